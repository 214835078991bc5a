#include "transport/tcp/tcp_connection.h"

#include <algorithm>
#include <cstring>
#include <deque>
#include <limits>
#include <unordered_map>

#include "common/error.h"
#include "common/log.h"

namespace ibdisk::transport {
namespace {

namespace asio = boost::asio;
using asio::ip::tcp;
using boost::system::error_code;

auto log() {
  static auto l = ibdisk::logger("tcp");
  return l;
}

// Buffer sizes stay with the kernel: setting SO_SNDBUF/SO_RCVBUF turns off autotuning, which
// measured slower on loopback.
// Non-blocking for the Writer, which writes until the socket is full.
void tune(tcp::socket& s) {
  error_code ec;
  s.set_option(tcp::no_delay(true), ec);
  s.non_blocking(true, ec);
}

// Completion condition for async_read/async_write without Asio's default cap of 64 KiB per
// system call (transfer_all): a 1 MiB payload or a batch of replies moves in as few
// recvmsg/sendmsg calls as the socket allows, not one call and one scheduler turn per 64 KiB.
std::size_t whole(const error_code& ec, std::size_t) { return ec ? 0 : std::numeric_limits<std::size_t>::max(); }

std::string endpoint_text(const tcp::socket& s) {
  error_code ec;
  const auto ep = s.remote_endpoint(ec);
  if (ec) return "(disconnected)";
  return (ep.address().is_v6() ? "[" + ep.address().to_string() + "]" : ep.address().to_string()) + ":" +
         std::to_string(ep.port());
}

// One queued output frame: header and capsule (or control bytes), then optional data.
struct OutFrame {
  std::array<std::byte, wire::kFrameHeaderSize + wire::kCommandSize> head{};
  std::size_t head_len = 0;
  std::string control;  // serialized protobuf, for control frames
  const std::byte* data = nullptr;
  std::size_t data_len = 0;
  Slot* release = nullptr;  // a read's slot, free again once sent
};

// Output queue shared by both roles. Frames queued during one handler turn go out together in
// one gathered sendmsg; the socket is written until it is full (EAGAIN) before waiting for room,
// and each frame is reported sent as soon as its last byte is in the socket, so a read's slot
// frees while later replies are still going out.
class Writer {
 public:
  struct Events {
    virtual void frame_sent(OutFrame& f) = 0;           // f's last byte is in the socket
    virtual void send_failed(const error_code& ec) = 0;  // once; nothing more is sent
    virtual void drained() = 0;                          // every queued frame is sent
  };
  explicit Writer(tcp::socket& s) : sock_(s) {}

  void push(OutFrame&& f) { queue_.push_back(std::move(f)); }
  bool idle() const { return queue_.empty(); }
  // Whether a send is scheduled (posted or waiting for room): push() then needs no new one.
  bool scheduled() const { return scheduled_; }
  void set_scheduled(bool s) { scheduled_ = s; }

  // Sends until the queue is empty (returns false) or the socket is full (returns true: wait
  // for room, then call again). Events may push more frames; they go out in the same loop.
  bool send(Events& ev) {
    if (failed_) return false;
    while (!queue_.empty()) {
      bufs_.clear();
      std::size_t skip = sent_;
      for (auto& f : queue_) {
        if (bufs_.size() + 3 > kMaxBuffers) break;
        add(asio::buffer(f.head.data(), f.head_len), &skip);
        add(asio::buffer(f.control), &skip);
        add(asio::buffer(f.data, f.data_len), &skip);
      }
      error_code ec;
      std::size_t n = sock_.write_some(bufs_, ec);
      if (ec == asio::error::would_block || ec == asio::error::try_again) return true;
      if (ec == asio::error::interrupted) continue;
      if (ec) {
        failed_ = true;
        ev.send_failed(ec);
        return false;
      }
      // Retire the frames this write finished.
      n += sent_;
      sent_ = 0;
      while (!queue_.empty()) {
        OutFrame& f = queue_.front();
        const std::size_t len = f.head_len + f.control.size() + f.data_len;
        if (n < len) {
          sent_ = n;
          break;
        }
        n -= len;
        OutFrame done = std::move(f);
        queue_.pop_front();
        ev.frame_sent(done);
        if (failed_) return false;
      }
    }
    ev.drained();
    return false;
  }

  // After an error: the frames that never went out, for their slots.
  std::deque<OutFrame> take_unsent() {
    failed_ = true;
    sent_ = 0;
    return std::exchange(queue_, {});
  }

 private:
  static constexpr std::size_t kMaxBuffers = 64;  // Asio gathers at most 64 buffers per call

  void add(asio::const_buffer b, std::size_t* skip) {
    if (b.size() <= *skip) {
      *skip -= b.size();
      return;
    }
    bufs_.push_back(b + *skip);
    *skip = 0;
  }

  tcp::socket& sock_;
  std::deque<OutFrame> queue_;
  std::size_t sent_ = 0;  // bytes of queue_.front() already sent
  std::vector<asio::const_buffer> bufs_;
  bool scheduled_ = false;
  bool failed_ = false;
};

// Buffered input shared by both roles. One recv takes every frame the socket holds (headers,
// capsules, completions, small payloads), so a batch of N frames costs one system call and one
// handler turn, not three of each per frame; a payload of at least kDirectRead bytes still to
// come is read straight into its destination. When a recv returns less than it asked for, Asio
// waits for the next readiness event instead of trying again (no recv that only says EAGAIN).
class Reader {
 public:
  static constexpr std::size_t kSize = 128 * 1024;
  static constexpr std::size_t kDirectRead = 64 * 1024;

  explicit Reader(tcp::socket& s) : sock_(s), buf_(kSize) {}

  std::size_t available() const { return end_ - pos_; }
  const std::byte* data() const { return buf_.data() + pos_; }
  void consume(std::size_t n) { pos_ += n; }
  // Moves up to n buffered bytes to dst; returns how many.
  std::size_t take(std::byte* dst, std::size_t n) {
    n = std::min(n, available());
    std::memcpy(dst, data(), n);
    pos_ += n;
    return n;
  }
  // Whether `left` more bytes of a payload should be read straight into it.
  bool direct(std::size_t left) const { return available() == 0 && left >= kDirectRead; }

  // One read into the buffer, with room for at least `want` contiguous bytes after what is
  // buffered. done(ec) runs once the bytes are in.
  template <class Done>
  void fill(std::size_t want, Done done) {
    if (pos_ == end_) pos_ = end_ = 0;
    if (buf_.size() - pos_ < want) {
      std::memmove(buf_.data(), buf_.data() + pos_, end_ - pos_);
      end_ -= pos_;
      pos_ = 0;
      if (buf_.size() < want) buf_.resize(want);  // a control message longer than the buffer
    }
    sock_.async_read_some(asio::buffer(buf_.data() + end_, buf_.size() - end_),
                          [this, done = std::move(done)](const error_code& ec, std::size_t n) mutable {
                            end_ += n;
                            done(ec);
                          });
  }
  // Reads exactly len bytes straight into dst (a large payload).
  template <class Done>
  void fill_direct(std::byte* dst, std::size_t len, Done done) {
    asio::async_read(sock_, asio::buffer(dst, len), whole,
                     [done = std::move(done)](const error_code& ec, std::size_t) mutable { done(ec); });
  }

 private:
  tcp::socket& sock_;
  std::vector<std::byte> buf_;
  std::size_t pos_ = 0, end_ = 0;  // buffered, not yet parsed: buf_[pos_, end_)
};

OutFrame control_frame(const proto::Control& msg) {
  OutFrame f;
  f.control = msg.SerializeAsString();
  wire::encode(wire::FrameHeader{wire::FrameType::kControl, static_cast<std::uint32_t>(f.control.size())},
               f.head.data());
  f.head_len = wire::kFrameHeaderSize;
  return f;
}

proto::Control error_message(proto::ErrorCode code, const std::string& text) {
  proto::Control c;
  c.mutable_error()->set_code(code);
  c.mutable_error()->set_message(text);
  return c;
}

// ---------------------------------------------------------------------------------------------
class TcpServerConnection final : public ServerConnection,
                                  private Writer::Events,
                                  public std::enable_shared_from_this<TcpServerConnection> {
 public:
  TcpServerConnection(tcp::socket s, BufferPool& pool)
      : sock_(std::move(s)), pool_(pool), writer_(sock_), peer_(endpoint_text(sock_)) {
    tune(sock_);
  }
  ~TcpServerConnection() override { pool_.release(slots_); }

  std::string transport_name() const override { return "tcp"; }
  std::string peer() const override { return peer_; }

  void start(Handler* handler) override {
    handler_ = handler;
    pump();
  }

  void send_control(const proto::Control& msg) override { push(control_frame(msg)); }

  unsigned set_queue(unsigned queue_depth, std::uint32_t max_io) override {
    if (!slots_.empty() || max_io > pool_.slot_size()) return static_cast<unsigned>(slots_.size());
    slots_ = pool_.reserve(queue_depth);
    free_.clear();
    for (auto& s : slots_) free_.push_back(&s);
    return static_cast<unsigned>(slots_.size());
  }

  void complete(const wire::Command& cmd, std::int32_t status, Slot* slot, std::uint32_t length) override {
    OutFrame f;
    const bool with_data = status == 0 && cmd.opcode == wire::Opcode::kRead && slot != nullptr;
    const std::uint32_t data_len = with_data ? length : 0;
    wire::encode(wire::FrameHeader{wire::FrameType::kCompletion,
                                   static_cast<std::uint32_t>(wire::kCompletionSize + data_len)},
                 f.head.data());
    wire::encode(wire::Completion{cmd.tag, status, data_len}, f.head.data() + wire::kFrameHeaderSize);
    f.head_len = wire::kFrameHeaderSize + wire::kCompletionSize;
    if (with_data) {
      f.data = slot->data;
      f.data_len = data_len;
      f.release = slot;
    } else if (slot) {
      slot_freed(slot);
    }
    push(std::move(f));
  }

  void close() override {
    if (!closing_) close_reason_ = "closed by the target";
    closing_ = true;
    if (writer_.idle() && !writer_.scheduled()) fail(close_reason_);
  }

 private:
  void push(OutFrame&& f) {
    if (dead_) {
      if (f.release) free_.push_back(f.release);
      return;
    }
    writer_.push(std::move(f));
    if (writer_.scheduled()) return;
    // Send at the end of this handler turn: replies the engine completed together share a sendmsg.
    writer_.set_scheduled(true);
    asio::post(sock_.get_executor(), [self = shared_from_this()] { self->send_now(); });
  }

  void send_now() {
    if (!dead_ && writer_.send(*this)) {
      sock_.async_wait(tcp::socket::wait_write, [self = shared_from_this()](const error_code& ec) {
        if (ec && !self->dead_) self->fail("sending: " + ec.message());
        if (ec) return self->writer_.set_scheduled(false);
        self->send_now();
      });
      return;
    }
    writer_.set_scheduled(false);
  }

  void frame_sent(OutFrame& f) override {
    if (f.release) slot_freed(f.release);
  }
  void send_failed(const error_code& ec) override { fail(closing_ ? close_reason_ : "sending: " + ec.message()); }
  void drained() override {
    if (closing_) fail(close_reason_);
  }

  void shutdown() {
    error_code ec;
    sock_.shutdown(tcp::socket::shutdown_both, ec);
    sock_.close(ec);
  }

  // Reports the end once; the session keeps this object alive until its I/O drains.
  void fail(const std::string& reason) {
    if (dead_) return;
    dead_ = true;
    shutdown();
    if (handler_) handler_->on_closed(reason);
  }

  // A protocol violation: tell the peer why (best effort), then close.
  void violation(const std::string& what) {
    log()->warn("{}: protocol error: {}; closing the connection", peer_, what);
    if (!closing_) close_reason_ = "protocol error: " + what;
    closing_ = true;
    push(control_frame(error_message(proto::ERROR_PROTOCOL, what)));
  }

  // Parses every buffered frame, then reads more. Entered from read completions and from
  // slot_freed() (a parked command got its slot); one loop at a time.
  void pump() {
    if (pumping_) {
      again_ = true;
      return;
    }
    pumping_ = true;
    do {
      again_ = false;
      parse();
    } while (again_ && !dead_);
    pumping_ = false;
    if (!dead_ && !closing_ && !parked_ && !reading_) read_more();
  }

  void parse() {
    for (;;) {
      if (dead_ || closing_ || parked_) return;
      if (filling_ != nullptr) {  // a write's payload, into its slot
        filled_ += reader_.take(filling_->data + filled_, filling_cmd_.length - filled_);
        if (filled_ < filling_cmd_.length) return;
        handler_->on_command(filling_cmd_, std::exchange(filling_, nullptr));
        continue;
      }
      want_ = wire::kFrameHeaderSize;
      if (reader_.available() < want_) return;
      wire::FrameHeader h;
      if (const auto e = wire::decode({reader_.data(), wire::kFrameHeaderSize}, &h); e != wire::DecodeError::kNone) {
        return violation(std::string("frame header: ") + wire::describe(e));
      }
      switch (h.type) {
        case wire::FrameType::kControl: {
          want_ = wire::kFrameHeaderSize + h.length;
          if (reader_.available() < want_) return;
          proto::Control msg;
          const bool ok = msg.ParseFromArray(reader_.data() + wire::kFrameHeaderSize, static_cast<int>(h.length)) &&
                          msg.msg_case() != proto::Control::MSG_NOT_SET;
          reader_.consume(want_);
          if (!ok) return violation("malformed control message");
          handler_->on_control(msg);
          continue;
        }
        case wire::FrameType::kCommand: {
          if (h.length < wire::kCommandSize) return violation("command frame shorter than a capsule");
          want_ = wire::kFrameHeaderSize + wire::kCommandSize;
          if (reader_.available() < want_) return;
          wire::Command cmd;
          const auto e = wire::decode({reader_.data() + wire::kFrameHeaderSize, wire::kCommandSize}, &cmd);
          reader_.consume(want_);
          if (e != wire::DecodeError::kNone) return violation(std::string("command: ") + wire::describe(e));
          if (!accept(h, cmd)) return;
          continue;
        }
        case wire::FrameType::kCompletion:
          return violation("a target does not accept completions");
      }
    }
  }

  void read_more() {
    reading_ = true;
    auto self = shared_from_this();
    auto done = [self](const error_code& ec) {
      self->reading_ = false;
      if (ec) {
        if (self->filling_) self->free_.push_back(std::exchange(self->filling_, nullptr));
        return self->fail(ec == asio::error::eof ? "closed by peer" : ec.message());
      }
      if (!self->closing_) self->pump();
    };
    const std::size_t left = filling_ ? filling_cmd_.length - filled_ : 0;
    if (filling_ && reader_.direct(left)) {
      reader_.fill_direct(filling_->data + filled_, left, [self, done](const error_code& ec) {
        if (!ec) self->filled_ = self->filling_cmd_.length;
        done(ec);
      });
      return;
    }
    reader_.fill(filling_ ? 1 : want_, done);
  }

  // A read's slot frees when its data has been sent; a command that arrived just before that
  // (the initiator saw the completion first) waits for it, with reading paused.
  void slot_freed(Slot* slot) {
    free_.push_back(slot);
    if (parked_ && !dead_) {
      parked_ = false;
      start_command(parked_cmd_);
      pump();
    }
  }

  // Checks a command against the queue; false when it ends the connection or parks.
  bool accept(const wire::FrameHeader& h, const wire::Command& cmd) {
    const bool write = cmd.opcode == wire::Opcode::kWrite;
    const std::uint32_t payload = h.length - static_cast<std::uint32_t>(wire::kCommandSize);
    if (payload != (write ? cmd.length : 0u)) {
      violation("frame length does not match the command");
      return false;
    }
    if (cmd.opcode == wire::Opcode::kRead || write) {
      if (slots_.empty()) {
      violation("data command before the queue was granted");
      return false;
    }
      if (cmd.length > slots_.front().capacity) {
      violation("command longer than the granted I/O size");
      return false;
    }
      if (free_.empty()) {
        parked_ = true;
        parked_cmd_ = cmd;
        return false;
      }
    }
    start_command(cmd);
    return true;
  }

  void start_command(const wire::Command& cmd) {
    const bool write = cmd.opcode == wire::Opcode::kWrite;
    Slot* slot = nullptr;
    if (cmd.opcode == wire::Opcode::kRead || write) {
      slot = free_.back();
      free_.pop_back();
    }
    if (!write) return handler_->on_command(cmd, slot);
    filling_ = slot;  // the payload follows; parse() fills it
    filling_cmd_ = cmd;
    filled_ = 0;
  }

  tcp::socket sock_;
  BufferPool& pool_;
  Writer writer_;
  std::string peer_;
  Handler* handler_ = nullptr;
  std::vector<Slot> slots_;
  std::vector<Slot*> free_;
  Reader reader_{sock_};
  std::size_t want_ = wire::kFrameHeaderSize;  // buffered bytes parse() needs next
  Slot* filling_ = nullptr;                    // a write whose payload is arriving
  wire::Command filling_cmd_;
  std::size_t filled_ = 0;
  bool pumping_ = false, again_ = false, reading_ = false;
  bool closing_ = false;
  std::string close_reason_;  // reported once the output drains after closing_
  bool dead_ = false;
  bool parked_ = false;
  wire::Command parked_cmd_;
};

// ---------------------------------------------------------------------------------------------
class TcpClientConnection final : public ClientConnection, private Writer::Events {
 public:
  TcpClientConnection(asio::io_context& io, tcp::socket s, std::chrono::milliseconds timeout)
      : io_(io), sock_(std::move(s)), writer_(sock_), peer_(endpoint_text(sock_)), timeout_(timeout) {
    tune(sock_);
  }
  ~TcpClientConnection() override {
    error_code ec;
    sock_.close(ec);
  }

  std::string transport_name() const override { return "tcp"; }
  std::string peer() const override { return peer_; }

  proto::Control call(const proto::Control& request) override {
    if (started_) throw SystemError("control call to " + peer_, std::string("the queue is in its data phase"));
    const std::string body = request.SerializeAsString();
    std::array<std::byte, wire::kFrameHeaderSize> head{};
    wire::encode(wire::FrameHeader{wire::FrameType::kControl, static_cast<std::uint32_t>(body.size())}, head.data());
    bool done = false;
    error_code err;
    wire::FrameHeader h;
    std::vector<char> reply;
    const std::array<asio::const_buffer, 2> out{asio::buffer(head), asio::buffer(body)};
    asio::async_write(sock_, out, [&](const error_code& ec, std::size_t) {
      if (ec) { err = ec; done = true; return; }
      asio::async_read(sock_, asio::buffer(hdr_), [&](const error_code& ec2, std::size_t) {
        if (ec2) { err = ec2; done = true; return; }
        if (wire::decode(hdr_, &h) != wire::DecodeError::kNone || h.type != wire::FrameType::kControl) {
          err = asio::error::invalid_argument;
          done = true;
          return;
        }
        reply.resize(h.length);
        asio::async_read(sock_, asio::buffer(reply), [&](const error_code& ec3, std::size_t) {
          err = ec3;
          done = true;
        });
      });
    });
    if (!run_until(io_, [&] { return done; }, timeout_)) {
      error_code ec;
      sock_.close(ec);
      run_until(io_, [&] { return done; }, std::chrono::milliseconds(1000));
      throw SystemError("waiting for " + peer_, "no answer within " + std::to_string(timeout_.count()) + " ms",
                        "is the target overloaded or the network down?", ETIMEDOUT);
    }
    if (err == asio::error::invalid_argument) {
      throw SystemError("reading the reply from " + peer_, std::string("not an ibdisk control frame"),
                        "is this port an ibdisk target (default 7420), not NBD (10809)?");
    }
    if (err) {
      throw SystemError("talking to " + peer_, err == asio::error::eof ? std::string("the target closed the connection")
                                                                       : err.message(),
                        "see the target's log for why");
    }
    proto::Control msg;
    if (!msg.ParseFromArray(reply.data(), static_cast<int>(reply.size()))) {
      throw SystemError("reading the reply from " + peer_, std::string("malformed control message"));
    }
    return msg;
  }

  void start(CompletionHandler on_complete, ClosedHandler on_closed) override {
    started_ = true;
    on_complete_ = std::move(on_complete);
    on_closed_ = std::move(on_closed);
    parse();
  }

  int submit(const wire::Command& cmd, std::byte* buffer) override {
    if (dead_) return -ENOTCONN;
    if (!inflight_.emplace(cmd.tag, Pending{cmd, buffer}).second) return -EEXIST;
    OutFrame f;
    const bool write = cmd.opcode == wire::Opcode::kWrite;
    wire::encode(wire::FrameHeader{wire::FrameType::kCommand,
                                   static_cast<std::uint32_t>(wire::kCommandSize + (write ? cmd.length : 0))},
                 f.head.data());
    wire::encode(cmd, f.head.data() + wire::kFrameHeaderSize);
    f.head_len = wire::kFrameHeaderSize + wire::kCommandSize;
    if (write) {
      f.data = buffer;
      f.data_len = cmd.length;
    }
    writer_.push(std::move(f));
    if (!writer_.scheduled()) {
      // Commands submitted in one handler turn (a refill of the pipeline) share a sendmsg.
      writer_.set_scheduled(true);
      asio::post(io_, [this] { send_now(); });
    }
    return 0;
  }

  void close() override {
    error_code ec;
    sock_.shutdown(tcp::socket::shutdown_both, ec);
    sock_.close(ec);
  }

 private:
  struct Pending {
    wire::Command cmd;
    std::byte* buffer;
  };

  void fail(const std::string& reason) {
    if (dead_) return;
    dead_ = true;
    error_code ec;
    sock_.close(ec);
    if (on_closed_) on_closed_(reason);
  }

  void send_now() {
    if (!dead_ && writer_.send(*this)) {
      sock_.async_wait(tcp::socket::wait_write, [this](const error_code& ec) {
        if (ec && !dead_) fail("sending: " + ec.message());
        if (ec) return writer_.set_scheduled(false);
        send_now();
      });
      return;
    }
    writer_.set_scheduled(false);
  }
  void frame_sent(OutFrame&) override {}
  void send_failed(const error_code& ec) override { fail("sending: " + ec.message()); }
  void drained() override {}

  // Parses every buffered frame (completions and the read data after them), then reads more.
  void parse() {
    for (;;) {
      if (dead_) return;
      if (!sock_.is_open()) return read_more(1);  // closed: the read reports it
      if (filling_) {  // a read's data, into the caller's buffer
        filled_ += reader_.take(fill_dst_ + filled_, fill_len_ - filled_);
        if (filled_ < fill_len_) return read_more(1);
        filling_ = false;
        inflight_.erase(fill_c_.tag);
        on_complete_(fill_c_);
        continue;
      }
      if (reader_.available() < wire::kFrameHeaderSize) return read_more(wire::kFrameHeaderSize);
      wire::FrameHeader h;
      if (const auto e = wire::decode({reader_.data(), wire::kFrameHeaderSize}, &h); e != wire::DecodeError::kNone) {
        return fail(std::string("bad frame from the target: ") + wire::describe(e));
      }
      if (h.type == wire::FrameType::kControl) {
        const std::size_t total = wire::kFrameHeaderSize + h.length;
        if (reader_.available() < total) return read_more(total);
        proto::Control msg;
        if (msg.ParseFromArray(reader_.data() + wire::kFrameHeaderSize, static_cast<int>(h.length)) && msg.has_error()) {
          return fail("the target closed the queue: " + msg.error().message());
        }
        return fail("unexpected control message during the data phase");
      }
      if (h.type != wire::FrameType::kCompletion || h.length < wire::kCompletionSize) {
        return fail("unexpected frame type from the target");
      }
      constexpr std::size_t total = wire::kFrameHeaderSize + wire::kCompletionSize;
      if (reader_.available() < total) return read_more(total);
      wire::Completion c;
      const auto e = wire::decode({reader_.data() + wire::kFrameHeaderSize, wire::kCompletionSize}, &c);
      reader_.consume(total);
      if (e != wire::DecodeError::kNone) return fail(std::string("bad completion from the target: ") + wire::describe(e));
      const auto it = inflight_.find(c.tag);
      if (it == inflight_.end()) return fail("completion for an unknown tag " + std::to_string(c.tag));
      const Pending p = it->second;
      const std::uint32_t payload = h.length - static_cast<std::uint32_t>(wire::kCompletionSize);
      if (payload != c.length || (payload && (p.cmd.opcode != wire::Opcode::kRead || payload != p.cmd.length))) {
        return fail("completion length does not match the command");
      }
      if (payload == 0) {
        inflight_.erase(it);
        on_complete_(c);
        continue;
      }
      filling_ = true;
      fill_c_ = c;
      fill_dst_ = p.buffer;
      fill_len_ = payload;
      filled_ = 0;
    }
  }

  void read_more(std::size_t want) {
    auto done = [this](const error_code& ec) {
      if (ec) return fail(ec == asio::error::eof ? "the target closed the connection" : ec.message());
      parse();
    };
    if (filling_ && reader_.direct(fill_len_ - filled_)) {
      reader_.fill_direct(fill_dst_ + filled_, fill_len_ - filled_, [this, done](const error_code& ec) {
        if (!ec) filled_ = fill_len_;
        done(ec);
      });
      return;
    }
    reader_.fill(want, done);
  }

  asio::io_context& io_;
  tcp::socket sock_;
  Writer writer_;
  std::string peer_;
  std::chrono::milliseconds timeout_;
  bool started_ = false;
  bool dead_ = false;
  CompletionHandler on_complete_;
  ClosedHandler on_closed_;
  std::unordered_map<std::uint64_t, Pending> inflight_;
  std::array<std::byte, wire::kFrameHeaderSize> hdr_{};  // call()'s reply, before the data phase
  Reader reader_{sock_};
  bool filling_ = false;  // a read's data is arriving into fill_dst_
  wire::Completion fill_c_{};
  std::byte* fill_dst_ = nullptr;
  std::size_t fill_len_ = 0, filled_ = 0;
};

}  // namespace

bool run_until(asio::io_context& io, const std::function<bool()>& done, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!done()) {
    const auto left = deadline - std::chrono::steady_clock::now();
    if (left <= std::chrono::steady_clock::duration::zero()) return false;
    io.restart();
    io.run_one_for(left);
  }
  return true;
}

std::shared_ptr<ServerConnection> make_tcp_server_connection(tcp::socket socket, BufferPool& pool) {
  return std::make_shared<TcpServerConnection>(std::move(socket), pool);
}

std::unique_ptr<ClientConnection> tcp_connect(asio::io_context& io, const std::string& host, std::uint16_t port,
                                              std::chrono::milliseconds timeout) {
  const std::string where = host + ":" + std::to_string(port);
  tcp::resolver resolver(io);
  error_code ec;
  const auto endpoints = resolver.resolve(host, std::to_string(port), ec);
  if (ec) throw SystemError("resolving '" + host + "'", ec.message(), "give an IP address or a resolvable name");
  tcp::socket sock(io);
  bool done = false;
  asio::async_connect(sock, endpoints, [&](const error_code& e, const tcp::endpoint&) {
    ec = e;
    done = true;
  });
  if (!run_until(io, [&] { return done; }, timeout)) {
    sock.close(ec);
    run_until(io, [&] { return done; }, std::chrono::milliseconds(1000));
    throw SystemError("TCP connect to " + where, "no answer within " + std::to_string(timeout.count()) + " ms",
                      "is the target up and the address reachable (firewall)?", ETIMEDOUT);
  }
  if (ec) {
    throw SystemError("TCP connect to " + where, ec.message(),
                      ec == asio::error::connection_refused ? "is `ibdisk serve` running there, on this port?"
                                                             : "check the address and the network");
  }
  return std::make_unique<TcpClientConnection>(io, std::move(sock), timeout);
}

}  // namespace ibdisk::transport
