#pragma once
// NBD base:allocation from the target's extent lists: NBD_CMD_BLOCK_STATUS goes down the
// request path as an extents command, and its reply is rewritten into NBD descriptors here.
#include <cstddef>
#include <cstdint>

namespace ibdisk::nbd {

// Rewrites the ibdisk extent list in buf[0, size) (proto/wire.h, a reply to a request for
// `asked` bytes) as BlockDescriptorWire entries from buf's start, in place (each descriptor
// is written below the run it comes from), at most `most` of them. Returns how many; 0 when
// the list is malformed (a bug on the target's side: the caller answers EIO).
std::uint32_t encode_block_status(std::byte* buf, std::size_t size, std::uint64_t asked, std::uint32_t most);

}  // namespace ibdisk::nbd
