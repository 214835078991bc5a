#include "common/checksum.h"

#include <cstring>
#include <stdexcept>

#include <openssl/evp.h>

namespace ibdisk {

Sha256 sha256(std::span<const std::byte> data) {
  Sha256 digest{};
  unsigned int len = 0;
  if (EVP_Digest(data.data(), data.size(), digest.data(), &len, EVP_sha256(), nullptr) != 1 ||
      len != digest.size()) {
    throw std::runtime_error("EVP_Digest(sha256) failed");
  }
  return digest;
}

std::string to_hex(const Sha256& digest) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  out.reserve(digest.size() * 2);
  for (const auto b : digest) {
    out.push_back(kHex[b >> 4]);
    out.push_back(kHex[b & 0xf]);
  }
  return out;
}

void fill_pattern(std::span<std::byte> buf, std::uint64_t seed) {
  std::uint64_t x = seed ? seed : 0x9e3779b97f4a7c15ULL;
  std::size_t i = 0;
  for (; i + 8 <= buf.size(); i += 8) {
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    const std::uint64_t v = x * 0x2545f4914f6cdd1dULL;
    std::memcpy(buf.data() + i, &v, 8);
  }
  for (; i < buf.size(); ++i) buf[i] = static_cast<std::byte>(x >> (8 * (i % 8)));
}

}  // namespace ibdisk
