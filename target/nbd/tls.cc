#include "target/nbd/tls.h"

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <unistd.h>

#include <cerrno>

#include <cctype>

#include "common/auth.h"
#include "common/error.h"

namespace ibdisk::nbd {
namespace {

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// The index of the NbdTls in its SSL_CTX's ex_data.
int tls_index() {
  static const int index = SSL_CTX_get_ex_new_index(0, nullptr, nullptr, nullptr, nullptr);
  return index;
}

// The index of a connection's PskAttempt in its SSL's ex_data (Asio keeps its own pointer in
// the SSL's app data).
int attempt_index() {
  static const int index = SSL_get_ex_new_index(0, nullptr, nullptr, nullptr, nullptr);
  return index;
}

// TLS 1.3 external PSK, server side: the client names an identity; a known one gets a session
// made from its key (TLS_AES_128_GCM_SHA256: SHA-256 is the hash GnuTLS uses for external
// PSKs). An unknown identity gets no session, and the handshake fails (no certificate to fall
// back on).
int find_psk_session(SSL* ssl, const unsigned char* identity, std::size_t identity_len, SSL_SESSION** sess) {
  *sess = nullptr;
  const auto* tls = static_cast<const NbdTls*>(SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), tls_index()));
  if (tls == nullptr) return 0;
  const std::string_view id(reinterpret_cast<const char*>(identity), identity_len);
  auto* attempt = static_cast<PskAttempt*>(SSL_get_ex_data(ssl, attempt_index()));
  if (attempt != nullptr) {
    attempt->offered = true;
    attempt->identity.assign(id.substr(0, 128));
  }
  for (const PskKey& k : tls->keys()) {
    if (k.identity != id) continue;
    if (attempt != nullptr) attempt->known = true;
    static constexpr unsigned char kAes128GcmSha256[] = {0x13, 0x01};
    const SSL_CIPHER* cipher = SSL_CIPHER_find(ssl, kAes128GcmSha256);
    SSL_SESSION* s = SSL_SESSION_new();
    if (cipher == nullptr || s == nullptr ||
        !SSL_SESSION_set1_master_key(s, reinterpret_cast<const unsigned char*>(k.key.data()), k.key.size()) ||
        !SSL_SESSION_set_cipher(s, cipher) || !SSL_SESSION_set_protocol_version(s, TLS1_3_VERSION)) {
      SSL_SESSION_free(s);
      return 0;
    }
    *sess = s;
    return 1;
  }
  return 1;  // not ours: no PSK, and so no handshake
}

}  // namespace

std::vector<PskKey> parse_psk_keys(const std::string& text, const std::string& where) {
  std::vector<PskKey> keys;
  std::size_t line_no = 0;
  for (std::size_t pos = 0; pos < text.size();) {
    const auto end = std::min(text.find('\n', pos), text.size());
    std::string line = text.substr(pos, end - pos);
    pos = end + 1;
    ++line_no;
    while (!line.empty() && std::isspace(static_cast<unsigned char>(line.back()))) line.pop_back();
    if (line.empty()) continue;
    const std::string at = where + ", line " + std::to_string(line_no);
    const auto colon = line.find(':');
    if (colon == std::string::npos || colon == 0) {
      throw SystemError(at, std::string("not IDENTITY:HEXKEY (the format of GnuTLS's psktool)"),
                        "make one with `ibdisk keygen --psktool FILE` or `psktool -u NAME -p FILE`");
    }
    const std::string hex = line.substr(colon + 1);
    PskKey k{line.substr(0, colon), {}};
    for (std::size_t i = 0; i + 1 < hex.size(); i += 2) {
      const int hi = hex_value(hex[i]);
      const int lo = hex_value(hex[i + 1]);
      if (hi < 0 || lo < 0) break;
      k.key.push_back(static_cast<char>(hi * 16 + lo));
    }
    if (hex.size() % 2 != 0 || k.key.size() * 2 != hex.size()) {
      throw SystemError(at, "the key of '" + k.identity + "' is not hexadecimal", "write it as psktool does: hex digits only");
    }
    if (k.key.size() < 16) {
      throw SystemError(at, "the key of '" + k.identity + "' has " + std::to_string(k.key.size()) +
                                " bytes, at least 16 are needed",
                        "make a new one with `ibdisk keygen --psktool FILE`");
    }
    for (const auto& other : keys) {
      if (other.identity == k.identity) {
        throw SystemError(at, "identity '" + k.identity + "' appears twice", "keep one key per identity");
      }
    }
    keys.push_back(std::move(k));
  }
  if (keys.empty()) {
    throw SystemError(where, std::string("holds no key"), "make one with `ibdisk keygen --psktool FILE`");
  }
  return keys;
}

void PskAttempt::watch(SSL* ssl) { SSL_set_ex_data(ssl, attempt_index(), this); }

std::string PskAttempt::failure(const std::string& tls_error, const NbdTls& tls) const {
  if (tls.keys().empty()) {
    return tls_error + " (a client needs TLS 1.2 or 1.3 and a certificate signed by " + tls.source() + "/ca-cert.pem)";
  }
  std::string printable;
  for (const char c : identity) printable.push_back(std::isprint(static_cast<unsigned char>(c)) ? c : '?');
  if (!offered) {
    return "the client offered no pre-shared key (" + tls_error + "): it needs a key of " + tls.source() +
           " (tls-psk-file)";
  }
  if (!known) return "the client's identity '" + printable + "' is not in " + tls.source() + " (" + tls_error + ")";
  return "the client's key for identity '" + printable + "' is not the one in " + tls.source() + " (" + tls_error + ")";
}

std::string PskAttempt::who(SSL* ssl) const {
  if (known) return "identity '" + identity + "'";
  X509* cert = SSL_get1_peer_certificate(ssl);
  if (cert == nullptr) return "no client certificate";
  char name[256];
  X509_NAME_oneline(X509_get_subject_name(cert), name, sizeof name);
  X509_free(cert);
  return std::string("certificate '") + name + "'";
}

NbdTls::NbdTls(std::vector<PskKey> keys, std::string source)
    : context_(boost::asio::ssl::context::tls_server), keys_(std::move(keys)), source_(std::move(source)) {
  SSL_CTX* ctx = context_.native_handle();
  // TLS 1.3 only: the PSK modes of 1.2 have no forward secrecy unless the client asks.
  if (SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION) != 1 || SSL_CTX_set_max_proto_version(ctx, TLS1_3_VERSION) != 1) {
    throw SystemError("TLS for the NBD front end", std::string("OpenSSL has no TLS 1.3"), "install OpenSSL 1.1.1 or later");
  }
  SSL_CTX_set_num_tickets(ctx, 0);  // no resumption: every connection proves its key again
  // Ours first: AES-128-GCM (AES-NI on any x86 of the last decade) before ChaCha20, which
  // GnuTLS lists first once AES-256-GCM-SHA384 is out.
  SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET | SSL_OP_CIPHER_SERVER_PREFERENCE);
  if (keys_.empty()) return;  // X.509: x509_dir() loads the certificates
  // The suites whose hash is SHA-256, the hash of the PSKs (OpenSSL skips a PSK whose hash
  // is not the chosen suite's, and would choose AES-256-GCM-SHA384 first).
  if (SSL_CTX_set_ciphersuites(ctx, "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256") != 1) {
    throw SystemError("TLS for the NBD front end", std::string("OpenSSL refused the TLS 1.3 cipher suites"));
  }
  SSL_CTX_set_ex_data(ctx, tls_index(), this);
  SSL_CTX_set_psk_find_session_callback(ctx, find_psk_session);
  description_ = "TLS 1.3 with a pre-shared key from " + source_ + " (" + std::to_string(keys_.size()) +
                 (keys_.size() == 1 ? " identity)" : " identities)");
}

std::shared_ptr<NbdTls> NbdTls::x509_dir(const std::string& dir) {
  auto tls = std::shared_ptr<NbdTls>(new NbdTls({}, dir));
  SSL_CTX* ctx = tls->context_.native_handle();
  // The kernel's nbd-client (3.24, GnuTLS) speaks TLS 1.2 only: allow it, with ephemeral
  // (EC)DHE and AEAD suites only.
  if (SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION) != 1 ||
      SSL_CTX_set_cipher_list(ctx, "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL") != 1) {
    throw SystemError("TLS for the NBD front end", std::string("OpenSSL refused the TLS 1.2 settings"));
  }
  const std::string ca = dir + "/ca-cert.pem", cert = dir + "/server-cert.pem", key = dir + "/server-key.pem";
  const std::string layout = "DIR holds ca-cert.pem, server-cert.pem and server-key.pem, as for nbdkit --tls-certificates";
  const auto ssl_error = [] {
    char buf[256];
    ERR_error_string_n(ERR_get_error(), buf, sizeof buf);
    ERR_clear_error();
    return std::string(buf);
  };
  for (const auto& f : {ca, cert, key}) {
    if (::access(f.c_str(), R_OK) != 0) throw SystemError("reading " + f, errno, layout);
  }
  if (SSL_CTX_use_certificate_chain_file(ctx, cert.c_str()) != 1) throw SystemError("loading " + cert, ssl_error(), layout);
  if (SSL_CTX_use_PrivateKey_file(ctx, key.c_str(), SSL_FILETYPE_PEM) != 1) throw SystemError("loading " + key, ssl_error(), layout);
  if (SSL_CTX_check_private_key(ctx) != 1) {
    throw SystemError(key, std::string("not the key of ") + cert, "give the key the certificate was made for");
  }
  if (SSL_CTX_load_verify_locations(ctx, ca.c_str(), nullptr) != 1) throw SystemError("loading " + ca, ssl_error(), layout);
  // A client proves itself with a certificate signed by the CA: without one it gets nothing.
  SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, nullptr);
  tls->description_ = "TLS 1.2 or 1.3 with X.509 certificates from " + dir + " (clients need a certificate signed by " + ca + ")";
  return tls;
}

std::shared_ptr<NbdTls> NbdTls::psk(std::vector<PskKey> keys, std::string source) {
  return std::shared_ptr<NbdTls>(new NbdTls(std::move(keys), std::move(source)));
}

std::shared_ptr<NbdTls> NbdTls::psk_file(const std::string& path) {
  const std::string text = read_key_file(path, KeyUser::kPskFile);
  return psk(parse_psk_keys(text, "key file " + path), path);
}

std::shared_ptr<NbdTls> NbdTls::from_spec(const std::string& spec) {
  if (spec.rfind("psk:", 0) == 0 && spec.size() > 4) return psk_file(spec.substr(4));
  if (spec.rfind("x509:", 0) == 0 && spec.size() > 5) return x509_dir(spec.substr(5));
  throw SystemError("--nbd-tls " + spec, std::string("not a TLS setting this server knows"),
                    "give psk:FILE (a psktool key file; make one with `ibdisk keygen --psktool FILE`) or x509:DIR "
                    "(ca-cert.pem, server-cert.pem, server-key.pem)");
}

void write_new_psk_file(const std::string& path, const std::string& identity) {
  if (identity.empty() || identity.find_first_of(": \t\r\n") != std::string::npos) {
    throw SystemError("identity '" + identity + "'", std::string("empty, or holds ':' or white space"),
                      "give a plain name, such as the client's host name");
  }
  write_new_key_file(path, identity + ":");
}

}  // namespace ibdisk::nbd
