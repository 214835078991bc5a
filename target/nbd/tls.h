#pragma once
// TLS for the NBD front end (NBD_OPT_STARTTLS; docs/nbd.md, "TLS"): TLS 1.3 with an external
// pre-shared key, from a key file in the format GnuTLS's psktool writes (`identity:hexkey`
// lines), which nbdkit, qemu-nbd, qemu-img and libnbd (nbdinfo, nbdcopy) read. OpenSSL, the
// library the rest of ibdisk already links.
#include <memory>
#include <string>
#include <vector>

#include "transport/tcp/asio.h"
#include <boost/asio/ssl.hpp>

namespace ibdisk::nbd {

struct PskKey {
  std::string identity;
  std::string key;  // the raw bytes (the file holds them in hex)
};

// Parses a psktool key file's text: one `identity:hexkey` per line, blank lines ignored.
// Throws SystemError naming `where` (the file), the line and the fix.
std::vector<PskKey> parse_psk_keys(const std::string& text, const std::string& where);

// What serves TLS to NBD clients: a server context (TLS 1.3 only, PSK only: no certificate)
// and the keys it accepts.
class NbdTls {
 public:
  // Reads a key file (mode 0600, as `ibdisk keygen --psktool` writes it).
  static std::shared_ptr<NbdTls> psk_file(const std::string& path);
  static std::shared_ptr<NbdTls> psk(std::vector<PskKey> keys, std::string source);
  // The `serve --nbd-tls` value: "psk:FILE".
  static std::shared_ptr<NbdTls> from_spec(const std::string& spec);

  boost::asio::ssl::context& context() { return context_; }
  // For the log and `serve`'s banner: "TLS 1.3 with a pre-shared key from FILE (N identities)".
  const std::string& description() const { return description_; }
  const std::string& source() const { return source_; }
  const std::vector<PskKey>& keys() const { return keys_; }

 private:
  NbdTls(std::vector<PskKey> keys, std::string source);

  boost::asio::ssl::context context_;
  std::vector<PskKey> keys_;
  std::string source_;
  std::string description_;
};

// What a client's TLS handshake showed of its key: set by the server's PSK lookup on the
// connection's SSL object (watch()), read to say why a handshake failed.
struct PskAttempt {
  bool offered = false;  // the client offered a pre-shared key
  bool known = false;    // ... with an identity of the key file
  std::string identity;

  void watch(SSL* ssl);
  // "client identity 'bob' is not in FILE", "wrong key for identity 'alice'", ...
  std::string failure(const std::string& tls_error, const NbdTls& tls) const;
};

// Writes a new key file in psktool's format (`identity:` and 32 random bytes in hex, mode
// 0600); refuses to overwrite. The same file serves `--nbd-tls psk:FILE` and the NBD tools'
// tls-psk-file.
void write_new_psk_file(const std::string& path, const std::string& identity);

}  // namespace ibdisk::nbd
