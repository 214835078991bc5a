#pragma once
// Pre-shared-key authentication: HMAC-SHA256 challenge-response (OpenSSL libcrypto).
#include <string>
#include <string_view>

#include "common/checksum.h"

namespace ibdisk {

// Who reads a key file: the hint for a missing one differs. A target may make a new key; an
// initiator needs a copy of the target's, since a new one could never match.
// A psktool key file (`--nbd-tls psk:FILE`) is made with `ibdisk keygen --psktool`.
enum class KeyUser { kTarget, kInitiator, kPskFile };

// Reads a key file. Refuses (SystemError naming the file, the reason and what to do) a
// missing or unreadable file, one that group or others can read, or one shorter than 16
// bytes. Surrounding whitespace is not part of the key. A file of one `IDENTITY:HEXKEY` line
// (GnuTLS psktool's format, `ibdisk keygen --psktool`) holds the key HEXKEY: one file serves
// `--key-file` and the NBD tools' tls-psk-file.
std::string load_key_file(const std::string& path, KeyUser user = KeyUser::kTarget);
// The file's text, with the checks of load_key_file, for formats of several lines.
std::string read_key_file(const std::string& path, KeyUser user);

// Writes a new random key (32 bytes, hex) after `prefix` to path with mode 0600; refuses to
// overwrite.
void write_new_key_file(const std::string& path, const std::string& prefix = {});

Sha256 hmac_sha256(std::string_view key, std::string_view data);
bool constant_time_equal(std::string_view a, std::string_view b);
std::string random_bytes(std::size_t n);

// The MACs of proto/ibdisk.proto's Auth and Welcome messages.
std::string client_mac(std::string_view key, std::string_view server_nonce, std::string_view client_nonce);
std::string server_mac(std::string_view key, std::string_view server_nonce, std::string_view client_nonce);
// Auth.join_proof of a queue joining a session: HMAC-SHA256(session secret, "ibdisk-join-v1" ||
// server_nonce || client_nonce). The secret itself never crosses the wire again.
std::string join_proof(std::string_view session_secret, std::string_view server_nonce, std::string_view client_nonce);

}  // namespace ibdisk
