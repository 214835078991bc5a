#include "target/nbd/handshake.h"

#include <algorithm>

namespace ibdisk::nbd {

std::uint16_t transmission_flags(const ExportFacts& facts, bool structured) {
  // CACHE is a hint: a prefetch into the page cache where reads use it, else answered as done.
  std::uint16_t f = kFlagHasFlags | kFlagSendFlush | kFlagSendFua | kFlagSendCache;
  if (facts.read_only) {
    f |= kFlagReadOnly;
  } else {
    f |= kFlagSendWriteZeroes;
    if (facts.trim) f |= kFlagSendTrim;
  }
  // Every read goes out as one chunk, so "don't fragment" costs nothing.
  if (structured) f |= kFlagSendDf;
  // All connections share one backing file (one page cache, fdatasync on the same inode), so
  // FLUSH and FUA on one connection cover the others. Exclusive exports admit one writer
  // connection anyway: advertising multi-conn there would make nbdcopy open a second one.
  if (facts.read_only || facts.shared) f |= kFlagCanMultiConn;
  return f;
}

Handshake::Next Handshake::on_client_flags(std::span<const std::byte> bytes) {
  const Parse p = parse_client_flags(bytes, &client_flags_);
  if (p != Parse::kOk) {
    reason_ = std::string("client flags ") + to_string(p) +
              " (the client set flags this server did not offer; the protocol requires closing)";
    return Next::kClose;
  }
  return Next::kOption;
}

Handshake::Next Handshake::refuse(std::vector<std::byte>& out, std::uint32_t option, std::uint32_t type,
                                  std::string message) {
  append_option_error(out, option, type, message);
  last_error_ = type;
  reason_ = std::move(message);
  return Next::kOption;
}

std::string Handshake::resolve(std::string_view name) const {
  if (!name.empty()) return std::string(name);
  const auto all = catalog_.names();
  return all.size() == 1 ? all.front() : std::string();
}

namespace {
std::string joined(const std::vector<std::string>& names) {
  std::string s;
  for (const auto& n : names) s += (s.empty() ? "" : ", ") + n;
  return s.empty() ? "none" : s;
}

std::uint32_t refusal_reply(Refusal r) { return r == Refusal::kUnknown ? kRepErrUnknown : kRepErrPolicy; }
}  // namespace

Handshake::Next Handshake::on_option(std::uint32_t option, std::span<const std::byte> data,
                                     std::vector<std::byte>& out) {
  last_error_ = 0;
  if (++options_ > kMaxOptions) {
    reason_ = "more than " + std::to_string(kMaxOptions) + " options without entering transmission";
    return Next::kClose;
  }
  if (tls_mode_ == TlsMode::kRequired && !tls_ && option != kOptStartTls && option != kOptAbort) {
    if (option == kOptExportName) {
      // This option cannot carry an error: the protocol says to close.
      reason_ = "NBD_OPT_EXPORT_NAME before TLS: this server requires TLS (the client must send NBD_OPT_STARTTLS)";
      return Next::kClose;
    }
    return refuse(out, option, kRepErrTlsReqd,
                  "this server requires TLS: connect with TLS (nbds://, a tls-psk-file, or --tls-creds)");
  }
  switch (option) {
    case kOptExportName:
      return export_name(data, out);
    case kOptAbort:
      append_option_reply(out, option, kRepAck);
      reason_ = "client aborted the handshake (NBD_OPT_ABORT)";
      return Next::kClose;
    case kOptList:
      if (!data.empty()) return refuse(out, option, kRepErrInvalid, "NBD_OPT_LIST takes no data");
      for (const auto& n : catalog_.names()) append_rep_server(out, option, n);
      append_option_reply(out, option, kRepAck);
      return Next::kOption;
    case kOptStartTls:
      return start_tls(data, out);
    case kOptInfo:
    case kOptGo:
      return info_or_go(option, data, out);
    case kOptStructuredReply:
      if (!data.empty()) return refuse(out, option, kRepErrInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data");
      structured_ = true;
      append_option_reply(out, option, kRepAck);
      return Next::kOption;
    case kOptListMetaContext:
    case kOptSetMetaContext:
      return meta_context(option, data, out);
    default:
      return refuse(out, option, kRepErrUnsup, "option " + std::to_string(option) + " is not supported by this server");
  }
}

Handshake::Next Handshake::start_tls(std::span<const std::byte> data, std::vector<std::byte>& out) {
  if (tls_mode_ == TlsMode::kOff) {
    return refuse(out, kOptStartTls, kRepErrPolicy,
                  "this server does not offer TLS; it serves plain NBD to the networks it allows");
  }
  if (tls_) return refuse(out, kOptStartTls, kRepErrInvalid, "TLS is already established on this connection");
  if (!data.empty()) return refuse(out, kOptStartTls, kRepErrInvalid, "NBD_OPT_STARTTLS takes no data");
  append_option_reply(out, kOptStartTls, kRepAck);
  return Next::kStartTls;
}

void Handshake::tls_established() {
  tls_ = true;
  structured_ = false;
  meta_selected_ = false;
  meta_export_.clear();
}

Handshake::Next Handshake::info_or_go(std::uint32_t option, std::span<const std::byte> data,
                                      std::vector<std::byte>& out) {
  const char* what = option == kOptGo ? "NBD_OPT_GO" : "NBD_OPT_INFO";
  ExportQuery q;
  if (parse_export_query(data, &q) != Parse::kOk) {
    return refuse(out, option, kRepErrInvalid,
                  std::string(what) + " data is malformed (name length, info count and option length disagree)");
  }
  const std::string name = resolve(q.name);
  if (name.empty()) {
    return refuse(out, option, kRepErrUnknown,
                  "no default export here: name one of the exports (" + joined(catalog_.names()) + ")");
  }
  CatalogAnswer a = option == kOptGo ? catalog_.open(name) : catalog_.probe(name);
  if (a.refusal != Refusal::kNone) return refuse(out, option, refusal_reply(a.refusal), std::move(a.message));

  const std::uint16_t flags = transmission_flags(a.facts, structured_);
  append_info_export(out, option, a.facts.size, flags);
  if (q.requests(kInfoName)) append_info_string(out, option, kInfoName, a.facts.name);
  if (q.requests(kInfoBlockSize)) {
    // Any alignment works (unaligned I/O goes through the page cache); the logical block
    // size, at least a page, is what is fast.
    const std::uint32_t preferred = std::clamp<std::uint32_t>(a.facts.block_size, 4096, kMaxPayload);
    append_info_block_size(out, option, 1, preferred, kMaxPayload);
  }
  append_option_reply(out, option, kRepAck);
  if (option == kOptInfo) return Next::kOption;
  const bool block_status = block_status_for(a.facts.name);
  transmission_ = {std::move(a.facts), flags, structured_, block_status};
  return Next::kTransmission;
}

Handshake::Next Handshake::meta_context(std::uint32_t option, std::span<const std::byte> data,
                                        std::vector<std::byte>& out) {
  const bool set = option == kOptSetMetaContext;
  const char* what = set ? "NBD_OPT_SET_META_CONTEXT" : "NBD_OPT_LIST_META_CONTEXT";
  if (set) meta_selected_ = false;  // each SET replaces the selection, also when it fails
  if (set && !structured_) {
    return refuse(out, option, kRepErrInvalid, std::string(what) + " needs structured replies (NBD_OPT_STRUCTURED_REPLY) first");
  }
  MetaContextQuery q;
  if (parse_meta_context_query(data, &q) != Parse::kOk) {
    return refuse(out, option, kRepErrInvalid,
                  std::string(what) + " data is malformed (name length, query count and option length disagree)");
  }
  const std::string name = resolve(q.name);
  const auto names = catalog_.names();
  if (name.empty() || std::find(names.begin(), names.end(), name) == names.end()) {
    return refuse(out, option, kRepErrUnknown,
                  "no export named '" + std::string(q.name) + "' (this target exports: " + joined(names) + ")");
  }
  // LIST: no query, or "base:" (the namespace), lists every context; SET takes exact names.
  bool match = !set && q.queries.empty();
  for (const std::string_view query : q.queries) {
    if (query == kBaseAllocation || (!set && query == "base:")) match = true;
  }
  if (match) append_meta_context(out, option, kBaseAllocationId, kBaseAllocation);
  if (set) {
    meta_selected_ = match;
    meta_export_ = name;
  }
  append_option_reply(out, option, kRepAck);
  return Next::kOption;
}

Handshake::Next Handshake::export_name(std::span<const std::byte> data, std::vector<std::byte>& out) {
  std::string_view requested;
  if (parse_export_name(data, &requested) != Parse::kOk) {
    reason_ = "NBD_OPT_EXPORT_NAME with a malformed name";
    return Next::kClose;
  }
  const std::string name = resolve(requested);
  if (name.empty()) {
    reason_ = "no default export here: name one of the exports (" + joined(catalog_.names()) + ")";
    return Next::kClose;
  }
  CatalogAnswer a = catalog_.open(name);
  if (a.refusal != Refusal::kNone) {
    // This option cannot carry an error: the protocol says to close.
    reason_ = std::move(a.message);
    return Next::kClose;
  }
  const std::uint16_t flags = transmission_flags(a.facts, structured_);
  append_export_name_reply(out, a.facts.size, flags, no_zeroes());
  const bool block_status = block_status_for(a.facts.name);
  transmission_ = {std::move(a.facts), flags, structured_, block_status};
  return Next::kTransmission;
}

}  // namespace ibdisk::nbd
