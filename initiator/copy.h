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
};

struct CopyResult {
  std::uint64_t bytes = 0;
  double seconds = 0;
  std::uint64_t skipped_zero_bytes = 0;  // zero blocks not written (download: sparse; upload: write-zeroes)
};

// Export -> local fd; the destination ends byte-equal to the export. A regular destination
// file (sparse_dest) is truncated to the export's size and zero blocks are not written, so it
// stays sparse: they are holes (punched, or written as zeros where the file system cannot
// punch, where the file had bytes before). Any other destination (a block device) gets every
// block, zeros included. Throws SystemError on any I/O error, naming the offset and the reason.
CopyResult download(Client& client, std::uint32_t handle, std::uint64_t size, int fd, bool sparse_dest,
                    const CopyOptions& opts);
// Local fd (size bytes) -> export, then flush. Zero blocks go as write-zeroes.
CopyResult upload(Client& client, std::uint32_t handle, std::uint64_t size, int fd, const CopyOptions& opts);

// SHA-256 of the export's first `size` bytes, read through the session.
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
