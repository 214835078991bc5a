#pragma once
// Internal to transport/rdma: what the initiator and target ends of an RDMA queue share.
// An Endpoint owns the CM id (on its own event channel), the CQ with its completion channel,
// the RC queue pair and the registered message buffers, and runs the completion loop on its
// io_context: both channel fds are watched with stream_descriptor::async_wait, never blocking
// the io thread. Derived classes supply what a message, a send completion and the end mean.
#include <deque>
#include <optional>
#include <string>
#include <vector>

#include "transport/rdma/rdma_connection.h"

namespace ibdisk::transport::rdma_detail {

namespace asio = boost::asio;

// The message header and what a received SEND means: rdma_msg.h.
inline constexpr std::uint32_t kSmallMsgSize = 64;  // a command or completion SEND
static_assert(kMsgHeaderSize + wire::kCommandSize <= kSmallMsgSize);
static_assert(kMsgHeaderSize + wire::kCompletionSize <= kSmallMsgSize);
inline constexpr unsigned kCtrlSendBuffers = 8;  // control fragments in flight
inline constexpr unsigned kExtraRecvs = 8;       // RECVs beyond the queue depth, for control

// wr_id: kind (8 bits) | index (24 bits) | send-queue entries this completion retires (32 bits).
enum class WrKind : std::uint8_t { kRecv = 1, kSend = 2, kCtrlSend = 3, kRead = 4 };
constexpr std::uint64_t make_wr_id(WrKind kind, std::uint32_t index, std::uint32_t retire = 0) {
  return (static_cast<std::uint64_t>(kind) << 56) | (static_cast<std::uint64_t>(index & 0xffffff) << 32) | retire;
}
constexpr WrKind wr_kind(std::uint64_t id) { return static_cast<WrKind>(id >> 56); }
constexpr std::uint32_t wr_index(std::uint64_t id) { return static_cast<std::uint32_t>(id >> 32) & 0xffffff; }
constexpr std::uint32_t wr_retire(std::uint64_t id) { return static_cast<std::uint32_t>(id); }

std::string sockaddr_text(const sockaddr* sa);
std::string cm_event_text(const rdma::CmEvent& ev);
// The host part of sockaddr_text, as an address (for the allow-list).
std::optional<boost::asio::ip::address> sockaddr_address(const sockaddr* sa);
// Makes librdmacm drop its context of a removed device (see rdma_endpoint.cc).
void forget_removed_devices();
// Starts (once per process) the watch that does the same for a device removed while no CM id
// of ours was on it. Called by the RDMA listener and connector.
void watch_device_removals();
void set_nonblocking(int fd);

// A connect request the listener accepted the private data of, with its id on an event
// channel of its own, so the chosen worker can take it over.
struct ConnectRequest {
  rdma::EventChannel channel;
  rdma::CmId id;
  RdmaConnectData data;
  std::string peer;
  std::optional<boost::asio::ip::address> address;
  unsigned responder_resources = 0;  // RDMA READs the initiator lets this side have in flight
};
// Target side: builds the QP for an accepted request on the calling (worker) thread; start()
// accepts it. Registrations of the worker's pool come from `cache`. Throws SystemError.
std::shared_ptr<ServerConnection> make_server_connection(boost::asio::io_context& io, ConnectRequest&& req,
                                                         RdmaDeviceCache& cache);

class Endpoint {
 public:
  Endpoint(asio::io_context& io, rdma::EventChannel channel, rdma::CmId id,
           std::shared_ptr<RdmaDeviceCache::Device> device, unsigned queue_depth);
  virtual ~Endpoint();
  Endpoint(const Endpoint&) = delete;
  Endpoint& operator=(const Endpoint&) = delete;

 protected:
  // A whole message (control messages reassembled and parsed). io thread.
  virtual void on_control_message(const proto::Control& msg) = 0;
  virtual void on_capsule(wire::FrameType type, std::span<const std::byte> payload) = 0;
  // A signalled send-queue completion (kSend with its index, or kRead).
  virtual void on_send_done(WrKind kind, std::uint32_t index) = 0;
  // The connection is over; report once. Called with dead_ already set.
  virtual void on_dead(const CloseReason& reason) = 0;
  virtual void on_established() {}
  // The peer broke the protocol: say why where possible, then end.
  virtual void violation(const std::string& what) { fail(CloseCode::kProtocol, what); }

  // Posts every RECV buffer; setup.
  void post_all_recvs();
  // Starts watching the completion and CM channels on the io_context.
  void watch();
  // Blocking, for the initiator's setup phase: processes completions until done() or timeout.
  bool wait_blocking(const std::function<bool()>& done, std::chrono::milliseconds timeout);

  // Queues a control message (cut into fragments) and posts what fits. Returns 0 or -errno.
  int send_control(const proto::Control& msg);
  // Posts a chain of `count` WRs ending in `last`; signals the last one when `signal` or
  // when the signalling interval or send-queue headroom asks for it. 0 or -errno.
  int post_chain(ibv_send_wr* first, ibv_send_wr* last, unsigned count, WrKind kind, std::uint32_t index, bool signal);
  // The data path's post_chain: the WRs (one SGE each at most) are copied and posted at the end
  // of this handler turn, together with every other chain queued in it, as one ibv_post_send (a
  // system call on rxe) for a whole batch of commands or completions. 0 or -errno now; a
  // failure of the later post ends the connection.
  int queue_chain(ibv_send_wr* first, ibv_send_wr* last, unsigned count, WrKind kind, std::uint32_t index, bool signal);
  // A small SEND buffer (command or completion); valid until the send queue wraps.
  std::byte* small_buffer(ibv_sge* sge);
  bool sq_room(unsigned n) const { return sq_used_ + n <= sq_cap_; }
  bool sq_idle() const { return sq_used_ == 0 && ctrl_out_.empty(); }
  // Ends the connection: disconnects and reports the reason through on_dead (once).
  void fail(CloseCode code, const std::string& detail);
  void disconnect();

  asio::io_context& io_;
  rdma::EventChannel channel_;
  rdma::CmId id_;
  std::shared_ptr<RdmaDeviceCache::Device> device_;
  rdma::CompletionQueue cq_;
  std::optional<rdma::QueuePair> qp_;
  const unsigned depth_;
  const unsigned recv_count_;
  const unsigned sq_cap_;
  const unsigned signal_every_;
  rdma::RegisteredBuffer msgs_;  // RECV buffers | small SEND ring | control SEND buffers
  std::string peer_;
  bool dead_ = false;
  bool disconnected_ = false;
  bool established_ = false;

 private:
  void handle(const ibv_wc& wc);
  void on_recv(std::uint32_t index, std::uint32_t bytes);
  void handle_cm_event(const rdma::CmEvent& ev);
  void repost_recvs();
  void pump_control();
  void mark_signal(ibv_send_wr* last, unsigned count, WrKind kind, std::uint32_t index, bool signal);
  void post_queued();
  void wait_cq();
  void wait_cm();
  void on_cq_ready();
  void on_cm_ready();
  std::byte* recv_buffer(std::uint32_t i) const { return msgs_.data() + static_cast<std::size_t>(i) * kRdmaMsgSize; }
  std::byte* ctrl_buffer(std::uint32_t i) const;

  asio::posix::stream_descriptor cq_fd_;
  asio::posix::stream_descriptor cm_fd_;
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
  unsigned sq_used_ = 0;
  unsigned unsignalled_ = 0;
  unsigned small_next_ = 0;
  struct QueuedWr {
    ibv_send_wr wr;
    ibv_sge sge;
  };
  std::vector<QueuedWr> queued_;  // queue_chain()'s WRs, posted at the end of the turn
  bool post_scheduled_ = false;
  std::vector<std::uint32_t> to_repost_;
  std::vector<ibv_recv_wr> recv_wrs_;
  std::vector<ibv_sge> recv_sges_;
  std::deque<std::string> ctrl_out_;  // fragments with their headers, not yet posted
  std::vector<std::uint32_t> ctrl_free_;
  std::string ctrl_in_;  // control fragments received so far
};

}  // namespace ibdisk::transport::rdma_detail
