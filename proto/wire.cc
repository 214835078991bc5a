#include "proto/wire.h"

namespace ibdisk::wire {
namespace {

void put16(std::byte* p, std::uint16_t v) { v = htole16(v); std::memcpy(p, &v, 2); }
void put32(std::byte* p, std::uint32_t v) { v = htole32(v); std::memcpy(p, &v, 4); }
void put64(std::byte* p, std::uint64_t v) { v = htole64(v); std::memcpy(p, &v, 8); }
std::uint16_t get16(const std::byte* p) { std::uint16_t v; std::memcpy(&v, p, 2); return le16toh(v); }
std::uint32_t get32(const std::byte* p) { std::uint32_t v; std::memcpy(&v, p, 4); return le32toh(v); }
std::uint64_t get64(const std::byte* p) { std::uint64_t v; std::memcpy(&v, p, 8); return le64toh(v); }

// Byte offsets of the command capsule's fields.
enum : std::size_t { kOpOpcode = 0, kOpFlags = 1, kOpReserved = 2, kOpLength = 4, kOpTag = 8,
                     kOpOffset = 16, kOpHandle = 24, kOpRkey = 28, kOpAddr = 32 };
static_assert(kOpAddr + 8 == kCommandSize);
enum : std::size_t { kCpTag = 0, kCpStatus = 8, kCpLength = 12 };
static_assert(kCpLength + 4 == kCompletionSize);

}  // namespace

void encode(const Command& c, std::byte out[kCommandSize]) {
  out[kOpOpcode] = static_cast<std::byte>(c.opcode);
  out[kOpFlags] = static_cast<std::byte>(c.flags);
  put16(out + kOpReserved, 0);
  put32(out + kOpLength, c.length);
  put64(out + kOpTag, c.tag);
  put64(out + kOpOffset, c.offset);
  put32(out + kOpHandle, c.handle);
  put32(out + kOpRkey, c.rkey);
  put64(out + kOpAddr, c.addr);
}

void encode(const Completion& c, std::byte out[kCompletionSize]) {
  put64(out + kCpTag, c.tag);
  put32(out + kCpStatus, static_cast<std::uint32_t>(c.status));
  put32(out + kCpLength, c.length);
}

void encode(const FrameHeader& h, std::byte out[kFrameHeaderSize]) {
  put16(out, kFrameMagic);
  out[2] = static_cast<std::byte>(h.type);
  out[3] = std::byte{0};
  put32(out + 4, h.length);
}

const char* describe(DecodeError e) {
  switch (e) {
    case DecodeError::kNone: return "ok";
    case DecodeError::kTruncated: return "truncated";
    case DecodeError::kBadMagic: return "bad frame magic (is the peer an ibdisk target or initiator?)";
    case DecodeError::kBadType: return "unknown frame type";
    case DecodeError::kTooLong: return "length above the protocol limit";
    case DecodeError::kBadOpcode: return "unknown opcode";
    case DecodeError::kBadFlags: return "unknown command flags";
    case DecodeError::kBadLength: return "length does not fit the opcode";
    case DecodeError::kReserved: return "reserved field is not zero";
  }
  return "unknown decode error";
}

DecodeError decode(std::span<const std::byte> in, Command* out) {
  if (in.size() < kCommandSize) return DecodeError::kTruncated;
  const auto op = static_cast<std::uint8_t>(in[kOpOpcode]);
  const auto flags = static_cast<std::uint8_t>(in[kOpFlags]);
  if (op > kMaxOpcode) return DecodeError::kBadOpcode;
  if (flags & ~kKnownFlags) return DecodeError::kBadFlags;
  if (get16(in.data() + kOpReserved) != 0) return DecodeError::kReserved;
  Command c;
  c.opcode = static_cast<Opcode>(op);
  c.flags = flags;
  c.length = get32(in.data() + kOpLength);
  c.tag = get64(in.data() + kOpTag);
  c.offset = get64(in.data() + kOpOffset);
  c.handle = get32(in.data() + kOpHandle);
  c.rkey = get32(in.data() + kOpRkey);
  c.addr = get64(in.data() + kOpAddr);
  switch (c.opcode) {
    case Opcode::kRead:
    case Opcode::kWrite:
      if (c.length == 0) return DecodeError::kBadLength;
      if (c.length > kMaxIoSize) return DecodeError::kTooLong;
      break;
    case Opcode::kFlush:
      if (c.length != 0 || c.offset != 0) return DecodeError::kBadLength;
      break;
    case Opcode::kTrim:
    case Opcode::kWriteZeroes:
    case Opcode::kExtents:
      if (c.length == 0) return DecodeError::kBadLength;
      break;
    case Opcode::kHeartbeat:
      if (c.length != 0 || c.offset != 0) return DecodeError::kBadLength;
      if (c.flags != 0 || c.handle != 0) return DecodeError::kReserved;
      break;
  }
  *out = c;
  return DecodeError::kNone;
}

DecodeError decode(std::span<const std::byte> in, Completion* out) {
  if (in.size() < kCompletionSize) return DecodeError::kTruncated;
  Completion c;
  c.tag = get64(in.data() + kCpTag);
  c.status = static_cast<std::int32_t>(get32(in.data() + kCpStatus));
  c.length = get32(in.data() + kCpLength);
  if (c.length > kMaxIoSize) return DecodeError::kTooLong;
  if (c.status > 0) return DecodeError::kBadLength;
  *out = c;
  return DecodeError::kNone;
}

DecodeError decode(std::span<const std::byte> in, FrameHeader* out) {
  if (in.size() < kFrameHeaderSize) return DecodeError::kTruncated;
  if (get16(in.data()) != kFrameMagic) return DecodeError::kBadMagic;
  const auto type = static_cast<std::uint8_t>(in[2]);
  if (type < 1 || type > 3) return DecodeError::kBadType;
  if (in[3] != std::byte{0}) return DecodeError::kReserved;
  FrameHeader h;
  h.type = static_cast<FrameType>(type);
  h.length = get32(in.data() + 4);
  const std::uint32_t limit = h.type == FrameType::kControl ? kMaxControlSize : kMaxFramePayload;
  if (h.length > limit) return DecodeError::kTooLong;
  *out = h;
  return DecodeError::kNone;
}

void encode(const ExtentList& l, std::byte* out) {
  put32(out, l.count);
  put32(out + 4, l.flags);
  for (std::uint32_t i = 0; i < l.count; ++i) {
    std::byte* p = out + kExtentsHeaderSize + i * kExtentSize;
    put64(p, l.runs[i].length);
    put32(p + 8, l.runs[i].type);
    put32(p + 12, 0);
  }
}

DecodeError decode(std::span<const std::byte> in, std::uint64_t asked, ExtentList* out) {
  if (in.size() < kExtentsHeaderSize) return DecodeError::kTruncated;
  const std::uint32_t count = get32(in.data());
  const std::uint32_t flags = get32(in.data() + 4);
  if (count == 0 || count > kMaxExtents) return DecodeError::kBadLength;
  if (in.size() < extents_size(count)) return DecodeError::kTruncated;
  if (flags & ~kExtentsExact) return DecodeError::kBadFlags;
  out->flags = flags;
  out->count = count;
  std::uint64_t covered = 0;
  for (std::uint32_t i = 0; i < count; ++i) {
    const std::byte* p = in.data() + kExtentsHeaderSize + i * kExtentSize;
    Extent& e = out->runs[i];
    e.length = get64(p);
    e.type = get32(p + 8);
    if (get32(p + 12) != 0) return DecodeError::kReserved;
    if (e.type & ~(kExtentHole | kExtentZero)) return DecodeError::kBadFlags;
    if (e.length == 0 || e.length > asked - covered) return DecodeError::kBadLength;
    covered += e.length;
  }
  return DecodeError::kNone;
}

}  // namespace ibdisk::wire
