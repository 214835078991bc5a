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
enum class Opcode : std::uint8_t { kRead = 0, kWrite = 1, kFlush = 2, kTrim = 3, kWriteZeroes = 4, kHeartbeat = 5,
                                   kExtents = 6 };
inline constexpr std::uint8_t kMaxOpcode = 6;
inline constexpr std::uint8_t kFlagFua = 1u << 0;
// Write-zeroes only: the zeroed range may become a hole (deallocated, as NBD_CMD_WRITE_ZEROES
// without NO_HOLE). Sent only where Opened.zeroes_may_trim says the target knows it.
inline constexpr std::uint8_t kFlagMayTrim = 1u << 1;
inline constexpr std::uint8_t kKnownFlags = kFlagFua | kFlagMayTrim;

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

// --- Extents (opcode 6) -----------------------------------------------------------------
// A command asks which runs of [offset, offset + length) hold data; its reply carries an
// extent list as a read carries data (after the completion on TCP, by RDMA WRITE into the
// command's buffer on RDMA), so it takes the data path's buffers, limits and ordering.
// Reply payload: a header {u32 count, u32 flags} then `count` descriptors {u64 length,
// u32 type, u32 reserved 0}, the runs contiguous from the command's offset. The reply may
// cover less than was asked (at most kMaxExtents runs): ask again from where it ends.
inline constexpr std::uint32_t kMaxExtents = 255;
inline constexpr std::size_t kExtentsHeaderSize = 8;
inline constexpr std::size_t kExtentSize = 16;
// The initiator's buffer for an extents reply (RDMA: what the target may write into).
inline constexpr std::uint32_t kExtentsReplySize = 4096;
static_assert(kExtentsHeaderSize + kMaxExtents * kExtentSize <= kExtentsReplySize);
inline constexpr std::uint32_t kExtentsExact = 1u << 0;  // header flag: the storage said where data is
inline constexpr std::uint32_t kExtentHole = 1u << 0;    // type: not allocated (as NBD_STATE_HOLE)
inline constexpr std::uint32_t kExtentZero = 1u << 1;    // type: reads as zeroes (as NBD_STATE_ZERO)

struct Extent {
  std::uint64_t length = 0;
  std::uint32_t type = 0;  // 0 data, or kExtentHole | kExtentZero
};
struct ExtentList {
  std::uint32_t flags = 0;  // kExtentsExact
  std::uint32_t count = 0;
  Extent runs[kMaxExtents];
};

// Bytes of reply payload for `count` runs.
constexpr std::size_t extents_size(std::uint32_t count) { return kExtentsHeaderSize + count * kExtentSize; }
// Writes l into out (extents_size(l.count) bytes).
void encode(const ExtentList& l, std::byte* out);
// A reply to a command for `asked` bytes: 1 to kMaxExtents runs of at least one byte, known
// types, reserved fields 0, covering at most `asked`. `in` may be the whole reply buffer:
// only its first extents_size(count) bytes are read.
DecodeError decode(std::span<const std::byte> in, std::uint64_t asked, ExtentList* out);

// Whether a successful reply to op carries a payload (a read's data, an extent list).
constexpr bool reply_has_payload(Opcode op) { return op == Opcode::kRead || op == Opcode::kExtents; }
// Bytes of the initiator's buffer a command uses: its data, or room for an extent list.
constexpr std::uint32_t buffer_size(const Command& c) {
  return c.opcode == Opcode::kExtents ? kExtentsReplySize : c.length;
}

}  // namespace ibdisk::wire
