// RDMA transport: the listener. Connect requests with bad private data are rejected here;
// good ones go, with their id migrated to an event channel of their own, to the worker chosen
// for them, which builds the queue pair and accepts. A removed device (or a changed address)
// drops the listening id; it binds again every second until the address has a device again.
#include <arpa/inet.h>
#include <netdb.h>

#include "common/error.h"
#include "common/log.h"
#include "transport/rdma/rdma_endpoint.h"

namespace ibdisk::transport {
namespace {

using namespace std::chrono_literals;
namespace asio = boost::asio;

auto log() {
  static auto l = ibdisk::logger("rdma");
  return l;
}

using rdma_detail::ConnectRequest;

class RdmaListener final : public Listener {
 public:
  RdmaListener(asio::io_context& io, const std::string& address, std::uint16_t port, NextWorker next,
               OnAccept on_accept)
      : impl_(std::make_shared<Impl>(io, address, port, std::move(next), std::move(on_accept))) {
    impl_->listen();
  }
  ~RdmaListener() override { close(); }
  std::string transport_name() const override { return "rdma"; }
  std::uint16_t port() const override { return impl_->port; }
  std::string description() const override { return impl_->address + ":" + std::to_string(impl_->port); }
  void close() override {
    impl_->closed = true;
    impl_->retry.cancel();
    if (impl_->fd.is_open()) impl_->fd.release();
    impl_->id = rdma::CmId();
  }

 private:
struct Impl : std::enable_shared_from_this<Impl> {
  Impl(asio::io_context& io, std::string address, std::uint16_t port, NextWorker n, OnAccept a)
      : io(io), address(std::move(address)), port(port), next(std::move(n)), on_accept(std::move(a)), fd(io), retry(io) {}
  ~Impl() {
    if (fd.is_open()) fd.release();
  }

  void listen() {
    addrinfo hints{};
    hints.ai_flags = AI_NUMERICSERV | AI_PASSIVE;
    hints.ai_family = AF_UNSPEC;
    addrinfo* res = nullptr;
    const std::string service = std::to_string(port);
    const std::string where = address + ":" + service;
    if (const int rc = ::getaddrinfo(address.c_str(), service.c_str(), &hints, &res); rc != 0) {
      throw SystemError("resolving '" + address + "'", std::string(gai_strerror(rc)), "give an IP address");
    }
    sockaddr_storage ss{};
    std::memcpy(&ss, res->ai_addr, res->ai_addrlen);
    ::freeaddrinfo(res);
    rdma::EventChannel ch;
    rdma::CmId lid(ch);
    lid.bind(reinterpret_cast<const sockaddr*>(&ss), where);
    lid.listen(64);
    rdma_detail::set_nonblocking(ch.fd());
    if (fd.is_open()) fd.release();
    id = rdma::CmId();
    channel = std::move(ch);
    id = std::move(lid);
    port = ntohs(rdma_get_src_port(id.get()));
    fd.assign(channel.fd());
    wait();
  }

  void wait() {
    fd.async_wait(asio::posix::descriptor_base::wait_read, [self = shared_from_this()](const boost::system::error_code& ec) {
      if (ec || self->closed) return;
      self->ready();
    });
  }

  void ready() {
    for (;;) {
      std::optional<rdma::CmEvent> ev;
      try {
        ev = channel.next(0ms);
      } catch (const std::exception& e) {
        // Never a listener that silently stops: a new id on a new channel, as after a removal.
        log()->error("RDMA listener on {}:{}: {}; listening again in a second", address, port, e.what());
        return relisten_later();
      }
      if (!ev) break;
      switch (ev->type()) {
        case RDMA_CM_EVENT_CONNECT_REQUEST:
          request(std::move(*ev));
          break;
        case RDMA_CM_EVENT_DEVICE_REMOVAL:
        case RDMA_CM_EVENT_ADDR_CHANGE:
          log()->warn("RDMA listener on {}:{}: {}; listening again when the device is back", address, port,
                      rdma_detail::cm_event_text(*ev));
          ev.reset();
          return relisten_later();
        default:
          log()->debug("RDMA listener: ignoring {}", rdma_detail::cm_event_text(*ev));
          break;
      }
    }
    if (!closed) wait();
  }

  void relisten_later() {
    fd.release();
    id = rdma::CmId();
    rdma_detail::forget_removed_devices();  // the listening id was the last user of a removed device here
    retry.expires_after(1s);
    retry.async_wait([self = shared_from_this()](const boost::system::error_code& ec) {
      if (ec || self->closed) return;
      try {
        self->listen();
        log()->info("listening on RDMA {}:{} again", self->address, self->port);
      } catch (const std::exception& e) {
        log()->debug("RDMA listener: not yet: {}", e.what());
        self->relisten_later();
      }
    });
  }

  void request(rdma::CmEvent ev) {
    rdma::CmId child = rdma::CmId::adopt(ev.id());
    RdmaConnectData data;
    const std::string why = decode_connect_data(ev.private_data(), &data);
    const std::string peer = rdma_detail::sockaddr_text(rdma_get_peer_addr(child.get()));
    const unsigned responder_resources = ev.conn().responder_resources;
    ev = rdma::CmEvent();  // acknowledged before the id moves or goes away
    if (!why.empty()) {
      log()->warn("RDMA connect request from {} rejected: {}", peer, why);
      reject_connect(child.get(), RdmaRejectReason::kBadConnectData);
      return;
    }
    auto req = std::make_shared<ConnectRequest>();
    try {
      child.migrate(req->channel);
    } catch (const std::exception& e) {
      log()->warn("RDMA connect request from {}: {}", peer, e.what());
      if (child) reject_connect(child.get(), RdmaRejectReason::kNoResources);
      return;
    }
    req->address = rdma_detail::sockaddr_address(rdma_get_peer_addr(child.get()));
    req->id = std::move(child);
    req->data = data;
    req->peer = peer;
    req->responder_resources = responder_resources;
    AcceptContext& ctx = next();
    asio::post(*ctx.io, [self = shared_from_this(), &ctx, req] {
      std::shared_ptr<ServerConnection> conn;
      try {
        if (self->closed) throw SystemError("accepting an RDMA queue", std::string("the target is stopping"));
        conn = rdma_detail::make_server_connection(*ctx.io, std::move(*req), *ctx.rdma);
      } catch (const std::exception& e) {
        log()->warn("{}: RDMA queue refused: {}", req->peer, e.what());
        if (req->id) {
          reject_connect(req->id.get(), self->closed ? RdmaRejectReason::kShuttingDown : RdmaRejectReason::kNoResources);
        }
        return;
      }
      self->on_accept(ctx, std::move(conn));
    });
  }

  asio::io_context& io;
  std::string address;
  std::uint16_t port;
  NextWorker next;
  OnAccept on_accept;
  rdma::EventChannel channel;
  rdma::CmId id;
  asio::posix::stream_descriptor fd;
  asio::steady_timer retry;
  bool closed = false;
};

  std::shared_ptr<Impl> impl_;
};

}  // namespace

std::unique_ptr<Listener> listen_rdma(asio::io_context& io, const std::string& address, std::uint16_t port,
                                      Listener::NextWorker next, Listener::OnAccept on_accept) {
  rdma_detail::watch_device_removals();
  return std::make_unique<RdmaListener>(io, address, port, std::move(next), std::move(on_accept));
}

}  // namespace ibdisk::transport
