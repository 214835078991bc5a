#pragma once
// TLS for the NBD front end (NBD_OPT_STARTTLS; docs/nbd.md, "TLS"): TLS 1.3 with an external
// pre-shared key, from a key file in the format GnuTLS's psktool writes (`identity:hexkey`
// lines), which nbdkit, qemu-nbd, qemu-img and libnbd (nbdinfo, nbdcopy) read; or with X.509
// certificates, a client certificate required. OpenSSL, the library the rest of ibdisk
// already links.
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

// What serves TLS to NBD clients: a server context and the PSKs it accepts (TLS 1.3, PSK
// only: no certificate), or, with no PSKs, the server's certificate and the CA its clients'
// certificates must be signed by (TLS 1.2 or 1.3: the kernel's nbd-client speaks 1.2).
class NbdTls {
 public:
  // Reads a key file (mode 0600, as `ibdisk keygen --psktool` writes it).
  static std::shared_ptr<NbdTls> psk_file(const std::string& path);
  static std::shared_ptr<NbdTls> psk(std::vector<PskKey> keys, std::string source);
  // X.509 from a folder laid out as nbdkit's --tls-certificates: ca-cert.pem, server-cert.pem,
  // server-key.pem. Clients must show a certificate signed by ca-cert.pem.
  static std::shared_ptr<NbdTls> x509_dir(const std::string& dir);
  // The `serve --nbd-tls` value: "psk:FILE" or "x509:DIR".
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
  // Who got in, for the log: "identity 'alice'" or "certificate '/CN=client'".
  std::string who(SSL* ssl) const;
};

// Writes a new key file in psktool's format (`identity:` and 32 random bytes in hex, mode
// 0600); refuses to overwrite. The same file serves `--nbd-tls psk:FILE` and the NBD tools'
// tls-psk-file.
void write_new_psk_file(const std::string& path, const std::string& identity);

}  // namespace ibdisk::nbd
