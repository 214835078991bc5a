#include "target/server.h"

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <set>
#include <mutex>
#include <thread>
#include <unordered_map>

#include "common/auth.h"
#include "common/error.h"
#include "common/log.h"
#include "transport/buffer_pool.h"
#include "transport/rdma/rdma_connection.h"
#include "transport/tcp/tcp_connection.h"

namespace ibdisk::target {
namespace {

namespace asio = boost::asio;
using asio::ip::tcp;
using transport::ServerConnection;
using transport::Slot;

auto log() {
  static auto l = ibdisk::logger("target");
  return l;
}

constexpr unsigned kDefaultQueueDepth = 32;
constexpr std::chrono::seconds kRejoinGrace{10};

struct Session {
  std::uint64_t id = 0;
  std::string peer;
  std::string client_name;
  std::string key_proof;  // the authenticated client's nonce-free identity: joins must match
  std::mutex mu;
  std::map<std::uint32_t, std::shared_ptr<ExportLease>> handles;
  std::uint32_t next_handle = 1;
  std::multiset<std::string> transports;  // one entry per live queue
  std::atomic<std::uint64_t> reads{0}, writes{0}, bytes_read{0}, bytes_written{0}, errors{0};
};

struct Shared {
  explicit Shared(ServerOptions o) : opts(std::move(o)), registry(opts.exports), allow(opts.allow) {}
  ServerOptions opts;
  ExportRegistry registry;
  NetworkAllowList allow;
  std::string key;
  std::mutex sessions_mu;
  std::map<std::uint64_t, std::shared_ptr<Session>> sessions;
  std::atomic<std::uint64_t> rejected{0}, protocol_errors{0};
  std::chrono::steady_clock::time_point started = std::chrono::steady_clock::now();
  std::atomic<bool> stopping{false};
};

class QueueHandler;

// Members parent first: connections (in queues) go before the RDMA registrations of the pool,
// which go before the pool.
struct Worker {
  asio::io_context io;
  std::unique_ptr<transport::BufferPool> pool;
  std::unique_ptr<transport::RdmaDeviceCache> rdma;
  std::unique_ptr<StorageEngine> engine;
  std::unordered_map<QueueHandler*, std::unique_ptr<QueueHandler>> queues;
  std::thread thread;
};

proto::ErrorCode code_of(OpenError e) {
  switch (e) {
    case OpenError::kNone: return proto::ERROR_NONE;
    case OpenError::kUnknownExport: return proto::ERROR_UNKNOWN_EXPORT;
    case OpenError::kReadOnly: return proto::ERROR_READ_ONLY;
    case OpenError::kBusy: return proto::ERROR_BUSY;
  }
  return proto::ERROR_INTERNAL;
}

void fill_info(proto::ExportInfo* out, const ExportInfo& in) {
  out->set_name(in.name);
  out->set_size(in.size);
  out->set_block_size(in.block_size);
  out->set_read_only(in.read_only);
  out->set_shared(in.shared);
  out->set_trim(in.trim);
  out->set_readers(in.readers);
  out->set_writers(in.writers);
}

// One queue (connection) of a session, on one worker thread. Owned by the worker; destroyed
// once the connection is closed and its last storage request has completed.
class QueueHandler final : public ServerConnection::Handler {
 public:
  QueueHandler(Shared& shared, Worker& worker, std::shared_ptr<ServerConnection> conn)
      : shared_(shared), worker_(worker), conn_(std::move(conn)) {}

  ~QueueHandler() override {
    if (!session_) return;
    bool last = false;
    {
      std::lock_guard lock(session_->mu);
      session_->transports.erase(session_->transports.find(conn_->transport_name()));
      last = session_->transports.empty();
    }
    if (!last) return;
    if (!lost_to_error_) {
      end_session(shared_, session_->id);
      return;
    }
    // The last queue went down with its network (an RDMA device removed, a reset): the session
    // and its open exports wait a while for the initiator to rejoin over another transport.
    auto timer = std::make_shared<asio::steady_timer>(worker_.io, kRejoinGrace);
    Shared& shared = shared_;
    const std::uint64_t id = session_->id;
    log()->info("session {:016x}: every queue lost ({}); kept {} s for the initiator to rejoin", id, last_reason_,
                kRejoinGrace.count());
    timer->async_wait([timer, &shared, id](const boost::system::error_code& ec) {
      if (!ec) end_session(shared, id);
    });
  }

  static void end_session(Shared& shared, std::uint64_t id) {
    std::lock_guard lock(shared.sessions_mu);
    const auto it = shared.sessions.find(id);
    if (it == shared.sessions.end()) return;
    {
      std::lock_guard slock(it->second->mu);
      if (!it->second->transports.empty()) return;  // rejoined
    }
    log()->info("session {:016x} from {} ended", id, it->second->peer);
    shared.sessions.erase(it);
  }

  void start(bool allowed) {
    conn_->start(this);
    if (!allowed) {
      shared_.rejected++;
      log()->warn("{}: refused: not in the allowed networks ({})", conn_->peer(), shared_.allow.describe());
      fail_with(proto::ERROR_NOT_ALLOWED,
                "this client's address is not in the target's allowed networks (" + shared_.allow.describe() + ")");
    }
  }

  // Finish what is in flight, then close.
  void begin_stop() {
    stopping_ = true;
    if (inflight_ == 0) conn_->close();
  }

  void on_control(const proto::Control& msg) override {
    if (state_ == State::kClosed) return;
    switch (msg.msg_case()) {
      case proto::Control::kHello: return on_hello(msg.hello());
      case proto::Control::kAuth: return on_auth(msg.auth());
      default: break;
    }
    if (state_ != State::kReady) {
      return fail_with(proto::ERROR_PROTOCOL, "send Hello and Auth before other requests");
    }
    proto::Control reply;
    switch (msg.msg_case()) {
      case proto::Control::kListExports:
        for (const auto& e : shared_.registry.list()) fill_info(reply.mutable_export_list()->add_exports(), e);
        break;
      case proto::Control::kOpen: {
        const auto& o = msg.open();
        OpenResult r = shared_.registry.open(o.name(), !o.read_only());
        if (!r.lease) {
          log()->info("{}: open '{}' refused: {}", conn_->peer(), o.name(), r.message);
          reply.mutable_error()->set_code(code_of(r.error));
          reply.mutable_error()->set_message(r.message);
          break;
        }
        ExportInfo info;
        shared_.registry.find(o.name(), &info);
        std::uint32_t handle;
        {
          std::lock_guard lock(session_->mu);
          handle = session_->next_handle++;
          session_->handles.emplace(handle, std::shared_ptr<ExportLease>(std::move(r.lease)));
        }
        auto* opened = reply.mutable_opened();
        opened->set_handle(handle);
        fill_info(opened->mutable_info(), info);
        opened->set_flush(true);
        opened->set_fua(true);
        opened->set_trim(info.trim && !o.read_only());
        opened->set_write_zeroes(!info.read_only && !o.read_only());
        log()->info("{}: opened '{}' {} as handle {}", conn_->peer(), o.name(), o.read_only() ? "read-only" : "read-write",
                    handle);
        break;
      }
      case proto::Control::kClose: {
        std::lock_guard lock(session_->mu);
        if (session_->handles.erase(msg.close().handle()) == 0) {
          reply.mutable_error()->set_code(proto::ERROR_BAD_HANDLE);
          reply.mutable_error()->set_message("no open export has handle " + std::to_string(msg.close().handle()));
        } else {
          reply.mutable_closed()->set_handle(msg.close().handle());
        }
        cache_.clear();
        break;
      }
      case proto::Control::kGetStats:
        fill_stats(reply.mutable_stats());
        break;
      default:
        return fail_with(proto::ERROR_PROTOCOL, "unexpected control message from an initiator");
    }
    conn_->send_control(reply);
  }

  void on_command(const wire::Command& cmd, Slot* slot) override {
    if (state_ != State::kReady || !queue_granted_) {
      return fail_with(proto::ERROR_PROTOCOL, "I/O command before the queue was granted");
    }
    if (free_ops_.empty()) {
      return fail_with(proto::ERROR_PROTOCOL, "more commands in flight than the granted queue depth");
    }
    ExportLease* lease = lookup(cmd.handle);
    int early = 0;
    if (stopping_) {
      early = -ESHUTDOWN;  // the target is stopping: refuse new work, finish what is in flight
    } else if (!lease) {
      early = -EBADF;
    } else if (cmd.opcode != wire::Opcode::kFlush && !wire::in_range(cmd.offset, cmd.length, lease->file().size)) {
      early = -EINVAL;
    } else if (cmd.opcode != wire::Opcode::kRead && cmd.opcode != wire::Opcode::kFlush && !lease->writable()) {
      early = -EROFS;
    }
    if (early != 0) {
      session_->errors++;
      conn_->complete(cmd, early, slot, 0);
      return;
    }
    Op* op = free_ops_.back();
    free_ops_.pop_back();
    op->cmd = cmd;
    op->slot = slot;
    IoRequest& r = op->req;
    r = IoRequest{};
    r.op = static_cast<IoOp>(cmd.opcode);
    r.flags = (cmd.flags & wire::kFlagFua) ? kIoFua : 0;
    r.offset = cmd.offset;
    r.length = cmd.length;
    r.data = slot ? slot->data : nullptr;
    r.fixed_index = slot ? slot->fixed_index : -1;
    r.done = &QueueHandler::io_done;
    r.context = op;
    ++inflight_;
    worker_.engine->submit(lease->file(), &r);
  }

  void on_closed(const std::string& reason) override {
    if (state_ == State::kClosed) return;
    state_ = State::kClosed;
    log()->debug("{}: queue closed: {}", conn_->peer(), reason);
    last_reason_ = reason;
    lost_to_error_ = !stopping_ && reason.rfind("disconnected by", 0) != 0 && reason.rfind("closed by", 0) != 0 &&
                     reason.rfind("protocol error", 0) != 0 && reason != "End of file";
    if (reason.rfind("protocol error", 0) == 0) shared_.protocol_errors++;
    maybe_destroy();
  }

 private:
  enum class State { kHello, kAuth, kReady, kClosed };

  struct Op {
    IoRequest req;
    wire::Command cmd;
    Slot* slot = nullptr;
    QueueHandler* owner = nullptr;
  };

  static void io_done(IoRequest* r, int result) {
    Op* op = static_cast<Op*>(r->context);
    op->owner->finish(op, result);
  }

  void finish(Op* op, int result) {
    const wire::Command& cmd = op->cmd;
    const std::int32_t status = result < 0 ? result : 0;
    if (status < 0) {
      session_->errors++;
      log()->debug("{}: {} at {}+{}: {}", conn_->peer(), static_cast<int>(cmd.opcode), cmd.offset, cmd.length,
                   errno_text(-status));
    } else if (cmd.opcode == wire::Opcode::kRead) {
      session_->reads++;
      session_->bytes_read += cmd.length;
    } else if (cmd.opcode == wire::Opcode::kWrite) {
      session_->writes++;
      session_->bytes_written += cmd.length;
    }
    if (state_ != State::kClosed) {
      conn_->complete(cmd, status, op->slot, status == 0 && cmd.opcode == wire::Opcode::kRead ? cmd.length : 0);
    }
    free_ops_.push_back(op);
    --inflight_;
    if (stopping_ && inflight_ == 0) conn_->close();
    maybe_destroy();
  }

  void on_hello(const proto::Hello& h) {
    if (state_ != State::kHello) return fail_with(proto::ERROR_PROTOCOL, "Hello sent twice");
    if (h.min_version() > wire::kProtocolVersion || h.max_version() < wire::kProtocolVersion) {
      return fail_with(proto::ERROR_VERSION,
                       "the initiator speaks protocol versions " + std::to_string(h.min_version()) + " to " +
                           std::to_string(h.max_version()) + ", this target speaks " +
                           std::to_string(wire::kProtocolVersion) + "; use the same ibdisk release on both sides");
    }
    hello_ = h;
    server_nonce_ = random_bytes(32);
    proto::Control reply;
    auto* c = reply.mutable_challenge();
    c->set_version(wire::kProtocolVersion);
    c->set_auth_required(!shared_.key.empty());
    c->set_server_nonce(server_nonce_);
    c->set_server_name(shared_.opts.server_name);
    state_ = State::kAuth;
    conn_->send_control(reply);
  }

  void on_auth(const proto::Auth& a) {
    if (state_ != State::kAuth) return fail_with(proto::ERROR_PROTOCOL, "Auth without a Challenge");
    if (!shared_.key.empty()) {
      const std::string expect = client_mac(shared_.key, server_nonce_, hello_.client_nonce());
      if (!constant_time_equal(expect, a.mac())) {
        shared_.rejected++;
        log()->warn("{}: refused: wrong key", conn_->peer());
        return fail_with(proto::ERROR_AUTH,
                         a.mac().empty() ? "this target requires a key: give --key-file with the target's key"
                                         : "wrong key: the initiator's --key-file does not match the target's");
      }
    }
    // Join an existing session, or make a new one.
    if (hello_.join_session() != 0) {
      std::lock_guard lock(shared_.sessions_mu);
      const auto it = shared_.sessions.find(hello_.join_session());
      if (it == shared_.sessions.end()) {
        return fail_with(proto::ERROR_UNKNOWN_SESSION, "no session " + std::to_string(hello_.join_session()) +
                                                           " on this target (it ended); reconnect");
      }
      session_ = it->second;
    } else {
      session_ = std::make_shared<Session>();
      session_->peer = conn_->peer();
      session_->client_name = hello_.client_name();
      std::lock_guard lock(shared_.sessions_mu);
      do {
        const std::string r = random_bytes(8);
        std::memcpy(&session_->id, r.data(), 8);
      } while (session_->id == 0 || shared_.sessions.count(session_->id));
      shared_.sessions.emplace(session_->id, session_);
      log()->info("session {:016x} from {} ({})", session_->id, conn_->peer(),
                  hello_.client_name().empty() ? "unnamed" : hello_.client_name());
    }
    {
      std::lock_guard lock(session_->mu);
      session_->transports.insert(conn_->transport_name());
    }
    const unsigned want_depth = std::min<unsigned>(hello_.queue_depth() ? hello_.queue_depth() : kDefaultQueueDepth,
                                                   wire::kMaxQueueDepth);
    const std::uint32_t max_io = std::min<std::uint32_t>(
        hello_.max_io_size() ? hello_.max_io_size() : wire::kMaxIoSize, worker_.pool->slot_size());
    const unsigned depth = conn_->set_queue(want_depth, max_io);
    if (depth == 0) {
      return fail_with(proto::ERROR_INTERNAL,
                       "the target has no free data buffers for another queue; raise its --buffer-mib");
    }
    ops_.resize(depth);
    for (auto& op : ops_) {
      op.owner = this;
      free_ops_.push_back(&op);
    }
    queue_granted_ = true;
    state_ = State::kReady;
    proto::Control reply;
    auto* w = reply.mutable_welcome();
    w->set_session_id(session_->id);
    w->set_queue_depth(depth);
    w->set_max_io_size(max_io);
    w->set_transport(conn_->transport_name());
    if (!shared_.key.empty()) w->set_server_mac(server_mac(shared_.key, server_nonce_, hello_.client_nonce()));
    conn_->send_control(reply);
  }

  ExportLease* lookup(std::uint32_t handle) {
    if (const auto it = cache_.find(handle); it != cache_.end()) return it->second.get();
    std::lock_guard lock(session_->mu);
    const auto it = session_->handles.find(handle);
    if (it == session_->handles.end()) return nullptr;
    cache_.emplace(handle, it->second);
    return it->second.get();
  }

  void fill_stats(proto::Stats* s) {
    s->set_uptime_seconds(static_cast<std::uint64_t>(
        std::chrono::duration_cast<std::chrono::seconds>(std::chrono::steady_clock::now() - shared_.started).count()));
    for (const auto& e : shared_.registry.list()) fill_info(s->add_exports(), e);
    s->set_rejected_connections(shared_.rejected);
    s->set_protocol_errors(shared_.protocol_errors);
    rusage ru{};
    ::getrusage(RUSAGE_SELF, &ru);
    const auto us = [](const timeval& tv) { return static_cast<std::uint64_t>(tv.tv_sec) * 1000000 + static_cast<std::uint64_t>(tv.tv_usec); };
    s->set_cpu_user_us(us(ru.ru_utime));
    s->set_cpu_system_us(us(ru.ru_stime));
    s->set_online_cpus(static_cast<std::uint32_t>(std::max(1L, ::sysconf(_SC_NPROCESSORS_ONLN))));
    std::lock_guard lock(shared_.sessions_mu);
    for (const auto& [id, sess] : shared_.sessions) {
      auto* out = s->add_sessions();
      out->set_session_id(id);
      out->set_client(sess->peer);
      out->set_client_name(sess->client_name);
      std::lock_guard slock(sess->mu);
      for (const auto& t : sess->transports) out->add_transports(t);
      for (const auto& [h, lease] : sess->handles) out->add_exports(lease->name() + (lease->writable() ? "" : " (ro)"));
      out->set_reads(sess->reads);
      out->set_writes(sess->writes);
      out->set_bytes_read(sess->bytes_read);
      out->set_bytes_written(sess->bytes_written);
      out->set_errors(sess->errors);
    }
  }

  void fail_with(proto::ErrorCode code, const std::string& text) {
    if (state_ == State::kClosed) return;
    if (code == proto::ERROR_PROTOCOL) {
      shared_.protocol_errors++;
      log()->warn("{}: protocol error: {}", conn_->peer(), text);
    }
    proto::Control reply;
    reply.mutable_error()->set_code(code);
    reply.mutable_error()->set_message(text);
    conn_->send_control(reply);
    conn_->close();
  }

  void maybe_destroy() {
    if (state_ != State::kClosed || inflight_ != 0 || destroying_) return;
    destroying_ = true;
    Worker& w = worker_;
    QueueHandler* self = this;
    Shared& shared = shared_;
    asio::post(w.io, [&w, self, &shared] {
      w.queues.erase(self);
      if (shared.stopping && w.queues.empty()) w.io.stop();
    });
  }

  Shared& shared_;
  Worker& worker_;
  std::shared_ptr<ServerConnection> conn_;
  State state_ = State::kHello;
  proto::Hello hello_;
  std::string server_nonce_;
  std::shared_ptr<Session> session_;
  std::unordered_map<std::uint32_t, std::shared_ptr<ExportLease>> cache_;
  std::vector<Op> ops_;
  std::vector<Op*> free_ops_;
  unsigned inflight_ = 0;
  bool queue_granted_ = false;
  bool stopping_ = false;
  bool destroying_ = false;
  bool lost_to_error_ = false;
  std::string last_reason_;
};

bool is_loopback(const asio::ip::address& a) { return a.is_loopback(); }

}  // namespace

struct Server::Impl {
  explicit Impl(ServerOptions o) : shared(std::move(o)) {}
  Shared shared;
  std::vector<std::unique_ptr<Worker>> workers;
  std::unique_ptr<tcp::acceptor> acceptor;
  unsigned next_worker = 0;
  std::string listen_text;
  std::unique_ptr<transport::RdmaListener> rdma_listener;  // on worker 0's thread
  unsigned next_rdma_worker = 0;
  std::string rdma_text;

  void add_queue(Worker& w, std::shared_ptr<ServerConnection> conn, bool allowed) {
    auto handler = std::make_unique<QueueHandler>(shared, w, std::move(conn));
    QueueHandler* raw = handler.get();
    w.queues.emplace(raw, std::move(handler));
    raw->start(allowed);
  }

  // Listener thread: hands the request to the next worker, which builds the QP and accepts.
  void on_rdma_request(transport::RdmaListener::Request&& req) {
    Worker& w = *workers[next_rdma_worker++ % workers.size()];
    asio::post(w.io, [this, &w, r = std::move(req)]() mutable {
      if (shared.stopping) return transport::reject_connect(r.id.get(), transport::RdmaRejectReason::kShuttingDown);
      const std::string peer = r.peer;
      const auto colon = peer.rfind(':');
      boost::system::error_code e;
      auto ip = peer.substr(0, colon == std::string::npos ? peer.size() : colon);
      if (!ip.empty() && ip.front() == '[') ip = ip.substr(1, ip.size() - 2);
      const auto addr = asio::ip::make_address(ip, e);
      const bool allowed = !e && shared.allow.allows(addr);
      rdma_cm_id* id = r.id.get();
      std::shared_ptr<ServerConnection> conn;
      try {
        conn = transport::make_rdma_server_connection(w.io, std::move(r), *w.rdma, *w.pool);
      } catch (const std::exception& ex) {
        log()->warn("{}: RDMA queue refused: {}", peer, ex.what());
        if (r.id) transport::reject_connect(id, transport::RdmaRejectReason::kNoResources);
        return;
      }
      add_queue(w, std::move(conn), allowed);
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
    const std::size_t need = static_cast<std::size_t>(o.threads) * workers[0]->pool->region().iov_len;
    if (const std::string m = transport::memlock_problem(need, "the target's RDMA buffer pools (--threads x --buffer-mib)");
        !m.empty()) {
      throw SystemError("listening on RDMA", m, "or lower --buffer-mib");
    }
    const std::uint16_t port = o.rdma_port < 0 ? tcp_port : static_cast<std::uint16_t>(o.rdma_port);
    try {
      rdma_listener = std::make_unique<transport::RdmaListener>(
          workers[0]->io, host, port, [this](transport::RdmaListener::Request&& r) { on_rdma_request(std::move(r)); });
    } catch (const SystemError& e) {
      rdma_text = e.what();
      log()->warn("not listening on RDMA at {}:{}: {}; TCP only", host, port, e.what());
      return;
    }
    rdma_text = "listening on RDMA " + host + ":" + std::to_string(rdma_listener->port());
    log()->info("{}", rdma_text);
  }

  void accept_next() {
    Worker& w = *workers[next_worker++ % workers.size()];
    acceptor->async_accept(w.io, [this, &w](const boost::system::error_code& ec, tcp::socket s) {
      if (ec) {
        if (ec == asio::error::operation_aborted || shared.stopping) return;
        log()->warn("accept: {}", ec.message());
      } else {
        asio::post(w.io, [this, &w, sock = std::move(s)]() mutable {
          boost::system::error_code e;
          const auto peer = sock.remote_endpoint(e);
          const bool allowed = !e && shared.allow.allows(peer.address());
          add_queue(w, transport::make_tcp_server_connection(std::move(sock), *w.pool), allowed);
        });
      }
      if (!shared.stopping) accept_next();
    });
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
  if (shared.key.empty() && !opts.insecure && !is_loopback(addr)) {
    throw SystemError("listening on " + host + " without a key",
                      std::string("anyone who reaches this address could read and write the exports"),
                      "give --key-file FILE (make one with `ibdisk keygen FILE`, copy it to the initiator), or "
                      "--insecure on a network you trust");
  }

  const std::uint32_t slot = wire::kMaxIoSize;
  const unsigned slots = std::max(1u, static_cast<unsigned>((static_cast<std::uint64_t>(opts.buffer_mib) << 20) / slot));
  for (unsigned i = 0; i < opts.threads; ++i) {
    auto w = std::make_unique<Worker>();
    w->pool = std::make_unique<transport::BufferPool>(slot, slots);
    w->engine = std::make_unique<StorageEngine>(w->io, StorageEngine::Options{});
    const iovec region = w->pool->region();
    w->engine->register_buffers({&region, 1});
    w->pool->set_fixed_index(0);
    w->rdma = std::make_unique<transport::RdmaDeviceCache>(*w->pool);
    impl_->workers.push_back(std::move(w));
  }

  const tcp::endpoint ep(addr, opts.port);
  impl_->acceptor = std::make_unique<tcp::acceptor>(impl_->workers[0]->io);
  auto& a = *impl_->acceptor;
  a.open(ep.protocol());
  a.set_option(tcp::acceptor::reuse_address(true));
  a.bind(ep, ec);
  if (ec) {
    throw SystemError("listening on TCP " + host + ":" + std::to_string(opts.port), ec.message(),
                      ec == asio::error::address_in_use ? "another process uses this port; stop it or give another port"
                                                        : "is the address assigned to an interface here?");
  }
  a.listen();
  impl_->listen_text = (addr.is_v6() ? "[" + host + "]" : host) + ":" + std::to_string(a.local_endpoint().port());
  if (shared.key.empty()) {
    log()->warn("no key configured: {} (give --key-file to require authentication)",
                opts.insecure ? "ANYONE who reaches this port can read and write the exports (--insecure)"
                              : "listening on loopback only");
  }
  impl_->accept_next();
  impl_->start_rdma(host, a.local_endpoint().port());
}

Server::~Server() {
  stop();
  for (auto& w : impl_->workers) {
    if (w->thread.joinable()) w->thread.join();
  }
}

void Server::run() {
  for (auto& w : impl_->workers) {
    Worker* wp = w.get();
    w->thread = std::thread([wp] {
      for (;;) {
        try {
          wp->io.run();
          return;
        } catch (const std::exception& e) {
          log()->error("worker: {}", e.what());
        }
      }
    });
  }
  for (auto& w : impl_->workers) w->thread.join();
}

void Server::stop() {
  auto& shared = impl_->shared;
  if (shared.stopping.exchange(true)) return;
  asio::post(impl_->workers[0]->io, [this] {
    boost::system::error_code ec;
    impl_->acceptor->close(ec);
    if (impl_->rdma_listener) impl_->rdma_listener->close();
  });
  for (auto& w : impl_->workers) {
    Worker* wp = w.get();
    asio::post(w->io, [wp] {
      if (wp->queues.empty()) {
        wp->io.stop();
        return;
      }
      for (auto& [raw, q] : wp->queues) raw->begin_stop();
    });
  }
}

std::uint16_t Server::port() const { return impl_->acceptor->local_endpoint().port(); }
std::uint16_t Server::rdma_port() const { return impl_->rdma_listener ? impl_->rdma_listener->port() : 0; }
std::string Server::rdma_status() const { return impl_->rdma_text; }
std::string Server::listen_description() const { return impl_->listen_text; }
ExportRegistry& Server::exports() { return impl_->shared.registry; }
const NetworkAllowList& Server::allow_list() const { return impl_->shared.allow; }
unsigned Server::worker_count() const { return static_cast<unsigned>(impl_->workers.size()); }
asio::io_context& Server::worker_io(unsigned i) { return impl_->workers.at(i)->io; }
StorageEngine& Server::worker_engine(unsigned i) { return *impl_->workers.at(i)->engine; }

}  // namespace ibdisk::target
