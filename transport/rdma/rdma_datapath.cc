// RDMA transport, the target's command path: a write's data is pulled by RDMA READ into the
// slot before the command is delivered; a read's data is pushed by RDMA WRITE chained with
// the completion's SEND (only the SEND signalled), and the slot frees when that SEND
// completes. Datapath errors close the queue; nothing here throws after start().
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

constexpr std::uint32_t kNoSlot = 0;  // wr index 0: the SEND frees no slot; otherwise slot + 1

class RdmaServerConnection final : public ServerConnection,
                                   public Endpoint,
                                   public std::enable_shared_from_this<RdmaServerConnection> {
 public:
  RdmaServerConnection(asio::io_context& io, RdmaListener::Request&& req, std::shared_ptr<RdmaDeviceCache::Device> dev,
                       BufferPool& pool)
      : Endpoint(io, std::move(req.channel), std::move(req.id), std::move(dev), req.data.queue_depth),
        pool_(pool),
        requested_(req.data) {
    peer_ = req.peer;
  }

  ~RdmaServerConnection() override {
    qp_.reset();  // no RDMA may touch a slot once it is back in the pool
    pool_.release(slots_);
  }

  std::string transport_name() const override { return "rdma"; }
  std::string peer() const override { return peer_; }

  void start(Handler* handler) override {
    handler_ = handler;
    post_all_recvs();
    ibv_device_attr attr{};
    ibv_query_device(id_.verbs(), &attr);
    rdma_conn_param param{};
    param.responder_resources = 0;  // the initiator never reads from the target
    param.initiator_depth = static_cast<std::uint8_t>(std::clamp(attr.max_qp_init_rd_atom, 1, 16));
    param.retry_count = 7;
    param.rnr_retry_count = 7;
    if (rdma_accept(id_.get(), &param) != 0) return fail("rdma_accept: " + errno_text(errno));
    watch();
  }

  void send_control(const proto::Control& msg) override {
    if (const int rc = Endpoint::send_control(msg); rc != 0 && rc != -ENOTCONN) fail("sending a control message: " + errno_text(-rc));
  }

  unsigned set_queue(unsigned queue_depth, std::uint32_t max_io) override {
    if (!slots_.empty() || max_io > pool_.slot_size() || max_io > requested_.max_io) {
      return static_cast<unsigned>(slots_.size());
    }
    slots_ = pool_.reserve(std::min(queue_depth, depth_));
    slot_cmd_.resize(slots_.size());
    for (std::uint32_t i = static_cast<std::uint32_t>(slots_.size()); i-- > 0;) free_.push_back(i);
    return static_cast<unsigned>(slots_.size());
  }

  void complete(const wire::Command& cmd, std::int32_t status, Slot* slot, std::uint32_t length) override {
    const std::uint32_t idx = slot ? static_cast<std::uint32_t>(slot - slots_.data()) : 0;
    const bool with_data = status == 0 && cmd.opcode == wire::Opcode::kRead && slot != nullptr;
    if (dead_) {
      if (slot) free_.push_back(idx);
      return;
    }
    ibv_sge send_sge{};
    std::byte* p = small_buffer(&send_sge);
    rdma_detail::encode(rdma_detail::MsgHeader{wire::FrameType::kCompletion, 0, wire::kCompletionSize}, p);
    wire::encode(wire::Completion{cmd.tag, status, with_data ? length : 0}, p + rdma_detail::kMsgHeaderSize);
    send_sge.length = rdma_detail::kMsgHeaderSize + wire::kCompletionSize;
    ibv_send_wr send{};
    send.sg_list = &send_sge;
    send.num_sge = 1;
    send.opcode = IBV_WR_SEND;
    int rc;
    if (with_data) {
      ibv_sge data_sge{reinterpret_cast<std::uintptr_t>(slot->data), length, device_->pool_mr->lkey()};
      ibv_send_wr write{};
      write.sg_list = &data_sge;
      write.num_sge = 1;
      write.opcode = IBV_WR_RDMA_WRITE;
      write.wr.rdma.remote_addr = cmd.addr;
      write.wr.rdma.rkey = cmd.rkey;
      write.next = &send;
      rc = queue_chain(&write, &send, 2, WrKind::kSend, idx + 1, true);
    } else {
      // Any other slot is free as soon as the command is done with it.
      if (slot) slot_freed(idx);
      if (dead_) return;
      rc = queue_chain(&send, &send, 1, WrKind::kSend, kNoSlot, true);
    }
    if (rc != 0) {
      if (with_data) free_.push_back(idx);
      fail("posting a completion: " + errno_text(-rc));
    }
  }

  void close() override {
    closing_ = true;
    if (sq_idle()) disconnect_or_fail();
  }

 private:
  void disconnect_or_fail() {
    if (dead_) return;
    if (!established_) return fail("closed by the target");
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
    violated_ = "protocol error: " + what;
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
    if (cmd.opcode == wire::Opcode::kRead || cmd.opcode == wire::Opcode::kWrite) {
      if (slots_.empty()) return violation("data command before the queue was granted");
      if (cmd.length > slots_.front().capacity) return violation("command longer than the granted I/O size");
      if (free_.empty() || !parked_.empty()) {
        // The initiator saw a read's completion before its SEND completed here.
        if (parked_.size() >= slots_.size()) return violation("more commands in flight than the granted queue depth");
        parked_.push_back(cmd);
        return;
      }
    }
    start_command(cmd);
  }

  void start_command(const wire::Command& cmd) {
    const bool write = cmd.opcode == wire::Opcode::kWrite;
    if (cmd.opcode != wire::Opcode::kRead && !write) return handler_->on_command(cmd, nullptr);
    const std::uint32_t idx = free_.back();
    free_.pop_back();
    Slot* slot = &slots_[idx];
    if (!write) return handler_->on_command(cmd, slot);
    slot_cmd_[idx] = cmd;
    ibv_sge sge{reinterpret_cast<std::uintptr_t>(slot->data), cmd.length, device_->pool_mr->lkey()};
    ibv_send_wr wr{};
    wr.sg_list = &sge;
    wr.num_sge = 1;
    wr.opcode = IBV_WR_RDMA_READ;
    wr.wr.rdma.remote_addr = cmd.addr;
    wr.wr.rdma.rkey = cmd.rkey;
    if (const int rc = queue_chain(&wr, &wr, 1, WrKind::kRead, idx, true); rc != 0) {
      free_.push_back(idx);
      fail("posting an RDMA READ: " + errno_text(-rc));
    }
  }

  void on_send_done(WrKind kind, std::uint32_t index) override {
    if (kind == WrKind::kRead) {
      if (closing_) {
        free_.push_back(index);
      } else {
        handler_->on_command(slot_cmd_[index], &slots_[index]);
      }
    } else if (kind == WrKind::kSend && index != kNoSlot) {
      slot_freed(index - 1);
    }
    if (closing_ && sq_idle()) disconnect_or_fail();
  }

  void slot_freed(std::uint32_t idx) {
    free_.push_back(idx);
    while (!dead_ && !closing_ && !free_.empty() && !parked_.empty()) {
      const wire::Command cmd = parked_.front();
      parked_.pop_front();
      start_command(cmd);
    }
  }

  void on_dead(const std::string& reason) override {
    parked_.clear();
    if (handler_) handler_->on_closed(violated_.empty() ? reason : violated_);
  }

  BufferPool& pool_;
  RdmaConnectData requested_;
  Handler* handler_ = nullptr;
  std::vector<Slot> slots_;
  std::vector<wire::Command> slot_cmd_;  // a write's command while its RDMA READ runs
  std::vector<std::uint32_t> free_;
  std::deque<wire::Command> parked_;
  bool closing_ = false;
  std::string violated_;
};

}  // namespace

std::shared_ptr<ServerConnection> make_rdma_server_connection(asio::io_context& io, RdmaListener::Request&& req,
                                                              RdmaDeviceCache& cache, BufferPool& pool) {
  auto dev = cache.get(req.id.verbs());
  return std::make_shared<RdmaServerConnection>(io, std::move(req), std::move(dev), pool);
}

}  // namespace ibdisk::transport
