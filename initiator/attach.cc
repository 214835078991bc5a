#include "initiator/attach.h"

#include <dirent.h>
#include <fcntl.h>
#include <linux/sockios.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <ctime>
#include <deque>
#include <fstream>
#include <memory>
#include <sstream>
#include <unordered_map>

#include <boost/asio/posix/stream_descriptor.hpp>
#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/log.h"
#include "initiator/io_buffers.h"
#include "target/nbd/protocol.h"

namespace ibdisk::initiator {
namespace {

namespace asio = boost::asio;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

auto log() {
  static auto l = ibdisk::logger("attach");
  return l;
}

constexpr milliseconds kFirstBackoff{100};
constexpr milliseconds kMaxBackoff{5000};
// The kernel must not time a request out while a session is re-established: its timeout is
// the reconnect timeout plus this margin, and 30 days for "forever" (the kernel keeps the
// timeout in jiffies, 32 bits).
constexpr std::uint64_t kKernelTimeoutMarginS = 120;
constexpr std::uint64_t kForeverKernelTimeoutS = 30ull * 24 * 3600;
// After SIGTERM, how long requests in flight may take before the device is disconnected.
constexpr milliseconds kDrainOnStop{10000};

std::string utc_now() {
  const std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

double seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// The read buffer of a kernel socket; write payloads at least this large skip it and are
// read straight into the request.
constexpr std::size_t kInBuffer = 64 * 1024;
// Reads and writes of at least this many bytes are spread over the session's queues (lane()).
constexpr std::uint32_t kSpreadFrom = 128 * 1024;
// Request buffers (io_buffers.h): a QD 8 stream of 1 MiB requests, with as much again waiting
// for the kernel to read it, fits several times over.
constexpr std::size_t kArenaBytes = 64u << 20;
// Send buffer of each socket, both ways: a 1 MiB request or reply goes in one call, not in
// pieces of the default ~200 KiB with a wakeup each.
constexpr int kSocketBuffer = 4 << 20;
// Replies with payloads this large go to the kernel by reference (flush_out()), through a pipe.
constexpr std::uint32_t kSpliceFrom = 64 * 1024;
constexpr int kPipeBytes = 2 << 20;
// Replies the kernel may still be reading: past either bound, ask how far it has read.
constexpr std::size_t kUnreadEntries = 256;
constexpr std::uint64_t kUnreadBytes = 16u << 20;

// One kernel request on its way through the session.
struct Request {
  nbd::Request req;
  IoBuffer data;  // READ and WRITE payload
  nbd::SimpleReplyWire reply{};  // the kernel may read it from here (flush_out())
  unsigned parts_left = 0;
  int status = 0;        // first error of any part, -errno
  bool lost = false;     // a part saw the session go: send again on the next session
  bool submitted = false;
  std::uint64_t gen = 0;  // the session it was submitted on
};

struct Reply {
  std::unique_ptr<Request> req;  // its header, and a read's payload
  std::uint32_t payload = 0;
  std::size_t sent = 0;  // bytes of it written, or in the pipe
  std::size_t total() const { return sizeof req->reply + payload; }
};

// Our end of one socketpair: the kernel's requests in, replies out. Non-blocking reads and
// writes with our own offsets, Asio only for readiness, so the socket can move from one
// io_context to another (a new session) without losing a partly read request.
struct KernelSocket {
  unsigned q = 0;
  int fd = -1;
  std::unique_ptr<asio::posix::stream_descriptor> sd;
  std::uint64_t epoch = 0;  // bumped when sd moves; older waits are ignored
  bool read_armed = false, write_armed = false;
  bool flush_posted = false;  // a flush_out() is queued for the end of this loop turn
  bool eof = false;
  // What the kernel sent and we have not parsed yet: in[in_pos, in_end). One read takes as
  // many requests (and small write payloads) as are waiting, not one system call each.
  std::unique_ptr<std::byte[]> in{new std::byte[kInBuffer]};
  std::size_t in_pos = 0, in_end = 0;
  std::unique_ptr<Request> receiving;  // a WRITE whose payload is arriving
  std::size_t payload_got = 0;
  std::unordered_map<Request*, std::unique_ptr<Request>> active;
  std::deque<Reply> out;
  // Replies go to the kernel by reference: vmsplice into a pipe, splice into the socket. The
  // kernel copies them out when it reads, so each one stays here until then: what has been
  // read is what entered the socket minus what its other end still holds (SIOCINQ on our copy
  // of the kernel's end).
  int kernel_fd = -1;
  int pipe_r = -1, pipe_w = -1;
  std::size_t in_pipe = 0;
  std::uint64_t written = 0;  // bytes into the socket since the start, by writev or splice
  std::uint64_t unread_bytes = 0;
  struct Unread {
    std::uint64_t end;  // the stream offset of its last byte + 1
    std::size_t bytes;
    std::unique_ptr<Request> req;
  };
  std::deque<Unread> unread;
};

class Attachment {
 public:
  explicit Attachment(const AttachOptions& o) : opts_(o) {}
  ~Attachment();
  int run();

 private:
  void start_signals();
  void connect_session();
  void attach_device();
  void reclaim_stale(int index);
  asio::io_context& current_io() { return client_ ? client_->io_context() : idle_io_; }
  void bind_all();
  void release_all();
  void bind(KernelSocket& s);
  void arm_read(KernelSocket& s);
  void arm_write(KernelSocket& s);
  void arm_signals();
  void on_signal();
  void on_readable(KernelSocket& s);
  void on_request(KernelSocket& s, std::unique_ptr<Request> r);
  void submit(KernelSocket& s, Request* r);
  void part_done(KernelSocket& s, Request* r, std::uint64_t gen, int status);
  void finish(KernelSocket& s, Request* r, int status);
  void reply(KernelSocket& s, std::unique_ptr<Request> r, std::uint32_t error, bool with_payload);
  void flush_out(KernelSocket& s);
  void reclaim(KernelSocket& s);
  IoBuffer buffer(std::size_t bytes);
  void close_socket(KernelSocket& s, const std::string& why);
  void on_lost(const std::string& reason);
  void try_reconnect();
  void fail_held();
  std::size_t outstanding() const;
  bool all_closed() const;
  void write_state(const std::string& state);
  std::string where() const { return opts_.client.host + ":" + std::to_string(opts_.client.port); }
  // The session queue for a command. Over RDMA, large transfers go round robin over all of them,
  // whichever kernel queue the request came from: one fio job (one CPU) fills one kernel queue,
  // and spread, its transfers keep every target worker busy (on rxe each worker also does its
  // RDMA work). Small ones, and everything over TCP, stay on their kernel queue's session queue:
  // there spreading costs more wakeups than it gains. Guest, 1 MiB reads QD 8, spread vs not:
  // RDMA 63-66 vs 50-58 MiB/s, TCP 92-104 vs 108-121; 4 KiB random reads QD 16 RDMA -15%.
  unsigned lane(const KernelSocket& s, std::uint32_t length) {
    if (length < kSpreadFrom || client_->transport(s.q) != "rdma") return s.q;
    return next_lane_++ % client_->queue_count();
  }

  AttachOptions opts_;
  IoBufferPool pool_{kArenaBytes};
  std::unique_ptr<Client> client_;
  proto::Opened opened_;
  std::uint16_t tflags_ = 0;
  asio::io_context idle_io_;  // serves the kernel sockets while there is no session
  std::vector<std::unique_ptr<KernelSocket>> socks_;
  std::unique_ptr<NbdDevice> dev_;
  std::string transport_;
  // signals
  int sigfd_ = -1;
  std::unique_ptr<asio::posix::stream_descriptor> sig_sd_;
  std::uint64_t sig_epoch_ = 0;
  bool sig_armed_ = false;
  // state
  bool wake_ = false;         // something for the main loop: run_until returns
  bool stop_requested_ = false;
  Clock::time_point stop_deadline_{};
  bool disconnect_sent_ = false;
  std::uint64_t gen_ = 1;
  unsigned next_lane_ = 0;
  Clock::time_point lost_since_{};
  Clock::time_point next_attempt_{};
  milliseconds backoff_ = kFirstBackoff;
  unsigned attempts_ = 0;
  std::string last_failure_;
  bool failing_ = false;      // past the reconnect timeout: requests fail with EIO
  std::uint64_t reconnects_ = 0;
  std::string state_file_;
  std::string state_;
};

Attachment::~Attachment() {
  for (auto& s : socks_) {
    if (s->sd) s->sd->release();
    s->sd.reset();
    for (const int fd : {s->fd, s->kernel_fd, s->pipe_r, s->pipe_w}) {
      if (fd >= 0) ::close(fd);
    }
  }
  if (sig_sd_) sig_sd_->release();
  sig_sd_.reset();
  if (sigfd_ >= 0) ::close(sigfd_);
  if (!state_file_.empty()) ::unlink(state_file_.c_str());
}

void Attachment::start_signals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  sigfd_ = ::signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
  if (sigfd_ < 0) throw SystemError("signalfd", errno);
}

void Attachment::connect_session() {
  auto c = Client::connect(opts_.client);
  proto::Opened o = c->open(opts_.export_name, opts_.read_only);
  if (client_ == nullptr && opened_.info().size() != 0 && o.info().size() != opened_.info().size()) {
    log()->error("export '{}' on {} is now {} bytes, was {}: the device keeps the old size; I/O beyond the end fails",
                 opts_.export_name, where(), o.info().size(), opened_.info().size());
  }
  transport_ = c->transport(0);
  opened_ = o;
  c->register_memory(pool_.base(), pool_.size());
  client_ = std::move(c);
}

// A device whose attach process died keeps its dead sockets until it is disconnected: when
// our state file says so, this attach takes it over.
void Attachment::reclaim_stale(int index) {
  if (index < 0 || !nbd_device_connected(index)) return;
  for (const auto& st : list_attachments(opts_.state_dir)) {
    if (st.index != index || st.alive) continue;
    log()->warn("{}: reclaiming it from an earlier attach (pid {}, {}/{}) that exited without detaching", st.device, st.pid,
                st.target, st.export_name);
    nbd_disconnect_index(index);
    for (int i = 0; i < 100 && nbd_device_connected(index); ++i) ::usleep(20000);
    ::unlink(st.file.c_str());
  }
}

void Attachment::attach_device() {
  const unsigned queues = client_->queue_count();
  const auto& info = opened_.info();
  tflags_ = nbd::kFlagHasFlags;
  if (opts_.read_only || info.read_only()) tflags_ |= nbd::kFlagReadOnly;
  if (opened_.flush()) tflags_ |= nbd::kFlagSendFlush;
  if (opened_.fua()) tflags_ |= nbd::kFlagSendFua;
  if (opened_.trim() && !(tflags_ & nbd::kFlagReadOnly)) tflags_ |= nbd::kFlagSendTrim;
  if (opened_.write_zeroes() && !(tflags_ & nbd::kFlagReadOnly)) tflags_ |= nbd::kFlagSendWriteZeroes;
  // One session, one export handle: a flush on any queue covers writes completed on all.
  if (queues > 1) tflags_ |= nbd::kFlagCanMultiConn;

  reclaim_stale(opts_.device_index);
  NbdConfig cfg;
  cfg.index = opts_.device_index;
  cfg.size_bytes = info.size();
  cfg.block_size = std::clamp<std::uint64_t>(info.block_size(), 512, 4096);
  cfg.server_flags = tflags_;
  cfg.timeout_s = opts_.reconnect_forever
                      ? kForeverKernelTimeoutS
                      : static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::seconds>(opts_.reconnect_timeout).count()) +
                            kKernelTimeoutMarginS;
  for (unsigned q = 0; q < queues; ++q) {
    int sv[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) throw SystemError("socketpair", errno);
    auto s = std::make_unique<KernelSocket>();
    s->q = q;
    s->fd = sv[0];
    s->kernel_fd = sv[1];  // the kernel takes its own reference; ours is for SIOCINQ
    ::fcntl(s->fd, F_SETFL, ::fcntl(s->fd, F_GETFL) | O_NONBLOCK);
    for (const int fd : sv) {
      // Above net.core.wmem_max needs CAP_NET_ADMIN; without it the default stays, which works.
      if (::setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &kSocketBuffer, sizeof kSocketBuffer) != 0) {
        ::setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &kSocketBuffer, sizeof kSocketBuffer);
      }
    }
    int p[2];
    if (::pipe2(p, O_CLOEXEC | O_NONBLOCK) != 0) throw SystemError("pipe2", errno);
    s->pipe_r = p[0];
    s->pipe_w = p[1];
    ::fcntl(s->pipe_w, F_SETPIPE_SZ, kPipeBytes);  // larger is fewer calls; the default also works
    cfg.sockets.push_back(s->kernel_fd);
    socks_.push_back(std::move(s));
  }
  dev_ = NbdDevice::connect(cfg, opts_.kernel);
  // Requests as large as one ibdisk command where the kernel allows it: fewer splits.
  const std::string max_kb = "/sys/block/nbd" + std::to_string(dev_->index()) + "/queue/max_sectors_kb";
  std::ofstream(max_kb) << (client_->max_io() / 1024) << '\n';
}

void Attachment::bind_all() {
  for (auto& s : socks_) bind(*s);
  ++sig_epoch_;
  sig_armed_ = false;
  if (sig_sd_) sig_sd_->release();
  sig_sd_ = std::make_unique<asio::posix::stream_descriptor>(current_io(), sigfd_);
  arm_signals();
}

// Takes every descriptor off the current io_context (before that context goes away).
void Attachment::release_all() {
  for (auto& s : socks_) {
    ++s->epoch;
    s->read_armed = s->write_armed = s->flush_posted = false;
    if (s->sd) s->sd->release();
    s->sd.reset();
  }
  ++sig_epoch_;
  sig_armed_ = false;
  if (sig_sd_) sig_sd_->release();
  sig_sd_.reset();
}

void Attachment::bind(KernelSocket& s) {
  ++s.epoch;
  s.read_armed = s.write_armed = s.flush_posted = false;
  if (s.sd) s.sd->release();
  s.sd.reset();
  if (s.eof) return;
  s.sd = std::make_unique<asio::posix::stream_descriptor>(current_io(), s.fd);
  arm_read(s);
  if (!s.out.empty()) arm_write(s);
}

// No poll() after queueing a wait: Asio starts an async_wait with EPOLL_CTL_MOD on its
// edge-triggered registration, and the kernel re-checks readiness on MOD, so bytes that arrived
// after our last read wake the wait at once (boost/asio/detail/impl/epoll_reactor.ipp,
// start_op; fs/eventpoll.c, ep_modify).

void Attachment::arm_read(KernelSocket& s) {
  if (s.read_armed || s.eof || !s.sd) return;
  s.read_armed = true;
  s.sd->async_wait(asio::posix::stream_descriptor::wait_read, [this, &s, epoch = s.epoch](const boost::system::error_code& ec) {
    if (epoch != s.epoch) return;
    s.read_armed = false;
    if (!ec) on_readable(s);
  });
}

void Attachment::arm_write(KernelSocket& s) {
  if (s.write_armed || s.eof || !s.sd) return;
  s.write_armed = true;
  s.sd->async_wait(asio::posix::stream_descriptor::wait_write, [this, &s, epoch = s.epoch](const boost::system::error_code& ec) {
    if (epoch != s.epoch) return;
    s.write_armed = false;
    if (!ec) flush_out(s);
  });
}

void Attachment::arm_signals() {
  if (sig_armed_ || !sig_sd_) return;
  sig_armed_ = true;
  sig_sd_->async_wait(asio::posix::stream_descriptor::wait_read, [this, epoch = sig_epoch_](const boost::system::error_code& ec) {
    if (epoch != sig_epoch_) return;
    sig_armed_ = false;
    if (ec) return;
    on_signal();
    arm_signals();
  });
}

void Attachment::on_signal() {
  signalfd_siginfo si{};
  while (::read(sigfd_, &si, sizeof si) == static_cast<ssize_t>(sizeof si)) {
    if (stop_requested_) continue;
    log()->info("{} received: detaching {} once in-flight requests are answered", strsignal(static_cast<int>(si.ssi_signo)),
                dev_ ? dev_->path() : std::string("the device"));
    stop_requested_ = true;
    stop_deadline_ = Clock::now() + kDrainOnStop;
    write_state("detaching");
  }
  wake_ = true;
}

void Attachment::on_readable(KernelSocket& s) {
  bool drained = false;  // the last read returned less than it asked for
  for (;;) {
    // 1. Everything already buffered: headers, and the payloads of writes.
    while (!s.eof) {
      const std::size_t avail = s.in_end - s.in_pos;
      if (s.receiving) {
        Request& r = *s.receiving;
        const std::size_t take = std::min<std::size_t>(avail, r.req.length - s.payload_got);
        std::memcpy(r.data.get() + s.payload_got, s.in.get() + s.in_pos, take);
        s.in_pos += take;
        s.payload_got += take;
        if (s.payload_got < r.req.length) break;
        s.payload_got = 0;
        on_request(s, std::move(s.receiving));
        continue;
      }
      if (avail < sizeof(nbd::RequestWire)) break;
      auto r = std::make_unique<Request>();
      std::array<std::byte, sizeof(nbd::RequestWire)> hdr;
      std::memcpy(hdr.data(), s.in.get() + s.in_pos, hdr.size());
      s.in_pos += hdr.size();
      if (nbd::parse_request(hdr, &r->req) != nbd::Parse::kOk) {
        return close_socket(s, "a request with a bad magic number from the kernel");
      }
      if (r->req.type == nbd::kCmdDisc) return close_socket(s, "NBD_CMD_DISC");
      if (r->req.type == nbd::kCmdRead || r->req.type == nbd::kCmdWrite) {
        if (r->req.length > nbd::kMaxPayload) {
          return close_socket(s, "a " + std::to_string(r->req.length) + "-byte request, beyond the 32 MiB limit");
        }
        r->data = buffer(r->req.length);
      }
      if (r->req.type == nbd::kCmdWrite && r->req.length > 0) {
        s.receiving = std::move(r);
        continue;
      }
      on_request(s, std::move(r));
    }
    if (s.eof) return;
    // A short read emptied the socket: wait (arm_read) rather than read again for EAGAIN.
    if (drained) break;
    // 2. Read more: a large payload straight into its request, the rest into the buffer.
    if (s.in_pos == s.in_end) {
      s.in_pos = s.in_end = 0;
    } else if (s.in_pos > 0) {  // a partial header: to the front
      std::memmove(s.in.get(), s.in.get() + s.in_pos, s.in_end - s.in_pos);
      s.in_end -= s.in_pos;
      s.in_pos = 0;
    }
    std::byte* into = s.in.get() + s.in_end;
    std::size_t room = kInBuffer - s.in_end;
    const bool direct = s.receiving && s.in_end == 0 && s.receiving->req.length - s.payload_got >= kInBuffer;
    if (direct) {
      into = s.receiving->data.get() + s.payload_got;
      room = s.receiving->req.length - s.payload_got;
    }
    const ssize_t n = ::read(s.fd, into, room);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
    if (n <= 0) return close_socket(s, n == 0 ? "the kernel closed it" : errno_text(errno));
    drained = static_cast<std::size_t>(n) < room;
    if (!direct) {
      s.in_end += static_cast<std::size_t>(n);
      continue;
    }
    s.payload_got += static_cast<std::size_t>(n);
    if (s.payload_got == s.receiving->req.length) {
      s.payload_got = 0;
      on_request(s, std::move(s.receiving));
    }
  }
  arm_read(s);
}

void Attachment::on_request(KernelSocket& s, std::unique_ptr<Request> r) {
  nbd::ExportLimits limits;
  limits.size = opened_.info().size();
  limits.transmission_flags = tflags_;
  const nbd::Verdict v = nbd::check_request(r->req, limits);
  if (v.error != 0) {
    log()->warn("{}: {} at offset {} length {} refused: {}", dev_->path(), nbd::command_name(r->req.type), r->req.offset,
                r->req.length, v.message ? v.message : "invalid");
    return reply(s, std::move(r), v.error, false);
  }
  if (failing_) return reply(s, std::move(r), nbd::kEio, false);
  Request* raw = r.get();
  s.active.emplace(raw, std::move(r));
  if (client_) submit(s, raw);
}

void Attachment::submit(KernelSocket& s, Request* r) {
  r->gen = gen_;
  r->submitted = true;
  r->lost = false;
  r->status = 0;
  const std::uint32_t handle = opened_.handle();
  const nbd::Request& q = r->req;
  const bool fua = (q.flags & nbd::kCmdFlagFua) != 0;
  auto done = [this, sp = &s, r, gen = gen_](int st) { part_done(*sp, r, gen, st); };
  // One extra part while issuing, so a synchronous completion cannot finish the request
  // before every part is out.
  r->parts_left = 1;
  switch (q.type) {
    case nbd::kCmdRead:
    case nbd::kCmdWrite: {
      const std::uint32_t max = client_->max_io();
      for (std::uint32_t off = 0; off < q.length; off += max) {
        const std::uint32_t len = std::min(max, q.length - off);
        ++r->parts_left;
        if (q.type == nbd::kCmdRead) client_->read(lane(s, len), handle, q.offset + off, len, r->data.get() + off, done);
        else client_->write(lane(s, len), handle, q.offset + off, len, r->data.get() + off, fua ? wire::kFlagFua : 0, done);
      }
      break;
    }
    case nbd::kCmdFlush:
      ++r->parts_left;
      client_->flush(s.q, handle, done);
      break;
    case nbd::kCmdTrim:
      ++r->parts_left;
      client_->trim(s.q, handle, q.offset, q.length, done);
      break;
    case nbd::kCmdWriteZeroes:
      ++r->parts_left;
      client_->write_zeroes(s.q, handle, q.offset, q.length, fua ? wire::kFlagFua : 0, done);
      break;
    default:
      ++r->parts_left;
      done(-EINVAL);
      break;
  }
  part_done(s, r, gen_, 0);
}

void Attachment::part_done(KernelSocket& s, Request* r, std::uint64_t gen, int status) {
  if (gen != gen_ || r->gen != gen) return;  // a session that is gone
  if (status == -ENOTCONN || status == -ECONNRESET || status == -EPIPE) {
    r->lost = true;
    wake_ = true;
  } else if (status < 0 && r->status == 0) {
    r->status = status;
  }
  if (--r->parts_left > 0) return;
  if (r->lost) {
    r->submitted = false;  // sent again once a session is back
    return;
  }
  finish(s, r, r->status);
}

void Attachment::finish(KernelSocket& s, Request* r, int status) {
  auto it = s.active.find(r);
  if (it == s.active.end()) return;
  std::unique_ptr<Request> owned = std::move(it->second);
  s.active.erase(it);
  if (status < 0) {
    log()->warn("{}: {} at offset {} length {} failed: {}", dev_->path(), nbd::command_name(owned->req.type),
                owned->req.offset, owned->req.length, errno_text(-status));
  }
  const bool read = owned->req.type == nbd::kCmdRead;
  reply(s, std::move(owned), status < 0 ? nbd::wire_error_from_errno(status) : 0, read && status == 0);
}

void Attachment::reply(KernelSocket& s, std::unique_ptr<Request> r, std::uint32_t error, bool with_payload) {
  if (s.eof) return;
  Reply rep;
  r->reply = nbd::make_simple_reply(r->req.cookie, error);
  rep.payload = with_payload ? r->req.length : 0;
  rep.req = std::move(r);
  s.out.push_back(std::move(rep));
  // Replies finished in one loop turn (a batch of completions) go out in one writev.
  if (s.write_armed || s.flush_posted) return;
  s.flush_posted = true;
  asio::post(current_io(), [this, &s, epoch = s.epoch] {
    if (epoch != s.epoch) return;  // rebound: bind() flushes what is queued
    s.flush_posted = false;
    if (!s.eof && !s.write_armed) flush_out(s);
  });
}

// Replies into the kernel's socket, in order. Small ones are copied, a turn's worth in one writev.
// A large payload goes by reference instead: vmsplice puts its pages into the pipe, splice moves
// them into the socket, and the kernel copies the bytes straight into its request when it reads
// them, so the reply stays untouched in s.unread until then. (A writev of 1 MiB copies it once
// more and clears the pages it copies into; for small replies that costs less than the extra
// calls and the kernel reader's wakeup per page.)
void Attachment::flush_out(KernelSocket& s) {
  while (!s.eof) {
    if (s.in_pipe > 0) {  // what is in the pipe goes before anything queued after it
      const ssize_t w = ::splice(s.pipe_r, nullptr, s.fd, nullptr, s.in_pipe, SPLICE_F_NONBLOCK | SPLICE_F_MOVE);
      if (w < 0 && errno == EINTR) continue;
      if (w < 0 && errno == EAGAIN) return arm_write(s);  // the socket is full
      if (w <= 0) return close_socket(s, w == 0 ? std::string("splice wrote nothing") : "splice: " + errno_text(errno));
      s.in_pipe -= static_cast<std::size_t>(w);
      s.written += static_cast<std::size_t>(w);
      continue;
    }
    if (s.out.empty()) break;
    const bool by_reference = s.out.front().payload >= kSpliceFrom;
    std::array<iovec, 64> iov{};
    std::size_t n = 0;
    for (auto it = s.out.begin(); it != s.out.end() && n + 2 <= iov.size(); ++it) {
      if ((it->payload >= kSpliceFrom) != by_reference) break;
      std::size_t skip = it->sent;
      auto add = [&](const void* p, std::size_t len) {
        if (skip >= len) {
          skip -= len;
          return;
        }
        iov[n++] = {const_cast<std::byte*>(static_cast<const std::byte*>(p)) + skip, len - skip};
        skip = 0;
      };
      add(&it->req->reply, sizeof it->req->reply);
      if (it->payload) add(it->req->data.get(), it->payload);
    }
    const ssize_t w = by_reference ? ::vmsplice(s.pipe_w, iov.data(), n, SPLICE_F_NONBLOCK)
                                   : ::writev(s.fd, iov.data(), static_cast<int>(n));
    if (w < 0 && errno == EINTR) continue;
    if (w < 0 && errno == EAGAIN && !by_reference) return arm_write(s);
    if (w <= 0) return close_socket(s, std::string(by_reference ? "vmsplice: " : "writev: ") + errno_text(errno));
    (by_reference ? s.in_pipe : s.written) += static_cast<std::size_t>(w);
    for (std::size_t left = static_cast<std::size_t>(w); left > 0;) {
      Reply& front = s.out.front();
      const std::size_t take = std::min(left, front.total() - front.sent);
      front.sent += take;
      left -= take;
      if (front.sent < front.total()) break;
      if (by_reference) {
        s.unread_bytes += front.total();
        s.unread.push_back({s.written + s.in_pipe - left, front.total(), std::move(front.req)});
      }
      s.out.pop_front();
    }
  }
  if (s.unread.size() > kUnreadEntries || s.unread_bytes > kUnreadBytes) reclaim(s);
}

// Frees the replies the kernel has read.
void Attachment::reclaim(KernelSocket& s) {
  if (s.unread.empty()) return;
  int queued = 0;
  if (::ioctl(s.kernel_fd, SIOCINQ, &queued) != 0 || queued < 0) return;
  const std::uint64_t read = s.written - static_cast<std::uint64_t>(queued);
  while (!s.unread.empty() && s.unread.front().end <= read) {
    s.unread_bytes -= s.unread.front().bytes;
    s.unread.pop_front();
  }
}

IoBuffer Attachment::buffer(std::size_t bytes) {
  if (pool_.exhausted(bytes)) {
    for (auto& s : socks_) reclaim(*s);
  }
  return pool_.get(bytes);
}

void Attachment::close_socket(KernelSocket& s, const std::string& why) {
  if (s.eof) return;
  log()->debug("{} queue {}: {}", dev_ ? dev_->path() : std::string("device"), s.q, why);
  if (!stop_requested_ && !disconnect_sent_ && why != "NBD_CMD_DISC" && why != "the kernel closed it") {
    log()->warn("{} queue {}: closing the kernel's socket: {}", dev_->path(), s.q, why);
  }
  s.eof = true;
  ++s.epoch;
  if (s.sd) s.sd->release();
  s.sd.reset();
  s.out.clear();
  // s.unread stays: the kernel may still read what is queued on its end.
  // The server side closes after NBD_CMD_DISC: the kernel's receive thread (and NBD_DO_IT with
  // the ioctl interface) waits for that.
  ::shutdown(s.fd, SHUT_RDWR);
  wake_ = true;
}

std::size_t Attachment::outstanding() const {
  std::size_t n = 0;
  for (const auto& s : socks_) n += s->active.size() + s->out.size() + (s->receiving ? 1 : 0);
  return n;
}

bool Attachment::all_closed() const {
  return std::all_of(socks_.begin(), socks_.end(), [](const auto& s) { return s->eof; });
}

void Attachment::on_lost(const std::string& reason) {
  std::size_t held = 0;
  for (const auto& s : socks_) held += s->active.size();
  const std::string limit = opts_.reconnect_forever
                                ? std::string("with no time limit")
                                : "for up to " + std::to_string(std::chrono::duration_cast<std::chrono::seconds>(opts_.reconnect_timeout).count()) +
                                      " s (--reconnect-timeout)";
  log()->warn("{}: session with {} lost ({}); holding {} request(s) and reconnecting {}", dev_->path(), where(), reason, held,
              limit);
  ++gen_;
  release_all();  // off the session's io_context before it goes
  client_.reset();
  bind_all();
  for (auto& s : socks_) {
    for (auto& [raw, r] : s->active) r->submitted = false;
  }
  lost_since_ = Clock::now();
  backoff_ = kFirstBackoff;
  next_attempt_ = lost_since_ + backoff_;
  attempts_ = 0;
  last_failure_.clear();
  write_state("reconnecting");
}

void Attachment::try_reconnect() {
  ++attempts_;
  try {
    connect_session();
  } catch (const std::exception& e) {
    const std::string why = e.what();
    const auto elapsed = Clock::now() - lost_since_;
    if (why != last_failure_) {
      log()->warn("{}: reconnecting to {} (attempt {}, {:.1f} s since the loss): {}", dev_->path(), where(), attempts_,
                  seconds(elapsed), why);
      last_failure_ = why;
    } else {
      log()->debug("{}: reconnect attempt {} failed: {}", dev_->path(), attempts_, why);
    }
    backoff_ = std::min(backoff_ * 2, kMaxBackoff);
    next_attempt_ = Clock::now() + backoff_;
    return;
  }
  ++gen_;
  ++reconnects_;
  std::size_t resubmit = 0;
  for (const auto& s : socks_) resubmit += s->active.size();
  log()->info("{}: reconnected to {} over {} after {:.1f} s ({} attempt(s)); sending {} held request(s) again", dev_->path(),
              where(), transport_, seconds(Clock::now() - lost_since_), attempts_, resubmit);
  if (failing_) log()->info("{}: I/O works again", dev_->path());
  failing_ = false;
  bind_all();
  write_state("connected");
  for (auto& s : socks_) {
    std::vector<Request*> resend;
    for (auto& [raw, r] : s->active) resend.push_back(raw);
    for (Request* r : resend) {
      if (!client_) break;
      if (s->active.count(r)) submit(*s, r);
    }
  }
}

void Attachment::fail_held() {
  failing_ = true;
  std::size_t n = 0;
  for (auto& s : socks_) {
    std::vector<Request*> resend;
    for (auto& [raw, r] : s->active) resend.push_back(raw);
    n += resend.size();
    for (Request* r : resend) {
      auto it = s->active.find(r);
      auto owned = std::move(it->second);
      s->active.erase(it);
      reply(*s, std::move(owned), nbd::kEio, false);
    }
  }
  log()->error("{}: the target {} has been unreachable for {:.0f} s (--reconnect-timeout): failing {} held request(s) "
               "with EIO, and new I/O until it is back; still reconnecting ({})",
               dev_->path(), where(), seconds(Clock::now() - lost_since_), n, last_failure_);
  write_state("failing");
}

void Attachment::write_state(const std::string& state) {
  state_ = state;
  if (!dev_) return;
  nlohmann::json j;
  j["device"] = dev_->path();
  j["index"] = dev_->index();
  j["target"] = where();
  j["export"] = opts_.export_name;
  j["transport"] = transport_;
  j["kernel"] = to_string(dev_->interface());
  j["queues"] = socks_.size();
  j["size"] = opened_.info().size();
  j["read_only"] = (tflags_ & nbd::kFlagReadOnly) != 0;
  j["pid"] = ::getpid();
  j["state"] = state;
  j["since"] = utc_now();
  j["reconnects"] = reconnects_;
  ::mkdir(opts_.state_dir.c_str(), 0755);
  state_file_ = state_file_for(opts_.state_dir, dev_->index());
  const std::string tmp = state_file_ + ".tmp";
  {
    std::ofstream f(tmp, std::ios::trunc);
    f << j.dump(2) << '\n';
    if (!f) {
      log()->warn("cannot write {}: {} (`ibdisk list` will not show {})", tmp, errno_text(errno), dev_->path());
      return;
    }
  }
  if (::rename(tmp.c_str(), state_file_.c_str()) != 0) log()->warn("rename {}: {}", tmp, errno_text(errno));
}

int Attachment::run() {
  if (!nbd_module_loaded()) {
    throw SystemError("attach " + opts_.export_name, std::string("the nbd module is not loaded"),
                      "load it: modprobe nbd (add nbds_max=N for more devices)", ENOENT);
  }
  start_signals();
  connect_session();
  attach_device();
  write_state("connected");
  log()->info("{} is {}/{} ({}, {} queue(s), {} bytes{}, kernel interface {})", dev_->path(), where(), opts_.export_name,
              transport_, socks_.size(), opened_.info().size(), (tflags_ & nbd::kFlagReadOnly) ? ", read-only" : "",
              to_string(dev_->interface()));
  if (opts_.on_ready) opts_.on_ready(dev_->path());
  bind_all();

  for (;;) {
    if (stop_requested_ && !disconnect_sent_ && (outstanding() == 0 || Clock::now() >= stop_deadline_ || !client_)) {
      if (outstanding() != 0) log()->warn("{}: disconnecting with {} request(s) unanswered", dev_->path(), outstanding());
      disconnect_sent_ = true;
      dev_->disconnect();
    }
    if (all_closed()) break;
    if (disconnect_sent_ && Clock::now() >= stop_deadline_ + kDrainOnStop) {
      log()->warn("{}: the kernel did not close its sockets after the disconnect; exiting", dev_->path());
      break;
    }
    wake_ = false;
    if (client_) {
      try {
        client_->run_until([&] {
          return wake_ || (stop_requested_ && !disconnect_sent_ && (outstanding() == 0 || Clock::now() >= stop_deadline_)) ||
                 (disconnect_sent_ && Clock::now() >= stop_deadline_ + kDrainOnStop);
        });
      } catch (const std::exception& e) {
        on_lost(e.what());
      }
      continue;
    }
    // No session: serve the kernel sockets (holding their requests) until the next attempt.
    const auto until = stop_requested_ ? Clock::now() + milliseconds(200) : next_attempt_;
    while (!wake_ && Clock::now() < until) {
      idle_io_.restart();
      idle_io_.run_one_until(until);
    }
    if (stop_requested_ || all_closed()) continue;
    if (!failing_ && !opts_.reconnect_forever && Clock::now() - lost_since_ >= opts_.reconnect_timeout) fail_held();
    if (Clock::now() >= next_attempt_) try_reconnect();
  }
  log()->info("{} detached from {}/{}", dev_->path(), where(), opts_.export_name);
  dev_.reset();
  return 0;
}

}  // namespace

int run_attach(const AttachOptions& opts) {
  Attachment a(opts);
  return a.run();
}

std::string state_file_for(const std::string& state_dir, int index) {
  return state_dir + "/nbd" + std::to_string(index) + ".json";
}

std::vector<AttachState> list_attachments(const std::string& state_dir) {
  std::vector<AttachState> out;
  DIR* d = ::opendir(state_dir.c_str());
  if (!d) return out;
  while (const dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    if (name.rfind("nbd", 0) != 0 || name.size() < 8 || name.substr(name.size() - 5) != ".json") continue;
    const std::string path = state_dir + "/" + name;
    std::ifstream f(path);
    nlohmann::json j = nlohmann::json::parse(f, nullptr, false);
    if (j.is_discarded() || !j.is_object()) continue;
    AttachState s;
    s.file = path;
    s.device = j.value("device", "");
    s.index = j.value("index", -1);
    s.target = j.value("target", "");
    s.export_name = j.value("export", "");
    s.transport = j.value("transport", "");
    s.kernel = j.value("kernel", "");
    s.state = j.value("state", "");
    s.queues = j.value("queues", 0u);
    s.size = j.value("size", std::uint64_t{0});
    s.read_only = j.value("read_only", false);
    s.pid = j.value("pid", 0);
    s.since = j.value("since", "");
    s.reconnects = j.value("reconnects", std::uint64_t{0});
    s.alive = s.pid > 0 && (::kill(s.pid, 0) == 0 || errno == EPERM);
    out.push_back(s);
  }
  ::closedir(d);
  std::sort(out.begin(), out.end(), [](const AttachState& a, const AttachState& b) { return a.index < b.index; });
  return out;
}

}  // namespace ibdisk::initiator
