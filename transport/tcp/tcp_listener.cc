// TCP transport: the listener. It accepts on its own thread's io_context, into the socket of
// the worker chosen for the connection. Out of file descriptors (or memory) it backs off
// instead of spinning, and says so at most once a second.
#include <chrono>

#include "common/error.h"
#include "common/log.h"
#include "transport/tcp/frame_io.h"

namespace ibdisk::transport {
namespace {

namespace asio = boost::asio;
using asio::ip::tcp;
using boost::system::error_code;
using namespace std::chrono_literals;

auto log() {
  static auto l = ibdisk::logger("tcp");
  return l;
}

constexpr auto kFirstBackoff = 50ms;
constexpr auto kLastBackoff = 1s;

bool out_of_resources(const error_code& ec) {
  return ec == asio::error::no_descriptors || ec.value() == ENFILE || ec == asio::error::no_buffer_space ||
         ec == asio::error::no_memory;
}

class TcpListener final : public Listener {
 public:
  TcpListener(asio::io_context& io, const std::string& address, std::uint16_t port, NextWorker next, OnAccept on_accept,
              std::chrono::milliseconds peer_timeout)
      : state_(std::make_shared<State>(io, std::move(next), std::move(on_accept))) {
    state_->peer_timeout = peer_timeout;
    error_code ec;
    const auto addr = asio::ip::make_address(address, ec);
    if (ec) throw SystemError("listen address '" + address + "'", ec.message(), "give an IP address, e.g. 10.30.0.1");
    const tcp::endpoint ep(addr, port);
    auto& a = state_->acceptor;
    a.open(ep.protocol());
    a.set_option(tcp::acceptor::reuse_address(true));
    a.bind(ep, ec);
    if (ec) {
      throw SystemError("listening on TCP " + tcp_detail::endpoint_text(ep), ec.message(),
                        ec == asio::error::address_in_use
                            ? "another process uses this port (see `ss -ltnp`); stop it or give another port"
                            : "is the address assigned to an interface here? (`ip -br addr`)");
    }
    a.listen(asio::socket_base::max_listen_connections);
    state_->where = tcp_detail::endpoint_text(a.local_endpoint());
    state_->port = a.local_endpoint().port();
    state_->accept();
  }
  ~TcpListener() override { close(); }

  std::string transport_name() const override { return "tcp"; }
  std::uint16_t port() const override { return state_->port; }
  std::string description() const override { return state_->where; }
  void close() override {
    state_->closed = true;
    error_code ec;
    state_->acceptor.close(ec);
    state_->backoff.cancel();
  }

 private:
  struct State : std::enable_shared_from_this<State> {
    State(asio::io_context& io, NextWorker n, OnAccept a)
        : acceptor(io), backoff(io), next(std::move(n)), on_accept(std::move(a)) {}

    void accept() {
      if (closed) return;
      AcceptContext& ctx = next();
      acceptor.async_accept(*ctx.io, [self = shared_from_this(), &ctx](const error_code& ec, tcp::socket s) {
        if (self->closed || ec == asio::error::operation_aborted) return;
        if (ec) return self->failed(ec);
        self->delay = kFirstBackoff;
        asio::post(*ctx.io, [self, &ctx, sock = std::move(s)]() mutable {
          if (self->closed) return;
          self->on_accept(ctx, tcp_detail::make_server_connection(std::move(sock), self->peer_timeout));
        });
        self->accept();
      });
    }

    // Out of descriptors, accept() fails at once for as long as the backlog holds connections:
    // wait (doubling up to a second) instead, and log once a second at most.
    void failed(const error_code& ec) {
      const auto now = std::chrono::steady_clock::now();
      ++failures;
      if (now - last_log >= 1s) {
        log()->warn("accepting on {}: {}{}; retrying in {} ms", where, ec.message(),
                    failures > 1 ? " (" + std::to_string(failures) + " times since the last message)" : "",
                    std::chrono::duration_cast<std::chrono::milliseconds>(delay).count());
        last_log = now;
        failures = 0;
      }
      const auto wait = out_of_resources(ec) ? delay : kFirstBackoff;
      delay = std::min<std::chrono::milliseconds>(delay * 2, kLastBackoff);
      backoff.expires_after(wait);
      backoff.async_wait([self = shared_from_this()](const error_code& e) {
        if (!e) self->accept();
      });
    }

    tcp::acceptor acceptor;
    asio::steady_timer backoff;
    NextWorker next;
    OnAccept on_accept;
    std::string where;
    std::uint16_t port = 0;
    bool closed = false;
    std::chrono::milliseconds delay = kFirstBackoff;
    std::chrono::milliseconds peer_timeout{0};
    std::chrono::steady_clock::time_point last_log{};
    unsigned failures = 0;
  };
  std::shared_ptr<State> state_;
};

}  // namespace

std::unique_ptr<Listener> listen_tcp(asio::io_context& io, const std::string& address, std::uint16_t port,
                                     Listener::NextWorker next, Listener::OnAccept on_accept,
                                     std::chrono::milliseconds peer_timeout) {
  return std::make_unique<TcpListener>(io, address, port, std::move(next), std::move(on_accept), peer_timeout);
}

}  // namespace ibdisk::transport
