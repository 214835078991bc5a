// The loopback transport (see loopback.h). A Pipe joins an initiator end, used on the Client's
// thread, and a target end, used on its worker's thread; each end is reached from the other
// only by posting to its io_context, and knows the other only through the Pipe.
#include "transport/loopback/loopback.h"

#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <deque>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <unordered_set>

#include "common/error.h"

namespace ibdisk::transport {

namespace {

namespace asio = boost::asio;

class ClientEnd;
class ServerEnd;

// Shared by the two ends of one connection.
struct Pipe {
  asio::io_context* client_io = nullptr;
  asio::io_context* server_io = nullptr;
  ClientEnd* client = nullptr;  // touched on client_io's thread only
  ServerEnd* server = nullptr;  // touched on server_io's thread only
  unsigned depth_cap = 0;       // 0: no limit
  std::atomic<bool> client_gone{false};
  std::atomic<bool> cut{false};
  LoopbackNetwork::Counters* counters = nullptr;
  // Both ends lose the connection, as with a pulled cable; the target sees `target_sees`. Any thread.
  void cut_now(const std::shared_ptr<Pipe>& self, CloseCode target_sees = CloseCode::kNetwork);
};

// A connector's faults, shared by its connections.
struct Plan {
  std::mutex mu;
  std::vector<Fault> faults;
  std::vector<bool> fired;
  std::vector<unsigned> depths;
  unsigned made = 0;
  std::uint64_t commands = 0;

  std::optional<Fault> next_command() {
    std::lock_guard lock(mu);
    ++commands;
    for (std::size_t i = 0; i < faults.size(); ++i) {
      if (!fired[i] && faults[i].at == commands) {
        fired[i] = true;
        return faults[i];
      }
    }
    return std::nullopt;
  }
  unsigned next_depth_cap() {
    std::lock_guard lock(mu);
    const unsigned n = made++;
    if (depths.empty()) return 0;
    return depths[std::min<std::size_t>(n, depths.size() - 1)];
  }
};

// What the target end knows of one command: where the initiator's buffer is, and for a
// duplicate a copy of a write's data (the initiator may reuse its buffer once the first copy
// is answered).
struct Carried {
  std::byte* buffer = nullptr;
  std::shared_ptr<std::vector<std::byte>> copy;
};

// --- target end ------------------------------------------------------------------------------
class ServerEnd final : public ServerConnection, public std::enable_shared_from_this<ServerEnd> {
 public:
  explicit ServerEnd(std::shared_ptr<Pipe> pipe) : pipe_(std::move(pipe)) {
    pipe_->server = this;
    peer_.text = "loopback";
    peer_.address = asio::ip::make_address("127.0.0.1");
    peer_.uid = ::geteuid();
  }
  ~ServerEnd() override { pipe_->server = nullptr; }

  std::string transport_name() const override { return "loopback"; }
  PeerInfo peer() const override { return peer_; }
  void start(Handler* handler) override {
    handler_ = handler;
    for (auto& m : std::exchange(early_, {})) deliver_control(m);
  }
  void send_control(const proto::Control& msg) override;
  unsigned admit(unsigned depth, std::uint32_t /*max_io*/) override {
    return pipe_->depth_cap ? std::min(depth, pipe_->depth_cap) : depth;
  }
  void receive_data(DataOp& op) override {
    if (dead_) return op.data_received(-ENOTCONN);
    if (op.slot.data == nullptr) return op.data_received(0);
    const auto it = carried_.find(op.cmd.tag);
    if (it == carried_.end() || it->second.empty()) return op.data_received(-ECONNRESET);
    const Carried& c = it->second.front();
    if (c.copy) {
      std::memcpy(op.slot.data, c.copy->data(), op.cmd.length);
    } else if (!answered_.count(op.cmd.tag) && !pipe_->client_gone) {
      std::memcpy(op.slot.data, c.buffer, op.cmd.length);  // as an RDMA READ would
    } else {
      return op.data_received(-ECONNRESET);
    }
    op.data_received(0);
  }
  void send_reply(DataOp& op, std::int32_t status, std::uint32_t length) override;
  void resume() override {
    if (held_.empty() || resume_posted_) return;
    resume_posted_ = true;
    asio::post(*pipe_->server_io, [self = shared_from_this()] {
      self->resume_posted_ = false;
      self->deliver_held();
    });
  }
  void close() override { end({CloseCode::kPeerClosed, "the target closed the queue"}, {CloseCode::kLocal, "closed by the target"}); }
  void abort(const std::string& why) override {
    end({CloseCode::kPeerClosed, "the target ended the queue: " + why}, {CloseCode::kLocal, why});
  }

  // From the initiator's end, on this thread.
  void deliver_control(const proto::Control& msg) {
    if (dead_) return;
    if (!handler_) return early_.push_back(msg);
    handler_->on_control(msg);
  }
  void deliver_command(const wire::Command& cmd, Carried carried) {
    if (dead_ || !handler_) return;
    carried_[cmd.tag].push_back(std::move(carried));
    if (!held_.empty()) return held_.push_back(cmd);
    if (!handler_->on_command(cmd)) held_.push_back(cmd);
  }
  void fail(const CloseReason& reason) {
    if (dead_) return;
    dead_ = true;
    held_.clear();
    if (handler_) handler_->on_closed(reason);
  }

 private:
  void end(const CloseReason& for_peer, const CloseReason& here);
  void deliver_held() {
    while (!dead_ && !held_.empty()) {
      if (!handler_->on_command(held_.front())) return;
      held_.pop_front();
    }
  }

  std::shared_ptr<Pipe> pipe_;
  PeerInfo peer_;
  Handler* handler_ = nullptr;
  std::vector<proto::Control> early_;  // before start()
  std::deque<wire::Command> held_;
  std::unordered_map<std::uint64_t, std::deque<Carried>> carried_;
  std::unordered_set<std::uint64_t> answered_;  // tags whose first reply went to the initiator
  bool resume_posted_ = false;
  bool dead_ = false;
};

// --- initiator end ---------------------------------------------------------------------------
class ClientEnd final : public ClientConnection {
 public:
  ClientEnd(asio::io_context& io, std::shared_ptr<Pipe> pipe, std::shared_ptr<Plan> plan,
            std::chrono::milliseconds timeout)
      : io_(io), pipe_(std::move(pipe)), plan_(std::move(plan)), timeout_(timeout), flush_(io) {
    pipe_->client = this;
  }
  ~ClientEnd() override {
    pipe_->client = nullptr;
    pipe_->client_gone = true;
    if (!dead_) to_server([](ServerEnd& s) { s.fail({CloseCode::kPeerClosed, "the initiator went away"}); });
  }

  std::string transport_name() const override { return "loopback"; }
  std::string peer() const override { return "loopback"; }

  proto::Control call(const proto::Control& request) override {
    if (started_) throw SystemError("control call to loopback", std::string("the queue is in its data phase"));
    if (dead_) throw SystemError("talking to loopback", reason_.detail, "");
    reply_.reset();
    to_server([request](ServerEnd& s) { s.deliver_control(request); });
    if (!run_until(io_, [&] { return reply_.has_value() || dead_; }, timeout_)) {
      throw SystemError("waiting for loopback", "no answer within " + std::to_string(timeout_.count()) + " ms", "",
                        ETIMEDOUT);
    }
    if (!reply_) throw SystemError("talking to loopback", reason_.detail, "");
    return *std::exchange(reply_, std::nullopt);
  }

  void start(CompletionHandler on_complete, ClosedHandler on_closed) override {
    started_ = true;
    on_complete_ = std::move(on_complete);
    on_closed_ = std::move(on_closed);
    if (dead_) on_closed_(reason_);
  }

  int submit(const wire::Command& cmd, std::byte* buffer) override {
    if (dead_) return -ENOTCONN;
    if (!inflight_.insert(cmd.tag).second) return -EEXIST;
    if (cmd.opcode == wire::Opcode::kHeartbeat) {  // not a data command: no fault counts it
      send(cmd, buffer);
      return 0;
    }
    pipe_->counters->commands++;
    const std::optional<Fault> fault = plan_->next_command();
    if (fault) pipe_->counters->faults++;
    if (fault && fault->kind == Fault::Kind::kDisconnect) {
      pipe_->cut_now(pipe_);
      return 0;  // it is in flight as far as the caller knows: the loss resends it
    }
    if (fault && fault->kind == Fault::Kind::kError) errors_[cmd.tag] = fault->error;
    if (fault && fault->kind == Fault::Kind::kDrop) return 0;
    if (fault && fault->kind == Fault::Kind::kReorder) {
      reordered_.push_back({cmd, buffer});
      // Overtaken by the next command, or by nothing within a while.
      flush_.expires_after(fault->delay);
      flush_.async_wait([this](const boost::system::error_code& ec) {
        if (!ec) send_reordered();
      });
      return 0;
    }
    if (fault && fault->kind == Fault::Kind::kDelay) {
      auto timer = std::make_shared<asio::steady_timer>(*pipe_->server_io, fault->delay);
      timer->async_wait([timer, p = pipe_, cmd, buffer](const boost::system::error_code&) {
        if (p->server) p->server->deliver_command(cmd, {buffer, nullptr});
      });
      return 0;
    }
    send(cmd, buffer);
    if (fault && fault->kind == Fault::Kind::kDuplicate) {
      Carried again{buffer, nullptr};
      if (cmd.opcode == wire::Opcode::kWrite) {
        again.copy = std::make_shared<std::vector<std::byte>>(buffer, buffer + cmd.length);
      }
      to_server([cmd, again](ServerEnd& s) { s.deliver_command(cmd, again); });
    }
    send_reordered();
    return 0;
  }

  void close() override {
    if (dead_) return;
    dead_ = true;
    reason_ = {CloseCode::kLocal, "closed by the initiator"};
    to_server([](ServerEnd& s) { s.fail({CloseCode::kPeerClosed, "closed by the initiator"}); });
  }

  // From the target's end, on this thread.
  void deliver_control(const proto::Control& msg) {
    if (dead_) return;
    if (!started_ && !reply_) {
      reply_ = msg;
      return;
    }
    lost(msg.has_error() ? CloseReason{CloseCode::kPeerClosed, "the target closed the queue: " + msg.error().message()}
                         : CloseReason{CloseCode::kProtocol, "unexpected control message during the data phase"});
  }
  void deliver_completion(wire::Completion c) {
    if (dead_) return;
    if (!inflight_.erase(c.tag)) return lost({CloseCode::kProtocol, "completion for an unknown tag " + std::to_string(c.tag)});
    if (const auto it = errors_.find(c.tag); it != errors_.end()) {
      c.status = it->second;
      c.length = 0;
      errors_.erase(it);
    }
    if (on_complete_) on_complete_(c);
  }
  void lost(const CloseReason& reason) {
    if (dead_) return;
    dead_ = true;
    reason_ = reason;
    if (started_ && on_closed_) on_closed_(reason);
  }

 private:
  template <class F>
  void to_server(F f) {
    asio::post(*pipe_->server_io, [p = pipe_, f = std::move(f)] {
      if (p->server) f(*p->server);
    });
  }
  void send(const wire::Command& cmd, std::byte* buffer) {
    to_server([cmd, buffer](ServerEnd& s) { s.deliver_command(cmd, {buffer, nullptr}); });
  }
  void send_reordered() {
    for (auto& [cmd, buffer] : std::exchange(reordered_, {})) {
      if (!dead_) send(cmd, buffer);
    }
  }

  asio::io_context& io_;
  std::shared_ptr<Pipe> pipe_;
  std::shared_ptr<Plan> plan_;
  std::chrono::milliseconds timeout_;
  asio::steady_timer flush_;
  bool started_ = false;
  bool dead_ = false;
  CloseReason reason_{CloseCode::kLocal, "the connection is closed"};
  std::optional<proto::Control> reply_;
  CompletionHandler on_complete_;
  ClosedHandler on_closed_;
  std::unordered_set<std::uint64_t> inflight_;
  std::unordered_map<std::uint64_t, int> errors_;  // kError faults, by tag
  std::vector<std::pair<wire::Command, std::byte*>> reordered_;
};

void ServerEnd::send_control(const proto::Control& msg) {
  if (dead_) return;
  asio::post(*pipe_->client_io, [p = pipe_, msg] {
    if (p->client) p->client->deliver_control(msg);
  });
}

void ServerEnd::send_reply(DataOp& op, std::int32_t status, std::uint32_t length) {
  if (dead_) return op.reply_sent(-ENOTCONN);
  const bool with_data = status == 0 && wire::reply_has_payload(op.cmd.opcode) && op.slot.data != nullptr;
  const auto it = carried_.find(op.cmd.tag);
  if (it != carried_.end() && !it->second.empty()) {
    const Carried c = it->second.front();
    it->second.pop_front();
    if (it->second.empty()) carried_.erase(it);
    // Only the first answer for a tag may write into the initiator's buffer (as an RDMA WRITE).
    if (with_data && !c.copy && !answered_.count(op.cmd.tag) && !pipe_->client_gone) {
      std::memcpy(c.buffer, op.slot.data, length);
    }
  }
  answered_.insert(op.cmd.tag);
  const wire::Completion done{op.cmd.tag, status, with_data ? length : 0};
  asio::post(*pipe_->client_io, [p = pipe_, done] {
    if (p->client) p->client->deliver_completion(done);
  });
  op.reply_sent(0);
}

void ServerEnd::end(const CloseReason& for_peer, const CloseReason& here) {
  if (dead_) return;
  asio::post(*pipe_->client_io, [p = pipe_, for_peer] {
    if (p->client) p->client->lost(for_peer);
  });
  fail(here);
}

void Pipe::cut_now(const std::shared_ptr<Pipe>& self, CloseCode target_sees) {
  if (cut.exchange(true)) return;
  counters->cuts++;
  const CloseReason r{CloseCode::kNetwork, "the loopback connection was cut"};
  asio::post(*server_io, [self, seen = CloseReason{target_sees, r.detail}] {
    if (self->server) self->server->fail(seen);
  });
  asio::post(*client_io, [self, r] {
    if (self->client) self->client->lost(r);
  });
}

}  // namespace

struct LoopbackNetwork::State {
  std::mutex mu;
  bool listening = false;
  Listener::NextWorker next;
  Listener::OnAccept on_accept;
  std::vector<std::weak_ptr<Pipe>> pipes;
  Counters counters;
};

namespace {

class LoopbackListener final : public Listener {
 public:
  explicit LoopbackListener(std::shared_ptr<LoopbackNetwork::State> s) : state_(std::move(s)) {}
  ~LoopbackListener() override { close(); }
  std::string transport_name() const override { return "loopback"; }
  std::uint16_t port() const override { return 0; }
  std::string description() const override { return "loopback"; }
  void close() override {
    std::lock_guard lock(state_->mu);
    state_->listening = false;
  }

 private:
  std::shared_ptr<LoopbackNetwork::State> state_;
};

class LoopbackConnector final : public Connector {
 public:
  LoopbackConnector(std::shared_ptr<LoopbackNetwork::State> s, std::shared_ptr<Plan> plan)
      : state_(std::move(s)), plan_(std::move(plan)) {}
  std::string transport_name() const override { return "loopback"; }
  std::unique_ptr<ClientConnection> connect(asio::io_context& io, const std::string& /*host*/, std::uint16_t /*port*/,
                                            const ConnectOptions& opts, std::string* why_not) override {
    Listener::NextWorker next;
    Listener::OnAccept on_accept;
    {
      std::lock_guard lock(state_->mu);
      if (!state_->listening) {
        *why_not = "nothing listens on the loopback network";
        return nullptr;
      }
      next = state_->next;
      on_accept = state_->on_accept;
    }
    AcceptContext& where = next();
    auto pipe = std::make_shared<Pipe>();
    pipe->client_io = &io;
    pipe->server_io = where.io;
    pipe->depth_cap = plan_->next_depth_cap();
    pipe->counters = &state_->counters;
    {
      std::lock_guard lock(state_->mu);
      state_->pipes.push_back(pipe);
    }
    state_->counters.connections++;
    auto end = std::make_unique<ClientEnd>(io, pipe, plan_, opts.call_timeout);
    asio::post(*where.io, [pipe, &where, on_accept] { on_accept(where, std::make_shared<ServerEnd>(pipe)); });
    return end;
  }

 private:
  std::shared_ptr<LoopbackNetwork::State> state_;
  std::shared_ptr<Plan> plan_;
};

}  // namespace

LoopbackNetwork::LoopbackNetwork() : state_(std::make_shared<State>()) {}
LoopbackNetwork::~LoopbackNetwork() = default;

std::unique_ptr<Listener> LoopbackNetwork::listen(Listener::NextWorker next, Listener::OnAccept on_accept) {
  std::lock_guard lock(state_->mu);
  state_->listening = true;
  state_->next = std::move(next);
  state_->on_accept = std::move(on_accept);
  return std::make_unique<LoopbackListener>(state_);
}

std::shared_ptr<Connector> LoopbackNetwork::connector(std::vector<Fault> faults, std::vector<unsigned> depths) {
  auto plan = std::make_shared<Plan>();
  plan->fired.assign(faults.size(), false);
  plan->faults = std::move(faults);
  plan->depths = std::move(depths);
  return std::make_shared<LoopbackConnector>(state_, std::move(plan));
}

const LoopbackNetwork::Counters& LoopbackNetwork::counters() const { return state_->counters; }

void LoopbackNetwork::cut_all(CloseCode target_sees) {
  std::vector<std::shared_ptr<Pipe>> live;
  {
    std::lock_guard lock(state_->mu);
    for (auto& w : state_->pipes) {
      if (auto p = w.lock()) live.push_back(std::move(p));
    }
  }
  for (auto& p : live) p->cut_now(p, target_sees);
}

}  // namespace ibdisk::transport
