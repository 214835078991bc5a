// The io_uring storage engine (see storage.h for the contract).
//
// A request moves through at most three steps (IoRequest::stage_): the main operation, a
// zero-filling write loop when the file system cannot zero a range itself, and a datasync
// for FUA on trim / write-zeroes. on_result() advances it; a short read or write stays in
// its step and is requeued for the remainder, on the path chosen at submit. A block device's
// trim runs on a helper thread (BLKDISCARD has no io_uring opcode before Linux 6.12). Nothing
// on this path allocates or throws, apart from the fault hook's timers (tests only).
#include "target/storage.h"

#include <fcntl.h>
#include <liburing.h>
#include <linux/fs.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <fstream>
#include <mutex>
#include <optional>
#include <thread>

#include "common/error.h"
#include "common/log.h"
#include "target/extents.h"

namespace ibdisk::target {
namespace {

enum Stage : std::uint8_t {
  kStageMain = 0,      // the request's own operation
  kStageZeroFill = 1,  // write-zeroes by writing from the zero page, done_bytes so far
  kStageFuaSync = 2,   // datasync after a trim / write-zeroes that asked for FUA
};

// Largest write of the zero-fill fallback; the source is a read-only mapping of the zero page.
constexpr std::size_t kZeroChunk = std::size_t{1} << 20;
// Completions taken from the CQ per peek.
constexpr unsigned kReapBatch = 64;
static_assert(kZeroChunk % 4096 == 0, "the zero buffer must satisfy any O_DIRECT alignment");

std::shared_ptr<spdlog::logger> storage_log() {
  static const auto l = logger("storage");
  return l;
}

bool aligned(std::uint64_t v, std::uint32_t a) { return (v & (a - 1)) == 0; }

}  // namespace

namespace {

// BLKDISCARD off the io thread: one helper thread per engine, started on first use. Each trim
// goes in pieces of kDiscardChunk, so a stopping target waits for at most one piece per trim.
class Discarder {
 public:
  struct Job {
    IoRequest* req = nullptr;
    int fd = -1;
    std::uint64_t first = 0, end = 0;
    int result = 0;
  };
  // notify runs on the helper thread after each finished job: it must only post.
  explicit Discarder(std::function<void()> notify) : notify_(std::move(notify)) {}
  ~Discarder() {
    {
      std::lock_guard lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
  }
  void push(const Job& j) {
    {
      std::lock_guard lock(mu_);
      queue_.push_back(j);
      ++busy_;
      if (!thread_.joinable()) thread_ = std::thread([this] { run(); });
    }
    cv_.notify_all();
  }
  std::vector<Job> take_done() {
    std::lock_guard lock(mu_);
    return std::exchange(done_, {});
  }
  // Blocks until every pushed job is done (shutdown).
  void wait_idle() {
    std::unique_lock lock(mu_);
    idle_cv_.wait(lock, [this] { return busy_ == 0; });
  }

 private:
  void run() {
    std::unique_lock lock(mu_);
    for (;;) {
      cv_.wait(lock, [this] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;
      Job j = queue_.front();
      queue_.pop_front();
      lock.unlock();
      for (std::uint64_t at = j.first; at < j.end && j.result == 0; at += kDiscardChunk) {
        std::uint64_t range[2] = {at, std::min(j.end - at, kDiscardChunk)};
        if (::ioctl(j.fd, BLKDISCARD, range) != 0) j.result = -errno;
      }
      lock.lock();
      done_.push_back(j);
      --busy_;
      idle_cv_.notify_all();
      notify_();
    }
  }

  std::function<void()> notify_;
  std::mutex mu_;
  std::condition_variable cv_, idle_cv_;
  std::deque<Job> queue_;
  std::vector<Job> done_;
  unsigned busy_ = 0;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace

struct StorageEngine::Impl {
  Impl(boost::asio::io_context& io, Options opts);
  ~Impl();

  void submit(BackingFile& f, IoRequest* r);
  void register_buffers(std::span<const iovec> buffers);

  static int check(const BackingFile& f, const IoRequest& r, unsigned fixed_count);
  void start(IoRequest* r);
  void enqueue(IoRequest* r);
  bool prep(IoRequest* r);
  void prep_rw(io_uring_sqe* sqe, IoRequest* r, bool write, std::byte* buf, std::uint32_t len, bool fixed);
  void close();
  void on_result(IoRequest* r, int res);
  void finish(IoRequest* r, int res);
  void finish_later(IoRequest* r, int res);
  void fill_from_pending();
  void schedule_flush();
  void submit_now();
  void reap();
  void drain_ready();
  void turn();
  void arm_eventfd();
  void drain_for_shutdown();
  void collect_discards();

  boost::asio::io_context& io_;
  io_uring ring_{};
  bool ring_ready_ = false;
  unsigned capacity_ = 0;  // requests in the ring at most: the SQ size, so the CQ never overflows
  unsigned in_ring_ = 0;   // SQEs prepared or submitted whose CQE has not been reaped
  unsigned in_flight_ = 0;
  unsigned fixed_count_ = 0;
  bool flush_scheduled_ = false;
  bool closing_ = false;
  IoRequest* pending_head_ = nullptr;  // waiting for ring space, in order
  IoRequest* pending_tail_ = nullptr;
  unsigned pending_count_ = 0;
  IoRequest* ready_head_ = nullptr;  // finished without I/O; `done` runs on the next turn
  IoRequest* ready_tail_ = nullptr;
  std::optional<boost::asio::posix::stream_descriptor> eventfd_;
  std::uint64_t eventfd_value_ = 0;
  // Handlers still queued in the io_context when the engine is gone see false and return.
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
  std::byte* zeroes_ = nullptr;
  Stats stats_;
  FaultHook fault_;
  struct Delayed {
    IoRequest* req;
    int res;
    std::shared_ptr<boost::asio::steady_timer> timer;
  };
  std::vector<Delayed> delayed_;  // completions a fault hook holds back
  unsigned discarding_ = 0;        // trims at the helper thread
  std::optional<Discarder> discarder_;
};

StorageEngine::Impl::Impl(boost::asio::io_context& io, Options opts) : io_(io) {
  if (opts.queue_depth == 0 || opts.queue_depth > 32768) {
    throw SystemError("storage engine", "queue depth " + std::to_string(opts.queue_depth) + " is out of range",
                      "use 1 to 32768 (the default is 256)");
  }
  // SUBMIT_ALL (5.18): one bad SQE must not hold back the rest of a batch. COOP_TASKRUN (5.19):
  // completions do not interrupt the io thread while it runs; a sleeping thread is still woken.
  // Older kernels refuse unknown flags with EINVAL, so drop them newest first.
  io_uring_params params{};
  int ret = -EINVAL;
  for (const unsigned flags : {IORING_SETUP_SUBMIT_ALL | IORING_SETUP_COOP_TASKRUN, IORING_SETUP_SUBMIT_ALL, 0u}) {
    params = io_uring_params{};
    params.flags = flags;
    ret = io_uring_queue_init_params(opts.queue_depth, &ring_, &params);
    if (ret != -EINVAL) break;
  }
  if (ret < 0) {
    const std::string call = "io_uring_queue_init(" + std::to_string(opts.queue_depth) + " entries)";
    switch (-ret) {
      case ENOSYS:
        throw SystemError(call, -ret, "this kernel has no io_uring: use Linux 5.10 or newer built with CONFIG_IO_URING");
      case EPERM:
        throw SystemError(call, -ret,
                          "io_uring is disabled: set sysctl kernel.io_uring_disabled=0, or allow io_uring_setup in "
                          "the container's seccomp profile");
      case ENOMEM:
        throw SystemError(call, -ret, "raise the locked-memory limit (ulimit -l) or lower the queue depth");
      default:
        throw SystemError(call, -ret, "check the kernel log (dmesg)");
    }
  }
  ring_ready_ = true;
  capacity_ = params.sq_entries;

  const int efd = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (efd < 0) {
    const int err = errno;
    io_uring_queue_exit(&ring_);
    throw SystemError("eventfd()", err, "raise the open-file limit (ulimit -n)");
  }
  ret = io_uring_register_eventfd(&ring_, efd);
  if (ret < 0) {
    ::close(efd);
    io_uring_queue_exit(&ring_);
    throw SystemError("io_uring_register_eventfd()", -ret, "check the kernel log (dmesg)");
  }
  eventfd_.emplace(io_, efd);

  void* z = ::mmap(nullptr, kZeroChunk, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (z == MAP_FAILED) {
    const int err = errno;
    eventfd_.reset();
    io_uring_queue_exit(&ring_);
    throw SystemError("mmap(zero buffer)", err, "raise the address-space limit (ulimit -v)");
  }
  zeroes_ = static_cast<std::byte*>(z);
  arm_eventfd();
}

// Runs before the Impl is freed, so callbacks that touch the engine still find it whole.
void StorageEngine::Impl::close() {
  closing_ = true;
  drain_for_shutdown();
}

StorageEngine::Impl::~Impl() {
  discarder_.reset();  // joins the helper thread: nothing posts to io_ after this
  *alive_ = false;
  boost::system::error_code ec;
  if (eventfd_) eventfd_->close(ec);
  eventfd_.reset();
  if (ring_ready_) io_uring_queue_exit(&ring_);
  if (zeroes_) ::munmap(zeroes_, kZeroChunk);
}

void StorageEngine::Impl::register_buffers(std::span<const iovec> buffers) {
  if (buffers.empty()) return;
  const int ret = io_uring_register_buffers(&ring_, buffers.data(), static_cast<unsigned>(buffers.size()));
  if (ret < 0) {
    std::size_t bytes = 0;
    for (const auto& b : buffers) bytes += b.iov_len;
    const std::string call =
        "io_uring_register_buffers(" + std::to_string(buffers.size()) + " buffers, " + std::to_string(bytes) + " bytes)";
    if (ret == -ENOMEM) throw SystemError(call, -ret, "raise the locked-memory limit (ulimit -l) or use fewer buffers");
    if (ret == -EBUSY) throw SystemError(call, -ret, "register buffers once per engine, before any I/O");
    throw SystemError(call, -ret, "each buffer must be non-empty, at most 1 GiB and anonymous memory");
  }
  fixed_count_ = static_cast<unsigned>(buffers.size());
}

int StorageEngine::Impl::check(const BackingFile& f, const IoRequest& r, unsigned fixed_count) {
  if (f.fd < 0) return -EBADF;
  switch (r.op) {
    case IoOp::kRead:
    case IoOp::kWrite:
      if (r.length > 0 && r.data == nullptr) return -EINVAL;
      if (r.fixed_index >= 0 && static_cast<unsigned>(r.fixed_index) >= fixed_count) return -EINVAL;
      break;
    case IoOp::kFlush:
      return 0;
    case IoOp::kExtents:
      if (r.data == nullptr) return -EINVAL;
      if (r.offset > f.size || r.length > f.size - r.offset) return -EINVAL;
      return 0;
    case IoOp::kTrim:
    case IoOp::kWriteZeroes:
      break;
    default:
      return -EINVAL;
  }
  if (r.op != IoOp::kRead && f.read_only) return -EROFS;
  if (r.offset > f.size || r.length > f.size - r.offset) return -EINVAL;  // no overflow: offset <= size
  if (r.op == IoOp::kTrim && !f.trim_supported) return -EOPNOTSUPP;
  return 0;
}

void StorageEngine::Impl::submit(BackingFile& f, IoRequest* r) {
  r->file_ = &f;
  r->next_ = nullptr;
  r->done_bytes = 0;
  r->stage_ = kStageMain;
  r->delay_ = std::chrono::milliseconds(0);
  r->direct_ = (r->op == IoOp::kRead || r->op == IoOp::kWrite) && goes_direct(f, r->offset, r->length, r->data);
  ++in_flight_;
  ++stats_.submitted;
  if (closing_) return finish_later(r, -ECANCELED);
  if (const int err = check(f, *r, fixed_count_); err != 0) return finish_later(r, err);
  if (fault_) {
    const Fault fault = fault_(*r);
    if (fault.fail != 0 || fault.delay.count() > 0 || fault.hold.count() > 0) ++stats_.injected;
    if (fault.fail != 0) return finish_later(r, fault.fail < 0 ? fault.fail : -fault.fail);
    r->delay_ = fault.delay;
    if (fault.hold.count() > 0) {
      auto timer = std::make_shared<boost::asio::steady_timer>(io_, fault.hold);
      timer->async_wait([this, alive = alive_, r, timer](const boost::system::error_code&) {
        if (!*alive) return;
        if (closing_) return finish(r, -ECANCELED);
        if (r->length == 0 && r->op != IoOp::kFlush) return finish_later(r, 0);
        start(r);
      });
      return;
    }
  }
  if (r->length == 0 && r->op != IoOp::kFlush) return finish_later(r, 0);
  start(r);
}

// Chooses the first step of a request; steps that need no ring entry finish here.
void StorageEngine::Impl::start(IoRequest* r) {
  BackingFile& f = *r->file_;
  if (r->op == IoOp::kExtents) return finish_later(r, map_extents(f, r->offset, r->length, r->data));
  if (r->op == IoOp::kTrim && f.block_device) {
    // BLKDISCARD has no io_uring opcode before Linux 6.12's uring_cmd, and it is synchronous:
    // the helper thread does it. Discard is advisory, so round inwards to whole logical blocks.
    const std::uint64_t lbs = f.logical_block_size;
    const std::uint64_t first = (r->offset + lbs - 1) / lbs * lbs;
    const std::uint64_t end = (r->offset + r->length) / lbs * lbs;
    if (end > first) {
      if (!discarder_) {
        discarder_.emplace([this, alive = alive_] {
          boost::asio::post(io_, [this, alive] {
            if (*alive) collect_discards();
          });
        });
      }
      ++discarding_;
      ++stats_.discards;
      discarder_->push({r, f.fd, first, end, 0});
      return;
    }
    if (r->flags & kIoFua) {
      r->stage_ = kStageFuaSync;
      return enqueue(r);
    }
    return finish_later(r, 0);
  }
  if (r->op == IoOp::kWriteZeroes && f.block_device &&
      !(aligned(r->offset, f.logical_block_size) && aligned(r->length, f.logical_block_size))) {
    r->stage_ = kStageZeroFill;  // fallocate on a block device takes whole blocks only
  }
  enqueue(r);
}

void StorageEngine::Impl::enqueue(IoRequest* r) {
  if (pending_head_ != nullptr || in_ring_ >= capacity_ || !prep(r)) {
    r->next_ = nullptr;
    if (pending_tail_) pending_tail_->next_ = r;
    else pending_head_ = r;
    pending_tail_ = r;
    ++pending_count_;
    stats_.pending_peak = std::max<std::uint64_t>(stats_.pending_peak, pending_count_);
  }
  schedule_flush();
}

void StorageEngine::Impl::fill_from_pending() {
  while (pending_head_ != nullptr && in_ring_ < capacity_) {
    IoRequest* r = pending_head_;
    if (!prep(r)) break;
    pending_head_ = r->next_;
    if (pending_head_ == nullptr) pending_tail_ = nullptr;
    --pending_count_;
  }
}

// buf and len: what is left of the transfer (the request's, or a zero-fill chunk).
void StorageEngine::Impl::prep_rw(io_uring_sqe* sqe, IoRequest* r, bool write, std::byte* buf,
                                  std::uint32_t len, bool fixed) {
  BackingFile& f = *r->file_;
  const std::uint64_t off = r->offset + r->done_bytes;
  // The request's own data keeps the path chosen at submit; zero-fill chunks (exclusive in
  // the range lock) take whichever fits.
  const bool direct = r->stage_ == kStageZeroFill ? goes_direct(f, off, len, buf) : r->direct_;
  const int fd = direct ? f.direct_fd : f.fd;
  ++(direct ? stats_.direct : stats_.buffered);
  if (fixed) {
    ++stats_.fixed;
    if (write) io_uring_prep_write_fixed(sqe, fd, buf, len, off, r->fixed_index);
    else io_uring_prep_read_fixed(sqe, fd, buf, len, off, r->fixed_index);
  } else if (write) {
    io_uring_prep_write(sqe, fd, buf, len, off);
  } else {
    io_uring_prep_read(sqe, fd, buf, len, off);
  }
  if (write && (r->flags & kIoFua)) sqe->rw_flags = RWF_DSYNC;
}

// Fills one SQE for the request's current step; false when the SQ has no room.
bool StorageEngine::Impl::prep(IoRequest* r) {
  io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
  if (sqe == nullptr) {
    submit_now();
    sqe = io_uring_get_sqe(&ring_);
    if (sqe == nullptr) return false;
  }
  BackingFile& f = *r->file_;
  const auto off = static_cast<off_t>(r->offset);
  const auto len = static_cast<off_t>(r->length);
  switch (r->stage_) {
    case kStageFuaSync:
      io_uring_prep_fsync(sqe, f.fd, IORING_FSYNC_DATASYNC);
      break;
    case kStageZeroFill: {
      const auto chunk = static_cast<std::uint32_t>(std::min<std::size_t>(r->length - r->done_bytes, kZeroChunk));
      prep_rw(sqe, r, true, zeroes_, chunk, false);
      break;
    }
    default:
      switch (r->op) {
        case IoOp::kRead:
          prep_rw(sqe, r, false, r->data + r->done_bytes, r->length - r->done_bytes, r->fixed_index >= 0);
          break;
        case IoOp::kWrite:
          prep_rw(sqe, r, true, r->data + r->done_bytes, r->length - r->done_bytes, r->fixed_index >= 0);
          break;
        case IoOp::kFlush:
          io_uring_prep_fsync(sqe, f.fd, IORING_FSYNC_DATASYNC);
          break;
        case IoOp::kTrim:
          io_uring_prep_fallocate(sqe, f.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, len);
          break;
        case IoOp::kWriteZeroes:
          // On a block device this is blkdev_issue_zeroout, as BLKZEROOUT, but off this thread.
          // On a file with kIoMayTrim a hole: it reads as zeros and takes no space.
          io_uring_prep_fallocate(sqe, f.fd,
                                  ((r->flags & kIoMayTrim) && !f.block_device ? FALLOC_FL_PUNCH_HOLE
                                                                              : FALLOC_FL_ZERO_RANGE) |
                                      FALLOC_FL_KEEP_SIZE,
                                  off, len);
          break;
        case IoOp::kExtents:
          break;  // never in the ring: start() answers it
      }
  }
  io_uring_sqe_set_data(sqe, r);
  ++in_ring_;
  ++stats_.sqes;
  if (io_uring_sq_space_left(&ring_) == 0) submit_now();
  return true;
}

void StorageEngine::Impl::on_result(IoRequest* r, int res) {
  if (res == -EINTR || res == -EAGAIN) return enqueue(r);  // transient: the same step again
  switch (r->stage_) {
    case kStageMain:
      if (r->op == IoOp::kRead || r->op == IoOp::kWrite) {
        if (res < 0) return finish(r, res);
        if (res == 0) {
          // Only a file truncated behind the export's back ends a range checked at submit.
          storage_log()->warn("{}: {} at {} stopped at {} of {} bytes: the file is shorter than when it was opened",
                      r->file_->path, r->op == IoOp::kRead ? "read" : "write", r->offset, r->done_bytes,
                      r->length);
          return finish(r, -EIO);
        }
        r->done_bytes += static_cast<std::uint32_t>(res);
        if (r->done_bytes < r->length) {
          ++stats_.short_requeues;
          if (r->direct_ &&
              !goes_direct(*r->file_, r->offset + r->done_bytes, r->length - r->done_bytes, r->data + r->done_bytes)) {
            // Going on through the page cache would break the range lock's promise (one path per
            // request); O_DIRECT transfers stop short only at block boundaries, so this is a device fault.
            storage_log()->error("{}: direct {} at {} stopped at {} of {} bytes, not at a block boundary",
                                 r->file_->path, r->op == IoOp::kRead ? "read" : "write", r->offset, r->done_bytes,
                                 r->length);
            return finish(r, -EIO);
          }
          return enqueue(r);
        }
        return finish(r, static_cast<int>(r->length));
      }
      if (r->op == IoOp::kWriteZeroes && res == -EOPNOTSUPP) {
        r->stage_ = kStageZeroFill;
        r->done_bytes = 0;
        return enqueue(r);
      }
      if (res < 0) return finish(r, res);
      if ((r->flags & kIoFua) && r->op != IoOp::kFlush) {
        r->stage_ = kStageFuaSync;
        return enqueue(r);
      }
      return finish(r, 0);
    case kStageZeroFill:
      if (res < 0) return finish(r, res);
      if (res == 0) return finish(r, -EIO);
      r->done_bytes += static_cast<std::uint32_t>(res);
      if (r->done_bytes < r->length) return enqueue(r);
      ++stats_.zero_fills;
      return finish(r, 0);  // FUA was honoured by RWF_DSYNC on every chunk
    default:
      return finish(r, res < 0 ? res : 0);
  }
}

void StorageEngine::Impl::finish(IoRequest* r, int res) {
  if (r->delay_.count() > 0 && !closing_) {
    auto timer = std::make_shared<boost::asio::steady_timer>(io_, std::exchange(r->delay_, {}));
    delayed_.push_back({r, res, timer});
    timer->async_wait([this, alive = alive_, r](const boost::system::error_code&) {
      if (!*alive) return;
      const auto it = std::find_if(delayed_.begin(), delayed_.end(), [r](const Delayed& d) { return d.req == r; });
      if (it == delayed_.end()) return;  // completed by shutdown
      const int held = it->res;
      delayed_.erase(it);
      finish(r, held);
    });
    return;
  }
  --in_flight_;
  ++stats_.completed;
  r->done(r, res);  // may submit more, or free r
}

void StorageEngine::Impl::finish_later(IoRequest* r, int res) {
  r->result_ = res;
  r->next_ = nullptr;
  if (ready_tail_) ready_tail_->next_ = r;
  else ready_head_ = r;
  ready_tail_ = r;
  schedule_flush();
}

void StorageEngine::Impl::drain_ready() {
  // Detach the list first: callbacks may add to it.
  IoRequest* r = ready_head_;
  ready_head_ = ready_tail_ = nullptr;
  while (r != nullptr) {
    IoRequest* next = r->next_;
    finish(r, r->result_);
    r = next;
  }
}

void StorageEngine::Impl::schedule_flush() {
  if (flush_scheduled_ || closing_) return;
  flush_scheduled_ = true;
  boost::asio::post(io_, [this, alive = alive_] {
    if (*alive) turn();
  });
}

// One turn of the engine, from a posted flush or the eventfd: submit what is queued, take the
// completions (buffered reads served from the page cache complete inside io_uring_enter), run
// callbacks, and submit what they queued in the same turn.
void StorageEngine::Impl::turn() {
  flush_scheduled_ = true;  // submissions made by callbacks go out at the end of this turn
  submit_now();
  reap();
  drain_ready();
  flush_scheduled_ = false;
  submit_now();
  if (ready_head_ != nullptr) schedule_flush();
}

void StorageEngine::Impl::submit_now() {
  while (io_uring_sq_ready(&ring_) > 0) {
    const int ret = io_uring_submit(&ring_);
    ++stats_.submit_calls;
    if (ret > 0 || ret == -EINTR) continue;
    if (ret == 0) return;
    if (ret == -EAGAIN || ret == -EBUSY) {
      // Kernel short of memory or CQ backlog: try again on the next turn.
      if (!flush_scheduled_ && !closing_) schedule_flush();
      return;
    }
    storage_log()->error("io_uring_submit: {}; {} requests wait in the ring", errno_text(-ret), io_uring_sq_ready(&ring_));
    if (!closing_) schedule_flush();
    return;
  }
}

void StorageEngine::Impl::reap() {
  io_uring_cqe* cqes[kReapBatch];
  struct Completion {
    IoRequest* req;
    int res;
  } batch[kReapBatch];
  for (;;) {
    const unsigned n = io_uring_peek_batch_cqe(&ring_, cqes, kReapBatch);
    if (n == 0) break;
    for (unsigned i = 0; i < n; ++i) {
      batch[i] = {static_cast<IoRequest*>(io_uring_cqe_get_data(cqes[i])), cqes[i]->res};
    }
    io_uring_cq_advance(&ring_, n);
    in_ring_ -= n;
    for (unsigned i = 0; i < n; ++i) on_result(batch[i].req, batch[i].res);
    fill_from_pending();
  }
}

// async_wait, not async_read_some: no speculative read() each time it is armed.
void StorageEngine::Impl::arm_eventfd() {
  eventfd_->async_wait(boost::asio::posix::descriptor_base::wait_read,
                       [this, alive = alive_](const boost::system::error_code& ec) {
                         if (!*alive || ec == boost::asio::error::operation_aborted) return;
                         if (ec) storage_log()->error("waiting on the io_uring eventfd: {}", ec.message());
                         // Reset the counter before reaping: a CQE posted after this wakes us again.
                         if (::read(eventfd_->native_handle(), &eventfd_value_, sizeof eventfd_value_) < 0 &&
                             errno != EAGAIN) {
                           storage_log()->error("reading the io_uring eventfd: {}", errno_text(errno));
                         }
                         turn();
                         arm_eventfd();
                       });
}

void StorageEngine::Impl::collect_discards() {
  for (const Discarder::Job& j : discarder_->take_done()) {
    --discarding_;
    IoRequest* r = j.req;
    if (j.result == 0 && (r->flags & kIoFua)) {
      r->stage_ = kStageFuaSync;
      enqueue(r);
      continue;
    }
    finish(r, j.result);
  }
}

void StorageEngine::Impl::drain_for_shutdown() {
  while (in_flight_ > 0) {
    for (auto& d : std::exchange(delayed_, {})) {
      d.timer->cancel();
      finish(d.req, d.res);
    }
    if (discarding_ > 0) {
      discarder_->wait_idle();
      collect_discards();
    }
    drain_ready();
    fill_from_pending();
    submit_now();
    if (in_ring_ == 0) {
      if (ready_head_ == nullptr && pending_head_ == nullptr && in_flight_ > 0) {
        storage_log()->error("storage engine closing with {} requests unaccounted for", in_flight_);
        return;
      }
      continue;
    }
    io_uring_cqe* cqe = nullptr;
    const int ret = io_uring_wait_cqe(&ring_, &cqe);
    if (ret < 0 && ret != -EINTR) {
      storage_log()->error("io_uring_wait_cqe while closing: {}; {} requests abandoned", errno_text(-ret), in_flight_);
      return;
    }
    reap();
  }
}

StorageEngine::StorageEngine(boost::asio::io_context& io, Options opts) : impl_(std::make_unique<Impl>(io, opts)) {}
void StorageEngine::set_fault_hook(FaultHook hook) { impl_->fault_ = std::move(hook); }
StorageEngine::~StorageEngine() { impl_->close(); }
void StorageEngine::register_buffers(std::span<const iovec> buffers) { impl_->register_buffers(buffers); }
void StorageEngine::submit(BackingFile& file, IoRequest* req) { impl_->submit(file, req); }
unsigned StorageEngine::in_flight() const { return impl_->in_flight_; }
const StorageEngine::Stats& StorageEngine::stats() const { return impl_->stats_; }

}  // namespace ibdisk::target
