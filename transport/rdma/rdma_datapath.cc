// RDMA transport, the target's command path: a write's data is pulled by RDMA READ into the
// slot the target chose (receive_data), at most as many READs in flight as the initiator
// allowed at connect; a read's data is pushed by RDMA WRITE chained with the completion's SEND
// (only the SEND signalled), and the reply counts as sent when that SEND completes. When the
// queue ends, its QP is destroyed before any operation is reported, so no slot is touched by
// the device once the target has it back. Nothing here throws after start().
#include <algorithm>
#include <cstring>
#include <deque>

#include "common/error.h"
#include "common/log.h"
#include "transport/rdma/rdma_endpoint.h"

namespace ibdisk::transport {
namespace {

using rdma_detail::Endpoint;
using rdma_detail::WrKind;
namespace asio = boost::asio;

auto log() {
  static auto l = ibdisk::logger("rdma");
  return l;
}

constexpr std::uint32_t kNoOp = 0;  // wr index 0: the SEND carries no DataOp; otherwise op index + 1

class RdmaServerConnection final : public ServerConnection,
                                   public Endpoint,
                                   public std::enable_shared_from_this<RdmaServerConnection> {
 public:
  RdmaServerConnection(asio::io_context& io, rdma_detail::ConnectRequest&& req,
                       std::shared_ptr<RdmaDeviceCache::Device> dev)
      : Endpoint(io, std::move(req.channel), std::move(req.id), std::move(dev), req.data.queue_depth),
        requested_(req.data),
        responder_resources_(req.responder_resources) {
    peer_ = req.peer;
    peer_info_.text = req.peer;
    peer_info_.address = req.address;
    // Operations in flight at once: every command of the queue, and its reply.
    ops_.resize(2 * static_cast<std::size_t>(depth_) + 1);
    for (std::uint32_t i = static_cast<std::uint32_t>(ops_.size()); i-- > 1;) free_ops_.push_back(i);
  }

  ~RdmaServerConnection() override { qp_.reset(); }

  std::string transport_name() const override { return "rdma"; }
  PeerInfo peer() const override { return peer_info_; }

  void start(Handler* handler) override {
    handler_ = handler;
    post_all_recvs();
    ibv_device_attr attr{};
    ibv_query_device(id_.verbs(), &attr);
    rdma_conn_param param{};
    param.responder_resources = 0;  // the initiator never reads from the target
    // RDMA READs this side may have in flight: what the device and the initiator both allow.
    const unsigned peer_allows = responder_resources_ ? responder_resources_ : 1;
    max_reads_ = std::clamp<unsigned>(std::min<unsigned>(static_cast<unsigned>(attr.max_qp_init_rd_atom), peer_allows), 1, 16);
    param.initiator_depth = static_cast<std::uint8_t>(max_reads_);
    param.retry_count = 7;
    param.rnr_retry_count = 7;
    if (rdma_accept(id_.get(), &param) != 0) return fail(CloseCode::kNetwork, "rdma_accept: " + errno_text(errno));
    watch();
  }

  void send_control(const proto::Control& msg) override {
    if (const int rc = Endpoint::send_control(msg); rc != 0 && rc != -ENOTCONN) {
      fail(CloseCode::kNetwork, "sending a control message: " + errno_text(-rc));
    }
  }

  unsigned admit(unsigned depth, std::uint32_t max_io) override {
    max_io_ = std::min<std::uint32_t>(max_io, requested_.max_io);
    return std::min(depth, depth_);
  }

  void receive_data(DataOp& op) override {
    if (dead_) return op.data_received(-ENOTCONN);
    if (op.slot.data == nullptr) return op.data_received(0);  // nothing to skip over RDMA
    if (reads_in_flight_ >= max_reads_) {
      waiting_reads_.push_back(&op);
      return;
    }
    post_read(op);
  }

  void send_reply(DataOp& op, std::int32_t status, std::uint32_t length) override {
    if (dead_) return op.reply_sent(-ENOTCONN);
    const bool with_data = status == 0 && wire::reply_has_payload(op.cmd.opcode) && op.slot.data != nullptr;
    ibv_sge send_sge{};
    std::byte* p = small_buffer(&send_sge);
    rdma_detail::encode(rdma_detail::MsgHeader{wire::FrameType::kCompletion, 0, wire::kCompletionSize}, p);
    wire::encode(wire::Completion{op.cmd.tag, status, with_data ? length : 0}, p + rdma_detail::kMsgHeaderSize);
    send_sge.length = rdma_detail::kMsgHeaderSize + wire::kCompletionSize;
    ibv_send_wr send{};
    send.sg_list = &send_sge;
    send.num_sge = 1;
    send.opcode = IBV_WR_SEND;
    if (!with_data) {
      // Nothing of the op is needed once the capsule is copied into the send ring.
      if (const int rc = queue_chain(&send, &send, 1, WrKind::kSend, kNoOp, true); rc != 0) {
        fail(CloseCode::kNetwork, "posting a completion: " + errno_text(-rc));
      }
      return op.reply_sent(dead_ ? -ENOTCONN : 0);
    }
    const std::uint32_t idx = hold(op, false);
    if (idx == kNoOp) {
      fail(CloseCode::kProtocol, "more replies in flight than the queue allows");
      return op.reply_sent(-ENOTCONN);
    }
    ibv_sge data_sge;
    ibv_send_wr write = data_wr(op, IBV_WR_RDMA_WRITE, length, &data_sge);
    write.next = &send;
    if (const int rc = queue_chain(&write, &send, 2, WrKind::kSend, idx, true); rc != 0) {
      fail(CloseCode::kNetwork, "posting a completion: " + errno_text(-rc));  // reports the op too
    }
  }

  void resume() override {
    if (held_.empty() || dead_ || resume_posted_) return;
    resume_posted_ = true;
    asio::post(io_, [self = shared_from_this()] {
      self->resume_posted_ = false;
      self->deliver_held();
    });
  }

  void close() override {
    closing_ = true;
    if (sq_idle()) disconnect_or_fail();
  }

  void abort(const std::string& why) override { fail(CloseCode::kLocal, why); }

 private:
  // Parks op in the table the work request ids index; kNoOp when it is full.
  std::uint32_t hold(DataOp& op, bool reading) {
    if (free_ops_.empty()) return kNoOp;
    const std::uint32_t idx = free_ops_.back();
    free_ops_.pop_back();
    ops_[idx] = {&op, reading};
    return idx;
  }
  DataOp* unhold(std::uint32_t idx) {
    DataOp* op = std::exchange(ops_[idx].op, nullptr);
    if (op) free_ops_.push_back(idx);
    return op;
  }

  // The RDMA READ or WRITE between op's slot and the initiator's buffer the command names.
  ibv_send_wr data_wr(const DataOp& op, ibv_wr_opcode opcode, std::uint32_t length, ibv_sge* sge) const {
    *sge = ibv_sge{reinterpret_cast<std::uintptr_t>(op.slot.data), length, device_->pool_mr->lkey()};
    ibv_send_wr wr{};
    wr.sg_list = sge;
    wr.num_sge = 1;
    wr.opcode = opcode;
    wr.wr.rdma.remote_addr = op.cmd.addr;
    wr.wr.rdma.rkey = op.cmd.rkey;
    return wr;
  }

  void post_read(DataOp& op) {
    const std::uint32_t idx = hold(op, true);
    if (idx == kNoOp) {
      fail(CloseCode::kProtocol, "more commands in flight than the queue allows");
      return op.data_received(-ENOTCONN);
    }
    ++reads_in_flight_;
    peak_reads_ = std::max(peak_reads_, reads_in_flight_);
    ibv_sge sge;
    ibv_send_wr wr = data_wr(op, IBV_WR_RDMA_READ, op.cmd.length, &sge);
    if (const int rc = queue_chain(&wr, &wr, 1, WrKind::kRead, idx, true); rc != 0) {
      fail(CloseCode::kNetwork, "posting an RDMA READ: " + errno_text(-rc));
    }
  }

  void disconnect_or_fail() {
    if (dead_) return;
    if (!established_) return fail(CloseCode::kLocal, "closed by the target");
    disconnect();  // DISCONNECTED follows and ends the queue
  }

  void on_established() override { log()->debug("{}: RDMA queue established", peer_); }

  void on_control_message(const proto::Control& msg) override {
    if (closing_) return;
    handler_->on_control(msg);
  }

  void violation(const std::string& what) override {
    if (dead_ || closing_) return;
    log()->warn("{}: protocol error: {}; closing the connection", peer_, what);
    proto::Control err;
    err.mutable_error()->set_code(proto::ERROR_PROTOCOL);
    err.mutable_error()->set_message(what);
    violated_ = what;
    Endpoint::send_control(err);
    close();
  }

  void on_capsule(wire::FrameType type, std::span<const std::byte> payload) override {
    if (closing_) return;
    if (type != wire::FrameType::kCommand) return violation("a target does not accept completions");
    wire::Command cmd;
    if (payload.size() != wire::kCommandSize) return violation("command of the wrong size");
    if (const auto e = wire::decode(payload, &cmd); e != wire::DecodeError::kNone) {
      return violation(std::string("command: ") + wire::describe(e));
    }
    if (!held_.empty()) {
      // Commands come in receive buffers the queue depth bounds: hold them in order.
      if (held_.size() > depth_ + rdma_detail::kExtraRecvs) return violation("more commands in flight than the granted queue depth");
      held_.push_back(cmd);
      return;
    }
    if (!handler_->on_command(cmd)) held_.push_back(cmd);
  }

  void deliver_held() {
    while (!dead_ && !closing_ && !held_.empty()) {
      if (!handler_->on_command(held_.front())) return;
      held_.pop_front();
    }
  }

  void on_send_done(WrKind kind, std::uint32_t index) override {
    if (kind == WrKind::kRead) {
      --reads_in_flight_;
      DataOp* op = unhold(index);
      if (!waiting_reads_.empty() && !dead_) {
        DataOp* next = waiting_reads_.front();
        waiting_reads_.pop_front();
        post_read(*next);
      }
      if (op) op->data_received(0);
    } else if (kind == WrKind::kSend && index != kNoOp) {
      if (DataOp* op = unhold(index)) op->reply_sent(0);
    }
    if (closing_ && sq_idle()) disconnect_or_fail();
  }

  void on_dead(const CloseReason& reason) override {
    held_.clear();
    // The device must be done with every slot before the target gets them back.
    qp_.reset();
    std::deque<DataOp*> waiting = std::exchange(waiting_reads_, {});
    for (DataOp* op : waiting) op->data_received(-ECONNRESET);
    for (std::uint32_t i = 1; i < ops_.size(); ++i) {
      const bool was_reading = ops_[i].reading;
      DataOp* op = unhold(i);
      if (!op) continue;
      if (was_reading) op->data_received(-ECONNRESET);
      else op->reply_sent(-ECONNRESET);
    }
    reads_in_flight_ = 0;
    if (reads_peaked_logged_ == false && peak_reads_ > 0) {
      log()->debug("{}: at most {} RDMA READs in flight (limit {})", peer_, peak_reads_, max_reads_);
      reads_peaked_logged_ = true;
    }
    if (handler_) {
      handler_->on_closed(violated_.empty() ? reason : CloseReason{CloseCode::kProtocol, violated_});
    }
  }

  RdmaConnectData requested_;
  unsigned responder_resources_;
  PeerInfo peer_info_;
  Handler* handler_ = nullptr;
  std::uint32_t max_io_ = 0;
  unsigned max_reads_ = 1;
  unsigned reads_in_flight_ = 0;
  unsigned peak_reads_ = 0;
  bool reads_peaked_logged_ = false;
  std::deque<DataOp*> waiting_reads_;  // beyond max_reads_, in order
  struct Held {
    DataOp* op = nullptr;
    bool reading = false;  // at its RDMA READ (else its reply is going out)
  };
  std::vector<Held> ops_;              // by work request index; [0] unused
  std::vector<std::uint32_t> free_ops_;
  std::deque<wire::Command> held_;  // commands the handler could not take yet
  bool resume_posted_ = false;
  bool closing_ = false;
  std::string violated_;
};

}  // namespace

namespace rdma_detail {

std::shared_ptr<ServerConnection> make_server_connection(asio::io_context& io, ConnectRequest&& req,
                                                         RdmaDeviceCache& cache) {
  auto dev = cache.get(req.id.verbs());
  return std::make_shared<RdmaServerConnection>(io, std::move(req), std::move(dev));
}

}  // namespace rdma_detail
}  // namespace ibdisk::transport
