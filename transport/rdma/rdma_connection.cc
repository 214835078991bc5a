// RDMA transport, setup half: the shared endpoint (completion loop, message framing, CM
// events), private data, the memlock check, the device cache, the listener and the initiator.
// The target's command path is in rdma_datapath.cc.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>

#include <array>
#include <cstring>
#include <fstream>
#include <unordered_map>

#include "common/error.h"
#include "common/log.h"
#include "transport/rdma/rdma_endpoint.h"

namespace ibdisk::transport {
namespace {

using namespace std::chrono_literals;
using rdma_detail::Endpoint;
using rdma_detail::WrKind;
namespace asio = boost::asio;

auto log() {
  static auto l = ibdisk::logger("rdma");
  return l;
}

void put16(std::byte* p, std::uint16_t v) { v = htole16(v); std::memcpy(p, &v, 2); }
void put32(std::byte* p, std::uint32_t v) { v = htole32(v); std::memcpy(p, &v, 4); }
std::uint16_t get16(const std::byte* p) { std::uint16_t v; std::memcpy(&v, p, 2); return le16toh(v); }
std::uint32_t get32(const std::byte* p) { std::uint32_t v; std::memcpy(&v, p, 4); return le32toh(v); }

void set_nonblocking(int fd) {
  const int flags = ::fcntl(fd, F_GETFL);
  if (flags >= 0) ::fcntl(fd, F_SETFL, flags | O_NONBLOCK);
}

// librdmacm keeps a verbs context open on each device it has used, and closes it only once it
// has seen the device leave the device list with no CM id left on it; it looks at the list when
// asked for it (or when an address resolves to a device it does not know). The kernel's removal
// of a device that cannot disassociate user contexts (rxe, and most drivers) waits until every
// process has closed its context: after DEVICE_REMOVAL, make librdmacm look now, so that the
// context closes with the last CM id on the device. The price: librdmacm opens a context on
// each other device, as it does for any device a CM id has used.
void forget_removed_devices() {
  int n = 0;
  if (ibv_context** list = rdma_get_devices(&n)) rdma_free_devices(list);
}

bool has_cap_ipc_lock() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("CapEff:", 0) == 0) {
      const unsigned long long caps = std::stoull(line.substr(7), nullptr, 16);
      return (caps >> 14) & 1;  // CAP_IPC_LOCK
    }
  }
  return false;
}

}  // namespace

// --- private data --------------------------------------------------------------------------

std::array<std::byte, sizeof(RdmaConnectData)> encode(const RdmaConnectData& d) {
  std::array<std::byte, sizeof(RdmaConnectData)> out{};
  put32(out.data(), d.magic);
  put16(out.data() + 4, d.version);
  put16(out.data() + 6, 0);
  put32(out.data() + 8, d.queue_depth);
  put32(out.data() + 12, d.max_io);
  put32(out.data() + 16, d.msg_size);
  return out;
}

std::string decode_connect_data(std::span<const std::byte> in, RdmaConnectData* out) {
  // The CM may pad private data with zeros up to its own size: only a shorter one is wrong.
  if (in.size() < sizeof(RdmaConnectData)) {
    return "private data of " + std::to_string(in.size()) + " bytes, expected " +
           std::to_string(sizeof(RdmaConnectData)) + " (not an ibdisk initiator)";
  }
  RdmaConnectData d;
  d.magic = get32(in.data());
  d.version = get16(in.data() + 4);
  d.reserved = get16(in.data() + 6);
  d.queue_depth = get32(in.data() + 8);
  d.max_io = get32(in.data() + 12);
  d.msg_size = get32(in.data() + 16);
  if (d.magic != kRdmaConnectMagic) return "bad magic (not an ibdisk initiator)";
  if (d.version != kRdmaConnectVersion) {
    return "connect version " + std::to_string(d.version) + ", this target speaks " +
           std::to_string(kRdmaConnectVersion) + " (use the same ibdisk release on both sides)";
  }
  for (std::size_t i = 20; i < sizeof(RdmaConnectData); ++i) {
    if (in[i] != std::byte{0}) return "reserved bytes are not zero";
  }
  if (d.reserved != 0) return "reserved bytes are not zero";
  if (d.queue_depth == 0 || d.queue_depth > wire::kMaxQueueDepth) {
    return "queue depth " + std::to_string(d.queue_depth) + " outside 1.." + std::to_string(wire::kMaxQueueDepth);
  }
  if (d.max_io == 0 || d.max_io > wire::kMaxIoSize) return "max I/O size " + std::to_string(d.max_io) + " out of range";
  if (d.msg_size != kRdmaMsgSize) return "message size " + std::to_string(d.msg_size) + " differs from the target's";
  *out = d;
  return {};
}

const char* describe(RdmaRejectReason reason) {
  switch (reason) {
    case RdmaRejectReason::kBadConnectData: return "the target did not accept the connect data (version mismatch?)";
    case RdmaRejectReason::kNoResources: return "the target has no RDMA resources for another queue";
    case RdmaRejectReason::kShuttingDown: return "the target is shutting down";
  }
  return "rejected by the target";
}

void reject_connect(rdma_cm_id* id, RdmaRejectReason reason) {
  std::array<std::byte, sizeof(RdmaRejectData)> pd{};
  put32(pd.data(), kRdmaConnectMagic);
  put16(pd.data() + 4, kRdmaConnectVersion);
  put16(pd.data() + 6, static_cast<std::uint16_t>(reason));
  if (rdma_reject(id, pd.data(), static_cast<std::uint8_t>(pd.size())) != 0) {
    log()->warn("rdma_reject: {}", errno_text(errno));
  }
}

// --- memlock -------------------------------------------------------------------------------

std::string memlock_problem(std::size_t bytes, const std::string& what, rlim_t limit, bool cap_ipc_lock) {
  if (cap_ipc_lock || limit == RLIM_INFINITY || limit >= bytes) return {};
  const std::size_t kib = (bytes + 1023) / 1024;
  const std::size_t set_kib = (kib + 1023) / 1024 * 1024 + 1024;  // rounded up, with room for the rest
  return what + " need " + std::to_string((bytes + (1 << 20) - 1) >> 20) + " MiB of locked memory, but RLIMIT_MEMLOCK is " +
         std::to_string(limit / 1024) + " KiB: run `ulimit -l " + std::to_string(set_kib) +
         "` (or unlimited) before starting, or set `* - memlock " + std::to_string(set_kib) +
         "` in /etc/security/limits.conf, or LimitMEMLOCK=" + std::to_string(set_kib) + "K in the systemd unit";
}

std::string memlock_problem(std::size_t bytes, const std::string& what) {
  rlimit lim{};
  ::getrlimit(RLIMIT_MEMLOCK, &lim);
  return memlock_problem(bytes, what, lim.rlim_cur, has_cap_ipc_lock());
}

// --- device cache --------------------------------------------------------------------------

RdmaDeviceCache::Device::Device(ibv_context* ctx, BufferPool* pool) : pd(ctx) {
  if (pool) {
    const iovec r = pool->region();
    pool_mr.emplace(pd, r.iov_base, r.iov_len, IBV_ACCESS_LOCAL_WRITE);
  }
}

std::shared_ptr<RdmaDeviceCache::Device> RdmaDeviceCache::get(ibv_context* ctx) {
  auto& slot = devices_[ctx];
  if (auto d = slot.lock()) return d;
  auto d = std::make_shared<Device>(ctx, &pool_);
  ++registrations_;
  log()->debug("registered the worker's {} MiB buffer pool with {}", pool_.region().iov_len >> 20,
               ibv_get_device_name(ctx->device));
  slot = d;
  return d;
}

namespace rdma_detail {

// --- message framing -----------------------------------------------------------------------

void encode(const MsgHeader& h, std::byte* out) {
  put16(out, kMsgMagic);
  out[2] = static_cast<std::byte>(h.type);
  out[3] = static_cast<std::byte>(h.flags);
  put32(out + 4, h.length);
}

bool decode(std::span<const std::byte> in, MsgHeader* out) {
  if (in.size() < kMsgHeaderSize || get16(in.data()) != kMsgMagic) return false;
  const auto type = static_cast<std::uint8_t>(in[2]);
  const auto flags = static_cast<std::uint8_t>(in[3]);
  if (type < 1 || type > 3 || (flags & ~kMsgMoreFragments)) return false;
  MsgHeader h;
  h.type = static_cast<wire::FrameType>(type);
  h.flags = flags;
  h.length = get32(in.data() + 4);
  if (h.length != in.size() - kMsgHeaderSize) return false;
  *out = h;
  return true;
}

std::string sockaddr_text(const sockaddr* sa) {
  char text[INET6_ADDRSTRLEN] = "?";
  if (!sa) return "?";
  if (sa->sa_family == AF_INET) {
    const auto* in = reinterpret_cast<const sockaddr_in*>(sa);
    ::inet_ntop(AF_INET, &in->sin_addr, text, sizeof text);
    return std::string(text) + ":" + std::to_string(ntohs(in->sin_port));
  }
  if (sa->sa_family == AF_INET6) {
    const auto* in = reinterpret_cast<const sockaddr_in6*>(sa);
    ::inet_ntop(AF_INET6, &in->sin6_addr, text, sizeof text);
    return "[" + std::string(text) + "]:" + std::to_string(ntohs(in->sin6_port));
  }
  return "?";
}

std::string cm_event_text(const rdma::CmEvent& ev) {
  std::string s = ev.name();
  if (ev.status()) s += " (status " + std::to_string(ev.status()) + ")";
  return s;
}

// --- endpoint ------------------------------------------------------------------------------

Endpoint::Endpoint(asio::io_context& io, rdma::EventChannel channel, rdma::CmId id,
                   std::shared_ptr<RdmaDeviceCache::Device> device, unsigned queue_depth)
    : io_(io),
      channel_(std::move(channel)),
      id_(std::move(id)),
      device_(std::move(device)),
      cq_(id_.verbs(), static_cast<int>(5 * queue_depth + 16 + kExtraRecvs + kCtrlSendBuffers)),
      depth_(queue_depth),
      recv_count_(queue_depth + kExtraRecvs),
      sq_cap_(4 * queue_depth + 16),
      signal_every_(std::max(1u, queue_depth / 4)),
      msgs_(device_->pd, static_cast<std::size_t>(recv_count_) * kRdmaMsgSize + std::size_t{sq_cap_} * kSmallMsgSize +
                             std::size_t{kCtrlSendBuffers} * kRdmaMsgSize,
            IBV_ACCESS_LOCAL_WRITE),
      peer_(sockaddr_text(rdma_get_peer_addr(id_.get()))),
      cq_fd_(io),
      cm_fd_(io) {
  qp_.emplace(id_, device_->pd, cq_, sq_cap_ + kCtrlSendBuffers, recv_count_, 2);
  for (std::uint32_t i = 0; i < kCtrlSendBuffers; ++i) ctrl_free_.push_back(i);
  recv_wrs_.resize(recv_count_);
  recv_sges_.resize(recv_count_);
  set_nonblocking(channel_.fd());
  set_nonblocking(cq_.channel_fd());
}

Endpoint::~Endpoint() {
  *alive_ = false;
  if (cq_fd_.is_open()) cq_fd_.release();
  if (cm_fd_.is_open()) cm_fd_.release();
  if (!disconnected_ && id_) rdma_disconnect(id_.get());
  qp_.reset();  // before the buffers and slots it may still address
}

std::byte* Endpoint::ctrl_buffer(std::uint32_t i) const {
  return msgs_.data() + static_cast<std::size_t>(recv_count_) * kRdmaMsgSize + std::size_t{sq_cap_} * kSmallMsgSize +
         static_cast<std::size_t>(i) * kRdmaMsgSize;
}

std::byte* Endpoint::small_buffer(ibv_sge* sge) {
  std::byte* p = msgs_.data() + static_cast<std::size_t>(recv_count_) * kRdmaMsgSize +
                 static_cast<std::size_t>(small_next_) * kSmallMsgSize;
  small_next_ = (small_next_ + 1) % sq_cap_;
  sge->addr = reinterpret_cast<std::uintptr_t>(p);
  sge->lkey = msgs_.mr().lkey();
  return p;
}

void Endpoint::post_all_recvs() {
  for (std::uint32_t i = 0; i < recv_count_; ++i) to_repost_.push_back(i);
  repost_recvs();
}

void Endpoint::repost_recvs() {
  if (to_repost_.empty() || dead_) {
    to_repost_.clear();
    return;
  }
  const std::size_t n = to_repost_.size();
  for (std::size_t k = 0; k < n; ++k) {
    const std::uint32_t i = to_repost_[k];
    recv_sges_[k] = ibv_sge{reinterpret_cast<std::uintptr_t>(recv_buffer(i)), kRdmaMsgSize, msgs_.mr().lkey()};
    recv_wrs_[k] = ibv_recv_wr{};
    recv_wrs_[k].wr_id = rdma_detail::make_wr_id(WrKind::kRecv, i);
    recv_wrs_[k].sg_list = &recv_sges_[k];
    recv_wrs_[k].num_sge = 1;
    recv_wrs_[k].next = k + 1 < n ? &recv_wrs_[k + 1] : nullptr;
  }
  to_repost_.clear();
  if (const int rc = qp_->post_recv(recv_wrs_.data()); rc != 0) fail("posting receives: " + errno_text(rc));
}

void Endpoint::mark_signal(ibv_send_wr* last, unsigned count, WrKind kind, std::uint32_t index, bool signal) {
  signal = signal || unsignalled_ + count >= signal_every_ || sq_used_ + count >= sq_cap_ / 2;
  last->next = nullptr;
  if (signal) {
    last->send_flags |= IBV_SEND_SIGNALED;
    last->wr_id = rdma_detail::make_wr_id(kind, index, unsignalled_ + count);
  } else {
    last->wr_id = 0;
  }
  unsignalled_ = signal ? 0 : unsignalled_ + count;
}

int Endpoint::post_chain(ibv_send_wr* first, ibv_send_wr* last, unsigned count, WrKind kind, std::uint32_t index,
                         bool signal) {
  if (dead_) return -ENOTCONN;
  post_queued();  // what the data path queued goes first: the peer sees sends in order
  if (dead_) return -ENOTCONN;
  if (!sq_room(count)) return -EAGAIN;
  const unsigned before = unsignalled_;
  mark_signal(last, count, kind, index, signal);
  if (const int rc = qp_->post_send(first); rc != 0) {
    unsignalled_ = before;
    return -rc;
  }
  sq_used_ += count;
  return 0;
}

int Endpoint::queue_chain(ibv_send_wr* first, ibv_send_wr* last, unsigned count, WrKind kind, std::uint32_t index,
                          bool signal) {
  if (dead_) return -ENOTCONN;
  if (!sq_room(count)) return -EAGAIN;
  for (ibv_send_wr* wr = first; wr != last; wr = wr->next) {
    if (wr->num_sge > 1) return -EINVAL;
  }
  if (last->num_sge > 1) return -EINVAL;
  mark_signal(last, count, kind, index, signal);
  for (ibv_send_wr* wr = first;; wr = wr->next) {
    queued_.push_back({*wr, wr->num_sge == 1 ? *wr->sg_list : ibv_sge{}});
    if (wr == last) break;
  }
  sq_used_ += count;
  if (!post_scheduled_) {
    post_scheduled_ = true;
    asio::post(io_, [this, alive = alive_] {
      if (*alive) post_queued();
    });
  }
  return 0;
}

void Endpoint::post_queued() {
  post_scheduled_ = false;
  if (queued_.empty()) return;
  if (dead_) return queued_.clear();
  for (std::size_t i = 0; i < queued_.size(); ++i) {
    ibv_send_wr& wr = queued_[i].wr;
    if (wr.num_sge == 1) wr.sg_list = &queued_[i].sge;
    wr.next = i + 1 < queued_.size() ? &queued_[i + 1].wr : nullptr;
  }
  const int rc = qp_->post_send(&queued_.front().wr);
  queued_.clear();
  if (rc != 0) fail("posting to the send queue: " + errno_text(rc));
}

int Endpoint::send_control(const proto::Control& msg) {
  if (dead_) return -ENOTCONN;
  const std::string body = msg.SerializeAsString();
  std::size_t off = 0;
  do {
    const std::size_t n = std::min<std::size_t>(kFragmentPayload, body.size() - off);
    std::string frag(kMsgHeaderSize + n, '\0');
    const bool more = off + n < body.size();
    encode(MsgHeader{wire::FrameType::kControl, more ? kMsgMoreFragments : std::uint8_t{0}, static_cast<std::uint32_t>(n)},
           reinterpret_cast<std::byte*>(frag.data()));
    std::memcpy(frag.data() + kMsgHeaderSize, body.data() + off, n);
    ctrl_out_.push_back(std::move(frag));
    off += n;
  } while (off < body.size());
  pump_control();
  return 0;
}

void Endpoint::pump_control() {
  while (!dead_ && !ctrl_out_.empty() && !ctrl_free_.empty() && sq_room(1)) {
    const std::uint32_t b = ctrl_free_.back();
    const std::string& frag = ctrl_out_.front();
    std::memcpy(ctrl_buffer(b), frag.data(), frag.size());
    ibv_sge sge{reinterpret_cast<std::uintptr_t>(ctrl_buffer(b)), static_cast<std::uint32_t>(frag.size()), msgs_.mr().lkey()};
    ibv_send_wr wr{};
    wr.sg_list = &sge;
    wr.num_sge = 1;
    wr.opcode = IBV_WR_SEND;
    if (const int rc = post_chain(&wr, &wr, 1, WrKind::kCtrlSend, b, true); rc != 0) {
      return fail("posting a control message: " + errno_text(-rc));
    }
    ctrl_free_.pop_back();
    ctrl_out_.pop_front();
  }
}

void Endpoint::fail(const std::string& reason) {
  if (dead_) return;
  dead_ = true;
  ctrl_out_.clear();
  disconnect();
  on_dead(reason);
}

void Endpoint::disconnect() {
  if (disconnected_) return;
  disconnected_ = true;
  rdma_disconnect(id_.get());  // errors mean it is already down
}

void Endpoint::handle(const ibv_wc& wc) {
  const WrKind kind = rdma_detail::wr_kind(wc.wr_id);
  if (wc.status != IBV_WC_SUCCESS) {
    if (!dead_) {
      const char* what = kind == WrKind::kRecv ? "receive" : kind == WrKind::kRead ? "RDMA READ" : "send";
      fail(std::string(what) + " failed: " + ibv_wc_status_str(wc.status) +
           (wc.status == IBV_WC_REM_ACCESS_ERR ? " (the peer's buffer key was refused)" : ""));
    }
    return;
  }
  if (kind == WrKind::kRecv) return on_recv(rdma_detail::wr_index(wc.wr_id), wc.byte_len);
  sq_used_ -= std::min(sq_used_, rdma_detail::wr_retire(wc.wr_id));
  if (kind == WrKind::kCtrlSend) {
    ctrl_free_.push_back(rdma_detail::wr_index(wc.wr_id));
    pump_control();
  }
  if (!dead_) on_send_done(kind, rdma_detail::wr_index(wc.wr_id));
}

void Endpoint::on_recv(std::uint32_t index, std::uint32_t bytes) {
  to_repost_.push_back(index);
  if (dead_) return;
  // Copy the message out and give its buffer back to the QP before acting on it: a completion
  // handler may send new commands whose replies arrive before this batch of completions ends,
  // and a SEND that finds no receive posted stalls the whole queue for the RNR timer.
  std::array<std::byte, kRdmaMsgSize> copy;
  bytes = std::min<std::uint32_t>(bytes, kRdmaMsgSize);
  std::memcpy(copy.data(), recv_buffer(index), bytes);
  repost_recvs();
  if (dead_) return;
  const std::span<const std::byte> msg(copy.data(), bytes);
  MsgHeader h;
  if (!decode(msg, &h)) return violation("malformed message of " + std::to_string(bytes) + " bytes");
  const auto payload = msg.subspan(kMsgHeaderSize);
  if (h.type != wire::FrameType::kControl) {
    if (!ctrl_in_.empty()) return violation("a capsule inside a fragmented control message");
    return on_capsule(h.type, payload);
  }
  if (ctrl_in_.size() + payload.size() > wire::kMaxControlSize) return violation("control message above the size limit");
  ctrl_in_.append(reinterpret_cast<const char*>(payload.data()), payload.size());
  if (h.flags & kMsgMoreFragments) return;
  proto::Control m;
  const bool ok = m.ParseFromString(ctrl_in_) && m.msg_case() != proto::Control::MSG_NOT_SET;
  ctrl_in_.clear();
  if (!ok) return violation("malformed control message");
  on_control_message(m);
}

void Endpoint::watch() {
  cq_fd_.assign(cq_.channel_fd());
  cm_fd_.assign(channel_.fd());
  if (ibv_req_notify_cq(cq_.get(), 0) != 0) return fail("ibv_req_notify_cq failed");
  on_cq_ready();
  wait_cm();
}

void Endpoint::wait_cq() {
  cq_fd_.async_wait(asio::posix::descriptor_base::wait_read, [this, alive = alive_](const boost::system::error_code& ec) {
    if (ec || !*alive) return;
    on_cq_ready();
  });
}

void Endpoint::wait_cm() {
  cm_fd_.async_wait(asio::posix::descriptor_base::wait_read, [this, alive = alive_](const boost::system::error_code& ec) {
    if (ec || !*alive) return;
    on_cm_ready();
  });
}

void Endpoint::on_cq_ready() {
  const auto alive = alive_;
  // One notification per arm, so at most one is pending: no second read that says EAGAIN.
  cq_.take_event();
  if (ibv_req_notify_cq(cq_.get(), 0) != 0 && !dead_) fail("ibv_req_notify_cq failed");
  std::array<ibv_wc, 32> wcs;
  for (;;) {
    const int n = cq_.poll(wcs);
    if (n < 0) {
      fail("polling the completion queue: " + errno_text(-n));
      break;
    }
    for (int i = 0; i < n && *alive; ++i) handle(wcs[static_cast<std::size_t>(i)]);
    if (!*alive || n < static_cast<int>(wcs.size())) break;
  }
  if (!*alive) return;
  repost_recvs();
  wait_cq();
}

void Endpoint::on_cm_ready() {
  const auto alive = alive_;
  for (;;) {
    std::optional<rdma::CmEvent> ev;
    try {
      ev = channel_.next(0ms);
    } catch (const std::exception& e) {
      if (!dead_) fail(e.what());
      return;
    }
    if (!ev) break;
    handle_cm_event(*ev);
    if (!*alive) return;
  }
  wait_cm();
}

void Endpoint::handle_cm_event(const rdma::CmEvent& ev) {
  switch (ev.type()) {
    case RDMA_CM_EVENT_ESTABLISHED: {
      established_ = true;
      // rdma_cm leaves the RNR timer at 0, which means the longest wait, 655 ms: a SEND that
      // ever finds no receive posted would stall this queue that long. 12 is 0.64 ms.
      ibv_qp_attr attr{};
      attr.min_rnr_timer = 12;
      if (const int rc = qp_ ? ibv_modify_qp(qp_->get(), &attr, IBV_QP_MIN_RNR_TIMER) : 0; rc != 0) {
        log()->debug("{}: setting the RNR timer: {}", peer_, errno_text(rc));
      }
      return on_established();
    }
    case RDMA_CM_EVENT_DISCONNECTED:
      disconnected_ = true;
      return fail("disconnected by " + peer_);
    case RDMA_CM_EVENT_DEVICE_REMOVAL:
      // The removal waits until this process lets go of the device: every resource on it goes
      // with this endpoint, which its owner destroys once on_dead() has run.
      forget_removed_devices();
      return fail(std::string("the RDMA device ") + (id_.verbs() ? ibv_get_device_name(id_.verbs()->device) : "") +
                  " was removed");
    case RDMA_CM_EVENT_ADDR_CHANGE:
      return fail("the local address of the RDMA port changed (interface down or readdressed)");
    case RDMA_CM_EVENT_TIMEWAIT_EXIT:
      log()->debug("{}: {}", peer_, ev.name());
      return;
    case RDMA_CM_EVENT_REJECTED:
    case RDMA_CM_EVENT_UNREACHABLE:
    case RDMA_CM_EVENT_CONNECT_ERROR:
      return fail(peer_ + ": connection failed: " + cm_event_text(ev));
    case RDMA_CM_EVENT_ADDR_RESOLVED:
    case RDMA_CM_EVENT_ADDR_ERROR:
    case RDMA_CM_EVENT_ROUTE_RESOLVED:
    case RDMA_CM_EVENT_ROUTE_ERROR:
    case RDMA_CM_EVENT_CONNECT_REQUEST:
    case RDMA_CM_EVENT_CONNECT_RESPONSE:
    case RDMA_CM_EVENT_MULTICAST_JOIN:
    case RDMA_CM_EVENT_MULTICAST_ERROR:
      break;
  }
  log()->warn("{}: unexpected RDMA CM event {} on a connected queue; closing it", peer_, cm_event_text(ev));
  fail("unexpected RDMA CM event " + cm_event_text(ev));
}

bool Endpoint::wait_blocking(const std::function<bool()>& done, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  std::array<ibv_wc, 16> wcs;
  while (!done() && !dead_) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) return false;
    int n = 0;
    try {
      n = cq_.wait(wcs, std::min<std::chrono::milliseconds>(left, 100ms));
    } catch (const std::exception& e) {
      fail(e.what());
      break;
    }
    for (int i = 0; i < n; ++i) handle(wcs[static_cast<std::size_t>(i)]);
    repost_recvs();
    // CM events (a disconnect) end the wait too.
    while (!dead_) {
      std::optional<rdma::CmEvent> ev;
      try {
        ev = channel_.next(0ms);
      } catch (const std::exception& e) {
        fail(e.what());
        break;
      }
      if (!ev) break;
      handle_cm_event(*ev);
    }
  }
  return done();
}

}  // namespace rdma_detail

// --- listener ------------------------------------------------------------------------------

struct RdmaListener::Impl : std::enable_shared_from_this<RdmaListener::Impl> {
  Impl(asio::io_context& io, std::string address, std::uint16_t port, OnRequest cb)
      : io(io), address(std::move(address)), port(port), on_request(std::move(cb)), fd(io), retry(io) {}
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
    set_nonblocking(ch.fd());
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
        log()->error("RDMA listener: {}", e.what());
        return;
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
    forget_removed_devices();  // the listening id was the last user of a removed device here
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
    ev = rdma::CmEvent();  // acknowledged before the id moves or goes away
    if (!why.empty()) {
      log()->warn("RDMA connect request from {} rejected: {}", peer, why);
      reject_connect(child.get(), RdmaRejectReason::kBadConnectData);
      return;
    }
    try {
      rdma::EventChannel own;
      child.migrate(own);
      on_request(Request{std::move(own), std::move(child), data, peer});
    } catch (const std::exception& e) {
      log()->warn("RDMA connect request from {}: {}", peer, e.what());
      if (child) reject_connect(child.get(), RdmaRejectReason::kNoResources);
    }
  }

  asio::io_context& io;
  std::string address;
  std::uint16_t port;
  OnRequest on_request;
  rdma::EventChannel channel;
  rdma::CmId id;
  asio::posix::stream_descriptor fd;
  asio::steady_timer retry;
  bool closed = false;
};

RdmaListener::RdmaListener(asio::io_context& io, const std::string& address, std::uint16_t port, OnRequest on_request)
    : impl_(std::make_shared<Impl>(io, address, port, std::move(on_request))) {
  impl_->listen();
}

RdmaListener::~RdmaListener() { close(); }

std::uint16_t RdmaListener::port() const { return impl_->port; }

void RdmaListener::close() {
  impl_->closed = true;
  impl_->retry.cancel();
  if (impl_->fd.is_open()) impl_->fd.release();
  impl_->id = rdma::CmId();
}

// --- initiator -----------------------------------------------------------------------------

namespace {

class RdmaClientConnection final : public ClientConnection, public Endpoint {
 public:
  RdmaClientConnection(asio::io_context& io, rdma::EventChannel ch, rdma::CmId id,
                       std::shared_ptr<RdmaDeviceCache::Device> dev, const RdmaConnectOptions& opts, std::string where)
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
          const auto pdata = ev->private_data();
          if (pdata.size() >= sizeof(RdmaRejectData) && get32(pdata.data()) == kRdmaConnectMagic) {
            throw SystemError("connecting", std::string("rejected: ") +
                                                describe(static_cast<RdmaRejectReason>(get16(pdata.data() + 6))));
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
    if (dead_) throw SystemError("talking to " + where_, dead_reason_, "see the target's log for why");
    reply_.reset();
    if (const int rc = send_control(request); rc != 0) throw SystemError("sending to " + where_, -rc);
    if (!wait_blocking([&] { return reply_.has_value(); }, call_timeout_)) {
      if (dead_) throw SystemError("talking to " + where_, dead_reason_, "see the target's log for why");
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
    const bool data = cmd.opcode == wire::Opcode::kRead || cmd.opcode == wire::Opcode::kWrite;
    if (data && (cmd.length == 0 || cmd.length > max_io_)) return -EINVAL;
    if (inflight_.count(cmd.tag)) return -EEXIST;
    wire::Command c = cmd;
    std::uint32_t slot = kNoSlot;
    if (data) {
      if (const rdma::MemoryRegion* mr = user_region(buffer, cmd.length)) {
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
      dead_reason_ = "closed by the initiator";
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
    fail(msg.has_error() ? "the target closed the queue: " + msg.error().message()
                         : std::string("unexpected control message during the data phase"));
  }

  void on_capsule(wire::FrameType type, std::span<const std::byte> payload) override {
    wire::Completion c;
    if (type != wire::FrameType::kCompletion) return fail("unexpected message type from the target");
    if (payload.size() != wire::kCompletionSize || wire::decode(payload, &c) != wire::DecodeError::kNone) {
      return fail("bad completion from the target");
    }
    const auto it = inflight_.find(c.tag);
    if (it == inflight_.end()) return fail("completion for an unknown tag " + std::to_string(c.tag));
    const Pending p = it->second;
    const bool read_data = p.cmd.opcode == wire::Opcode::kRead && c.status == 0;
    if (read_data ? c.length != p.cmd.length : c.length != 0) return fail("completion length does not match the command");
    if (p.slot != kNoSlot) {
      if (read_data) std::memcpy(p.buffer, bounce_.data() + static_cast<std::size_t>(p.slot) * max_io_, c.length);
      free_slots_.push_back(p.slot);
    }
    inflight_.erase(it);
    if (on_complete_) on_complete_(c);
  }

  void on_send_done(WrKind, std::uint32_t) override {
    while (!dead_ && !backlog_.empty() && sq_room(1)) {
      if (const int rc = post_command(backlog_.front()); rc != 0) return fail("posting a command: " + errno_text(-rc));
      backlog_.pop_front();
    }
  }

  void on_dead(const std::string& reason) override {
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
  std::string dead_reason_ = "the connection is closed";
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

}  // namespace

std::unique_ptr<ClientConnection> rdma_connect(asio::io_context& io, const std::string& host, std::uint16_t port,
                                               const RdmaConnectOptions& opts, std::string* why_not) {
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
    auto dev = std::make_shared<RdmaDeviceCache::Device>(id.verbs(), nullptr);
    auto conn = std::make_unique<RdmaClientConnection>(io, std::move(ch), std::move(id), std::move(dev), opts, where);
    conn->connect(left());
    return conn;
  } catch (const std::exception& e) {
    *why_not = "RDMA connect to " + where + ": " + short_reason(e);
    return nullptr;
  }
}

}  // namespace ibdisk::transport
