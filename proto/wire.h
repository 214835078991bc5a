#pragma once
// The ibdisk data plane: fixed-size binary capsules, little-endian on the wire, and the frame
// header that carries capsules and control messages over a byte stream (TCP). See
// docs/protocol.md. Decoders never trust a length: every field is checked before use.
#include <endian.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>

namespace ibdisk::wire {

// 2: sessions are joined with a proof of their secret (Auth.join_proof), queues carry ids
// that a rejoining queue names (Hello.replaces_queue).
// 3: the heartbeat opcode (one in flight per queue beyond the granted depth), and the target
// closes a version-3 queue it heard nothing from for its session timeout.
inline constexpr std::uint32_t kProtocolVersion = 3;
inline constexpr std::uint32_t kMinProtocolVersion = 2;  // the oldest this side still speaks
inline constexpr std::uint32_t kHeartbeatVersion = 3;    // the first with heartbeats
inline constexpr std::uint16_t kFrameMagic = 0x4249;  // "IB" read as little-endian u16
inline constexpr std::uint32_t kMaxIoSize = 1u << 20;  // largest read/write per command
inline constexpr std::uint32_t kMaxControlSize = 1u << 20;
inline constexpr std::uint32_t kMaxQueueDepth = 256;
inline constexpr std::size_t kMaxClientName = 256;  // longer Hello.client_name is cut there

// kHeartbeat: no data, no export (handle, offset, length, flags 0); the target answers it at
// once with status 0, never through the storage, so an answered heartbeat says the target runs.
enum class Opcode : std::uint8_t { kRead = 0, kWrite = 1, kFlush = 2, kTrim = 3, kWriteZeroes = 4, kHeartbeat = 5 };
inline constexpr std::uint8_t kMaxOpcode = 5;
inline constexpr std::uint8_t kFlagFua = 1u << 0;
inline constexpr std::uint8_t kKnownFlags = kFlagFua;

enum class FrameType : std::uint8_t { kControl = 1, kCommand = 2, kCompletion = 3 };

// Host-order views of the capsules.
struct Command {
  Opcode opcode = Opcode::kRead;
  std::uint8_t flags = 0;
  std::uint32_t length = 0;   // bytes to read/write/trim/zero; 0 for flush
  std::uint64_t tag = 0;      // chosen by the initiator, echoed in the completion
  std::uint32_t handle = 0;   // from Opened
  std::uint32_t rkey = 0;     // RDMA: the initiator buffer's rkey
  std::uint64_t offset = 0;
  std::uint64_t addr = 0;     // RDMA: the initiator buffer's address
};

struct Completion {
  std::uint64_t tag = 0;
  std::int32_t status = 0;    // 0 or -errno (Linux numbering)
  std::uint32_t length = 0;   // read: bytes of data that follow (TCP) or were written (RDMA)
};

inline constexpr std::size_t kCommandSize = 40;
inline constexpr std::size_t kCompletionSize = 16;
inline constexpr std::size_t kFrameHeaderSize = 8;

// Frame header: magic u16, type u8, reserved u8 (0), payload length u32.
struct FrameHeader {
  FrameType type = FrameType::kControl;
  std::uint32_t length = 0;
};

// Largest payload any frame may carry: a command capsule plus a maximal write.
inline constexpr std::uint32_t kMaxFramePayload = kCommandSize + kMaxIoSize;

void encode(const Command& c, std::byte out[kCommandSize]);
void encode(const Completion& c, std::byte out[kCompletionSize]);
void encode(const FrameHeader& h, std::byte out[kFrameHeaderSize]);

enum class DecodeError {
  kNone = 0,
  kTruncated,       // fewer bytes than the fixed size
  kBadMagic,
  kBadType,
  kTooLong,         // a length above the protocol's limit
  kBadOpcode,
  kBadFlags,
  kBadLength,       // a length that does not fit the opcode (e.g. flush with data, read of 0)
  kReserved,        // a reserved field is not zero
};
const char* describe(DecodeError e);

DecodeError decode(std::span<const std::byte> in, Command* out);
DecodeError decode(std::span<const std::byte> in, Completion* out);
DecodeError decode(std::span<const std::byte> in, FrameHeader* out);

// True when [offset, offset+length) lies inside [0, size), without overflow.
constexpr bool in_range(std::uint64_t offset, std::uint64_t length, std::uint64_t size) {
  return offset <= size && length <= size - offset;
}

}  // namespace ibdisk::wire
