#include "target/nbd/protocol.h"

#include <cerrno>

namespace ibdisk::nbd {

const char* to_string(Parse p) {
  switch (p) {
    case Parse::kOk: return "ok";
    case Parse::kTruncated: return "truncated";
    case Parse::kBadMagic: return "bad magic number";
    case Parse::kTooLarge: return "length too large";
    case Parse::kInvalid: return "invalid";
  }
  return "unknown parse result";
}

const char* option_name(std::uint32_t option) {
  switch (option) {
    case kOptExportName: return "NBD_OPT_EXPORT_NAME";
    case kOptAbort: return "NBD_OPT_ABORT";
    case kOptList: return "NBD_OPT_LIST";
    case kOptStartTls: return "NBD_OPT_STARTTLS";
    case kOptInfo: return "NBD_OPT_INFO";
    case kOptGo: return "NBD_OPT_GO";
    case kOptStructuredReply: return "NBD_OPT_STRUCTURED_REPLY";
    case kOptListMetaContext: return "NBD_OPT_LIST_META_CONTEXT";
    case kOptSetMetaContext: return "NBD_OPT_SET_META_CONTEXT";
    case kOptExtendedHeaders: return "NBD_OPT_EXTENDED_HEADERS";
  }
  return "unknown";
}

const char* command_name(std::uint16_t type) {
  switch (type) {
    case kCmdRead: return "NBD_CMD_READ";
    case kCmdWrite: return "NBD_CMD_WRITE";
    case kCmdDisc: return "NBD_CMD_DISC";
    case kCmdFlush: return "NBD_CMD_FLUSH";
    case kCmdTrim: return "NBD_CMD_TRIM";
    case kCmdCache: return "NBD_CMD_CACHE";
    case kCmdWriteZeroes: return "NBD_CMD_WRITE_ZEROES";
    case kCmdBlockStatus: return "NBD_CMD_BLOCK_STATUS";
  }
  return "unknown";
}

Parse parse_client_flags(std::span<const std::byte> bytes, std::uint32_t* flags) {
  if (bytes.size() < 4) return Parse::kTruncated;
  *flags = load<Be32>(bytes).get();
  if (*flags & ~(kClientFlagFixedNewstyle | kClientFlagNoZeroes)) return Parse::kInvalid;
  return Parse::kOk;
}

Parse parse_option_header(std::span<const std::byte> bytes, OptionHeader* out) {
  if (bytes.size() < sizeof(OptionHeaderWire)) return Parse::kTruncated;
  const auto w = load<OptionHeaderWire>(bytes);
  if (w.magic.get() != kOptionMagic) return Parse::kBadMagic;
  out->option = w.option.get();
  out->length = w.length.get();
  if (out->length > kMaxOptionLength) return Parse::kTooLarge;
  return Parse::kOk;
}

namespace {
bool is_protocol_string(std::string_view s) {
  return s.size() <= kMaxStringLength && s.find('\0') == std::string_view::npos;
}
}  // namespace

bool ExportQuery::requests(std::uint16_t type) const {
  for (std::size_t i = 0; i < info_count(); ++i) {
    if (info(i) == type) return true;
  }
  return false;
}

Parse parse_export_query(std::span<const std::byte> data, ExportQuery* out) {
  // u32 name length, name, u16 count, count x u16.
  if (data.size() < 6) return Parse::kInvalid;
  const std::uint32_t name_len = load<Be32>(data).get();
  if (name_len > data.size() - 6) return Parse::kInvalid;
  const auto rest = data.subspan(4 + name_len);
  const std::uint16_t count = load<Be16>(rest).get();
  if (rest.size() != 2 + 2 * static_cast<std::size_t>(count)) return Parse::kInvalid;
  out->name = {reinterpret_cast<const char*>(data.data() + 4), name_len};
  out->info_types = rest.subspan(2);
  if (!is_protocol_string(out->name)) return Parse::kInvalid;
  return Parse::kOk;
}

Parse parse_export_name(std::span<const std::byte> data, std::string_view* name) {
  *name = {reinterpret_cast<const char*>(data.data()), data.size()};
  return is_protocol_string(*name) ? Parse::kOk : Parse::kInvalid;
}

Parse parse_request(std::span<const std::byte> bytes, Request* out) {
  if (bytes.size() < sizeof(RequestWire)) return Parse::kTruncated;
  const auto w = load<RequestWire>(bytes);
  if (w.magic.get() != kRequestMagic) return Parse::kBadMagic;
  out->flags = w.flags.get();
  out->type = w.type.get();
  out->cookie = w.cookie.get();
  out->offset = w.offset.get();
  out->length = w.length.get();
  return Parse::kOk;
}

namespace {
bool beyond_end(const Request& r, std::uint64_t size) {
  return r.length > size || r.offset > size - r.length;
}
}  // namespace

Verdict check_request(const Request& r, const ExportLimits& x) {
  const std::uint16_t tf = x.transmission_flags;
  const bool read_only = tf & kFlagReadOnly;
  std::uint16_t allowed = (tf & kFlagSendFua) ? kCmdFlagFua : 0;
  bool writes = false;
  bool has_payload_limit = false;
  std::uint32_t range_error = kEinval;
  switch (r.type) {
    case kCmdRead:
      if (tf & kFlagSendDf) allowed |= kCmdFlagDf;
      has_payload_limit = true;
      break;
    case kCmdWrite:
      writes = true;
      has_payload_limit = true;
      range_error = kEnospc;
      break;
    case kCmdDisc:
      return {};
    case kCmdFlush:
      if (!(tf & kFlagSendFlush)) return {kEinval, "NBD_CMD_FLUSH was not offered for this export"};
      if (r.flags & ~allowed) return {kEinval, "command flags not valid for NBD_CMD_FLUSH"};
      if (r.offset != 0 || r.length != 0) return {kEinval, "NBD_CMD_FLUSH must have offset and length 0"};
      return {};
    case kCmdTrim:
      if (!(tf & kFlagSendTrim)) return {kEinval, "NBD_CMD_TRIM was not offered for this export"};
      writes = true;
      break;
    case kCmdCache:
      if (!(tf & kFlagSendCache)) return {kEinval, "NBD_CMD_CACHE was not offered for this export"};
      break;
    case kCmdBlockStatus:
      if (!x.block_status) return {kEinval, "NBD_CMD_BLOCK_STATUS without a metadata context selected (NBD_OPT_SET_META_CONTEXT)"};
      allowed |= kCmdFlagReqOne;
      break;
    case kCmdWriteZeroes:
      if (!(tf & kFlagSendWriteZeroes)) return {kEinval, "NBD_CMD_WRITE_ZEROES was not offered for this export"};
      allowed |= kCmdFlagNoHole;
      writes = true;
      range_error = kEnospc;
      break;
    default:
      return {kEinval, "unknown or unsupported command"};
  }
  if (r.flags & ~allowed) return {kEinval, "command flags not valid for this command"};
  if (writes && read_only) return {kEperm, "the export is read-only"};
  if (r.length == 0) return {kEinval, "zero-length request"};
  if (has_payload_limit && r.length > x.max_payload) {
    return {kEinval, "request larger than the maximum block size the server advertised"};
  }
  if (beyond_end(r, x.size)) return {range_error, "request extends beyond the end of the export"};
  return {};
}

std::uint32_t wire_error_from_errno(int err) {
  if (err < 0) err = -err;
  switch (err) {
    case 0: return 0;
    case EPERM:
    case EACCES:
    case EROFS: return kEperm;
    case EIO: return kEio;
    case ENOMEM: return kEnomem;
    case EINVAL: return kEinval;
    case ENOSPC:
    case EFBIG:
    case EDQUOT: return kEnospc;
    case EOVERFLOW: return kEoverflow;
    case ENOTSUP: return kEnotsup;
    case ESHUTDOWN: return kEshutdown;
    default: return kEio;
  }
}

GreetingWire make_greeting() {
  GreetingWire g;
  g.magic.set(kNbdMagic);
  g.option_magic.set(kOptionMagic);
  g.handshake_flags.set(kFlagFixedNewstyle | kFlagNoZeroes);
  return g;
}

namespace {
void append(std::vector<std::byte>& out, std::span<const std::byte> bytes) {
  out.insert(out.end(), bytes.begin(), bytes.end());
}
void append(std::vector<std::byte>& out, std::string_view s) {
  append(out, std::span(reinterpret_cast<const std::byte*>(s.data()), s.size()));
}
void append_reply_header(std::vector<std::byte>& out, std::uint32_t option, std::uint32_t type,
                         std::size_t length) {
  OptionReplyHeaderWire h;
  h.magic.set(kOptionReplyMagic);
  h.option.set(option);
  h.type.set(type);
  h.length.set(static_cast<std::uint32_t>(length));
  append(out, bytes_of(h));
}
std::string_view clip(std::string_view s) { return s.substr(0, kMaxStringLength); }
}  // namespace

void append_option_reply(std::vector<std::byte>& out, std::uint32_t option, std::uint32_t type,
                         std::span<const std::byte> data) {
  append_reply_header(out, option, type, data.size());
  append(out, data);
}

void append_option_error(std::vector<std::byte>& out, std::uint32_t option, std::uint32_t type,
                         std::string_view message) {
  message = clip(message);
  append_reply_header(out, option, type, message.size());
  append(out, message);
}

void append_rep_server(std::vector<std::byte>& out, std::uint32_t option, std::string_view name) {
  name = clip(name);
  append_reply_header(out, option, kRepServer, 4 + name.size());
  Be32 len;
  len.set(static_cast<std::uint32_t>(name.size()));
  append(out, bytes_of(len));
  append(out, name);
}

void append_meta_context(std::vector<std::byte>& out, std::uint32_t option, std::uint32_t id, std::string_view name) {
  name = clip(name);
  append_reply_header(out, option, kRepMetaContext, 4 + name.size());
  Be32 v;
  v.set(id);
  append(out, bytes_of(v));
  append(out, name);
}

void append_info_export(std::vector<std::byte>& out, std::uint32_t option, std::uint64_t size,
                        std::uint16_t transmission_flags) {
  InfoExportWire w;
  w.type.set(kInfoExport);
  w.size.set(size);
  w.transmission_flags.set(transmission_flags);
  append_option_reply(out, option, kRepInfo, bytes_of(w));
}

void append_info_string(std::vector<std::byte>& out, std::uint32_t option, std::uint16_t info_type,
                        std::string_view text) {
  text = clip(text);
  append_reply_header(out, option, kRepInfo, 2 + text.size());
  Be16 type;
  type.set(info_type);
  append(out, bytes_of(type));
  append(out, text);
}

void append_info_block_size(std::vector<std::byte>& out, std::uint32_t option, std::uint32_t minimum,
                            std::uint32_t preferred, std::uint32_t maximum) {
  InfoBlockSizeWire w;
  w.type.set(kInfoBlockSize);
  w.minimum.set(minimum);
  w.preferred.set(preferred);
  w.maximum.set(maximum);
  append_option_reply(out, option, kRepInfo, bytes_of(w));
}

void append_export_name_reply(std::vector<std::byte>& out, std::uint64_t size,
                              std::uint16_t transmission_flags, bool no_zeroes) {
  ExportNameReplyWire w;
  w.size.set(size);
  w.transmission_flags.set(transmission_flags);
  append(out, bytes_of(w));
  if (!no_zeroes) out.resize(out.size() + kExportNameZeroes, std::byte{0});
}

SimpleReplyWire make_simple_reply(std::uint64_t cookie, std::uint32_t error) {
  SimpleReplyWire w;
  w.magic.set(kSimpleReplyMagic);
  w.error.set(error);
  w.cookie.set(cookie);
  return w;
}

StructuredReplyWire make_chunk(std::uint16_t flags, std::uint16_t type, std::uint64_t cookie,
                               std::uint32_t payload_length) {
  StructuredReplyWire w;
  w.magic.set(kStructuredReplyMagic);
  w.flags.set(flags);
  w.type.set(type);
  w.cookie.set(cookie);
  w.length.set(payload_length);
  return w;
}

ReadChunkWire make_read_chunk(std::uint64_t cookie, std::uint64_t offset, std::uint32_t length) {
  ReadChunkWire w;
  w.header = make_chunk(kReplyFlagDone, kReplyOffsetData, cookie,
                        static_cast<std::uint32_t>(sizeof(OffsetDataChunkWire) + length));
  w.data.offset.set(offset);
  return w;
}

ErrorReplyWire make_error_chunk(std::uint64_t cookie, std::uint32_t error, std::uint16_t message_length) {
  ErrorReplyWire w;
  w.header = make_chunk(kReplyFlagDone, kReplyError, cookie,
                        static_cast<std::uint32_t>(sizeof(ErrorChunkWire) + message_length));
  w.error.error.set(error);
  w.error.message_length.set(message_length);
  return w;
}

BlockStatusChunkWire make_block_status_chunk(std::uint64_t cookie, std::uint32_t context_id, std::uint32_t count) {
  BlockStatusChunkWire w;
  w.chunk = make_chunk(kReplyFlagDone, kReplyBlockStatus, cookie,
                       static_cast<std::uint32_t>(4 + count * sizeof(BlockDescriptorWire)));
  w.context_id.set(context_id);
  return w;
}

Parse parse_meta_context_query(std::span<const std::byte> data, MetaContextQuery* out) {
  // u32 name length, name, u32 count, count x (u32 length, string).
  if (data.size() < 8) return Parse::kInvalid;
  const std::uint32_t name_len = load<Be32>(data).get();
  if (name_len > data.size() - 8) return Parse::kInvalid;
  out->name = {reinterpret_cast<const char*>(data.data() + 4), name_len};
  if (!is_protocol_string(out->name)) return Parse::kInvalid;
  auto rest = data.subspan(4 + name_len);
  const std::uint32_t count = load<Be32>(rest).get();
  rest = rest.subspan(4);
  // Each query takes at least 4 bytes: a count the data cannot hold is malformed.
  if (count > rest.size() / 4) return Parse::kInvalid;
  out->queries.clear();
  for (std::uint32_t i = 0; i < count; ++i) {
    if (rest.size() < 4) return Parse::kInvalid;
    const std::uint32_t len = load<Be32>(rest).get();
    if (len > rest.size() - 4) return Parse::kInvalid;
    const std::string_view q{reinterpret_cast<const char*>(rest.data() + 4), len};
    if (!is_protocol_string(q)) return Parse::kInvalid;
    out->queries.push_back(q);
    rest = rest.subspan(4 + len);
  }
  return rest.empty() ? Parse::kOk : Parse::kInvalid;
}

}  // namespace ibdisk::nbd
