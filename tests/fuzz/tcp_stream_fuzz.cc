// libFuzzer: the TCP byte stream through tcp_detail::decode_frame (transport/tcp/frame_io.cc),
// taken the way the target and the initiator take it: decode the frame at the front of what is
// buffered, consume its header and capsule, skip the payload that follows, wait for more bytes
// when it says so. The stream arrives in chunks cut where the fuzzer says (partial headers,
// partial payloads, several frames in one chunk), and each decode sees exactly the buffered
// bytes in an allocation of their size, so a read past them is an ASan error.
// Input: flags u8 (bit 0: initiator, else target; bit 1: the handshake's control limit), n u8
// (n % 8 chunk sizes follow), n x u16 little-endian chunk sizes (cycled; 0 means 1), then the
// stream. Checks: the frames and the end state (waiting for bytes, or the error) are the same
// chunk by chunk as for the whole stream at once; a frame re-encodes to the bytes it consumed,
// and stays within the buffer; "need more" asks for more than is buffered, and never more than
// a header and the largest control frame or capsule.
#include <algorithm>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "transport/tcp/frame_io.h"

using namespace ibdisk;
using namespace ibdisk::transport::tcp_detail;

namespace {

void require(bool ok) {
  if (!ok) __builtin_trap();
}

// What a reader saw of one frame, to compare the two ways of reading.
struct Seen {
  Decoded::Kind kind;
  std::string bytes;  // the header and capsule or control message it consumed
  std::uint32_t payload;
  std::string error;
  bool operator==(const Seen&) const = default;
};

struct Reassembler {
  Role role;
  std::uint32_t max_control;
  std::vector<std::byte> buffered;  // received, not yet consumed
  std::size_t skip = 0;             // payload bytes still to come before the next frame
  std::vector<Seen> seen;
  bool bad = false;

  // Takes the next bytes of the stream; decodes every frame they complete.
  void feed(std::span<const std::byte> chunk) {
    if (bad) return;
    buffered.insert(buffered.end(), chunk.begin(), chunk.end());
    for (;;) {
      const std::size_t drop = std::min(skip, buffered.size());
      buffered.erase(buffered.begin(), buffered.begin() + static_cast<std::ptrdiff_t>(drop));
      skip -= drop;
      if (skip > 0 || buffered.empty()) return;
      // Exactly the buffered bytes, alone in their allocation.
      const std::size_t n = buffered.size();
      const std::unique_ptr<std::byte[]> copy(new std::byte[n]);
      std::memcpy(copy.get(), buffered.data(), n);
      const std::span<const std::byte> in(copy.get(), n);
      const Decoded d = decode_frame(in, role, max_control);
      check(d, in);
      if (d.kind == Decoded::Kind::kNeedMore) return;
      if (d.kind == Decoded::Kind::kBad) {
        seen.push_back({d.kind, {}, 0, d.error});
        bad = true;
        return;
      }
      seen.push_back({d.kind, std::string(reinterpret_cast<const char*>(in.data()), d.consumed), d.payload, {}});
      buffered.erase(buffered.begin(), buffered.begin() + static_cast<std::ptrdiff_t>(d.consumed));
      skip = d.payload;
    }
  }

  void check(const Decoded& d, std::span<const std::byte> in) const {
    using K = Decoded::Kind;
    const std::size_t largest = wire::kFrameHeaderSize + std::max<std::size_t>(max_control, wire::kCommandSize);
    switch (d.kind) {
      case K::kNeedMore:
        require(d.need > in.size() && d.need <= largest);
        return;
      case K::kBad:
        require(!d.error.empty());
        return;
      case K::kControl: {
        require(d.consumed <= in.size() && d.consumed == wire::kFrameHeaderSize + d.control.size());
        require(d.control.size() <= max_control && d.control.data() == in.data() + wire::kFrameHeaderSize);
        std::byte h[wire::kFrameHeaderSize];
        wire::encode(wire::FrameHeader{wire::FrameType::kControl, static_cast<std::uint32_t>(d.control.size())}, h);
        require(std::memcmp(h, in.data(), sizeof h) == 0);
        return;
      }
      case K::kCommand: {
        require(role == Role::kTarget && d.consumed == wire::kFrameHeaderSize + wire::kCommandSize);
        require(d.consumed <= in.size());
        require(d.payload == (d.command.opcode == wire::Opcode::kWrite ? d.command.length : 0u));
        require(d.payload <= wire::kMaxIoSize);
        std::byte out[wire::kFrameHeaderSize + wire::kCommandSize];
        const auto length = static_cast<std::uint32_t>(wire::kCommandSize) + d.payload;
        wire::encode(wire::FrameHeader{wire::FrameType::kCommand, length}, out);
        wire::encode(d.command, out + wire::kFrameHeaderSize);
        require(std::memcmp(out, in.data(), sizeof out) == 0);
        return;
      }
      case K::kCompletion: {
        require(role == Role::kInitiator && d.consumed == wire::kFrameHeaderSize + wire::kCompletionSize);
        require(d.consumed <= in.size());
        require(d.payload == d.completion.length && d.payload <= wire::kMaxIoSize);
        std::byte out[wire::kFrameHeaderSize + wire::kCompletionSize];
        const auto length = static_cast<std::uint32_t>(wire::kCompletionSize) + d.payload;
        wire::encode(wire::FrameHeader{wire::FrameType::kCompletion, length}, out);
        wire::encode(d.completion, out + wire::kFrameHeaderSize);
        require(std::memcmp(out, in.data(), sizeof out) == 0);
        return;
      }
    }
    require(false);
  }
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 2) return 0;
  const Role role = data[0] & 1 ? Role::kInitiator : Role::kTarget;
  const std::uint32_t max_control = data[0] & 2 ? kMaxHandshakeControl : wire::kMaxControlSize;
  const std::size_t nsizes = data[1] % 8;
  if (size < 2 + 2 * nsizes) return 0;
  std::vector<std::size_t> sizes;
  for (std::size_t i = 0; i < nsizes; ++i) {
    const std::size_t s = static_cast<std::size_t>(data[2 + 2 * i]) | static_cast<std::size_t>(data[3 + 2 * i]) << 8;
    sizes.push_back(std::max<std::size_t>(s, 1));
  }
  const std::span<const std::byte> stream(reinterpret_cast<const std::byte*>(data + 2 + 2 * nsizes),
                                          size - 2 - 2 * nsizes);

  Reassembler whole{role, max_control};
  whole.feed(stream);

  Reassembler chunked{role, max_control};
  std::size_t pos = 0;
  for (std::size_t i = 0; pos < stream.size(); ++i) {
    const std::size_t n = sizes.empty() ? stream.size() : std::min(sizes[i % sizes.size()], stream.size() - pos);
    chunked.feed(stream.subspan(pos, n));
    pos += n;
  }

  require(chunked.seen == whole.seen);
  require(chunked.bad == whole.bad);
  if (!whole.bad) require(chunked.buffered == whole.buffered && chunked.skip == whole.skip);
  return 0;
}
