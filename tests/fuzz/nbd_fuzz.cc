// Fuzzes the NBD front end's parsers as a server sees them: the input is a client's byte
// stream (client flags, options with their data, then transmission requests with payloads).
// Checks that every reply the handshake produces is well framed, that a server requiring TLS
// answers nothing but STARTTLS before it, and that request checks never pass a request that
// reaches beyond the export.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <span>

#include "target/nbd/handshake.h"
#include "target/nbd/protocol.h"

namespace {
using namespace ibdisk::nbd;

class Catalog : public ExportCatalog {
 public:
  explicit Catalog(bool busy) : busy_(busy) {}
  std::vector<std::string> names() const override { return {"disk", "iso"}; }
  CatalogAnswer probe(std::string_view name) override {
    CatalogAnswer a;
    if (name == "disk") {
      a.facts = {"disk", 1 << 20, 512, false, false, true};
      if (busy_) {
        a.refusal = Refusal::kPolicy;
        a.message = "busy";
      }
    } else if (name == "iso") {
      a.facts = {"iso", 3 * 4096 + 17, 4096, true, false, false};
    } else {
      a.refusal = Refusal::kUnknown;
      a.message = "no export named '" + std::string(name) + "'";
    }
    return a;
  }
  CatalogAnswer open(std::string_view name) override { return probe(name); }

 private:
  bool busy_;
};

void require(bool ok) {
  if (!ok) std::abort();
}

// Every option reply: magic, and a length that matches what follows.
void check_replies(const std::vector<std::byte>& out, std::uint32_t option) {
  std::size_t pos = 0;
  while (pos < out.size()) {
    require(out.size() - pos >= sizeof(OptionReplyHeaderWire));
    const auto h = load<OptionReplyHeaderWire>(std::span(out).subspan(pos));
    require(h.magic.get() == kOptionReplyMagic);
    require(h.option.get() == option);
    pos += sizeof(h);
    require(h.length.get() <= out.size() - pos);
    pos += h.length.get();
  }
}

struct Stream {
  std::span<const std::uint8_t> in;
  bool take(std::size_t n, std::span<const std::byte>* out) {
    if (in.size() < n) return false;
    *out = std::as_bytes(in.first(n));
    in = in.subspan(n);
    return true;
  }
};
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 1) return 0;
  Catalog catalog(data[0] & 1);
  const bool tls_required = data[0] & 2;  // serve --nbd-tls: TLS before anything else
  Stream s{{data + 1, size - 1}};
  Handshake hs(catalog, tls_required ? TlsMode::kRequired : TlsMode::kOff);
  std::span<const std::byte> bytes;
  if (!s.take(4, &bytes) || hs.on_client_flags(bytes) != Handshake::Next::kOption) return 0;

  std::vector<std::byte> out;
  for (;;) {
    if (!s.take(sizeof(OptionHeaderWire), &bytes)) return 0;
    OptionHeader h;
    if (parse_option_header(bytes, &h) != Parse::kOk) return 0;
    std::span<const std::byte> payload;
    if (!s.take(h.length, &payload)) return 0;
    out.clear();
    const bool in_clear = tls_required && !hs.tls();
    const auto next = hs.on_option(h.option, payload, out);
    if (h.option != kOptExportName) check_replies(out, h.option);
    // Without TLS established, a server requiring it answers nothing but STARTTLS and ABORT.
    if (in_clear && h.option != kOptStartTls && h.option != kOptAbort) {
      require(next != Handshake::Next::kTransmission);
      require(h.option == kOptExportName || hs.last_error() == kRepErrTlsReqd);
    }
    if (next == Handshake::Next::kStartTls) {
      require(tls_required && !hs.tls());
      hs.tls_established();  // as if the TLS handshake succeeded
    }
    if (next == Handshake::Next::kClose) return 0;
    if (next == Handshake::Next::kTransmission) break;
  }

  const Transmission& t = hs.transmission();
  require(t.flags & kFlagHasFlags);
  const ExportLimits limits{t.facts.size, t.flags, kMaxPayload};
  for (;;) {
    if (!s.take(sizeof(RequestWire), &bytes)) return 0;
    Request r;
    if (parse_request(bytes, &r) != Parse::kOk) return 0;
    const Verdict v = check_request(r, limits);
    if (v.error == 0 && r.type != kCmdDisc && r.type != kCmdFlush) {
      require(r.length > 0 && r.length <= t.facts.size && r.offset <= t.facts.size - r.length);
      // A read-only export refuses every command that changes it; reads, CACHE and
      // BLOCK_STATUS are fine.
      const bool changes = r.type == kCmdWrite || r.type == kCmdTrim || r.type == kCmdWriteZeroes;
      require(!(t.flags & kFlagReadOnly) || !changes);
    }
    if (v.error != 0) require(v.message != nullptr);
    if (r.type == kCmdDisc && v.error == 0) return 0;
    std::span<const std::byte> payload;
    if (!s.take(request_payload(r), &payload)) return 0;
  }
}
