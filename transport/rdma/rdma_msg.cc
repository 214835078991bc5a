#include "transport/rdma/rdma_msg.h"

#include <endian.h>

#include <cstring>

namespace ibdisk::transport {
namespace {

using rdma_detail::get16;
using rdma_detail::get32;

void put16(std::byte* p, std::uint16_t v) { v = htole16(v); std::memcpy(p, &v, 2); }
void put32(std::byte* p, std::uint32_t v) { v = htole32(v); std::memcpy(p, &v, 4); }

}  // namespace

// --- private data --------------------------------------------------------------------------

std::array<std::byte, sizeof(RdmaConnectData)> encode(const RdmaConnectData& d) {
  std::array<std::byte, sizeof(RdmaConnectData)> out{};
  put32(out.data(), d.magic);
  put16(out.data() + 4, d.version);
  put16(out.data() + 6, 0);
  put32(out.data() + 8, d.queue_depth);
  put32(out.data() + 12, d.max_io);
  put32(out.data() + 16, d.msg_size);
  return out;
}

std::string decode_connect_data(std::span<const std::byte> in, RdmaConnectData* out) {
  // The CM may pad private data with zeros up to its own size: only a shorter one is wrong.
  if (in.size() < sizeof(RdmaConnectData)) {
    return "private data of " + std::to_string(in.size()) + " bytes, expected " +
           std::to_string(sizeof(RdmaConnectData)) + " (not an ibdisk initiator)";
  }
  RdmaConnectData d;
  d.magic = get32(in.data());
  d.version = get16(in.data() + 4);
  d.reserved = get16(in.data() + 6);
  d.queue_depth = get32(in.data() + 8);
  d.max_io = get32(in.data() + 12);
  d.msg_size = get32(in.data() + 16);
  if (d.magic != kRdmaConnectMagic) return "bad magic (not an ibdisk initiator)";
  if (d.version != kRdmaConnectVersion) {
    return "connect version " + std::to_string(d.version) + ", this target speaks " +
           std::to_string(kRdmaConnectVersion) + " (use the same ibdisk release on both sides)";
  }
  for (std::size_t i = 20; i < sizeof(RdmaConnectData); ++i) {
    if (in[i] != std::byte{0}) return "reserved bytes are not zero";
  }
  if (d.reserved != 0) return "reserved bytes are not zero";
  if (d.queue_depth == 0 || d.queue_depth > wire::kMaxQueueDepth) {
    return "queue depth " + std::to_string(d.queue_depth) + " outside 1.." + std::to_string(wire::kMaxQueueDepth);
  }
  if (d.max_io == 0 || d.max_io > wire::kMaxIoSize) return "max I/O size " + std::to_string(d.max_io) + " out of range";
  if (d.msg_size != kRdmaMsgSize) return "message size " + std::to_string(d.msg_size) + " differs from the target's";
  *out = d;
  return {};
}

std::array<std::byte, sizeof(RdmaRejectData)> encode(RdmaRejectReason reason) {
  std::array<std::byte, sizeof(RdmaRejectData)> out{};
  put32(out.data(), kRdmaConnectMagic);
  put16(out.data() + 4, kRdmaConnectVersion);
  put16(out.data() + 6, static_cast<std::uint16_t>(reason));
  return out;
}

bool decode_reject_data(std::span<const std::byte> in, RdmaRejectReason* out) {
  if (in.size() < sizeof(RdmaRejectData) || get32(in.data()) != kRdmaConnectMagic) return false;
  *out = static_cast<RdmaRejectReason>(get16(in.data() + 6));
  return true;
}

const char* describe(RdmaRejectReason reason) {
  switch (reason) {
    case RdmaRejectReason::kBadConnectData: return "the target did not accept the connect data (version mismatch?)";
    case RdmaRejectReason::kNoResources: return "the target has no RDMA resources for another queue";
    case RdmaRejectReason::kShuttingDown: return "the target is shutting down";
  }
  return "rejected by the target";
}

}  // namespace ibdisk::transport

namespace ibdisk::transport::rdma_detail {

std::uint16_t get16(const std::byte* p) { std::uint16_t v; std::memcpy(&v, p, 2); return le16toh(v); }
std::uint32_t get32(const std::byte* p) { std::uint32_t v; std::memcpy(&v, p, 4); return le32toh(v); }

// --- message framing -----------------------------------------------------------------------

void encode(const MsgHeader& h, std::byte* out) {
  put16(out, kMsgMagic);
  out[2] = static_cast<std::byte>(h.type);
  out[3] = static_cast<std::byte>(h.flags);
  put32(out + 4, h.length);
}

bool decode(std::span<const std::byte> in, MsgHeader* out) {
  if (in.size() < kMsgHeaderSize || get16(in.data()) != kMsgMagic) return false;
  const auto type = static_cast<std::uint8_t>(in[2]);
  const auto flags = static_cast<std::uint8_t>(in[3]);
  if (type < 1 || type > 3 || (flags & ~kMsgMoreFragments)) return false;
  MsgHeader h;
  h.type = static_cast<wire::FrameType>(type);
  h.flags = flags;
  h.length = get32(in.data() + 4);
  if (h.length != in.size() - kMsgHeaderSize) return false;
  *out = h;
  return true;
}

Received receive(std::span<const std::byte> msg, std::string* control) {
  Received r;
  MsgHeader h;
  if (!decode(msg, &h)) {
    r.error = "malformed message of " + std::to_string(msg.size()) + " bytes";
    return r;
  }
  const auto payload = msg.subspan(kMsgHeaderSize);
  if (h.type != wire::FrameType::kControl) {
    if (!control->empty()) {
      r.error = "a capsule inside a fragmented control message";
      return r;
    }
    r.kind = Received::Kind::kCapsule;
    r.type = h.type;
    r.payload = payload;
    return r;
  }
  if (control->size() + payload.size() > wire::kMaxControlSize) {
    r.error = "control message above the size limit";
    return r;
  }
  control->append(reinterpret_cast<const char*>(payload.data()), payload.size());
  r.kind = h.flags & kMsgMoreFragments ? Received::Kind::kFragment : Received::Kind::kControl;
  return r;
}

}  // namespace ibdisk::transport::rdma_detail
