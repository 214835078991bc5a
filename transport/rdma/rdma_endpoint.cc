// RDMA transport, the part both roles share: the reject, the memlock check, the device cache
// and the endpoint (completion loop, control messages, CM events). The listener, the initiator
// and the target's command path have files of their own; the bytes on the wire (private data,
// message framing) are decoded in rdma_msg.cc.
#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <netdb.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <fstream>
#include <mutex>
#include <set>
#include <thread>
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

void reject_connect(rdma_cm_id* id, RdmaRejectReason reason) {
  const auto pd = encode(reason);
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

namespace {

// The user-verbs devices the kernel lists (uverbs0, ... with their RDMA device's name).
std::set<std::string> verbs_devices() {
  std::set<std::string> out;
  const std::string dir = "/sys/class/infiniband_verbs";
  DIR* d = ::opendir(dir.c_str());
  if (!d) return out;
  while (const dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    if (name.rfind("uverbs", 0) != 0) continue;
    std::string ibdev;
    std::ifstream(dir + "/" + name + "/ibdev") >> ibdev;
    out.insert(name + "=" + ibdev);
  }
  ::closedir(d);
  return out;
}

}  // namespace

// That price: a device no CM id of ours is on holds a context too, and nothing tells us of its
// removal (DEVICE_REMOVAL goes to CM ids), so the kernel's removal would wait for as long as
// this process runs. Its uverbs entry leaves sysfs before the kernel waits for the contexts to
// close (ib_uverbs_remove_one): a thread looks once a second and, when an entry went, has
// librdmacm look too, which closes the context of a removed device with no CM id left.
void watch_device_removals() {
  static std::once_flag once;
  std::call_once(once, [] {
    if (verbs_devices().empty()) return;  // no RDMA here (or no user verbs): nothing to watch
    std::thread([] {
      std::set<std::string> seen = verbs_devices();
      for (;;) {
        std::this_thread::sleep_for(1s);
        std::set<std::string> now = verbs_devices();
        const bool gone = !std::includes(now.begin(), now.end(), seen.begin(), seen.end());
        if (gone) {
          log()->debug("an RDMA device went: letting librdmacm close its context");
          forget_removed_devices();
        }
        seen = std::move(now);
      }
    }).detach();
  });
}


std::optional<boost::asio::ip::address> sockaddr_address(const sockaddr* sa) {
  std::string text = sockaddr_text(sa);
  const auto colon = text.rfind(':');
  if (colon == std::string::npos) return std::nullopt;
  text.resize(colon);
  if (!text.empty() && text.front() == '[') text = text.substr(1, text.size() - 2);
  boost::system::error_code ec;
  const auto a = boost::asio::ip::make_address(text, ec);
  if (ec) return std::nullopt;
  return a;
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
  if (const int rc = qp_->post_recv(recv_wrs_.data()); rc != 0) fail(CloseCode::kNetwork, "posting receives: " + errno_text(rc));
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
  if (rc != 0) fail(CloseCode::kNetwork, "posting to the send queue: " + errno_text(rc));
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
      return fail(CloseCode::kNetwork, "posting a control message: " + errno_text(-rc));
    }
    ctrl_free_.pop_back();
    ctrl_out_.pop_front();
  }
}

void Endpoint::fail(CloseCode code, const std::string& detail) {
  if (dead_) return;
  dead_ = true;
  ctrl_out_.clear();
  disconnect();
  on_dead(CloseReason{code, detail});
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
      fail(CloseCode::kNetwork, std::string(what) + " failed: " + ibv_wc_status_str(wc.status) +
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
  const Received r = receive(std::span<const std::byte>(copy.data(), bytes), &ctrl_in_);
  switch (r.kind) {
    case Received::Kind::kBad: return violation(r.error);
    case Received::Kind::kCapsule: return on_capsule(r.type, r.payload);
    case Received::Kind::kFragment: return;
    case Received::Kind::kControl: break;
  }
  proto::Control m;
  const bool ok = m.ParseFromString(ctrl_in_) && m.msg_case() != proto::Control::MSG_NOT_SET;
  ctrl_in_.clear();
  if (!ok) return violation("malformed control message");
  on_control_message(m);
}

void Endpoint::watch() {
  cq_fd_.assign(cq_.channel_fd());
  cm_fd_.assign(channel_.fd());
  if (ibv_req_notify_cq(cq_.get(), 0) != 0) return fail(CloseCode::kNetwork, "ibv_req_notify_cq failed");
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
  if (ibv_req_notify_cq(cq_.get(), 0) != 0 && !dead_) fail(CloseCode::kNetwork, "ibv_req_notify_cq failed");
  std::array<ibv_wc, 32> wcs;
  for (;;) {
    const int n = cq_.poll(wcs);
    if (n < 0) {
      fail(CloseCode::kNetwork, "polling the completion queue: " + errno_text(-n));
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
      if (!dead_) fail(CloseCode::kNetwork, e.what());
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
      return fail(CloseCode::kPeerClosed, "disconnected by " + peer_);
    case RDMA_CM_EVENT_DEVICE_REMOVAL:
      // The removal waits until this process lets go of the device: every resource on it goes
      // with this endpoint, which its owner destroys once on_dead() has run.
      forget_removed_devices();
      return fail(CloseCode::kDeviceRemoved, std::string("the RDMA device ") + (id_.verbs() ? ibv_get_device_name(id_.verbs()->device) : "") +
                  " was removed");
    case RDMA_CM_EVENT_ADDR_CHANGE:
      return fail(CloseCode::kDeviceRemoved, "the local address of the RDMA port changed (interface down or readdressed)");
    case RDMA_CM_EVENT_TIMEWAIT_EXIT:
      log()->debug("{}: {}", peer_, ev.name());
      return;
    case RDMA_CM_EVENT_REJECTED:
    case RDMA_CM_EVENT_UNREACHABLE:
    case RDMA_CM_EVENT_CONNECT_ERROR:
      return fail(CloseCode::kNetwork, peer_ + ": connection failed: " + cm_event_text(ev));
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
  fail(CloseCode::kProtocol, "unexpected RDMA CM event " + cm_event_text(ev));
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
      fail(CloseCode::kNetwork, e.what());
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
        fail(CloseCode::kNetwork, e.what());
        break;
      }
      if (!ev) break;
      handle_cm_event(*ev);
    }
  }
  return done();
}

}  // namespace rdma_detail

}  // namespace ibdisk::transport
