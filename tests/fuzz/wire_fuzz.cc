// libFuzzer: the ibdisk protocol's decoders for bytes from the network: frame headers, command
// and completion capsules, and protobuf control messages. Decoding must never crash, and what
// decodes must re-encode to the same bytes.
#include <cstring>

#include <google/protobuf/stubs/logging.h>

#include "proto/ibdisk.pb.h"
#include "proto/wire.h"

using namespace ibdisk;

// Protobuf logs every string field that is not UTF-8; at fuzzing speed that is most of the run
// (and 1.4 million lines of the test log).
extern "C" int LLVMFuzzerInitialize(int*, char***) {
  google::protobuf::SetLogHandler(nullptr);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::span<const std::byte> in(reinterpret_cast<const std::byte*>(data), size);
  wire::FrameHeader h;
  if (wire::decode(in, &h) == wire::DecodeError::kNone) {
    std::byte out[wire::kFrameHeaderSize];
    wire::encode(h, out);
    if (std::memcmp(out, data, sizeof out) != 0) __builtin_trap();
  }
  wire::Command c;
  if (wire::decode(in, &c) == wire::DecodeError::kNone) {
    std::byte out[wire::kCommandSize];
    wire::encode(c, out);
    if (std::memcmp(out, data, sizeof out) != 0) __builtin_trap();
    (void)wire::in_range(c.offset, c.length, 1ull << 30);
  }
  wire::Completion p;
  if (wire::decode(in, &p) == wire::DecodeError::kNone) {
    std::byte out[wire::kCompletionSize];
    wire::encode(p, out);
    if (std::memcmp(out, data, sizeof out) != 0) __builtin_trap();
  }
  proto::Control msg;
  if (size < (1u << 20) && msg.ParseFromArray(data, static_cast<int>(size))) {
    (void)msg.SerializeAsString();
  }
  return 0;
}
