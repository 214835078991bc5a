#pragma once
// The NBD handshake (fixed newstyle) as a pure state machine: the server feeds it the client's
// flags and each option, and sends what it appends to `out`. Exports come through an
// ExportCatalog, so tests and the fuzzer drive it without sockets or files.
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "target/nbd/protocol.h"

namespace ibdisk::nbd {

struct ExportFacts {
  std::string name;
  std::uint64_t size = 0;
  std::uint32_t block_size = 512;  // the backing's logical block size
  bool read_only = false;
  bool shared = false;
  bool trim = false;
};

// Why the catalog refused an export; the handshake maps it to NBD_REP_ERR_UNKNOWN / _POLICY.
enum class Refusal { kNone, kUnknown, kPolicy };

struct CatalogAnswer {
  Refusal refusal = Refusal::kNone;
  std::string message;  // for the user when refused: the export, the reason, what to do
  ExportFacts facts;    // when not refused
};

// The handshake's view of the target's exports and their rules.
class ExportCatalog {
 public:
  virtual ~ExportCatalog() = default;
  virtual std::vector<std::string> names() const = 0;
  // Would open() succeed now? (NBD_OPT_INFO); holds nothing.
  virtual CatalogAnswer probe(std::string_view name) = 0;
  // Opens the export for the transmission phase (NBD_OPT_GO, NBD_OPT_EXPORT_NAME); the
  // catalog keeps the hold until the connection ends.
  virtual CatalogAnswer open(std::string_view name) = 0;
};

// What the transmission phase runs with, once the handshake is done.
struct Transmission {
  ExportFacts facts;
  std::uint16_t flags = 0;  // transmission flags as sent
  bool structured = false;  // NBD_OPT_STRUCTURED_REPLY was acknowledged
  bool block_status = false;  // base:allocation selected for this export (NBD_OPT_SET_META_CONTEXT)
};

// The transmission flags this server sends for an export.
std::uint16_t transmission_flags(const ExportFacts& facts, bool structured);

// Whether the server offers TLS (NBD_OPT_STARTTLS). When it does, it requires it: before TLS
// every option but STARTTLS and ABORT is refused with NBD_REP_ERR_TLS_REQD (the protocol's
// FORCEDTLS), so a client cannot be talked into plaintext.
enum class TlsMode { kOff, kRequired };

class Handshake {
 public:
  // Options a client may send before the connection is judged abusive and closed.
  static constexpr unsigned kMaxOptions = 1024;

  explicit Handshake(ExportCatalog& catalog, TlsMode tls = TlsMode::kOff) : catalog_(catalog), tls_mode_(tls) {}

  enum class Next {
    kOption,        // read the next option
    kTransmission,  // after sending `out`: the transmission phase (see transmission())
    kClose,         // after sending `out`: close the connection (reason() says why)
    kStartTls,      // after sending `out`: the TLS handshake, then tls_established() and kOption
  };

  // The client's 4 flag bytes. kClose on unknown flags (the protocol requires it).
  Next on_client_flags(std::span<const std::byte> bytes);
  // One option with its data (the caller parsed and length-checked the header).
  Next on_option(std::uint32_t option, std::span<const std::byte> data, std::vector<std::byte>& out);

  // The TLS handshake that followed kStartTls succeeded: options go on inside TLS, and what
  // was negotiated before it (structured replies, meta contexts) is forgotten, as the
  // protocol requires.
  void tls_established();
  bool tls() const { return tls_; }

  const Transmission& transmission() const { return transmission_; }
  // Why the handshake ended in kClose, or what the last refusal was: for the log.
  const std::string& reason() const { return reason_; }
  bool no_zeroes() const { return client_flags_ & kClientFlagNoZeroes; }
  // The error reply type sent for the last option, 0 when it succeeded.
  std::uint32_t last_error() const { return last_error_; }

 private:
  Next info_or_go(std::uint32_t option, std::span<const std::byte> data, std::vector<std::byte>& out);
  Next export_name(std::span<const std::byte> data, std::vector<std::byte>& out);
  Next meta_context(std::uint32_t option, std::span<const std::byte> data, std::vector<std::byte>& out);
  // Whether base:allocation was selected for the export the client goes to.
  bool block_status_for(const std::string& name) const { return structured_ && meta_selected_ && meta_export_ == name; }
  // The empty name means the default export: the only one, when there is exactly one.
  std::string resolve(std::string_view name) const;
  Next refuse(std::vector<std::byte>& out, std::uint32_t option, std::uint32_t type, std::string message);

  Next start_tls(std::span<const std::byte> data, std::vector<std::byte>& out);

  ExportCatalog& catalog_;
  TlsMode tls_mode_;
  bool tls_ = false;  // TLS is established
  std::uint32_t client_flags_ = 0;
  unsigned options_ = 0;
  bool structured_ = false;
  bool meta_selected_ = false;  // the last NBD_OPT_SET_META_CONTEXT selected base:allocation
  std::string meta_export_;     // ... for this export
  Transmission transmission_;
  std::string reason_;
  std::uint32_t last_error_ = 0;
};

}  // namespace ibdisk::nbd
