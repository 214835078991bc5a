#pragma once
// `ibdisk copy`: an export to a local file or device, or back, with many requests in flight
// across the session's queues.
#include <cstdint>
#include <functional>
#include <span>
#include <string>

#include "initiator/client.h"

namespace ibdisk::initiator {

struct CopyOptions {
  std::uint32_t block_size = 1 << 20;
  std::function<void(std::uint64_t done, std::uint64_t total)> progress;  // called often; throttle yourself
  // From the export's Opened: `extents` lets the copy ask where the export's holes are and
  // never read them; `zeroes_may_trim` lets an upload's write-zeroes leave holes.
  bool extents = false;
  bool zeroes_may_trim = false;
};

struct CopyResult {
  std::uint64_t bytes = 0;               // bytes of the export covered, holes included
  std::uint64_t moved_bytes = 0;         // of them, bytes that crossed the wire as data
  double seconds = 0;
  std::uint64_t skipped_zero_bytes = 0;  // holes and zero blocks not moved as data
};

// Export -> local fd; the destination ends byte-equal to the export. The export's holes (with
// opts.extents) are not read. A regular destination file (sparse_dest) is truncated to the
// export's size and holes and zero blocks are not written, so it stays as sparse as the
// export: they are holes (punched, or written as zeros where the file system cannot punch,
// where the file had bytes before). Any other destination (a block device) gets every block,
// its holes as FALLOC_FL_ZERO_RANGE or written zeros. Throws SystemError on any I/O error,
// naming the offset and the reason.
CopyResult download(Client& client, std::uint32_t handle, std::uint64_t size, int fd, bool sparse_dest,
                    const CopyOptions& opts);
// Local fd (size bytes) -> export, then flush. The source's holes (SEEK_DATA/SEEK_HOLE) are not
// read; where the export is a hole already they are left unwritten, elsewhere they and zero
// blocks go as write-zeroes (which leave holes with opts.zeroes_may_trim).
CopyResult upload(Client& client, std::uint32_t handle, std::uint64_t size, int fd, const CopyOptions& opts);

// SHA-256 of the export's first `size` bytes, read through the session (holes, with
// opts.extents, hashed as zeros without reading them).
std::string remote_sha256(Client& client, std::uint32_t handle, std::uint64_t size, const CopyOptions& opts);

// The same over several Clients of one session (ClientOptions::join_session), one lane each:
// clients[0] runs on the calling thread, each other on a thread of its own, and each takes the
// next block when it has room, so the copy is not limited to what one thread can receive.
// `handle` is the session's, from any of them. Progress is reported from the calling thread.
CopyResult download(std::span<Client* const> clients, std::uint32_t handle, std::uint64_t size, int fd,
                    bool sparse_dest, const CopyOptions& opts);
CopyResult upload(std::span<Client* const> clients, std::uint32_t handle, std::uint64_t size, int fd,
                  const CopyOptions& opts);
std::string remote_sha256(std::span<Client* const> clients, std::uint32_t handle, std::uint64_t size,
                          const CopyOptions& opts);

}  // namespace ibdisk::initiator
