#pragma once
// The target's storage engine: one io_uring per worker thread, driven from that thread's
// Boost.Asio io_context. Not thread-safe: every method is called on the owning io thread.
//
// Contract (shared by the ibdisk protocol sessions, the NBD front end and `bench --local`):
// - submit() queues a request; queued SQEs are submitted in one io_uring_submit() per turn
//   of the io_context (or at once when the submission queue is full), never one syscall each.
// - Completions are reaped when the ring's eventfd fires; each request's `done` runs on the
//   io thread with a result: bytes moved (read/write, always the full length: short reads
//   and writes are requeued for the remainder), 0 (flush/trim/write-zeroes), or -errno.
// - A read past the end of the file returns -EINVAL; the engine checks offset+length
//   against the size without overflow (callers check too, for a clear protocol error).
// - Writes with kIoFua are durable when `done` runs (RWF_DSYNC); kFlush is fdatasync.
// - kTrim punches a hole (files, through io_uring) or BLKDISCARD (block devices, on a helper
//   thread in pieces of at most kDiscardChunk: the ioctl is synchronous and may take seconds);
//   kWriteZeroes uses FALLOC_FL_ZERO_RANGE / BLKZEROOUT (with kIoMayTrim on a file, a punched
//   hole), falling back to writing zeroes.
// - kExtents writes an extent list (wire::ExtentList, at most wire::kExtentsReplySize bytes)
//   into `data` and returns its size: SEEK_DATA/SEEK_HOLE on files (target/extents.h), all
//   data on block devices. lseek has no io_uring opcode; it runs on the io thread, a few
//   calls per run, and completes on the next turn like any request.
// - Data goes through O_DIRECT when offset, length and buffer are aligned to the logical
//   block size (goes_direct()), through the page cache otherwise; the path is chosen once per
//   request, so a short transfer's remainder never switches it. Callers that mix both paths
//   on one file order them (target/range_lock.h).
// - Buffers registered with register_buffers() are used with READ_FIXED / WRITE_FIXED when
//   a request names one (fixed_index >= 0).
#include <sys/uio.h>

#include <chrono>
#include <cstddef>
#include <functional>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "target/range_lock.h"
#include "transport/tcp/asio.h"

namespace ibdisk::target {

enum class IoOp : std::uint8_t { kRead = 0, kWrite = 1, kFlush = 2, kTrim = 3, kWriteZeroes = 4, kExtents = 6 };
struct BackingFile;
inline constexpr std::uint32_t kIoFua = 1u << 0;
inline constexpr std::uint32_t kIoMayTrim = 1u << 1;  // kWriteZeroes on a file: punch a hole instead

struct IoRequest {
  IoOp op = IoOp::kRead;
  std::uint32_t flags = 0;  // kIoFua, kIoMayTrim
  std::uint64_t offset = 0;
  std::uint32_t length = 0;
  std::byte* data = nullptr;  // read destination / write source / extent list; unused otherwise
  int fixed_index = -1;       // a registered buffer containing `data`, or -1
  void (*done)(IoRequest* req, int result) = nullptr;
  void* context = nullptr;    // the caller's; the engine does not touch it
  // Engine-private progress for requeued short transfers.
  std::uint32_t done_bytes = 0;
  // Engine-private bookkeeping, valid from submit() until `done` runs.
  BackingFile* file_ = nullptr;
  IoRequest* next_ = nullptr;  // the engine's pending / ready lists
  int result_ = 0;             // for requests completed without I/O
  std::uint8_t stage_ = 0;     // which step of a multi-step request is running
  bool direct_ = false;        // the path chosen at submit, for every step
  std::chrono::milliseconds delay_{0};  // a fault hook's delay of the completion
};

// An open export's storage: a regular file or a block device.
struct BackingFile {
  std::string path;
  int fd = -1;         // buffered
  int direct_fd = -1;  // O_DIRECT, or -1 when the file system refuses it
  std::uint64_t size = 0;
  std::uint32_t logical_block_size = 512;
  bool read_only = false;
  bool block_device = false;
  bool trim_supported = false;
  // Orders requests of both paths on the same pages; used only when direct_fd >= 0.
  RangeLock order;
  bool mixed_paths() const { return direct_fd >= 0; }
  ~BackingFile();
};

// Whether a read or write of [offset, offset + length) from buf goes through O_DIRECT.
bool goes_direct(const BackingFile& f, std::uint64_t offset, std::uint64_t length, const void* buf);
// The range-lock mode of a request on f.
RangeLock::Mode order_mode(const BackingFile& f, const IoRequest& r);

// Largest BLKDISCARD issued at once; a trim is done in pieces of this.
inline constexpr std::uint64_t kDiscardChunk = 256ull << 20;

// Opens PATH (regular file or block device). Throws SystemError naming the path, the reason
// and a fix (missing file, permission, a directory, size 0).
std::shared_ptr<BackingFile> open_backing(const std::string& path, bool read_only);

class StorageEngine {
 public:
  struct Options {
    unsigned queue_depth = 256;  // SQ entries
  };
  StorageEngine(boost::asio::io_context& io, Options opts);
  // Waits for in-flight requests to complete (their callbacks run; a submit() from one of them
  // completes with -ECANCELED). Destroy the engine before its io_context.
  ~StorageEngine();
  StorageEngine(const StorageEngine&) = delete;
  StorageEngine& operator=(const StorageEngine&) = delete;

  // Registers buffers as io_uring fixed buffers. Call once, before any I/O.
  void register_buffers(std::span<const iovec> buffers);
  // An error hook, as liburing's tests inject results: called as each request reaches the
  // engine; `fail` nonzero completes it with that -errno without doing it, `hold` keeps it
  // that long before doing it (a slow device), `delay` holds its completion back that long
  // after the I/O. For tests; io thread.
  struct Fault {
    int fail = 0;
    std::chrono::milliseconds hold{0};
    std::chrono::milliseconds delay{0};
  };
  using FaultHook = std::function<Fault(const IoRequest& req)>;
  void set_fault_hook(FaultHook hook);
  // Queues req against file. Invalid requests (out of range, write to read-only) complete
  // through req->done with -EINVAL / -EROFS / -EBADF without touching the file.
  void submit(BackingFile& file, IoRequest* req);
  // Requests submitted and not yet completed.
  unsigned in_flight() const;

  // Counters since construction, for tests and `ibdisk bench`.
  struct Stats {
    std::uint64_t submitted = 0;       // submit() calls
    std::uint64_t completed = 0;       // `done` callbacks run
    std::uint64_t sqes = 0;            // SQEs prepared, requeued remainders and extra steps included
    std::uint64_t submit_calls = 0;    // io_uring_submit() calls, each one io_uring_enter
    std::uint64_t direct = 0;          // reads/writes through the O_DIRECT fd
    std::uint64_t buffered = 0;        // reads/writes through the page cache
    std::uint64_t fixed = 0;           // READ_FIXED / WRITE_FIXED
    std::uint64_t short_requeues = 0;  // short reads/writes resubmitted for the remainder
    std::uint64_t zero_fills = 0;      // write-zeroes done by writing zeroes (no fallocate)
    std::uint64_t pending_peak = 0;    // most requests waiting for ring space at once
    std::uint64_t discards = 0;        // BLKDISCARD calls on the helper thread
    std::uint64_t injected = 0;        // requests the fault hook failed or delayed
  };
  const Stats& stats() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace ibdisk::target
