#pragma once
// Internal to transport/rdma: the bytes an RDMA peer sends, as pure functions with no verbs in
// them (the endpoint, the listener, the initiator and the fuzzers in tests/fuzz call them):
// - the RDMA CM private data of a connect request and of a reject;
// - the 8-byte header every SEND starts with, and what one received SEND means (a capsule, a
//   control fragment, or the last fragment of a control message).
// Little-endian on the wire. Decoders never trust a length.
#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

#include "proto/wire.h"

namespace ibdisk::transport {

inline constexpr std::uint32_t kRdmaConnectMagic = 0x51444249;  // "IBDQ" little-endian
inline constexpr std::uint16_t kRdmaConnectVersion = 1;

// RDMA CM private data of a connect request, initiator -> target. Little-endian on the wire.
struct RdmaConnectData {
  std::uint32_t magic = kRdmaConnectMagic;
  std::uint16_t version = kRdmaConnectVersion;
  std::uint16_t reserved = 0;
  std::uint32_t queue_depth = 0;  // commands in flight wanted; sizes the target's QP and RECVs
  std::uint32_t max_io = 0;       // largest read/write per command wanted
  std::uint32_t msg_size = 0;     // the initiator's RECV buffer size; must equal the target's
  std::uint32_t reserved2[3] = {0, 0, 0};
};
static_assert(sizeof(RdmaConnectData) == 32 && sizeof(RdmaConnectData) <= 56,
              "RDMA CM private data is limited to 56 bytes");

// Why a target rejected a connect request, carried in the reject's private data.
enum class RdmaRejectReason : std::uint16_t { kBadConnectData = 1, kNoResources = 2, kShuttingDown = 3 };
struct RdmaRejectData {
  std::uint32_t magic = kRdmaConnectMagic;
  std::uint16_t version = kRdmaConnectVersion;
  std::uint16_t reason = 0;
};
static_assert(sizeof(RdmaRejectData) == 8);

// Size of every RECV buffer, and so the largest SEND (a control message is cut into pieces).
inline constexpr std::uint32_t kRdmaMsgSize = 4096;

std::array<std::byte, sizeof(RdmaConnectData)> encode(const RdmaConnectData& d);
// Checks and decodes connect private data. Returns empty on success, else what is wrong.
std::string decode_connect_data(std::span<const std::byte> in, RdmaConnectData* out);
std::array<std::byte, sizeof(RdmaRejectData)> encode(RdmaRejectReason reason);
// The reason in a reject's private data; false when it is not an ibdisk target's reject (any
// version: the reason is there so that a newer target can say why it refused an older initiator).
bool decode_reject_data(std::span<const std::byte> in, RdmaRejectReason* out);
const char* describe(RdmaRejectReason reason);

}  // namespace ibdisk::transport

namespace ibdisk::transport::rdma_detail {

// Every SEND starts with this header: magic u16, type u8 (wire::FrameType), flags u8, payload
// length u32, little-endian.
inline constexpr std::uint16_t kMsgMagic = 0x5249;
inline constexpr std::size_t kMsgHeaderSize = 8;
inline constexpr std::uint8_t kMsgMoreFragments = 1;  // a control message continues in the next SEND
inline constexpr std::uint32_t kFragmentPayload = kRdmaMsgSize - kMsgHeaderSize;

struct MsgHeader {
  wire::FrameType type = wire::FrameType::kControl;
  std::uint8_t flags = 0;
  std::uint32_t length = 0;
};
void encode(const MsgHeader& h, std::byte* out);
// False when the bytes are not a well-formed header for a message of `in.size()` bytes.
bool decode(std::span<const std::byte> in, MsgHeader* out);

// What one received SEND is.
struct Received {
  enum class Kind { kBad, kCapsule, kFragment, kControl };
  Kind kind = Kind::kBad;
  wire::FrameType type = wire::FrameType::kControl;  // kCapsule: command or completion
  std::span<const std::byte> payload;                // kCapsule: the capsule, inside the message
  std::string error;                                 // kBad: what is wrong
};
// Decodes the SEND `msg`; control fragments gather in `control` (at most wire::kMaxControlSize
// bytes). kControl: `control` holds the whole serialized message, for the caller to parse and
// clear. kFragment: more is to come.
Received receive(std::span<const std::byte> msg, std::string* control);

std::uint16_t get16(const std::byte* p);
std::uint32_t get32(const std::byte* p);

}  // namespace ibdisk::transport::rdma_detail
