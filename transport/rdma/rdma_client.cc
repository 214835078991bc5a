// RDMA transport, initiator side: address and route resolution, connect with the versioned
// private data, blocking control calls for the setup phase, then commands by SEND whose data
// the target moves by RDMA READ and WRITE, from registered caller memory or bounce buffers.
#include <arpa/inet.h>
#include <netdb.h>

#include <cstring>
#include <unordered_map>

#include "common/error.h"
#include "common/log.h"
#include "transport/rdma/rdma_endpoint.h"

namespace ibdisk::transport {
namespace {

using namespace std::chrono_literals;
namespace asio = boost::asio;

using rdma_detail::Endpoint;
using rdma_detail::WrKind;

class RdmaClientConnection final : public ClientConnection, public RegisteredMemory, public Endpoint {
 public:
  RdmaClientConnection(asio::io_context& io, rdma::EventChannel ch, rdma::CmId id,
                       std::shared_ptr<RdmaDeviceCache::Device> dev, const ConnectOptions& opts, std::string where)
      : Endpoint(io, std::move(ch), std::move(id), std::move(dev), opts.queue_depth),
        max_io_(opts.max_io),
        call_timeout_(opts.call_timeout),
        bounce_(device_->pd, static_cast<std::size_t>(opts.queue_depth) * opts.max_io,
                IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_READ | IBV_ACCESS_REMOTE_WRITE),
        where_(std::move(where)) {
    for (std::uint32_t i = opts.queue_depth; i-- > 0;) free_slots_.push_back(i);
    post_all_recvs();
  }

  std::string transport_name() const override { return "rdma"; }
  std::string peer() const override { return where_; }

  // Connects; throws SystemError with a short reason (the caller makes it one line).
  void connect(std::chrono::milliseconds timeout) {
    RdmaConnectData d;
    d.queue_depth = depth_;
    d.max_io = max_io_;
    d.msg_size = kRdmaMsgSize;
    const auto pd = encode(d);
    ibv_device_attr attr{};
    ibv_query_device(id_.verbs(), &attr);
    rdma_conn_param param{};
    param.private_data = pd.data();
    param.private_data_len = static_cast<std::uint8_t>(pd.size());
    param.responder_resources = static_cast<std::uint8_t>(std::clamp(attr.max_qp_rd_atom, 1, 16));
    param.initiator_depth = 0;  // the initiator never reads from the target
    param.retry_count = 7;
    param.rnr_retry_count = 7;  // the peer may be reposting receives: retry forever
    if (rdma_connect(id_.get(), &param) != 0) throw SystemError("rdma_connect", errno);
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      auto ev = left.count() > 0 ? channel_.next(left) : std::nullopt;
      if (!ev) throw SystemError("connecting", "no answer within " + std::to_string(timeout.count()) + " ms", "", ETIMEDOUT);
      switch (ev->type()) {
        case RDMA_CM_EVENT_ESTABLISHED:
          established_ = true;
          return;
        case RDMA_CM_EVENT_REJECTED: {
          if (RdmaRejectReason reason; decode_reject_data(ev->private_data(), &reason)) {
            throw SystemError("connecting", std::string("rejected: ") + describe(reason));
          }
          throw SystemError("connecting", ev->status() == 8 ? std::string("nothing listens for RDMA on that port")
                                                            : "rejected (" + rdma_detail::cm_event_text(*ev) + ")");
        }
        case RDMA_CM_EVENT_UNREACHABLE:
          throw SystemError("connecting", "the target is unreachable over RDMA (" + rdma_detail::cm_event_text(*ev) + ")");
        default:
          throw SystemError("connecting", "got " + rdma_detail::cm_event_text(*ev) + " instead of ESTABLISHED");
      }
    }
  }

  proto::Control call(const proto::Control& request) override {
    if (started_) throw SystemError("control call to " + where_, std::string("the queue is in its data phase"));
    if (dead_) throw SystemError("talking to " + where_, dead_reason_.detail, "see the target's log for why");
    reply_.reset();
    if (const int rc = send_control(request); rc != 0) throw SystemError("sending to " + where_, -rc);
    if (!wait_blocking([&] { return reply_.has_value(); }, call_timeout_)) {
      if (dead_) throw SystemError("talking to " + where_, dead_reason_.detail, "see the target's log for why");
      throw SystemError("waiting for " + where_, "no answer within " + std::to_string(call_timeout_.count()) + " ms",
                        "is the target overloaded or the network down?", ETIMEDOUT);
    }
    return *std::exchange(reply_, std::nullopt);
  }

  void start(CompletionHandler on_complete, ClosedHandler on_closed) override {
    started_ = true;
    on_complete_ = std::move(on_complete);
    on_closed_ = std::move(on_closed);
    if (dead_) return on_closed_(dead_reason_);
    watch();
  }

  int submit(const wire::Command& cmd, std::byte* buffer) override {
    if (dead_) return -ENOTCONN;
    const bool data = cmd.opcode == wire::Opcode::kRead || cmd.opcode == wire::Opcode::kWrite ||
                      cmd.opcode == wire::Opcode::kExtents;
    const std::uint32_t bytes = wire::buffer_size(cmd);  // an extent list's room, or the data
    if (data && (cmd.length == 0 || bytes > max_io_)) return -EINVAL;
    if (inflight_.count(cmd.tag)) return -EEXIST;
    wire::Command c = cmd;
    std::uint32_t slot = kNoSlot;
    if (data) {
      if (const rdma::MemoryRegion* mr = user_region(buffer, bytes)) {
        c.addr = reinterpret_cast<std::uintptr_t>(buffer);  // the target moves the data straight to or from it
        c.rkey = mr->rkey();
      } else {
        if (free_slots_.empty()) return -EBUSY;
        ++bounced_;
        slot = free_slots_.back();
        std::byte* p = bounce_.data() + static_cast<std::size_t>(slot) * max_io_;
        if (cmd.opcode == wire::Opcode::kWrite) std::memcpy(p, buffer, cmd.length);
        c.addr = reinterpret_cast<std::uintptr_t>(p);
        c.rkey = bounce_.mr().rkey();
      }
    }
    if (!backlog_.empty() || !sq_room(1)) {
      backlog_.push_back(c);
    } else if (const int rc = post_command(c); rc != 0) {
      return rc;
    }
    if (slot != kNoSlot) free_slots_.pop_back();
    inflight_.emplace(c.tag, Pending{c, buffer, slot});
    return 0;
  }

  std::uint64_t bounced() const override { return bounced_; }

  bool add_memory(std::byte* base, std::size_t length, std::string* why) override {
    try {
      user_mrs_.emplace_back(device_->pd, base, length,
                             IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_READ | IBV_ACCESS_REMOTE_WRITE);
      return true;
    } catch (const std::exception& e) {
      *why = e.what();
      return false;
    }
  }

  void close() override {
    if (!dead_) {
      dead_ = true;
      dead_reason_ = {CloseCode::kLocal, "closed by the initiator"};
      disconnect();
    }
  }

 private:
  static constexpr std::uint32_t kNoSlot = ~0u;
  struct Pending {
    wire::Command cmd;
    std::byte* buffer;
    std::uint32_t slot;
  };

  int post_command(const wire::Command& c) {
    ibv_sge sge{};
    std::byte* p = small_buffer(&sge);
    rdma_detail::encode(rdma_detail::MsgHeader{wire::FrameType::kCommand, 0, wire::kCommandSize}, p);
    wire::encode(c, p + rdma_detail::kMsgHeaderSize);
    sge.length = rdma_detail::kMsgHeaderSize + wire::kCommandSize;
    ibv_send_wr wr{};
    wr.sg_list = &sge;
    wr.num_sge = 1;
    wr.opcode = IBV_WR_SEND;
    return queue_chain(&wr, &wr, 1, WrKind::kSend, 0, false);
  }

  void on_control_message(const proto::Control& msg) override {
    if (!started_ && !reply_) {
      reply_ = msg;
      return;
    }
    if (msg.has_error()) return fail(CloseCode::kPeerClosed, "the target closed the queue: " + msg.error().message());
    fail(CloseCode::kProtocol, "unexpected control message during the data phase");
  }

  void on_capsule(wire::FrameType type, std::span<const std::byte> payload) override {
    wire::Completion c;
    if (type != wire::FrameType::kCompletion) return fail(CloseCode::kProtocol, "unexpected message type from the target");
    if (payload.size() != wire::kCompletionSize || wire::decode(payload, &c) != wire::DecodeError::kNone) {
      return fail(CloseCode::kProtocol, "bad completion from the target");
    }
    const auto it = inflight_.find(c.tag);
    if (it == inflight_.end()) return fail(CloseCode::kProtocol, "completion for an unknown tag " + std::to_string(c.tag));
    const Pending p = it->second;
    const bool read_data = wire::reply_has_payload(p.cmd.opcode) && c.status == 0;
    const bool length_ok = !read_data                                 ? c.length == 0
                           : p.cmd.opcode == wire::Opcode::kExtents ? c.length <= wire::kExtentsReplySize
                                                                     : c.length == p.cmd.length;
    if (!length_ok) return fail(CloseCode::kProtocol, "completion length does not match the command");
    if (p.slot != kNoSlot) {
      if (read_data) std::memcpy(p.buffer, bounce_.data() + static_cast<std::size_t>(p.slot) * max_io_, c.length);
      free_slots_.push_back(p.slot);
    }
    inflight_.erase(it);
    if (on_complete_) on_complete_(c);
  }

  void on_send_done(WrKind, std::uint32_t) override {
    while (!dead_ && !backlog_.empty() && sq_room(1)) {
      if (const int rc = post_command(backlog_.front()); rc != 0) return fail(CloseCode::kNetwork, "posting a command: " + errno_text(-rc));
      backlog_.pop_front();
    }
  }

  void on_dead(const CloseReason& reason) override {
    dead_reason_ = reason;
    if (started_ && on_closed_) on_closed_(reason);
  }

  // The caller's registered memory that holds [p, p + n), or null.
  const rdma::MemoryRegion* user_region(const std::byte* p, std::size_t n) const {
    for (const auto& mr : user_mrs_) {
      const auto* base = static_cast<const std::byte*>(mr.addr());
      if (p >= base && n <= mr.length() && static_cast<std::size_t>(p - base) <= mr.length() - n) return &mr;
    }
    return nullptr;
  }

  const std::uint32_t max_io_;
  const std::chrono::milliseconds call_timeout_;
  rdma::RegisteredBuffer bounce_;
  std::vector<rdma::MemoryRegion> user_mrs_;  // add_memory(), on the PD the Endpoint base keeps
  std::uint64_t bounced_ = 0;
  std::string where_;
  bool started_ = false;
  CloseReason dead_reason_{CloseCode::kLocal, "the connection is closed"};
  std::optional<proto::Control> reply_;
  CompletionHandler on_complete_;
  ClosedHandler on_closed_;
  std::vector<std::uint32_t> free_slots_;
  std::unordered_map<std::uint64_t, Pending> inflight_;
  std::deque<wire::Command> backlog_;
};

std::string short_reason(const std::exception& e) {
  if (const auto* se = dynamic_cast<const SystemError*>(&e)) {
    std::string s = se->what();
    // "call failed: reason (hint)" -> keep call and reason; the one line stays short.
    if (!se->hint().empty()) {
      const auto cut = s.rfind(" (" + se->hint() + ")");
      if (cut != std::string::npos) s.resize(cut);
    }
    return s;
  }
  return e.what();
}

std::unique_ptr<ClientConnection> rdma_connect(asio::io_context& io, const std::string& host, std::uint16_t port,
                                               const ConnectOptions& opts, std::string* why_not) {
  const std::string where = host + ":" + std::to_string(port);
  const auto probe = rdma::probe_devices();
  if (probe.devices.empty()) {
    *why_not = "no RDMA device (" + probe.unavailable_reason + ")";
    return nullptr;
  }
  const std::size_t need = static_cast<std::size_t>(opts.queue_depth) * opts.max_io +
                           static_cast<std::size_t>(opts.queue_depth + rdma_detail::kExtraRecvs + 8) * kRdmaMsgSize;
  if (std::string m = memlock_problem(need, "the initiator's RDMA buffers"); !m.empty()) {
    *why_not = m;
    return nullptr;
  }
  const auto start = std::chrono::steady_clock::now();
  const auto left = [&] {
    return std::max(1ms, std::chrono::duration_cast<std::chrono::milliseconds>(opts.connect_timeout -
                                                                               (std::chrono::steady_clock::now() - start)));
  };
  try {
    addrinfo hints{};
    hints.ai_flags = AI_NUMERICSERV;
    hints.ai_family = AF_UNSPEC;
    addrinfo* res = nullptr;
    const std::string service = std::to_string(port);
    if (const int rc = ::getaddrinfo(host.c_str(), service.c_str(), &hints, &res); rc != 0) {
      *why_not = "cannot resolve '" + host + "': " + gai_strerror(rc);
      return nullptr;
    }
    sockaddr_storage dst{};
    std::memcpy(&dst, res->ai_addr, res->ai_addrlen);
    ::freeaddrinfo(res);

    rdma::EventChannel ch;
    rdma::CmId id(ch);
    id.resolve_addr(nullptr, reinterpret_cast<const sockaddr*>(&dst), where, left());
    auto ev = ch.next(left());
    if (!ev) {
      *why_not = "no RDMA address resolution for " + host + " within " + std::to_string(opts.connect_timeout.count()) + " ms";
      return nullptr;
    }
    if (ev->type() != RDMA_CM_EVENT_ADDR_RESOLVED) {
      *why_not = "no RDMA path to " + host + " (" + rdma_detail::cm_event_text(*ev) +
                 ": the route to it does not go through an RDMA device)";
      return nullptr;
    }
    ev.reset();
    id.resolve_route(left());
    ev = ch.next(left());
    if (!ev || ev->type() != RDMA_CM_EVENT_ROUTE_RESOLVED) {
      *why_not = "no RDMA route to " + host + (ev ? " (" + rdma_detail::cm_event_text(*ev) + ")" : " (timeout)") +
                 "; on InfiniBand a subnet manager must run";
      return nullptr;
    }
    ev.reset();
    // A connect request sent through a port that is not active (its netdev down, or a device
    // added moments ago) times out, and on Soft-RoCE it leaves the device's connection manager
    // answering no connect request at all, ours or anyone's, until the device is re-created:
    // never send one there.
    if (ibv_port_attr pa{}; ibv_query_port(id.verbs(), id.get()->port_num, &pa) == 0 && pa.state != IBV_PORT_ACTIVE) {
      *why_not = std::string("RDMA port ") + ibv_get_device_name(id.verbs()->device) + "/" +
                 std::to_string(id.get()->port_num) + " is " + ibv_port_state_str(pa.state) +
                 " (its link is down: check the cable and `ip link show`)";
      return nullptr;
    }
    auto dev = std::make_shared<RdmaDeviceCache::Device>(id.verbs(), nullptr);
    auto conn = std::make_unique<RdmaClientConnection>(io, std::move(ch), std::move(id), std::move(dev), opts, where);
    conn->connect(left());
    return conn;
  } catch (const std::exception& e) {
    *why_not = "RDMA connect to " + where + ": " + short_reason(e);
    return nullptr;
  }
}

class RdmaConnector final : public Connector {
 public:
  std::string transport_name() const override { return "rdma"; }
  std::unique_ptr<ClientConnection> connect(asio::io_context& io, const std::string& host, std::uint16_t port,
                                            const ConnectOptions& opts, std::string* why_not) override {
    return rdma_connect(io, host, port, opts, why_not);
  }
};

}  // namespace

std::shared_ptr<Connector> rdma_connector() {
  rdma_detail::watch_device_removals();
  return std::make_shared<RdmaConnector>();
}

}  // namespace ibdisk::transport
