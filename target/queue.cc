#include "target/queue.h"

#include <sys/resource.h>

#include <algorithm>
#include <cstring>

#include "common/auth.h"
#include "common/error.h"
#include "common/log.h"

namespace ibdisk::target {
namespace {

namespace asio = boost::asio;
using transport::CloseCode;

auto log() {
  static auto l = ibdisk::logger("target");
  return l;
}

constexpr unsigned kDefaultQueueDepth = 32;
constexpr std::chrono::seconds kCloseGrace{2};  // an Error sent before closing gets this long to go out
// A Stats reply leaves room below the frame limit for everything but the session list.
constexpr std::size_t kStatsBudget = wire::kMaxControlSize - (64u << 10);

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

// At most n bytes of s, not cutting a UTF-8 sequence (proto3 strings must stay valid UTF-8).
std::string utf8_prefix(const std::string& s, std::size_t n) {
  if (s.size() <= n) return s;
  while (n > 0 && (static_cast<unsigned char>(s[n]) & 0xC0) == 0x80) --n;
  return s.substr(0, n);
}

}  // namespace

void Shared::end_session(std::uint64_t id) {
  std::lock_guard lock(sessions_mu);
  const auto it = sessions.find(id);
  if (it == sessions.end() || it->second->has_queues()) return;  // gone, or rejoined
  log()->info("session {:016x} from {} ended", id, it->second->peer());
  sessions.erase(it);
}

QueueHandler::QueueHandler(Shared& shared, Worker& worker, std::shared_ptr<transport::ServerConnection> conn)
    : shared_(shared), worker_(worker), conn_(std::move(conn)), life_(std::make_shared<Life>(Life{this})),
      timer_(worker.io), liveness_(worker.io) {}

QueueHandler::~QueueHandler() {
  life_->alive = false;
  worker_.slots->forget(account_);
  if (!session_ || queue_id_ == 0) return;
  const bool last = session_->remove_queue(queue_id_);
  if (!last) return;
  if (!lost_to_error_) {
    shared_.end_session(session_->id());
    return;
  }
  // The last queue went down with its network (an RDMA device removed, a reset): the session
  // and its open exports wait a while for the initiator to rejoin over another transport.
  auto timer = std::make_shared<asio::steady_timer>(worker_.io, kRejoinGrace);
  Shared& shared = shared_;
  const std::uint64_t id = session_->id();
  log()->info("session {:016x}: every queue lost ({}); kept {} s for the initiator to rejoin", id, last_reason_,
              kRejoinGrace.count());
  timer->async_wait([timer, &shared, id](const boost::system::error_code& ec) {
    if (!ec) shared.end_session(id);
  });
}

bool QueueHandler::admissible(const transport::PeerInfo& p, std::string* why) const {
  if (p.address && !shared_.allow.allows(*p.address)) {
    *why = "this client's address is not in the target's allowed networks (" + shared_.allow.describe() + ")";
    return false;
  }
  // Without a key the target listens on loopback only, and trusts only its own user and root:
  // anyone else on the host could not open the exports themselves.
  if (shared_.key.empty() && !shared_.opts.insecure) {
    if (!p.uid) {
      *why = "this target has no key, and who is behind this connection cannot be told; "
             "give the target --key-file, or --insecure to let anyone on this host in";
      return false;
    }
    if (*p.uid != 0 && *p.uid != shared_.uid) {
      *why = "this target has no key and serves only its own user (uid " + std::to_string(shared_.uid) +
             ") and root, not uid " + std::to_string(*p.uid) +
             "; give the target --key-file (and this user a copy of the key), or run as that user";
      return false;
    }
  }
  return true;
}

void QueueHandler::start() {
  const transport::PeerInfo p = conn_->peer();
  peer_ = p.text;
  conn_->start(this);
  std::string why;
  if (!admissible(p, &why)) {
    shared_.rejected++;
    log()->warn("{}: refused: {}", peer_, why);
    return fail_with(proto::ERROR_NOT_ALLOWED, why);
  }
  if (shared_.stopping) return fail_with(proto::ERROR_INTERNAL, "the target is stopping; connect again later");
  timer_.expires_after(shared_.opts.handshake_timeout);
  timer_.async_wait([life = life_](const boost::system::error_code& ec) {
    if (!ec && life->alive) life->self->handshake_expired();
  });
}

void QueueHandler::handshake_expired() {
  if (state_ == State::kReady || state_ == State::kClosed) return;
  shared_.protocol_errors++;
  log()->warn("{}: the handshake did not finish within {} ms; closing the connection", peer_,
              shared_.opts.handshake_timeout.count());
  fail_with(proto::ERROR_PROTOCOL, "the handshake did not finish within " +
                                       std::to_string(shared_.opts.handshake_timeout.count()) + " ms");
}

void QueueHandler::begin_stop() {
  stopping_ = true;
  if (state_ == State::kClosed) return;
  if (state_ != State::kReady) return fail_with(proto::ERROR_INTERNAL, "the target is stopping");
  if (idle()) conn_->close();
}

void QueueHandler::abort(const std::string& why) {
  if (state_ == State::kClosed) return;
  conn_->abort(why);
}

void QueueHandler::fenced() {
  log()->info("{}: queue {} of session {:016x} replaced by a new one; ending it", peer_, queue_id_,
              session_ ? session_->id() : 0);
  abort("replaced by a new queue of its session");
}

void QueueHandler::on_control(const proto::Control& msg) {
  if (state_ == State::kClosed) return;
  heard_ = true;
  switch (msg.msg_case()) {
    case proto::Control::kHello: return on_hello(msg.hello());
    case proto::Control::kAuth: return on_auth(msg.auth());
    default: break;
  }
  if (state_ != State::kReady) return fail_with(proto::ERROR_PROTOCOL, "send Hello and Auth before other requests");
  proto::Control reply;
  switch (msg.msg_case()) {
    case proto::Control::kListExports:
      for (const auto& e : shared_.registry.list()) fill_info(reply.mutable_export_list()->add_exports(), e);
      break;
    case proto::Control::kOpen: {
      const auto& o = msg.open();
      OpenResult r = shared_.registry.open(o.name(), !o.read_only());
      if (!r.lease) {
        log()->info("{}: open '{}' refused: {}", peer_, utf8_prefix(o.name(), 256), r.message);
        reply.mutable_error()->set_code(code_of(r.error));
        reply.mutable_error()->set_message(r.message);
        break;
      }
      ExportInfo info;
      shared_.registry.find(o.name(), &info);
      const std::uint32_t handle = session_->open(std::shared_ptr<ExportLease>(std::move(r.lease)));
      auto* opened = reply.mutable_opened();
      opened->set_handle(handle);
      fill_info(opened->mutable_info(), info);
      opened->set_flush(true);
      opened->set_fua(true);
      opened->set_trim(info.trim && !o.read_only());
      opened->set_write_zeroes(!info.read_only && !o.read_only());
      opened->set_extents(true);
      opened->set_zeroes_may_trim(opened->write_zeroes());
      log()->info("{}: opened '{}' {} as handle {}", peer_, o.name(), o.read_only() ? "read-only" : "read-write", handle);
      break;
    }
    case proto::Control::kClose:
      // Revokes the handle on every queue of the session: their caches see the new version.
      if (!session_->close(msg.close().handle())) {
        reply.mutable_error()->set_code(proto::ERROR_BAD_HANDLE);
        reply.mutable_error()->set_message("no open export has handle " + std::to_string(msg.close().handle()));
      } else {
        reply.mutable_closed()->set_handle(msg.close().handle());
      }
      break;
    case proto::Control::kGetStats:
      fill_stats(reply.mutable_stats());
      break;
    default:
      return fail_with(proto::ERROR_PROTOCOL, "unexpected control message from an initiator");
  }
  conn_->send_control(reply);
}

void QueueHandler::on_hello(const proto::Hello& h) {
  if (state_ != State::kHello) return fail_with(proto::ERROR_PROTOCOL, "Hello sent twice");
  // The highest version both sides speak.
  const std::uint32_t chosen = std::min(h.max_version(), wire::kProtocolVersion);
  if (chosen < std::max(h.min_version(), wire::kMinProtocolVersion)) {
    return fail_with(proto::ERROR_VERSION,
                     "the initiator speaks protocol versions " + std::to_string(h.min_version()) + " to " +
                         std::to_string(h.max_version()) + ", this target speaks " +
                         std::to_string(wire::kMinProtocolVersion) + " to " + std::to_string(wire::kProtocolVersion) +
                         "; use the same ibdisk release on both sides");
  }
  version_ = chosen;
  hello_ = h;
  hello_.set_client_name(utf8_prefix(h.client_name(), wire::kMaxClientName));
  server_nonce_ = random_bytes(32);
  proto::Control reply;
  auto* c = reply.mutable_challenge();
  c->set_version(version_);
  c->set_auth_required(!shared_.key.empty());
  c->set_server_nonce(server_nonce_);
  c->set_server_name(shared_.opts.server_name);
  state_ = State::kAuth;
  conn_->send_control(reply);
}

void QueueHandler::on_auth(const proto::Auth& a) {
  if (state_ != State::kAuth) return fail_with(proto::ERROR_PROTOCOL, "Auth without a Challenge");
  if (!shared_.key.empty()) {
    const std::string expect = client_mac(shared_.key, server_nonce_, hello_.client_nonce());
    if (!constant_time_equal(expect, a.mac())) {
      shared_.rejected++;
      log()->warn("{}: refused: wrong key", peer_);
      return fail_with(proto::ERROR_AUTH, a.mac().empty()
                                               ? "this target requires a key: give --key-file with the target's key"
                                               : "wrong key: the initiator's --key-file does not match the target's");
    }
  }
  if (hello_.join_session() != 0) {
    std::shared_ptr<Session> s;
    {
      std::lock_guard lock(shared_.sessions_mu);
      const auto it = shared_.sessions.find(hello_.join_session());
      if (it != shared_.sessions.end()) s = it->second;
    }
    if (!s) {
      return fail_with(proto::ERROR_UNKNOWN_SESSION, "no session " + std::to_string(hello_.join_session()) +
                                                         " on this target (it ended); reconnect");
    }
    const std::string proof = join_proof(s->secret(), server_nonce_, hello_.client_nonce());
    if (!constant_time_equal(proof, a.join_proof())) {
      shared_.rejected++;
      log()->warn("{}: refused: a queue without the proof of session {:016x}'s secret tried to join it", peer_, s->id());
      return fail_with(proto::ERROR_AUTH,
                       "this queue cannot prove it belongs to the session it names: a session is joined only with "
                       "the proof of the secret its first Welcome carried");
    }
    session_ = std::move(s);
  } else {
    std::uint64_t id = 0;
    std::lock_guard lock(shared_.sessions_mu);
    do {
      const std::string r = random_bytes(8);
      std::memcpy(&id, r.data(), 8);
    } while (id == 0 || shared_.sessions.count(id));
    session_ = std::make_shared<Session>(id, random_bytes(32), peer_, hello_.client_name());
    shared_.sessions.emplace(id, session_);
    new_session_ = true;
    log()->info("session {:016x} from {} ({})", id, peer_,
                hello_.client_name().empty() ? "unnamed" : hello_.client_name());
  }
  queue_id_ = session_->add_queue({conn_->transport_name(), &worker_.io,
                                   [life = life_] {
                                     if (life->alive) life->self->fenced();
                                   },
                                   last_heard_});
  const unsigned want_depth =
      std::min<unsigned>(hello_.queue_depth() ? hello_.queue_depth() : kDefaultQueueDepth, wire::kMaxQueueDepth);
  max_io_ = std::min<std::uint32_t>(hello_.max_io_size() ? hello_.max_io_size() : wire::kMaxIoSize,
                                    worker_.buffers->slot_size());
  depth_ = conn_->admit(want_depth, max_io_);
  // Every command and its reply can be in flight at once (RDMA: a reply's SEND completes after
  // the initiator has seen it and sent the next command).
  // And the one heartbeat allowed beyond the depth, with its reply.
  capacity_ = 2 * depth_ + 3;
  requests_ = std::make_unique<Request[]>(capacity_);
  for (unsigned i = capacity_; i-- > 0;) free_.push_back(&requests_[i]);
  if (hello_.join_session() != 0 && hello_.replaces_queue() != 0 && hello_.replaces_queue() != queue_id_) {
    // A queue replacing a lost one: end the old one and let its storage I/O finish before this
    // one carries anything, so a resent write never runs beside the old queue's copy of it.
    state_ = State::kFencing;
    boost::asio::io_context* io = &worker_.io;
    session_->fence(hello_.replaces_queue(), [io, life = life_] {
      asio::post(*io, [life] {
        if (life->alive) life->self->welcome();
      });
    });
    return;
  }
  welcome();
}

void QueueHandler::welcome() {
  if (state_ == State::kClosed) return;
  state_ = State::kReady;
  timer_.cancel();
  proto::Control reply;
  auto* w = reply.mutable_welcome();
  w->set_session_id(session_->id());
  w->set_queue_id(queue_id_);
  w->set_queue_depth(depth_);
  w->set_max_io_size(max_io_);
  w->set_transport(conn_->transport_name());
  if (new_session_) w->set_session_secret(session_->secret());
  if (!shared_.key.empty()) w->set_server_mac(server_mac(shared_.key, server_nonce_, hello_.client_nonce()));
  conn_->send_control(reply);
  last_heard_->store(std::chrono::duration_cast<std::chrono::milliseconds>(
                         std::chrono::steady_clock::now().time_since_epoch()).count(),
                     std::memory_order_relaxed);
  // A version-2 initiator sends no heartbeats: an idle one would look silent, so it is only
  // watched for stats.
  enforce_liveness_ = version_ >= wire::kHeartbeatVersion && shared_.opts.session_timeout.count() > 0;
  arm_liveness();
  if (stopping_) begin_stop();
}

void QueueHandler::arm_liveness() {
  const auto period = enforce_liveness_ ? std::clamp<std::chrono::milliseconds>(shared_.opts.session_timeout / 4,
                                                                               std::chrono::milliseconds(100),
                                                                               std::chrono::seconds(5))
                                        : std::chrono::milliseconds(5000);
  liveness_.expires_after(period);
  liveness_.async_wait([life = life_](const boost::system::error_code& ec) {
    if (!ec && life->alive) life->self->check_liveness();
  });
}

bool QueueHandler::waits_on_target() const {
  for (unsigned i = 0; i < capacity_; ++i) {
    const auto st = requests_[i].state();
    if (st == Request::State::kNeedSlot || st == Request::State::kDataIn) return true;
  }
  return false;
}

void QueueHandler::check_liveness() {
  if (state_ != State::kReady || timed_out_) return;
  using namespace std::chrono;
  const std::int64_t now = duration_cast<milliseconds>(steady_clock::now().time_since_epoch()).count();
  // The target's own waits restart the clock: the initiator may be sending behind them.
  if (std::exchange(heard_, false) || waits_on_target()) {
    last_heard_->store(now, std::memory_order_relaxed);
    return arm_liveness();
  }
  const milliseconds silent(now - last_heard_->load(std::memory_order_relaxed));
  if (!enforce_liveness_ || silent < shared_.opts.session_timeout) return arm_liveness();
  const std::string secs = fmt::format("{:.1f}", duration<double>(silent).count());
  const std::string limit = fmt::format("{:g}", duration<double>(shared_.opts.session_timeout).count());
  log()->warn("{}: queue {} of session {:016x}: nothing received for {} s (serve --session-timeout {}); closing it "
              "as lost, the session's exports are released {} s later unless it rejoins",
              peer_, queue_id_, session_->id(), secs, limit, kRejoinGrace.count());
  timed_out_ = true;
  last_reason_ = "nothing received for " + secs + " s";
  proto::Control err;
  err.mutable_error()->set_code(proto::ERROR_TIMEOUT);
  err.mutable_error()->set_message("the target received nothing on this queue for " + secs + " s (its --session-timeout " +
                                   limit + "); the queue is closed");
  conn_->send_control(err);
  conn_->close();
  timer_.expires_after(kCloseGrace);
  timer_.async_wait([life = life_](const boost::system::error_code& ec) {
    if (!ec && life->alive) life->self->abort("did not take its error message");
  });
}

bool QueueHandler::on_command(const wire::Command& cmd) {
  if (state_ == State::kClosed) return true;
  heard_ = true;
  if (state_ != State::kReady) {
    fail_with(proto::ERROR_PROTOCOL, "I/O command before the queue was granted");
    return true;
  }
  const bool heartbeat = cmd.opcode == wire::Opcode::kHeartbeat;
  if (heartbeat && version_ < wire::kHeartbeatVersion) {
    fail_with(proto::ERROR_PROTOCOL, "a heartbeat on a queue of protocol version " + std::to_string(version_));
    return true;
  }
  // A heartbeat may be the one command beyond the depth.
  if (unreplied_ >= depth_ + (heartbeat ? 1 : 0)) {
    fail_with(proto::ERROR_PROTOCOL, "more commands in flight than the granted queue depth (" +
                                         std::to_string(depth_) + ")");
    return true;
  }
  if (free_.empty()) {
    // Every request holds a reply the initiator has not taken yet: stop reading until one is out.
    refused_ = true;
    return false;
  }
  Request* r = free_.back();
  free_.pop_back();
  ++busy_;
  ++unreplied_;
  r->start(*this, cmd);
  return true;
}

RequestPort::Resolved QueueHandler::resolve(Request& req) {
  Resolved out;
  if ((req.cmd.opcode == wire::Opcode::kRead || req.cmd.opcode == wire::Opcode::kWrite) && req.cmd.length > max_io_) {
    fail_with(proto::ERROR_PROTOCOL, "a command of " + std::to_string(req.cmd.length) +
                                         " bytes, above the granted max I/O size of " + std::to_string(max_io_));
    out.verdict = Verdict::kFatal;
    return out;
  }
  if (stopping_) {
    req.status = -ESHUTDOWN;  // the target is stopping: refuse new work, finish what is in flight
    out.verdict = Verdict::kError;
    return out;
  }
  auto lease = lookup(req.cmd.handle);
  if (!lease) {
    req.status = -EBADF;
    out.verdict = Verdict::kError;
    return out;
  }
  out.file = &lease->file();
  out.writable = lease->writable();
  out.hold = std::move(lease);
  return out;
}

std::shared_ptr<ExportLease> QueueHandler::lookup(std::uint32_t handle) {
  const std::uint64_t v = session_->handles_version();
  if (v != cache_version_) {
    cache_.clear();
    last_handle_ = 0;
    cache_version_ = v;
  }
  if (handle == last_handle_ && handle != 0) {  // most commands name the handle the last one did
    if (auto lease = last_lease_.lock()) return lease;
  }
  if (const auto it = cache_.find(handle); it != cache_.end()) {
    if (auto lease = it->second.lock()) {
      last_handle_ = handle;
      last_lease_ = it->second;
      return lease;
    }
  }
  auto lease = session_->find(handle);
  if (lease) {
    cache_[handle] = lease;
    last_handle_ = handle;
    last_lease_ = lease;
  }
  return lease;
}

bool QueueHandler::acquire_slot(Request& req) { return worker_.slots->acquire(account_, req); }
void QueueHandler::release_slot(Request& req) { worker_.slots->release(account_, req); }
void QueueHandler::receive_data(Request& req) { conn_->receive_data(req); }

void QueueHandler::send_reply(Request& req) {
  --unreplied_;
  const wire::Command& cmd = req.cmd;
  if (req.status < 0) {
    session_->errors++;
    log()->debug("{}: {} at {}+{}: {}", peer_, static_cast<int>(cmd.opcode), cmd.offset, cmd.length,
                 errno_text(-req.status));
  } else if (cmd.opcode == wire::Opcode::kHeartbeat) {
    session_->heartbeats++;
  } else if (cmd.opcode == wire::Opcode::kRead) {
    session_->reads++;
    session_->bytes_read += cmd.length;
  } else if (cmd.opcode == wire::Opcode::kWrite) {
    session_->writes++;
    session_->bytes_written += cmd.length;
  }
  conn_->send_reply(req, req.status, req.reply_length);
}

void QueueHandler::request_done(Request& req) {
  free_.push_back(&req);
  --busy_;
  if (state_ == State::kClosed) return maybe_destroy();
  if (refused_) {
    refused_ = false;
    conn_->resume();
  }
  if (stopping_ && idle()) conn_->close();
}

void QueueHandler::on_closed(const transport::CloseReason& reason) {
  if (state_ == State::kClosed) return;
  state_ = State::kClosed;
  timer_.cancel();
  liveness_.cancel();
  if (!timed_out_) last_reason_ = reason.detail;
  lost_to_error_ = !stopping_ && (reason.lost() || timed_out_);
  if (reason.code == CloseCode::kProtocol) shared_.protocol_errors++;
  log()->debug("{}: queue closed: {}", peer_, reason.detail);
  // Requests not yet at the storage engine end here; those at it finish first.
  if (requests_) {
    for (unsigned i = 0; i < capacity_; ++i) {
      if (requests_[i].busy()) requests_[i].cancel();
    }
  }
  maybe_destroy();
}

void QueueHandler::fill_stats(proto::Stats* s) {
  s->set_uptime_seconds(static_cast<std::uint64_t>(
      std::chrono::duration_cast<std::chrono::seconds>(std::chrono::steady_clock::now() - shared_.started).count()));
  for (const auto& e : shared_.registry.list()) fill_info(s->add_exports(), e);
  s->set_rejected_connections(shared_.rejected);
  s->set_protocol_errors(shared_.protocol_errors);
  rusage ru{};
  ::getrusage(RUSAGE_SELF, &ru);
  const auto us = [](const timeval& tv) {
    return static_cast<std::uint64_t>(tv.tv_sec) * 1000000 + static_cast<std::uint64_t>(tv.tv_usec);
  };
  s->set_cpu_user_us(us(ru.ru_utime));
  s->set_cpu_system_us(us(ru.ru_stime));
  s->set_online_cpus(static_cast<std::uint32_t>(std::max(1L, ::sysconf(_SC_NPROCESSORS_ONLN))));
  std::vector<std::shared_ptr<Session>> sessions;
  {
    std::lock_guard lock(shared_.sessions_mu);
    for (const auto& [id, sess] : shared_.sessions) sessions.push_back(sess);
  }
  std::size_t size = s->ByteSizeLong();
  for (const auto& sess : sessions) {
    proto::SessionStats one;
    // Only the asker's own session shows its id: the id is half of what joining needs.
    one.set_session_id(sess == session_ ? sess->id() : 0);
    one.set_client(sess->peer());
    one.set_client_name(sess->client_name());
    for (const auto& t : sess->transports()) one.add_transports(t);
    for (const auto ms : sess->idle_ms()) one.add_idle_ms(ms);
    one.set_heartbeats(sess->heartbeats);
    for (const auto& e : sess->export_names()) one.add_exports(e);
    one.set_reads(sess->reads);
    one.set_writes(sess->writes);
    one.set_bytes_read(sess->bytes_read);
    one.set_bytes_written(sess->bytes_written);
    one.set_errors(sess->errors);
    size += one.ByteSizeLong() + 8;
    if (size > kStatsBudget) {
      s->set_sessions_truncated(true);
      break;
    }
    *s->add_sessions() = std::move(one);
  }
}

void QueueHandler::fail_with(proto::ErrorCode code, const std::string& text) {
  if (state_ == State::kClosed) return;
  if (code == proto::ERROR_PROTOCOL) {
    shared_.protocol_errors++;
    log()->warn("{}: protocol error: {}", peer_, text);
  }
  proto::Control reply;
  reply.mutable_error()->set_code(code);
  reply.mutable_error()->set_message(text);
  conn_->send_control(reply);
  conn_->close();
  // A peer that does not read could hold the close up: it gets a little while, then nothing.
  timer_.expires_after(kCloseGrace);
  timer_.async_wait([life = life_](const boost::system::error_code& ec) {
    if (!ec && life->alive) life->self->abort("did not take its error message");
  });
}

void QueueHandler::maybe_destroy() {
  if (state_ != State::kClosed || busy_ != 0 || destroying_) return;
  destroying_ = true;
  Worker& w = worker_;
  QueueHandler* self = this;
  Shared& shared = shared_;
  asio::post(w.io, [&w, self, &shared] {
    w.queues.erase(self);
    if (shared.stopping && w.queues.empty()) w.io.stop();
  });
}

}  // namespace ibdisk::target
