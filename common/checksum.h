#pragma once
// Content checks for self-tests and verification passes: SHA-256 via OpenSSL libcrypto,
// and a fast deterministic pattern generator so two peers can agree on data without sending it.
#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

namespace ibdisk {

using Sha256 = std::array<std::uint8_t, 32>;

// SHA-256 of the bytes, raw and as lowercase hex.
Sha256 sha256(std::span<const std::byte> data);
std::string to_hex(const Sha256& digest);
inline std::string sha256_hex(std::span<const std::byte> data) { return to_hex(sha256(data)); }

// Fills buf with a pseudo-random pattern determined by seed (xorshift64*).
void fill_pattern(std::span<std::byte> buf, std::uint64_t seed);

}  // namespace ibdisk
