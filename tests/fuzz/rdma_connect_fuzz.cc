// libFuzzer: the RDMA CM private data a peer sends, through the decoders the listener (connect
// request, decode_connect_data) and the initiator (reject, decode_reject_data) run on it
// (transport/rdma/rdma_msg.cc). The input is the private data, of any length (the CM pads
// it with zeros up to its own size). Checks: accepted connect data re-encodes to the same 32
// bytes and every value is within the bounds the target sizes its queue pair and buffers by;
// refused data has a reason and leaves the output alone; a reject's reason re-encodes to the
// same magic and reason bytes.
#include <cstring>
#include <string>

#include "transport/rdma/rdma_msg.h"

using namespace ibdisk;
using namespace ibdisk::transport;

namespace {
void require(bool ok) {
  if (!ok) __builtin_trap();
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::span<const std::byte> in(reinterpret_cast<const std::byte*>(data), size);

  RdmaConnectData d;
  d.queue_depth = 0xdead;  // what a refusal must leave as it was
  const std::string why = decode_connect_data(in, &d);
  if (why.empty()) {
    require(size >= sizeof(RdmaConnectData));
    const auto out = encode(d);
    require(std::memcmp(out.data(), data, out.size()) == 0);
    require(d.magic == kRdmaConnectMagic && d.version == kRdmaConnectVersion && d.reserved == 0);
    require(d.queue_depth >= 1 && d.queue_depth <= wire::kMaxQueueDepth);
    require(d.max_io >= 1 && d.max_io <= wire::kMaxIoSize);
    require(d.msg_size == kRdmaMsgSize);
  } else {
    require(d.queue_depth == 0xdead);
  }

  RdmaRejectReason reason{};
  if (decode_reject_data(in, &reason)) {
    require(size >= sizeof(RdmaRejectData));
    const auto out = encode(reason);
    require(std::memcmp(out.data(), data, 4) == 0 && std::memcmp(out.data() + 6, data + 6, 2) == 0);
    require(describe(reason) != nullptr);
  } else {
    require(size < sizeof(RdmaRejectData) || std::memcmp(encode(reason).data(), data, 4) != 0);
  }
  return 0;
}
