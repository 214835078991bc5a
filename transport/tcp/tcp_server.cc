// TCP transport, target side: one accepted socket per queue. Frames are parsed from buffered
// input; a write's payload is read only once the target has said where it goes
// (receive_data), so a command waiting for a buffer holds the stream, and input stops while
// output the peer does not read piles up. See connection.h for the contract.
#include <algorithm>
#include <optional>

#include "common/log.h"
#include "transport/tcp/frame_io.h"

namespace ibdisk::transport::tcp_detail {
namespace {

namespace asio = boost::asio;
using asio::ip::tcp;
using boost::system::error_code;

auto log() {
  static auto l = ibdisk::logger("tcp");
  return l;
}

constexpr std::size_t kHandshakeBuffer = 4096;     // input buffer before the queue is admitted
constexpr std::size_t kAdmittedBuffer = 128 * 1024;
// Output the peer has not taken yet beyond which input stops (a peer that sends and never reads).
constexpr std::size_t kMaxQueuedControl = 2u << 20;
constexpr std::size_t kMaxQueuedFramesSlack = 64;

class TcpServerConnection final : public ServerConnection,
                                  private Writer::Events,
                                  public std::enable_shared_from_this<TcpServerConnection> {
 public:
  TcpServerConnection(tcp::socket s, std::chrono::milliseconds peer_timeout)
      : sock_(std::move(s)), writer_(sock_), reader_(sock_, kHandshakeBuffer) {
    tune(sock_, peer_timeout);
    error_code ec;
    const auto remote = sock_.remote_endpoint(ec);
    if (ec) {
      peer_.text = "(disconnected)";
      return;
    }
    peer_.text = endpoint_text(remote);
    peer_.address = remote.address();
    const auto local = sock_.local_endpoint(ec);
    if (!ec) peer_.uid = loopback_peer_uid(local, remote);
  }

  std::string transport_name() const override { return "tcp"; }
  PeerInfo peer() const override { return peer_; }

  void start(Handler* handler) override {
    handler_ = handler;
    pump();
  }

  void send_control(const proto::Control& msg) override { push(control_frame(msg)); }

  unsigned admit(unsigned depth, std::uint32_t max_io) override {
    depth_ = depth;
    max_io_ = max_io;
    max_control_ = wire::kMaxControlSize;
    reader_.reserve(kAdmittedBuffer);
    return depth;
  }

  void receive_data(DataOp& op) override {
    if (dead_) return op.data_received(-ENOTCONN);
    awaiting_payload_ = false;
    filling_ = &op;
    filled_ = 0;
    if (!pumping_) pump();
  }

  void send_reply(DataOp& op, std::int32_t status, std::uint32_t length) override {
    if (dead_) return op.reply_sent(-ENOTCONN);
    OutFrame f;
    const bool with_data = status == 0 && wire::reply_has_payload(op.cmd.opcode) && op.slot.data != nullptr;
    const std::uint32_t data_len = with_data ? length : 0;
    wire::encode(wire::FrameHeader{wire::FrameType::kCompletion,
                                   static_cast<std::uint32_t>(wire::kCompletionSize + data_len)},
                 f.head.data());
    wire::encode(wire::Completion{op.cmd.tag, status, data_len}, f.head.data() + wire::kFrameHeaderSize);
    f.head_len = wire::kFrameHeaderSize + wire::kCompletionSize;
    if (with_data) {
      f.data = op.slot.data;
      f.data_len = data_len;
    }
    f.op = &op;
    push(std::move(f));
  }

  void resume() override {
    if (!held_ || dead_) return;
    if (!pumping_) {
      // Not from inside the handler that freed room: deliver on the next turn.
      asio::post(sock_.get_executor(), [self = shared_from_this()] { self->pump(); });
    } else {
      again_ = true;
    }
  }

  void close() override {
    if (dead_) return;
    if (!closing_) close_reason_ = {CloseCode::kLocal, "closed by the target"};
    closing_ = true;
    if (writer_.idle() && !writer_.scheduled()) fail(close_reason_);
  }

  void abort(const std::string& why) override { fail({CloseCode::kLocal, why}); }

 private:
  void push(OutFrame&& f) {
    if (dead_) {
      if (f.op) f.op->reply_sent(-ENOTCONN);
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
        if (ec && !self->dead_) self->fail({close_code_of(ec), "sending: " + ec.message()});
        if (ec) return self->writer_.set_scheduled(false);
        self->send_now();
      });
      return;
    }
    writer_.set_scheduled(false);
  }

  void frame_sent(OutFrame& f) override {
    if (f.op) f.op->reply_sent(0);
    if (output_paused_ && !output_full()) {
      output_paused_ = false;
      if (!pumping_) pump();
    }
  }
  void send_failed(const error_code& ec) override {
    fail(closing_ ? close_reason_ : CloseReason{close_code_of(ec), "sending: " + ec.message()});
  }
  void drained() override {
    if (closing_) fail(close_reason_);
  }

  bool output_full() const {
    return writer_.copied_bytes() > kMaxQueuedControl || writer_.frames() > 2 * depth_ + kMaxQueuedFramesSlack;
  }

  // Reports the end once, after every operation the target handed over has been told.
  void fail(const CloseReason& reason) {
    if (dead_) return;
    dead_ = true;
    error_code ec;
    sock_.shutdown(tcp::socket::shutdown_both, ec);
    sock_.close(ec);
    if (DataOp* op = std::exchange(filling_, nullptr)) op->data_received(-ECONNRESET);
    for (auto& f : writer_.take_unsent()) {
      if (f.op) f.op->reply_sent(-ECONNRESET);
    }
    if (handler_) handler_->on_closed(reason);
  }

  // A protocol violation: tell the peer why (best effort), then close.
  void violation(const std::string& what) {
    log()->warn("{}: protocol error: {}; closing the connection", peer_.text, what);
    if (!closing_) close_reason_ = {CloseCode::kProtocol, what};
    proto::Control err;
    err.mutable_error()->set_code(proto::ERROR_PROTOCOL);
    err.mutable_error()->set_message(what);
    push(control_frame(err));
    closing_ = true;
    if (writer_.idle() && !writer_.scheduled()) fail(close_reason_);
  }

  // Parses every buffered frame, then reads more. Entered from read completions, resume(),
  // receive_data() and sent output; one loop at a time.
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
    if (!dead_ && !closing_ && !reading_ && !stalled()) read_more();
  }

  // Input waits for the target: a command it could not take, a payload without a destination,
  // or replies the peer does not read.
  bool stalled() const { return (held_ && !filling_) || awaiting_payload_ || output_paused_; }

  void parse() {
    for (;;) {
      if (dead_ || closing_) return;
      if (filling_) {  // a write's payload, into its slot or skipped
        const std::uint32_t len = filling_->cmd.length;
        filled_ += reader_.take(filling_->slot.data ? filling_->slot.data + filled_ : nullptr, len - filled_);
        if (filled_ < len) return;
        std::exchange(filling_, nullptr)->data_received(0);
        continue;
      }
      if (awaiting_payload_) return;
      if (held_) {
        const wire::Command cmd = *held_;
        held_.reset();
        if (!deliver(cmd)) return;
        continue;
      }
      if (output_full()) {
        output_paused_ = true;
        return;
      }
      const Decoded d = decode_frame(reader_.buffered(), Role::kTarget, max_control_);
      switch (d.kind) {
        case Decoded::Kind::kNeedMore:
          want_ = d.need;
          return;
        case Decoded::Kind::kBad:
          return violation(d.error);
        case Decoded::Kind::kControl: {
          proto::Control msg;
          const bool ok = msg.ParseFromArray(d.control.data(), static_cast<int>(d.control.size())) &&
                          msg.msg_case() != proto::Control::MSG_NOT_SET;
          reader_.consume(d.consumed);
          if (!ok) return violation("malformed control message");
          handler_->on_control(msg);
          continue;
        }
        case Decoded::Kind::kCommand:
          reader_.consume(d.consumed);
          if (!deliver(d.command)) return;
          continue;
        case Decoded::Kind::kCompletion:
          return violation("a target does not accept completions");
      }
    }
  }

  // False when the handler could not take the command (it waits in held_).
  bool deliver(const wire::Command& cmd) {
    awaiting_payload_ = cmd.opcode == wire::Opcode::kWrite;  // until receive_data() for it
    if (handler_->on_command(cmd)) return true;
    awaiting_payload_ = false;
    held_ = cmd;
    return false;
  }

  void read_more() {
    reading_ = true;
    auto self = shared_from_this();
    auto done = [self](const error_code& ec) {
      self->reading_ = false;
      if (ec) {
        if (self->dead_) return;
        return self->fail(ec == asio::error::eof ? CloseReason{CloseCode::kPeerClosed, "closed by peer"}
                                                 : CloseReason{close_code_of(ec), ec.message()});
      }
      if (!self->closing_) self->pump();
    };
    if (filling_) {
      const std::size_t left = filling_->cmd.length - filled_;
      if (filling_->slot.data && reader_.direct(left)) {
        reader_.fill_direct(filling_->slot.data + filled_, left, [self, done](const error_code& ec) {
          if (!ec && self->filling_) self->filled_ = self->filling_->cmd.length;
          done(ec);
        });
        return;
      }
      return reader_.fill(1, done);
    }
    reader_.fill(want_, done);
  }

  tcp::socket sock_;
  Writer writer_;
  Reader reader_;
  PeerInfo peer_;
  Handler* handler_ = nullptr;
  unsigned depth_ = 0;
  std::uint32_t max_io_ = 0;
  std::uint32_t max_control_ = kMaxHandshakeControl;
  std::size_t want_ = wire::kFrameHeaderSize;  // buffered bytes parse() needs next
  std::optional<wire::Command> held_;          // delivered, refused for now: again after resume()
  bool awaiting_payload_ = false;              // a write was delivered; its payload waits for receive_data()
  DataOp* filling_ = nullptr;                  // a write whose payload is being read
  std::size_t filled_ = 0;
  bool pumping_ = false, again_ = false, reading_ = false;
  bool output_paused_ = false;
  bool closing_ = false;
  CloseReason close_reason_;  // reported once the output drains after closing_
  bool dead_ = false;
};

}  // namespace

std::shared_ptr<ServerConnection> make_server_connection(tcp::socket s, std::chrono::milliseconds peer_timeout) {
  return std::make_shared<TcpServerConnection>(std::move(s), peer_timeout);
}

}  // namespace ibdisk::transport::tcp_detail
