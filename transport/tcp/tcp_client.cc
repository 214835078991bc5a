// TCP transport, initiator side: connect, blocking control calls for the setup phase, then
// commands out and completions (with read data) in, parsed from buffered input.
#include <unordered_map>

#include "common/error.h"
#include "common/log.h"
#include "transport/tcp/frame_io.h"

namespace ibdisk::transport::tcp_detail {
namespace {

namespace asio = boost::asio;
using asio::ip::tcp;
using boost::system::error_code;

constexpr std::size_t kInputBuffer = 128 * 1024;

class TcpClientConnection final : public ClientConnection, private Writer::Events {
 public:
  TcpClientConnection(asio::io_context& io, tcp::socket s, std::chrono::milliseconds timeout,
                      std::chrono::milliseconds peer_timeout)
      : io_(io), sock_(std::move(s)), writer_(sock_), reader_(sock_, kInputBuffer), timeout_(timeout) {
    tune(sock_, peer_timeout);
    error_code ec;
    const auto ep = sock_.remote_endpoint(ec);
    peer_ = ec ? "(disconnected)" : endpoint_text(ep);
  }
  ~TcpClientConnection() override {
    error_code ec;
    sock_.close(ec);
  }

  std::string transport_name() const override { return "tcp"; }
  std::string peer() const override { return peer_; }

  proto::Control call(const proto::Control& request) override {
    if (started_) throw SystemError("control call to " + peer_, std::string("the queue is in its data phase"));
    writer_.push(control_frame(request));
    send_now();
    std::optional<proto::Control> reply;
    std::string bad;
    error_code err;
    bool done = false;
    std::function<void()> step;
    step = [&] {
      const Decoded d = decode_frame(reader_.buffered(), Role::kInitiator, wire::kMaxControlSize);
      if (d.kind == Decoded::Kind::kNeedMore) {
        return reader_.fill(d.need, [&](const error_code& ec) {
          if (ec) {
            err = ec;
            done = true;
            return;
          }
          step();
        });
      }
      done = true;
      if (d.kind != Decoded::Kind::kControl) {
        bad = d.kind == Decoded::Kind::kBad ? d.error : "not a control frame";
        return;
      }
      proto::Control msg;
      if (msg.ParseFromArray(d.control.data(), static_cast<int>(d.control.size()))) reply = std::move(msg);
      else bad = "malformed control message";
      reader_.consume(d.consumed);
    };
    step();
    if (!run_until(io_, [&] { return done && !writer_.scheduled(); }, timeout_)) {
      error_code ec;
      sock_.close(ec);
      run_until(io_, [&] { return done && !writer_.scheduled(); }, std::chrono::milliseconds(1000));
      throw SystemError("waiting for " + peer_, "no answer within " + std::to_string(timeout_.count()) + " ms",
                        "is the target overloaded or the network down?", ETIMEDOUT);
    }
    if (failed_) throw SystemError("sending to " + peer_, send_error_, "see the target's log for why");
    if (err) {
      throw SystemError("talking to " + peer_, err == asio::error::eof ? std::string("the target closed the connection")
                                                                       : err.message(),
                        "see the target's log for why");
    }
    if (!bad.empty()) {
      throw SystemError("reading the reply from " + peer_, bad,
                        "is this port an ibdisk target (default 7420), not NBD (10809)?");
    }
    return *reply;
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

  void fail(const CloseReason& reason) {
    if (dead_) return;
    dead_ = true;
    error_code ec;
    sock_.close(ec);
    if (on_closed_) on_closed_(reason);
  }

  void send_now() {
    if (!dead_ && !failed_ && writer_.send(*this)) {
      writer_.set_scheduled(true);
      sock_.async_wait(tcp::socket::wait_write, [this](const error_code& ec) {
        if (ec && !dead_) fail({close_code_of(ec), "sending: " + ec.message()});
        if (ec) return writer_.set_scheduled(false);
        send_now();
      });
      return;
    }
    writer_.set_scheduled(false);
  }
  void frame_sent(OutFrame&) override {}
  void send_failed(const error_code& ec) override {
    failed_ = true;
    send_error_ = ec.message();
    if (started_) fail({close_code_of(ec), "sending: " + ec.message()});
  }
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
      const Decoded d = decode_frame(reader_.buffered(), Role::kInitiator, wire::kMaxControlSize);
      switch (d.kind) {
        case Decoded::Kind::kNeedMore:
          return read_more(d.need);
        case Decoded::Kind::kBad:
          return fail({CloseCode::kProtocol, "bad frame from the target: " + d.error});
        case Decoded::Kind::kControl: {
          proto::Control msg;
          if (msg.ParseFromArray(d.control.data(), static_cast<int>(d.control.size())) && msg.has_error()) {
            return fail({CloseCode::kPeerClosed, "the target closed the queue: " + msg.error().message()});
          }
          return fail({CloseCode::kProtocol, "unexpected control message during the data phase"});
        }
        case Decoded::Kind::kCommand:
          return fail({CloseCode::kProtocol, "unexpected frame type from the target"});
        case Decoded::Kind::kCompletion:
          break;
      }
      reader_.consume(d.consumed);
      const wire::Completion& c = d.completion;
      const auto it = inflight_.find(c.tag);
      if (it == inflight_.end()) return fail({CloseCode::kProtocol, "completion for an unknown tag " + std::to_string(c.tag)});
      const Pending p = it->second;
      const std::uint32_t most = p.cmd.opcode == wire::Opcode::kRead      ? p.cmd.length
                                 : p.cmd.opcode == wire::Opcode::kExtents ? wire::kExtentsReplySize
                                                                          : 0;
      if (d.payload && (d.payload > most || (p.cmd.opcode == wire::Opcode::kRead && d.payload != most))) {
        return fail({CloseCode::kProtocol, "completion length does not match the command"});
      }
      if (d.payload == 0) {
        inflight_.erase(it);
        on_complete_(c);
        continue;
      }
      filling_ = true;
      fill_c_ = c;
      fill_dst_ = p.buffer;
      fill_len_ = d.payload;
      filled_ = 0;
    }
  }

  void read_more(std::size_t want) {
    auto done = [this](const error_code& ec) {
      if (ec) {
        return fail(ec == asio::error::eof ? CloseReason{CloseCode::kPeerClosed, "the target closed the connection"}
                                           : CloseReason{close_code_of(ec), ec.message()});
      }
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
  Reader reader_;
  std::string peer_;
  std::chrono::milliseconds timeout_;
  bool started_ = false;
  bool dead_ = false;
  bool failed_ = false;  // a send failed during the setup phase
  std::string send_error_;
  CompletionHandler on_complete_;
  ClosedHandler on_closed_;
  std::unordered_map<std::uint64_t, Pending> inflight_;
  bool filling_ = false;  // a read's data is arriving into fill_dst_
  wire::Completion fill_c_{};
  std::byte* fill_dst_ = nullptr;
  std::size_t fill_len_ = 0, filled_ = 0;
};

class TcpConnector final : public Connector {
 public:
  std::string transport_name() const override { return "tcp"; }
  std::unique_ptr<ClientConnection> connect(asio::io_context& io, const std::string& host, std::uint16_t port,
                                            const ConnectOptions& opts, std::string* /*why_not*/) override {
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
    const auto timeout = std::max(opts.connect_timeout, opts.call_timeout);
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
    return make_client_connection(io, std::move(sock), opts.call_timeout, opts.peer_timeout);
  }
};

}  // namespace

std::unique_ptr<ClientConnection> make_client_connection(asio::io_context& io, tcp::socket s,
                                                         std::chrono::milliseconds timeout,
                                                         std::chrono::milliseconds peer_timeout) {
  return std::make_unique<TcpClientConnection>(io, std::move(s), timeout, peer_timeout);
}

}  // namespace ibdisk::transport::tcp_detail

namespace ibdisk::transport {

std::shared_ptr<Connector> tcp_connector() { return std::make_shared<tcp_detail::TcpConnector>(); }

bool run_until(boost::asio::io_context& io, const std::function<bool()>& done, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!done()) {
    const auto left = deadline - std::chrono::steady_clock::now();
    if (left <= std::chrono::steady_clock::duration::zero()) return false;
    io.restart();
    io.run_one_for(left);
  }
  return true;
}

}  // namespace ibdisk::transport
