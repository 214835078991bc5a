#include "initiator/client.h"

#include <algorithm>
#include <stdexcept>
#include <unordered_map>

#include "common/auth.h"
#include "common/error.h"
#include "common/log.h"

namespace ibdisk::initiator {
namespace {
auto log() {
  static auto l = ibdisk::logger("initiator");
  return l;
}
constexpr std::chrono::seconds kProbeInterval{5};
constexpr std::chrono::milliseconds kProbeTimeout{1000};
constexpr std::chrono::milliseconds kLivenessTick{100};  // how often run_until looks at the clocks
double seconds(std::chrono::steady_clock::duration d) { return std::chrono::duration<double>(d).count(); }
}  // namespace

void parse_host_port(const std::string& text, std::string* host, std::uint16_t* port) {
  std::string h = text, p;
  if (!text.empty() && text.front() == '[') {
    const auto close = text.find(']');
    if (close == std::string::npos) throw std::invalid_argument("'" + text + "': missing ']' after the IPv6 address");
    h = text.substr(1, close - 1);
    if (close + 1 < text.size()) {
      if (text[close + 1] != ':') throw std::invalid_argument("'" + text + "': expected ':PORT' after ']'");
      p = text.substr(close + 2);
    }
  } else if (std::count(text.begin(), text.end(), ':') == 1) {
    const auto colon = text.find(':');
    h = text.substr(0, colon);
    p = text.substr(colon + 1);
  }
  if (h.empty()) throw std::invalid_argument("'" + text + "': the host is empty");
  if (!p.empty()) {
    if (p.size() > 5 || p.find_first_not_of("0123456789") != std::string::npos || std::stoul(p) == 0 ||
        std::stoul(p) > 65535) {
      throw std::invalid_argument("'" + text + "': port must be 1 to 65535");
    }
    *port = static_cast<std::uint16_t>(std::stoul(p));
  }
  *host = h;
}

bool parse_remote(const std::string& text, RemoteName* out) {
  std::string t = text;
  const std::string scheme = "ibdisk://";
  const bool explicit_scheme = t.rfind(scheme, 0) == 0;
  if (explicit_scheme) t = t.substr(scheme.size());
  else if (t.empty() || t.front() == '/' || t.front() == '.') return false;
  const auto slash = t.find('/');
  if (slash == std::string::npos || slash == 0 || slash + 1 == t.size() || t.find('/', slash + 1) != std::string::npos) {
    return false;
  }
  RemoteName r;
  try {
    parse_host_port(t.substr(0, slash), &r.host, &r.port);
  } catch (const std::invalid_argument&) {
    if (explicit_scheme) throw;
    return false;
  }
  r.export_name = t.substr(slash + 1);
  *out = r;
  return true;
}

namespace {
std::string where_of(const ClientOptions& o) { return o.host + ":" + std::to_string(o.port); }

// A name from the network, safe to print on a terminal: at most 64 bytes (not cutting a UTF-8
// sequence), control characters as '?'.
std::string printable_name(const std::string& s) {
  std::size_t n = std::min<std::size_t>(s.size(), 64);
  while (n < s.size() && n > 0 && (static_cast<unsigned char>(s[n]) & 0xC0) == 0x80) --n;
  std::string out = s.substr(0, n);
  for (char& ch : out) {
    if (static_cast<unsigned char>(ch) < 0x20 || ch == 0x7f) ch = '?';
  }
  return out;
}
}  // namespace

void throw_if_error(const proto::Control& reply, const std::string& what) {
  if (reply.has_error()) {
    throw SystemError(what, reply.error().message(), "", 0);
  }
}

struct Client::Queue {
  unsigned index = 0;
  std::unique_ptr<transport::ClientConnection> conn;
  bool primary = false;       // conn is on the primary transport (RDMA)
  std::uint32_t queue_id = 0;  // the target's number for conn, in session queue_session
  std::uint64_t queue_session = 0;
  // The previous connection, finishing the commands it carries after a move back to RDMA.
  std::unique_ptr<transport::ClientConnection> draining;
  bool draining_primary = false;
  unsigned depth = 0;
  unsigned inflight = 0;
  // Liveness of conn: when it last received anything, its heartbeat in flight (0: none),
  // whether its target takes heartbeats (version 3), and whether it was declared lost.
  std::chrono::steady_clock::time_point heard{};
  std::uint64_t heartbeat_tag = 0;
  bool heartbeats = false;
  const transport::ClientConnection* silent = nullptr;
  std::uint64_t next_tag = 1;
  struct Pending {
    wire::Command cmd;
    std::byte* buf;
    Callback cb;
    transport::ClientConnection* via = nullptr;
  };
  std::unordered_map<std::uint64_t, Pending> pending;  // in flight, by tag
  std::deque<Pending> backlog;
  unsigned carried_by(const transport::ClientConnection* c) const {
    unsigned n = 0;
    for (const auto& [tag, p] : pending) n += p.via == c;
    return n;
  }
};

Client::Admitted Client::open_queue(bool primary, bool fallback, std::chrono::milliseconds primary_timeout,
                                    std::uint32_t replaces, std::string* why_not) {
  const auto& opts = opts_;
  transport::ConnectOptions co;
  co.queue_depth = std::clamp(opts.queue_depth, 1u, wire::kMaxQueueDepth);
  co.max_io = std::clamp<std::uint32_t>(opts.max_io, 4096, wire::kMaxIoSize);
  co.call_timeout = opts.timeout;
  co.peer_timeout = opts.io_timeout;
  Admitted a;
  if (primary) {
    co.connect_timeout = std::min(primary_timeout, opts.timeout);
    a.conn = primary_->connect(io_, opts.host, opts.rdma_port ? opts.rdma_port : opts.port, co, why_not);
    a.primary = a.conn != nullptr;
    if (a.conn && fallback) {
      // Connected, but the queue may still fail on RDMA (the device going away under it): the
      // fallback is allowed, so a failure here is a reason to use it, not an error.
      try {
        admit(*a.conn, replaces, &a);
        for (const auto& m : memory_) add_memory(*a.conn, m);
        return a;
      } catch (const std::exception& e) {
        *why_not = std::string("RDMA connected but the queue failed: ") + e.what();
        log()->debug("{}", *why_not);
        a = Admitted{};
      }
    }
  }
  if (!a.conn && !fallback) return a;
  if (!a.conn) {
    co.connect_timeout = opts.timeout;
    std::string why;
    a.conn = fallback_->connect(io_, opts.host, opts.port, co, &why);
    if (!a.conn) throw SystemError("connecting to " + opts.host, why, "check the target and the network");
  }
  admit(*a.conn, replaces, &a);
  for (const auto& m : memory_) add_memory(*a.conn, m);
  return a;
}

void Client::add_memory(transport::ClientConnection& conn, const Memory& m) {
  auto* reg = dynamic_cast<transport::RegisteredMemory*>(&conn);
  if (!reg) return;  // moves data by copy anyway (TCP)
  std::string why;
  if (reg->add_memory(m.base, m.length, &why) || memory_warned_) return;
  memory_warned_ = true;
  log()->warn("RDMA: cannot register {} bytes of I/O buffers ({}); data goes through bounce buffers", m.length, why);
}

void Client::register_memory(std::byte* base, std::size_t length) {
  memory_.push_back({base, length});
  for (auto& q : queues_) {
    for (auto* c : {q->conn.get(), q->draining.get()}) {
      if (c) add_memory(*c, memory_.back());
    }
  }
}

void Client::admit(transport::ClientConnection& c, std::uint32_t replaces, Admitted* out) {
  const auto& opts = opts_;
  const std::string where = opts.host + ":" + std::to_string(opts.port);
  transport::ClientConnection* conn = &c;
  const std::string client_nonce = random_bytes(32);
  proto::Control hello;
  auto* h = hello.mutable_hello();
  h->set_min_version(wire::kMinProtocolVersion);
  h->set_max_version(wire::kProtocolVersion);
  h->add_transports(conn->transport_name());
  h->set_queue_depth(opts.queue_depth);
  h->set_max_io_size(opts.max_io);
  h->set_client_name(opts.client_name);
  h->set_join_session(session_id_);
  h->set_client_nonce(client_nonce);
  if (session_id_ != 0) h->set_replaces_queue(replaces);
  const proto::Control challenge = conn->call(hello);
  throw_if_error(challenge, "connecting to " + where);
  if (!challenge.has_challenge()) throw SystemError("connecting to " + where, std::string("no Challenge from the target"));
  if (challenge.challenge().auth_required() && key_.empty()) {
    throw SystemError("connecting to " + where, std::string("the target requires a key"),
                      "give --key-file with a copy of the target's key file");
  }
  const std::uint32_t version = challenge.challenge().version();
  if (version < wire::kMinProtocolVersion || version > wire::kProtocolVersion) {
    throw SystemError("connecting to " + where, "the target chose protocol version " + std::to_string(version) +
                                                    ", outside the " + std::to_string(wire::kMinProtocolVersion) + " to " +
                                                    std::to_string(wire::kProtocolVersion) + " this initiator speaks",
                      "use the same ibdisk release on both sides");
  }
  out->version = version;
  const std::string& server_nonce = challenge.challenge().server_nonce();
  server_name_ = printable_name(challenge.challenge().server_name());
  proto::Control auth;
  auth.mutable_auth();
  if (!key_.empty()) auth.mutable_auth()->set_mac(client_mac(key_, server_nonce, client_nonce));
  if (session_id_ != 0) auth.mutable_auth()->set_join_proof(join_proof(session_secret_, server_nonce, client_nonce));
  const proto::Control welcome = conn->call(auth);
  session_unknown_ = welcome.has_error() && welcome.error().code() == proto::ERROR_UNKNOWN_SESSION;
  throw_if_error(welcome, "connecting to " + where);
  if (!welcome.has_welcome()) throw SystemError("connecting to " + where, std::string("no Welcome from the target"));
  const auto& w = welcome.welcome();
  if (!key_.empty() && !constant_time_equal(w.server_mac(), server_mac(key_, server_nonce, client_nonce))) {
    throw SystemError("connecting to " + where, std::string("the target could not prove it holds the key"),
                      "is this the right host? check the key files on both sides");
  }
  out->depth = w.queue_depth();
  out->queue_id = w.queue_id();
  if (out->depth == 0 || w.max_io_size() == 0) {
    throw SystemError("connecting to " + where, std::string("the target granted no queue"));
  }
  if (session_id_ == 0) session_secret_ = w.session_secret();
  session_id_ = w.session_id();
  max_io_ = max_io_ == 0 ? w.max_io_size() : std::min(max_io_, w.max_io_size());
}

std::unique_ptr<Client> Client::connect(const ClientOptions& opts) {
  if (opts.queues == 0 || opts.queues > 64) throw std::invalid_argument("--queues must be 1 to 64");
  if (opts.transport != "auto" && opts.transport != "rdma" && opts.transport != "tcp") {
    throw std::invalid_argument("--transport must be auto, rdma or tcp (got '" + opts.transport + "')");
  }
  std::unique_ptr<Client> c(new Client());
  c->opts_ = opts;
  c->primary_ = opts.primary ? opts.primary : transport::rdma_connector();
  c->fallback_ = opts.fallback ? opts.fallback : transport::tcp_connector();
  c->key_ = opts.key_file.empty() ? std::string() : load_key_file(opts.key_file);
  c->session_id_ = opts.join_session;
  c->session_secret_ = opts.join_secret;
  bool try_primary = opts.transport != "tcp";
  for (unsigned i = 0; i < opts.queues; ++i) {
    auto q = std::make_unique<Queue>();
    q->index = i;
    std::string why;
    Admitted a = c->open_queue(try_primary, opts.transport != "rdma", opts.rdma_timeout, 0, &why);
    if (!a.conn) {
      throw SystemError("connecting to " + opts.host + " over RDMA (port " +
                            std::to_string(opts.rdma_port ? opts.rdma_port : opts.port) + ")",
                        why, "check `ibdisk setup doctor` on both sides, or use --transport auto to allow TCP");
    }
    if (try_primary && !a.primary) {
      log()->warn("RDMA not used: {}; using TCP", why);
      c->rdma_not_used_ = why;
      try_primary = false;
    }
    q->conn = std::move(a.conn);
    q->primary = a.primary;
    q->depth = a.depth;
    q->queue_id = a.queue_id;
    q->queue_session = c->session_id_;
    q->heartbeats = a.version >= wire::kHeartbeatVersion;
    if (!q->heartbeats) log()->info("queue {}: the target speaks protocol version {}: no heartbeats", i, a.version);
    c->queues_.push_back(std::move(q));
  }
  c->next_probe_ = std::chrono::steady_clock::now() + kProbeInterval;
  log()->debug("session {:016x} with {}: {} queue(s) of depth {}", c->session_id_, where_of(opts), opts.queues,
               c->queues_[0]->depth);
  return c;
}

Client::~Client() {
  if (heartbeats_ || silent_losses_) {
    log()->debug("session {:016x}: {} heartbeat(s) sent, {} connection(s) lost for silence", session_id_, heartbeats_,
                 silent_losses_);
  }
  for (auto& q : queues_) {
    if (q->conn) q->conn->close();
    if (q->draining) q->draining->close();
  }
}

std::vector<proto::ExportInfo> Client::list_exports() {
  proto::Control req;
  req.mutable_list_exports();
  const auto reply = queues_.at(0)->conn->call(req);
  throw_if_error(reply, "listing exports");
  return {reply.export_list().exports().begin(), reply.export_list().exports().end()};
}

proto::Stats Client::stats() {
  proto::Control req;
  req.mutable_get_stats();
  const auto reply = queues_.at(0)->conn->call(req);
  throw_if_error(reply, "reading stats");
  return reply.stats();
}

proto::Opened Client::open(const std::string& name, bool read_only) {
  proto::Control req;
  req.mutable_open()->set_name(name);
  req.mutable_open()->set_read_only(read_only);
  const auto reply = queues_.at(0)->conn->call(req);
  throw_if_error(reply, "opening export '" + name + "'");
  if (!reply.has_opened()) throw SystemError("opening export '" + name + "'", std::string("no Opened reply"));
  opened_.push_back({name, read_only, reply.opened().handle(), reply.opened().handle()});
  return reply.opened();
}

void Client::close(std::uint32_t handle) {
  std::uint32_t current = handle;
  for (const auto& e : opened_) {
    if (e.handle == handle) current = e.current;
  }
  proto::Control req;
  req.mutable_close()->set_handle(current);
  const auto reply = queues_.at(0)->conn->call(req);
  throw_if_error(reply, "closing handle " + std::to_string(handle));
  if (!reply.has_closed()) throw SystemError("closing handle " + std::to_string(handle), std::string("no Closed reply"));
  std::erase_if(opened_, [handle](const OpenedExport& e) { return e.handle == handle; });
}

unsigned Client::queue_count() const { return static_cast<unsigned>(queues_.size()); }
unsigned Client::queue_depth(unsigned q) const { return queues_.at(q)->depth; }
std::uint32_t Client::max_io() const { return max_io_; }
std::string Client::transport(unsigned q) const {
  const auto& conn = queues_.at(q)->conn;
  return conn ? conn->transport_name() : "none";  // none: the queue was lost
}
std::uint64_t Client::session_id() const { return session_id_; }

std::uint64_t Client::bounced() const {
  std::uint64_t n = 0;
  for (const auto& q : queues_) {
    if (const auto* reg = dynamic_cast<const transport::RegisteredMemory*>(q->conn.get())) n += reg->bounced();
  }
  return n;
}

unsigned Client::in_flight() const {
  unsigned n = 0;
  for (const auto& q : queues_) n += q->inflight + static_cast<unsigned>(q->backlog.size());
  return n;
}

void Client::ensure_started() {
  if (started_) return;
  started_ = true;
  for (auto& q : queues_) start_conn(*q, q->conn.get());
}

void Client::start_conn(Queue& queue, transport::ClientConnection* conn) {
  Queue* q = &queue;
  if (conn == q->conn.get()) {
    q->heard = std::chrono::steady_clock::now();
    q->heartbeat_tag = 0;
    q->silent = nullptr;
  }
  conn->start(
      [this, q, conn](const wire::Completion& c) {
        if (conn == q->conn.get()) {
          q->heard = std::chrono::steady_clock::now();
          if (c.tag == q->heartbeat_tag && q->heartbeat_tag != 0) {
            q->heartbeat_tag = 0;
            return;
          }
        }
        const auto it = q->pending.find(c.tag);
        if (it == q->pending.end() || it->second.via != conn) return;
        Callback cb = std::move(it->second.cb);
        q->pending.erase(it);
        --q->inflight;
        if (q->draining.get() == conn && q->carried_by(conn) == 0) {
          boost::asio::post(io_, [this, q, conn] {
            if (q->draining.get() == conn && q->carried_by(conn) == 0) retire(std::move(q->draining));
          });
        }
        dispatch(*q);
        cb(c.status);
      },
      [this, q, conn](const transport::CloseReason& reason) {
        // Not from inside the connection's own handler: the connection may be replaced.
        boost::asio::post(io_, [this, q, conn, reason] { on_conn_lost(*q, conn, reason); });
      });
}

Client::Admitted Client::open_allowed(std::uint32_t replaces) {
  std::string why;
  Admitted a = open_queue(opts_.transport != "tcp", opts_.transport != "rdma", kProbeTimeout, replaces, &why);
  if (!a.conn) throw SystemError("connecting to " + opts_.host + " over RDMA", why, "check `ibdisk setup doctor`");
  return a;
}

Client::Admitted Client::reconnect_queue(std::uint32_t replaces) {
  const std::uint64_t tried = session_id_;
  try {
    return open_allowed(replaces);
  } catch (const SystemError&) {
    // A Client that opened nothing shares another's exports: a new session could not have them.
    if (!session_unknown_ || opened_.empty()) throw;
  }
  // Another queue's reconnection ran while this one waited for the target (a TCP call runs
  // io_) and has started the new session already: join that one.
  if (session_id_ != tried) return open_allowed(0);
  // The target ended the session: with a removed device it may see its queues closed as if by
  // the initiator. Start a new session; its handles replace the caller's, in the same order.
  log()->warn("session {:016x} ended on the target; starting a new one and opening its {} export(s) again", tried,
              opened_.size());
  session_id_ = 0;
  session_secret_.clear();
  Admitted a = open_allowed(0);
  for (auto& e : opened_) {
    proto::Control req;
    req.mutable_open()->set_name(e.name);
    req.mutable_open()->set_read_only(e.read_only);
    const auto reply = a.conn->call(req);
    throw_if_error(reply, "opening export '" + e.name + "' again");
    if (!reply.has_opened()) throw SystemError("opening export '" + e.name + "' again", std::string("no Opened reply"));
    e.current = reply.opened().handle();
    handles_moved_ = handles_moved_ || e.current != e.handle;
  }
  return a;
}

int Client::send(transport::ClientConnection& conn, const wire::Command& cmd, std::byte* buf) {
  if (!handles_moved_) return conn.submit(cmd, buf);
  wire::Command c = cmd;
  for (const auto& e : opened_) {
    if (e.handle == cmd.handle) c.handle = e.current;
  }
  return conn.submit(c, buf);
}

void Client::retire(std::unique_ptr<transport::ClientConnection> conn) {
  if (!conn) return;
  conn->close();
  // An RDMA connection must go now (a removed device waits for it); another may still have
  // handlers queued on io_, so it stays until the client goes.
  if (conn->transport_name() != "rdma") retired_.push_back(std::move(conn));
}

class Client::Reconnecting {
 public:
  explicit Reconnecting(Client& c) : c_(c) { c_.reconnecting_ = true; }
  ~Reconnecting() {
    c_.reconnecting_ = false;
    for (auto& f : c_.after_reconnect_) boost::asio::post(c_.io_, std::move(f));
    c_.after_reconnect_.clear();
  }
  Reconnecting(const Reconnecting&) = delete;
  Reconnecting& operator=(const Reconnecting&) = delete;

 private:
  Client& c_;
};

void Client::on_conn_lost(Queue& q, transport::ClientConnection* conn, const transport::CloseReason& reason) {
  if (reconnecting_) {
    after_reconnect_.push_back([this, &q, conn, reason] { on_conn_lost(q, conn, reason); });
    return;
  }
  if (conn != q.conn.get() && conn != q.draining.get()) return;  // already replaced
  Reconnecting one_at_a_time(*this);
  const std::string what = "queue " + std::to_string(q.index) + " to " + opts_.host + ": " + reason.detail;
  const bool was_primary = conn == q.conn.get() ? q.primary : q.draining_primary;
  // A silent connection (io_timeout, or TCP's user timeout) is replaced on any transport: the
  // target may well be back by the time a new connection's handshake gets through.
  const bool replace = (opts_.transport == "auto" && was_primary) || reason.code == transport::CloseCode::kTimeout;
  if (!replace) {
    if (lost_.empty()) lost_ = what;
    return;
  }
  log()->info("queue {}: {} connection lost ({}); reconnecting", q.index, conn->transport_name(), reason.detail);
  // What the lost connection carried goes first in the backlog, in order, so the new
  // connection sends it again within its own granted depth. Moved now: a silent connection
  // may still answer while the new one is made, and that late answer is then ignored.
  std::vector<std::uint64_t> tags;
  for (const auto& [tag, p] : q.pending) {
    if (p.via == conn) tags.push_back(tag);
  }
  std::sort(tags.begin(), tags.end());
  for (auto it = tags.rbegin(); it != tags.rend(); ++it) {
    auto node = q.pending.extract(*it);
    node.mapped().via = nullptr;
    q.backlog.push_front(std::move(node.mapped()));
    --q.inflight;
  }
  resent_ += tags.size();
  std::unique_ptr<transport::ClientConnection> old;
  if (conn == q.draining.get()) {
    old = std::move(q.draining);
  } else {
    old = std::move(q.conn);
    if (q.draining) {  // the one it was replacing still works: use it again
      q.conn = std::move(q.draining);
      q.primary = q.draining_primary;
    } else {
      try {
        // A queue id means something only in the session it was given in: after the target
        // ended that session, naming it would end an unrelated queue of the new one.
        Admitted a = reconnect_queue(q.queue_session == session_id_ ? q.queue_id : 0);
        q.conn = std::move(a.conn);
        q.primary = a.primary;
        q.queue_id = a.queue_id;
        q.queue_session = session_id_;
        q.depth = a.depth;  // what this connection was granted: it may be less, or more again
        q.heartbeats = a.version >= wire::kHeartbeatVersion;
        start_conn(q, q.conn.get());
      } catch (const std::exception& e) {
        log()->error("queue {}: reconnecting failed: {}", q.index, e.what());
        if (lost_.empty()) lost_ = what + "; reconnecting failed: " + e.what();
        retire(std::move(old));
        return;
      }
    }
    log()->warn("queue {}: {} connection lost ({}); continuing over {} without failing I/O", q.index,
                old->transport_name(), reason.detail, q.conn->transport_name());
  }
  retire(std::move(old));
  dispatch(q);
}

void Client::check_liveness() {
  const auto now = std::chrono::steady_clock::now();
  if (now < next_liveness_) return;
  next_liveness_ = now + kLivenessTick;
  for (auto& qp : queues_) {
    Queue& q = *qp;
    if (!q.conn || !q.heartbeats || q.silent == q.conn.get()) continue;
    const auto quiet = now - q.heard;
    const unsigned outstanding = q.carried_by(q.conn.get());
    if (opts_.io_timeout.count() > 0 && (outstanding > 0 || q.heartbeat_tag != 0) && quiet >= opts_.io_timeout) {
      ++silent_losses_;
      q.silent = q.conn.get();
      const std::string detail = fmt::format(
          "nothing from the target {} for {:.1f} s with {} command(s){} outstanding (--io-timeout {:g})", where_of(opts_),
          seconds(quiet), outstanding, q.heartbeat_tag ? " and a heartbeat" : "", seconds(opts_.io_timeout));
      log()->warn("queue {}: {}; replacing the connection", q.index, detail);
      transport::ClientConnection* conn = q.conn.get();
      boost::asio::post(io_, [this, &q, conn, detail] {
        on_conn_lost(q, conn, transport::CloseReason{transport::CloseCode::kTimeout, detail});
      });
      continue;
    }
    if (opts_.heartbeat.count() > 0 && q.heartbeat_tag == 0 && quiet >= opts_.heartbeat) {
      wire::Command hb;
      hb.opcode = wire::Opcode::kHeartbeat;
      hb.tag = q.next_tag++;
      if (q.conn->submit(hb, nullptr) == 0) {
        q.heartbeat_tag = hb.tag;
        ++heartbeats_;
        log()->debug("queue {}: heartbeat after {:.1f} s without a word from the target", q.index, seconds(quiet));
      }
    }
  }
}

void Client::probe_rdma() {
  if (opts_.transport != "auto" || !started_ || std::chrono::steady_clock::now() < next_probe_) return;
  next_probe_ = std::chrono::steady_clock::now() + kProbeInterval;
  if (reconnecting_) return;
  Reconnecting one_at_a_time(*this);
  for (auto& q : queues_) {
    if (!q->conn || q->primary || q->draining) continue;
    std::string why;
    Admitted a;
    try {
      a = open_queue(true, false, kProbeTimeout, 0, &why);
    } catch (const std::exception& e) {
      why = e.what();
    }
    if (!a.conn) {
      log()->debug("queue {}: RDMA still not usable: {}", q->index, why);
      return;  // try again later; one attempt per interval
    }
    log()->info("queue {}: back on RDMA", q->index);
    q->draining = std::move(q->conn);
    q->draining_primary = q->primary;
    q->conn = std::move(a.conn);
    q->primary = true;
    q->queue_id = a.queue_id;
    q->queue_session = session_id_;
    q->depth = a.depth;
    start_conn(*q, q->conn.get());
    if (q->carried_by(q->draining.get()) == 0) retire(std::move(q->draining));
    rdma_not_used_.clear();
  }
}

void Client::submit(unsigned q, const wire::Command& cmd, std::byte* buf, Callback cb) {
  ensure_started();
  Queue& queue = *queues_.at(q % queues_.size());
  wire::Command c = cmd;
  c.tag = queue.next_tag++;
  queue.backlog.push_back({c, buf, std::move(cb), nullptr});
  dispatch(queue);
}

void Client::dispatch(Queue& queue) {
  while (queue.conn && queue.inflight < queue.depth && !queue.backlog.empty()) {
    const int rc = send(*queue.conn, queue.backlog.front().cmd, queue.backlog.front().buf);
    if (rc == -ENOTCONN && opts_.transport == "auto" && queue.primary) {
      return;  // the connection just died: its loss (queued) moves the backlog to a new one
    }
    Queue::Pending p = std::move(queue.backlog.front());
    queue.backlog.pop_front();
    if (rc != 0) {
      p.cb(rc);
      continue;
    }
    ++queue.inflight;
    p.via = queue.conn.get();
    queue.pending.emplace(p.cmd.tag, std::move(p));
  }
}

namespace {
wire::Command make(wire::Opcode op, std::uint32_t handle, std::uint64_t offset, std::uint32_t length, std::uint32_t flags) {
  wire::Command c;
  c.opcode = op;
  c.handle = handle;
  c.offset = offset;
  c.length = length;
  c.flags = static_cast<std::uint8_t>(flags);
  return c;
}
}  // namespace

void Client::read(unsigned q, std::uint32_t handle, std::uint64_t offset, std::uint32_t length, std::byte* buf,
                  Callback cb) {
  if (length == 0 || length > max_io_) return cb(-EINVAL);
  submit(q, make(wire::Opcode::kRead, handle, offset, length, 0), buf, std::move(cb));
}

void Client::write(unsigned q, std::uint32_t handle, std::uint64_t offset, std::uint32_t length, const std::byte* buf,
                   std::uint32_t flags, Callback cb) {
  if (length == 0 || length > max_io_) return cb(-EINVAL);
  submit(q, make(wire::Opcode::kWrite, handle, offset, length, flags), const_cast<std::byte*>(buf), std::move(cb));
}

void Client::flush(unsigned q, std::uint32_t handle, Callback cb) {
  submit(q, make(wire::Opcode::kFlush, handle, 0, 0, 0), nullptr, std::move(cb));
}

void Client::trim(unsigned q, std::uint32_t handle, std::uint64_t offset, std::uint32_t length, Callback cb) {
  if (length == 0) return cb(-EINVAL);
  submit(q, make(wire::Opcode::kTrim, handle, offset, length, 0), nullptr, std::move(cb));
}

void Client::write_zeroes(unsigned q, std::uint32_t handle, std::uint64_t offset, std::uint32_t length,
                          std::uint32_t flags, Callback cb) {
  if (length == 0) return cb(-EINVAL);
  submit(q, make(wire::Opcode::kWriteZeroes, handle, offset, length, flags), nullptr, std::move(cb));
}

void Client::extents(unsigned q, std::uint32_t handle, std::uint64_t offset, std::uint32_t length,
                     ExtentsCallback cb) {
  struct Reply {
    alignas(8) std::byte buf[wire::kExtentsReplySize];
    wire::ExtentList list;
  };
  if (length == 0 || max_io_ < wire::kExtentsReplySize) return cb(-EINVAL, wire::ExtentList{});
  auto reply = std::make_shared<Reply>();
  std::byte* buf = reply->buf;
  submit(q, make(wire::Opcode::kExtents, handle, offset, length, 0), buf,
         [reply, length, cb = std::move(cb)](int status) {
           if (status == 0 && wire::decode(reply->buf, length, &reply->list) != wire::DecodeError::kNone) status = -EPROTO;
           if (status != 0) reply->list = wire::ExtentList{};
           cb(status, reply->list);
         });
}

void Client::run_until(const std::function<bool()>& done) {
  ensure_started();
  while (!done()) {
    if (!lost_.empty()) throw SystemError("I/O", lost_, "check the target's log; the session was lost");
    io_.restart();
    io_.run_one_for(kLivenessTick);
    check_liveness();
    probe_rdma();
  }
  if (!lost_.empty() && in_flight() > 0) throw SystemError("I/O", lost_, "check the target's log; the session was lost");
}

}  // namespace ibdisk::initiator
