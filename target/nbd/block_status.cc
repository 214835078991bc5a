#include "target/nbd/block_status.h"

#include <algorithm>
#include <cstring>
#include <span>

#include "proto/wire.h"
#include "target/nbd/protocol.h"

namespace ibdisk::nbd {

std::uint32_t encode_block_status(std::byte* buf, std::size_t size, std::uint64_t asked, std::uint32_t most) {
  wire::ExtentList list;  // decoded first, so writing over buf cannot disturb what is read
  if (wire::decode(std::span<const std::byte>(buf, size), asked, &list) != wire::DecodeError::kNone) return 0;
  const std::uint32_t n = std::min(list.count, most);
  for (std::uint32_t i = 0; i < n; ++i) {
    BlockDescriptorWire d;
    d.length.set(static_cast<std::uint32_t>(list.runs[i].length));  // <= asked, a u32
    std::uint32_t flags = 0;
    if (list.runs[i].type & wire::kExtentHole) flags |= kStateHole;
    if (list.runs[i].type & wire::kExtentZero) flags |= kStateZero;
    d.flags.set(flags);
    std::memcpy(buf + i * sizeof(d), &d, sizeof(d));
  }
  return n;
}

}  // namespace ibdisk::nbd
