// The target: workers, listeners (from the transports' factories), queues, and stopping.
#include "target/server.h"

#include <algorithm>
#include <exception>
#include <mutex>
#include <thread>

#include "common/auth.h"
#include "common/error.h"
#include "common/log.h"
#include "target/queue.h"
#include "target/worker.h"

namespace ibdisk::target {
namespace {

namespace asio = boost::asio;

auto log() {
  static auto l = ibdisk::logger("target");
  return l;
}

// After stop_timeout: whatever is still open does not finish by itself. Worker's thread.
void force_stop(Worker& w) {
  if (w.queues.empty()) return w.io.stop();
  std::vector<QueueHandler*> left;
  for (auto& [raw, q] : w.queues) left.push_back(raw);
  log()->warn("stopping: {} queue(s) on worker {} did not finish within the stop timeout; closing them", left.size(),
              w.index);
  for (QueueHandler* q : left) {
    log()->warn("stopping: closing the queue from {} ({})", q->peer(), q->idle() ? "idle" : "requests in flight");
    q->abort("the target is stopping and the queue did not finish in time");
  }
}

}  // namespace

struct Server::Impl {
  explicit Impl(ServerOptions o) : shared(std::move(o)) {}
  Shared shared;
  std::vector<std::unique_ptr<Worker>> workers;
  std::vector<std::unique_ptr<transport::Listener>> listeners;  // on worker 0's thread
  transport::Listener* tcp = nullptr;
  transport::Listener* rdma = nullptr;
  std::atomic<unsigned> next_worker{0};
  std::string rdma_text;
  std::mutex failure_mu;
  std::exception_ptr failure;  // what ended a worker's loop

  transport::AcceptContext& pick() {
    return workers[next_worker.fetch_add(1, std::memory_order_relaxed) % workers.size()]->accept;
  }

  // A new connection on its worker's thread.
  void add_queue(transport::AcceptContext& where, std::shared_ptr<transport::ServerConnection> conn) {
    Worker& w = *static_cast<Worker*>(where.owner);
    auto handler = std::make_unique<QueueHandler>(shared, w, std::move(conn));
    QueueHandler* raw = handler.get();
    w.queues.emplace(raw, std::move(handler));
    raw->start();  // refuses it when the target is stopping
  }

  std::unique_ptr<transport::Listener> make(const ListenerFactory& f) {
    return f([this]() -> transport::AcceptContext& { return pick(); },
             [this](transport::AcceptContext& where, std::shared_ptr<transport::ServerConnection> conn) {
               add_queue(where, std::move(conn));
             });
  }

  void start_rdma(const std::string& host, std::uint16_t tcp_port) {
    const auto& o = shared.opts;
    if (!o.rdma) {
      rdma_text = "RDMA disabled by configuration";
      log()->info("not listening on RDMA: disabled; TCP only");
      return;
    }
    const auto probe = rdma::probe_devices();
    if (probe.devices.empty()) {
      rdma_text = probe.unavailable_reason;
      log()->info("not listening on RDMA: {}; TCP only", probe.unavailable_reason);
      return;
    }
    // Every worker's pool is registered with the device: that much memory must be lockable.
    const std::size_t need = static_cast<std::size_t>(o.threads) * workers[0]->buffers->region().iov_len;
    if (const std::string m = transport::memlock_problem(need, "the target's RDMA buffer pools (--threads x --buffer-mib)");
        !m.empty()) {
      throw SystemError("listening on RDMA", m, "or lower --buffer-mib");
    }
    const std::uint16_t port = o.rdma_port < 0 ? tcp_port : static_cast<std::uint16_t>(o.rdma_port);
    try {
      listeners.push_back(make([&](auto next, auto on_accept) {
        return transport::listen_rdma(workers[0]->io, host, port, std::move(next), std::move(on_accept));
      }));
      rdma = listeners.back().get();
    } catch (const SystemError& e) {
      rdma_text = e.what();
      log()->warn("not listening on RDMA at {}:{}: {}; TCP only", host, port, e.what());
      return;
    }
    rdma_text = "listening on RDMA " + host + ":" + std::to_string(rdma->port());
    log()->info("{}", rdma_text);
  }

};

Server::Server(ServerOptions opts) {
  if (opts.exports.empty()) {
    throw SystemError("starting the target", std::string("no exports"),
                      "give at least one --export NAME=PATH (or export lines in --config)");
  }
  if (opts.threads == 0 || opts.threads > 64) throw std::invalid_argument("--threads must be 1 to 64");
  impl_ = std::make_unique<Impl>(opts);
  auto& shared = impl_->shared;
  if (!opts.key_file.empty()) shared.key = load_key_file(opts.key_file);

  std::string host = opts.listen_address;
  if (host.empty()) host = shared.key.empty() && !opts.insecure ? "127.0.0.1" : "0.0.0.0";
  boost::system::error_code ec;
  const auto addr = asio::ip::make_address(host, ec);
  if (ec) throw SystemError("listen address '" + host + "'", ec.message(), "give an IP address, e.g. 10.30.0.1");
  if (shared.key.empty() && !opts.insecure && !addr.is_loopback()) {
    throw SystemError("listening on " + host + " without a key",
                      std::string("anyone who reaches this address could read and write the exports"),
                      "give --key-file FILE (make one with `ibdisk keygen FILE`, copy it to the initiator), or "
                      "--insecure on a network you trust");
  }

  const std::uint32_t slot = wire::kMaxIoSize;
  const unsigned slots = std::max(1u, static_cast<unsigned>((static_cast<std::uint64_t>(opts.buffer_mib) << 20) / slot));
  for (unsigned i = 0; i < opts.threads; ++i) {
    auto w = std::make_unique<Worker>();
    w->index = i;
    w->buffers = std::make_unique<transport::BufferPool>(slot, slots);
    w->engine = std::make_unique<StorageEngine>(w->io, StorageEngine::Options{});
    const iovec region = w->buffers->region();
    w->engine->register_buffers({&region, 1});
    w->buffers->set_fixed_index(0);
    w->rdma = std::make_unique<transport::RdmaDeviceCache>(*w->buffers);
    w->slots = std::make_unique<SlotPool>(*w->buffers, w->io);
    w->accept = transport::AcceptContext{&w->io, w->rdma.get(), w.get()};
    impl_->workers.push_back(std::move(w));
  }

  impl_->listeners.push_back(impl_->make([&](auto next, auto on_accept) {
    return transport::listen_tcp(impl_->workers[0]->io, host, opts.port, std::move(next), std::move(on_accept),
                                 opts.session_timeout);
  }));
  impl_->tcp = impl_->listeners.back().get();
  if (shared.key.empty()) {
    log()->warn("no key configured: {} (give --key-file to require authentication)",
                opts.insecure ? "ANYONE who reaches this port can read and write the exports (--insecure)"
                              : "listening on loopback only, for this user (uid " + std::to_string(shared.uid) +
                                    ") and root");
  }
  impl_->start_rdma(host, impl_->tcp->port());
}

Server::~Server() {
  stop();
  for (auto& w : impl_->workers) {
    if (w->thread.joinable()) w->thread.join();
  }
}

void Server::add_listener(const ListenerFactory& make) { impl_->listeners.push_back(impl_->make(make)); }

void Server::run() {
  for (auto& w : impl_->workers) {
    Worker* wp = w.get();
    Impl* impl = impl_.get();
    w->thread = std::thread([wp, impl, this] {
      try {
        wp->io.run();
      } catch (const std::exception& e) {
        // The data path does not throw: this is a bug. Going on with the loop's state half
        // updated could lose data; stop the whole target instead, and say why.
        log()->critical("worker {}: internal error: {}; stopping the target", wp->index, e.what());
        {
          std::lock_guard lock(impl->failure_mu);
          if (!impl->failure) impl->failure = std::current_exception();
        }
        stop();
      }
    });
  }
  for (auto& w : impl_->workers) w->thread.join();
  if (impl_->failure) std::rethrow_exception(impl_->failure);
}

void Server::stop() {
  auto& shared = impl_->shared;
  if (shared.stopping.exchange(true)) return;
  Impl* impl = impl_.get();
  asio::post(impl->workers[0]->io, [impl] {
    for (auto& l : impl->listeners) l->close();
  });
  for (auto& w : impl->workers) {
    Worker* wp = w.get();
    asio::post(w->io, [wp, impl] {
      if (wp->queues.empty()) return wp->io.stop();
      // Each worker keeps its own deadline: one that stops early must not take the others' with it.
      wp->stop_timer = std::make_unique<asio::steady_timer>(wp->io, impl->shared.opts.stop_timeout);
      wp->stop_timer->async_wait([wp](const boost::system::error_code& ec) {
        if (!ec) force_stop(*wp);
      });
      std::vector<QueueHandler*> all;
      for (auto& [raw, q] : wp->queues) all.push_back(raw);
      for (QueueHandler* q : all) q->begin_stop();
    });
  }
}

std::uint16_t Server::port() const { return impl_->tcp->port(); }
std::uint16_t Server::rdma_port() const { return impl_->rdma ? impl_->rdma->port() : 0; }
std::string Server::rdma_status() const { return impl_->rdma_text; }
std::string Server::listen_description() const { return impl_->tcp->description(); }
ExportRegistry& Server::exports() { return impl_->shared.registry; }
const NetworkAllowList& Server::allow_list() const { return impl_->shared.allow; }
unsigned Server::worker_count() const { return static_cast<unsigned>(impl_->workers.size()); }
asio::io_context& Server::worker_io(unsigned i) { return impl_->workers.at(i)->io; }
StorageEngine& Server::worker_engine(unsigned i) { return *impl_->workers.at(i)->engine; }

}  // namespace ibdisk::target
