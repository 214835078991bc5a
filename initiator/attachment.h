#pragma once
// Internal to `ibdisk attach` (initiator/attach.h is the interface): the attach process's
// state, shared by attach.cc (the session, the device, takeover, the main loop) and
// attach_kernel_io.cc (the kernel's sockets: requests in, replies out).
#include <signal.h>
#include <sys/signalfd.h>

#include <chrono>
#include <cstdint>
#include <ctime>
#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include <boost/asio/posix/stream_descriptor.hpp>

#include "common/log.h"
#include "initiator/attach.h"
#include "initiator/io_buffers.h"
#include "target/nbd/protocol.h"

namespace ibdisk::initiator::attach_internal {


namespace asio = boost::asio;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

inline auto log() {
  static auto l = ibdisk::logger("attach");
  return l;
}

constexpr milliseconds kFirstBackoff{100};
constexpr milliseconds kMaxBackoff{5000};
// While every socket is dead (this process died), the kernel holds the device's I/O for the
// reconnect timeout plus this margin, and 30 days for "forever" (jiffies, 32 bits).
constexpr std::uint64_t kDeadConnMarginS = 120;
constexpr std::uint64_t kForeverS = 30ull * 24 * 3600;
// After SIGTERM, how long requests in flight may take before the device is disconnected.
constexpr milliseconds kDrainOnStop{10000};

inline std::string utc_now() {
  const std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

inline double seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

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
  bool renew = false;  // the kernel marked its end dead: give it a new socket (renew_socket())
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
  std::optional<AttachState> find_orphan() const;
  void connect_for_takeover();
  void make_socket(KernelSocket& s);
  void renew_dead_sockets();
  std::string backend_id() const { return "ibdisk:" + where() + "/" + opts_.export_name; }
  unsigned home(const KernelSocket& s) const { return s.q % client_->queue_count(); }
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
  // kernel_gone: the kernel closed its end (EOF, EPIPE): outside a disconnect, it marked the
  // socket dead, and renew_dead_sockets() gives it a new one.
  void close_socket(KernelSocket& s, const std::string& why, bool kernel_gone = false);
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
    if (length < kSpreadFrom || client_->transport(home(s)) != "rdma") return home(s);
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
  std::optional<AttachState> orphan_;  // a device of this export whose attach process died
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
  std::string last_error_;  // for `ibdisk list`: why the session was last lost, or a reconnect failed
  bool failing_ = false;      // past the reconnect timeout: requests fail with EIO
  std::uint64_t reconnects_ = 0;
  std::uint64_t takeovers_ = 0;
  std::uint64_t renewed_ = 0;
  bool disc_seen_ = false;   // the kernel sent NBD_CMD_DISC: the device is being disconnected
  bool detached_ = false;    // the device is gone: the state file goes with it
  bool hand_off_ = false;    // SIGUSR1: exit, leaving the device to the next attach
  std::string state_file_;
  std::string state_;
};

}  // namespace ibdisk::initiator::attach_internal
