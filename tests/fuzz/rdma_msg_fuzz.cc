// libFuzzer: what an RDMA peer SENDs, through the decoder the endpoint runs on every received
// buffer (rdma_detail::receive in transport/rdma/rdma_msg.cc): the message header, capsules,
// and control messages cut into fragments. The input is a run of SENDs, each preceded by its
// size (u16 little-endian, at most one RECV buffer). Checks: a header that decodes re-encodes
// to the same bytes and its length is the message's; a capsule is the message's payload and
// never comes inside a fragmented control message; the control message gathered is exactly
// the fragments' payloads, in order, never above the size limit; capsules decode as the
// target and the initiator decode them, and re-encode to the same bytes.
#include <algorithm>
#include <cstring>
#include <string>

#include <google/protobuf/stubs/logging.h>

#include "proto/ibdisk.pb.h"
#include "transport/rdma/rdma_msg.h"

using namespace ibdisk;
using namespace ibdisk::transport::rdma_detail;

namespace {

void require(bool ok) {
  if (!ok) __builtin_trap();
}

void check_capsule(wire::FrameType type, std::span<const std::byte> payload) {
  // As rdma_datapath.cc (commands) and rdma_client.cc (completions) take them.
  if (type == wire::FrameType::kCommand) {
    wire::Command c;
    if (payload.size() != wire::kCommandSize || wire::decode(payload, &c) != wire::DecodeError::kNone) return;
    std::byte out[wire::kCommandSize];
    wire::encode(c, out);
    require(std::memcmp(out, payload.data(), sizeof out) == 0);
    require(c.length <= wire::kMaxIoSize || (c.opcode != wire::Opcode::kRead && c.opcode != wire::Opcode::kWrite));
  } else {
    require(type == wire::FrameType::kCompletion);
    wire::Completion c;
    if (payload.size() != wire::kCompletionSize || wire::decode(payload, &c) != wire::DecodeError::kNone) return;
    std::byte out[wire::kCompletionSize];
    wire::encode(c, out);
    require(std::memcmp(out, payload.data(), sizeof out) == 0);
    require(c.length <= wire::kMaxIoSize && c.status <= 0);
  }
}

}  // namespace

// Protobuf logs every string field that is not UTF-8; at fuzzing speed that is most of the run.
extern "C" int LLVMFuzzerInitialize(int*, char***) {
  google::protobuf::SetLogHandler(nullptr);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::string control;
  std::size_t pos = 0;
  while (size - pos >= 2) {
    std::size_t n = static_cast<std::size_t>(data[pos]) | static_cast<std::size_t>(data[pos + 1]) << 8;
    pos += 2;
    n = std::min({n, size - pos, std::size_t{transport::kRdmaMsgSize}});
    const std::span<const std::byte> msg(reinterpret_cast<const std::byte*>(data + pos), n);
    pos += n;

    MsgHeader h;
    const bool ok = decode(msg, &h);
    if (ok) {
      std::byte out[kMsgHeaderSize];
      encode(h, out);
      require(std::memcmp(out, msg.data(), kMsgHeaderSize) == 0);
      require(h.length == msg.size() - kMsgHeaderSize);
    }

    const std::string before = control;
    const Received r = receive(msg, &control);
    switch (r.kind) {
      case Received::Kind::kBad:
        // A well-formed header is refused only for where it comes or for the size limit.
        require(!r.error.empty());
        require(!ok || (h.type != wire::FrameType::kControl && !before.empty()) ||
                (h.type == wire::FrameType::kControl && before.size() + h.length > wire::kMaxControlSize));
        require(control == before);
        return 0;  // the endpoint ends the connection
      case Received::Kind::kCapsule:
        require(ok && h.type == r.type && h.type != wire::FrameType::kControl && before.empty() && control.empty());
        require(r.payload.data() == msg.data() + kMsgHeaderSize && r.payload.size() == h.length);
        check_capsule(r.type, r.payload);
        break;
      case Received::Kind::kFragment:
      case Received::Kind::kControl: {
        require(ok && h.type == wire::FrameType::kControl);
        require(((h.flags & kMsgMoreFragments) != 0) == (r.kind == Received::Kind::kFragment));
        require(control.size() == before.size() + h.length && control.size() <= wire::kMaxControlSize);
        require(control.compare(0, before.size(), before) == 0);
        require(std::memcmp(control.data() + before.size(), msg.data() + kMsgHeaderSize, h.length) == 0);
        if (r.kind == Received::Kind::kControl) {
          proto::Control m;  // as the endpoint parses it
          if (m.ParseFromString(control)) (void)m.SerializeAsString();
          control.clear();
        }
        break;
      }
    }
  }
  return 0;
}
