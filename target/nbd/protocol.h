#pragma once
// The NBD wire protocol (NetworkBlockDevice/nbd doc/proto.md): constants, fixed-size wire
// structs in network byte order, and parsing and encoding with no sockets, no logging and no
// allocation on the transmission path, so the handshake and the request parser can be
// unit-tested and fuzzed byte by byte. The server (server.h) moves these bytes over Asio.
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string_view>
#include <type_traits>
#include <vector>

namespace ibdisk::nbd {

// --- magic numbers --------------------------------------------------------------------------
inline constexpr std::uint64_t kNbdMagic = 0x4e42444d41474943;       // "NBDMAGIC"
inline constexpr std::uint64_t kOptionMagic = 0x49484156454f5054;    // "IHAVEOPT"
inline constexpr std::uint64_t kOptionReplyMagic = 0x3e889045565a9;
inline constexpr std::uint32_t kRequestMagic = 0x25609513;
inline constexpr std::uint32_t kSimpleReplyMagic = 0x67446698;
inline constexpr std::uint32_t kStructuredReplyMagic = 0x668e33ef;

// --- handshake flags (server, 16 bits) and client flags (32 bits) ---------------------------
inline constexpr std::uint16_t kFlagFixedNewstyle = 1u << 0;
inline constexpr std::uint16_t kFlagNoZeroes = 1u << 1;
inline constexpr std::uint32_t kClientFlagFixedNewstyle = 1u << 0;
inline constexpr std::uint32_t kClientFlagNoZeroes = 1u << 1;

// --- options and option replies -------------------------------------------------------------
enum Option : std::uint32_t {
  kOptExportName = 1,
  kOptAbort = 2,
  kOptList = 3,
  kOptStartTls = 5,
  kOptInfo = 6,
  kOptGo = 7,
  kOptStructuredReply = 8,
  kOptListMetaContext = 9,
  kOptSetMetaContext = 10,
  kOptExtendedHeaders = 11,
};

inline constexpr std::uint32_t kRepErrorBit = 1u << 31;
enum OptionReply : std::uint32_t {
  kRepAck = 1,
  kRepServer = 2,
  kRepInfo = 3,
  kRepMetaContext = 4,
  kRepErrUnsup = kRepErrorBit + 1,
  kRepErrPolicy = kRepErrorBit + 2,
  kRepErrInvalid = kRepErrorBit + 3,
  kRepErrPlatform = kRepErrorBit + 4,
  kRepErrTlsReqd = kRepErrorBit + 5,
  kRepErrUnknown = kRepErrorBit + 6,
  kRepErrShutdown = kRepErrorBit + 7,
  kRepErrBlockSizeReqd = kRepErrorBit + 8,
  kRepErrTooBig = kRepErrorBit + 9,
};

enum InfoType : std::uint16_t {
  kInfoExport = 0,
  kInfoName = 1,
  kInfoDescription = 2,
  kInfoBlockSize = 3,
};

// --- transmission flags (16 bits, sent with the export's size) ------------------------------
inline constexpr std::uint16_t kFlagHasFlags = 1u << 0;
inline constexpr std::uint16_t kFlagReadOnly = 1u << 1;
inline constexpr std::uint16_t kFlagSendFlush = 1u << 2;
inline constexpr std::uint16_t kFlagSendFua = 1u << 3;
inline constexpr std::uint16_t kFlagRotational = 1u << 4;
inline constexpr std::uint16_t kFlagSendTrim = 1u << 5;
inline constexpr std::uint16_t kFlagSendWriteZeroes = 1u << 6;
inline constexpr std::uint16_t kFlagSendDf = 1u << 7;
inline constexpr std::uint16_t kFlagCanMultiConn = 1u << 8;
inline constexpr std::uint16_t kFlagSendCache = 1u << 10;

// --- commands, command flags, structured reply types ----------------------------------------
enum Command : std::uint16_t {
  kCmdRead = 0,
  kCmdWrite = 1,
  kCmdDisc = 2,
  kCmdFlush = 3,
  kCmdTrim = 4,
  kCmdCache = 5,
  kCmdWriteZeroes = 6,
  kCmdBlockStatus = 7,
};

inline constexpr std::uint16_t kCmdFlagFua = 1u << 0;
inline constexpr std::uint16_t kCmdFlagNoHole = 1u << 1;
inline constexpr std::uint16_t kCmdFlagDf = 1u << 2;
inline constexpr std::uint16_t kCmdFlagReqOne = 1u << 3;
inline constexpr std::uint16_t kCmdFlagFastZero = 1u << 4;

inline constexpr std::uint16_t kReplyFlagDone = 1u << 0;
enum ReplyType : std::uint16_t {
  kReplyNone = 0,
  kReplyOffsetData = 1,
  kReplyOffsetHole = 2,
  kReplyBlockStatus = 5,
  kReplyError = (1u << 15) + 1,
  kReplyErrorOffset = (1u << 15) + 2,
};

// Error values on the wire: the protocol fixes them (they match Linux's errno numbers).
enum WireError : std::uint32_t {
  kEperm = 1,
  kEio = 5,
  kEnomem = 12,
  kEinval = 22,
  kEnospc = 28,
  kEoverflow = 75,
  kEnotsup = 95,
  kEshutdown = 108,
};

// --- metadata contexts ----------------------------------------------------------------------
// The one context this server offers: allocation, from the storage's extents.
inline constexpr std::string_view kBaseAllocation = "base:allocation";
inline constexpr std::uint32_t kBaseAllocationId = 1;
inline constexpr std::uint32_t kStateHole = 1u << 0;  // base:allocation: not allocated
inline constexpr std::uint32_t kStateZero = 1u << 1;  // base:allocation: reads as zeroes

// --- limits ---------------------------------------------------------------------------------
// Strings (export names, messages): the protocol's own ceiling.
inline constexpr std::size_t kMaxStringLength = 4096;
// An option's data: an OPT_GO with the longest name and every info type fits many times over.
// A longer option is a client we do not want: the connection closes.
inline constexpr std::uint32_t kMaxOptionLength = 16 * 1024;
// The largest READ or WRITE payload (advertised as the maximum block size).
inline constexpr std::uint32_t kMaxPayload = 32u << 20;
// Bytes of zeroes after the NBD_OPT_EXPORT_NAME reply unless the client negotiated NO_ZEROES.
inline constexpr std::size_t kExportNameZeroes = 124;

// A big-endian unsigned integer kept as bytes: alignment 1, so wire structs have no padding
// and may be copied to and from any byte offset.
template <typename T>
class BigEndian {
  static_assert(std::is_unsigned_v<T>);

 public:
  constexpr T get() const {
    T v = 0;
    for (const std::byte b : bytes_) v = static_cast<T>((v << 8) | std::to_integer<T>(b));
    return v;
  }
  constexpr void set(T v) {
    for (std::size_t i = sizeof(T); i-- > 0;) {
      bytes_[i] = static_cast<std::byte>(v & 0xffu);
      v = static_cast<T>(v >> 8);
    }
  }

 private:
  std::array<std::byte, sizeof(T)> bytes_{};
};
using Be16 = BigEndian<std::uint16_t>;
using Be32 = BigEndian<std::uint32_t>;
using Be64 = BigEndian<std::uint64_t>;

// --- wire structs ---------------------------------------------------------------------------
struct GreetingWire {  // S: right after connect
  Be64 magic;           // kNbdMagic
  Be64 option_magic;    // kOptionMagic
  Be16 handshake_flags;
};
struct OptionHeaderWire {  // C: before each option's data
  Be64 magic;               // kOptionMagic
  Be32 option;
  Be32 length;
};
struct OptionReplyHeaderWire {  // S: before each option reply's data
  Be64 magic;                    // kOptionReplyMagic
  Be32 option;
  Be32 type;
  Be32 length;
};
struct ExportNameReplyWire {  // S: answer to NBD_OPT_EXPORT_NAME (then 124 zeroes, or none)
  Be64 size;
  Be16 transmission_flags;
};
struct InfoExportWire {  // NBD_REP_INFO data, type NBD_INFO_EXPORT
  Be16 type;
  Be64 size;
  Be16 transmission_flags;
};
struct InfoBlockSizeWire {  // NBD_REP_INFO data, type NBD_INFO_BLOCK_SIZE
  Be16 type;
  Be32 minimum;
  Be32 preferred;
  Be32 maximum;
};
struct RequestWire {  // C: every transmission request (WRITE: payload follows)
  Be32 magic;          // kRequestMagic
  Be16 flags;
  Be16 type;
  Be64 cookie;         // "handle" in older texts: echoed in the reply
  Be64 offset;
  Be32 length;
};
struct SimpleReplyWire {  // S: (READ without structured replies: payload follows)
  Be32 magic;              // kSimpleReplyMagic
  Be32 error;
  Be64 cookie;
};
struct StructuredReplyWire {  // S: one chunk header; `length` bytes of payload follow
  Be32 magic;                  // kStructuredReplyMagic
  Be16 flags;
  Be16 type;
  Be64 cookie;
  Be32 length;
};
struct ErrorChunkWire {  // payload of NBD_REPLY_TYPE_ERROR (message follows)
  Be32 error;
  Be16 message_length;
};
struct OffsetDataChunkWire {  // payload of NBD_REPLY_TYPE_OFFSET_DATA (data follows)
  Be64 offset;
};

static_assert(sizeof(GreetingWire) == 18);
static_assert(sizeof(OptionHeaderWire) == 16);
static_assert(sizeof(OptionReplyHeaderWire) == 20);
static_assert(sizeof(ExportNameReplyWire) == 10);
static_assert(sizeof(InfoExportWire) == 12);
static_assert(sizeof(InfoBlockSizeWire) == 14);
static_assert(sizeof(RequestWire) == 28);
static_assert(sizeof(SimpleReplyWire) == 16);
static_assert(sizeof(StructuredReplyWire) == 20);
static_assert(sizeof(ErrorChunkWire) == 6);
static_assert(sizeof(OffsetDataChunkWire) == 8);
static_assert(std::is_trivially_copyable_v<RequestWire> && alignof(RequestWire) == 1);

// Copies a wire struct out of bytes; the caller checked there are enough.
template <typename Wire>
Wire load(std::span<const std::byte> bytes) {
  Wire w;
  std::memcpy(&w, bytes.data(), sizeof(Wire));
  return w;
}
template <typename Wire>
std::span<const std::byte> bytes_of(const Wire& w) {
  return {reinterpret_cast<const std::byte*>(&w), sizeof(Wire)};
}

// --- parsing --------------------------------------------------------------------------------
enum class Parse {
  kOk,
  kTruncated,  // fewer bytes than the structure needs
  kBadMagic,   // not the magic the protocol puts there: not an NBD peer, or out of step
  kTooLarge,   // a length beyond what this server accepts
  kInvalid,    // well framed but not allowed (unknown client flags, bad option data)
};
const char* to_string(Parse p);
// "NBD_OPT_GO", "NBD_CMD_WRITE", ...: for log lines; "unknown" otherwise.
const char* option_name(std::uint32_t option);
const char* command_name(std::uint16_t type);

// Client flags (4 bytes after the greeting). kInvalid: bits this server did not offer.
Parse parse_client_flags(std::span<const std::byte> bytes, std::uint32_t* flags);

struct OptionHeader {
  std::uint32_t option = 0;
  std::uint32_t length = 0;
};
// kBadMagic, kTooLarge (length > kMaxOptionLength), kTruncated.
Parse parse_option_header(std::span<const std::byte> bytes, OptionHeader* out);

// The data of NBD_OPT_INFO / NBD_OPT_GO: a name and a list of requested info types. Views
// into the option's bytes; no copy.
struct ExportQuery {
  std::string_view name;
  std::span<const std::byte> info_types;  // 2 bytes each, big-endian
  std::size_t info_count() const { return info_types.size() / 2; }
  std::uint16_t info(std::size_t i) const {
    return load<Be16>(info_types.subspan(2 * i, 2)).get();
  }
  bool requests(std::uint16_t type) const;
};
// kInvalid when the lengths inside disagree with the option length or the name is not a
// protocol string (longer than 4096 bytes, or contains NUL).
Parse parse_export_query(std::span<const std::byte> data, ExportQuery* out);

// The data of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT: an export name and
// queries (u32 length + string each). Views into the option's bytes.
struct MetaContextQuery {
  std::string_view name;
  std::vector<std::string_view> queries;
};
// kInvalid when a length disagrees with the option length or a string is not a protocol string.
Parse parse_meta_context_query(std::span<const std::byte> data, MetaContextQuery* out);

// NBD_OPT_EXPORT_NAME: the whole data is the name.
Parse parse_export_name(std::span<const std::byte> data, std::string_view* name);

struct Request {
  std::uint16_t flags = 0;
  std::uint16_t type = 0;
  std::uint64_t cookie = 0;
  std::uint64_t offset = 0;
  std::uint32_t length = 0;
};
// kBadMagic or kTruncated; any other content is judged by check_request.
Parse parse_request(std::span<const std::byte> bytes, Request* out);

// Bytes of payload that follow the request header on the wire, valid or not.
inline std::uint32_t request_payload(const Request& r) { return r.type == kCmdWrite ? r.length : 0; }

// What a request may do on this connection's export.
struct ExportLimits {
  std::uint64_t size = 0;
  std::uint16_t transmission_flags = kFlagHasFlags;
  std::uint32_t max_payload = kMaxPayload;
  bool block_status = false;  // base:allocation was selected (needs structured replies)
};
struct Verdict {
  std::uint32_t error = 0;          // a WireError, 0 when the request may go to storage
  const char* message = nullptr;    // for the client (structured replies) and the log
};
// Checks type, flags, length and range against the export without overflow. NBD_CMD_DISC
// passes (the server acts on it).
Verdict check_request(const Request& r, const ExportLimits& limits);

// A storage result (-errno or errno) as the protocol's error value.
std::uint32_t wire_error_from_errno(int err);

// --- encoding -------------------------------------------------------------------------------
GreetingWire make_greeting();
void append_option_reply(std::vector<std::byte>& out, std::uint32_t option, std::uint32_t type,
                         std::span<const std::byte> data = {});
// An error reply with a human message (cut to kMaxStringLength).
void append_option_error(std::vector<std::byte>& out, std::uint32_t option, std::uint32_t type,
                         std::string_view message);
void append_rep_server(std::vector<std::byte>& out, std::uint32_t option, std::string_view name);
void append_meta_context(std::vector<std::byte>& out, std::uint32_t option, std::uint32_t id, std::string_view name);
void append_info_export(std::vector<std::byte>& out, std::uint32_t option, std::uint64_t size,
                        std::uint16_t transmission_flags);
// NBD_INFO_NAME or NBD_INFO_DESCRIPTION.
void append_info_string(std::vector<std::byte>& out, std::uint32_t option, std::uint16_t info_type,
                        std::string_view text);
void append_info_block_size(std::vector<std::byte>& out, std::uint32_t option, std::uint32_t minimum,
                            std::uint32_t preferred, std::uint32_t maximum);
void append_export_name_reply(std::vector<std::byte>& out, std::uint64_t size,
                              std::uint16_t transmission_flags, bool no_zeroes);

SimpleReplyWire make_simple_reply(std::uint64_t cookie, std::uint32_t error);
StructuredReplyWire make_chunk(std::uint16_t flags, std::uint16_t type, std::uint64_t cookie,
                               std::uint32_t payload_length);

// A structured read reply: one OFFSET_DATA chunk marked DONE; `length` data bytes follow.
struct ReadChunkWire {
  StructuredReplyWire header;
  OffsetDataChunkWire data;
};
static_assert(sizeof(ReadChunkWire) == 28);
ReadChunkWire make_read_chunk(std::uint64_t cookie, std::uint64_t offset, std::uint32_t length);

// A structured error reply: one ERROR chunk marked DONE; `message_length` bytes follow.
struct ErrorReplyWire {
  StructuredReplyWire header;
  ErrorChunkWire error;
};
static_assert(sizeof(ErrorReplyWire) == 26);
ErrorReplyWire make_error_chunk(std::uint64_t cookie, std::uint32_t error, std::uint16_t message_length);

// A block status reply: one BLOCK_STATUS chunk marked DONE for a context; `count`
// descriptors (BlockDescriptorWire) follow.
struct BlockStatusChunkWire {
  StructuredReplyWire chunk;
  Be32 context_id;
};
static_assert(sizeof(BlockStatusChunkWire) == 24);
struct BlockDescriptorWire {
  Be32 length;
  Be32 flags;  // kStateHole | kStateZero
};
static_assert(sizeof(BlockDescriptorWire) == 8);
BlockStatusChunkWire make_block_status_chunk(std::uint64_t cookie, std::uint32_t context_id, std::uint32_t count);

}  // namespace ibdisk::nbd
