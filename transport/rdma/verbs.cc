#include "transport/rdma/verbs.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/resource.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "common/error.h"
#include "common/log.h"

namespace ibdisk::rdma {
namespace {

auto log() {
  static auto l = ibdisk::logger("rdma");
  return l;
}

// Waits until fd is readable. Returns false on timeout.
bool wait_readable(int fd, std::chrono::milliseconds timeout, const char* what) {
  pollfd pfd{fd, POLLIN, 0};
  for (;;) {
    const int n = ::poll(&pfd, 1, static_cast<int>(timeout.count()));
    if (n > 0) return true;
    if (n == 0) return false;
    if (errno != EINTR) throw SystemError(std::string("poll(") + what + ")", errno);
  }
}

const char* kNoDeviceHint =
    "is the address on an RDMA-capable interface (ib0, or a RoCE/Soft-RoCE netdev)? "
    "`ibdisk setup doctor` checks the fabric";

}  // namespace

DeviceProbe probe_devices() {
  DeviceProbe probe;
  int n = 0;
  errno = 0;
  ibv_device** list = ibv_get_device_list(&n);
  if (list == nullptr) {
    const int err = errno;
    probe.unavailable_reason =
        err == ENOSYS ? "this kernel has no RDMA support (ibv_get_device_list: " + errno_text(err) + ")"
                      : "ibv_get_device_list failed: " + errno_text(err);
    return probe;
  }
  for (int i = 0; i < n; ++i) probe.devices.emplace_back(ibv_get_device_name(list[i]));
  ibv_free_device_list(list);
  if (probe.devices.empty()) {
    probe.unavailable_reason =
        "no RDMA device found (load the driver, e.g. mlx4_ib/mlx5_ib, or add Soft-RoCE with "
        "`rdma link add rxe0 type rxe netdev IFACE`)";
  }
  return probe;
}

CmEvent& CmEvent::operator=(CmEvent&& o) noexcept {
  if (this != &o) {
    this->~CmEvent();
    ev_ = std::exchange(o.ev_, nullptr);
  }
  return *this;
}

CmEvent::~CmEvent() {
  if (ev_ && rdma_ack_cm_event(ev_) != 0) log()->warn("rdma_ack_cm_event: {}", errno_text(errno));
}

std::span<const std::byte> CmEvent::private_data() const {
  const auto& c = ev_->param.conn;
  return {static_cast<const std::byte*>(c.private_data), c.private_data ? c.private_data_len : 0u};
}

EventChannel::EventChannel() : ch_(rdma_create_event_channel()) {
  if (!ch_) {
    throw SystemError("rdma_create_event_channel", errno,
                      "is the rdma_ucm module loaded and /dev/infiniband/rdma_cm accessible?");
  }
}

EventChannel& EventChannel::operator=(EventChannel&& o) noexcept {
  if (this != &o) {
    this->~EventChannel();
    ch_ = std::exchange(o.ch_, nullptr);
  }
  return *this;
}

EventChannel::~EventChannel() {
  if (ch_) rdma_destroy_event_channel(ch_);
}

std::optional<CmEvent> EventChannel::next(std::chrono::milliseconds timeout) {
  // librdmacm consumes some events itself (a connect request whose new id it could not set up,
  // say, when the device is going away) and then reads on: on a non-blocking channel that read
  // says EAGAIN. That is "no event yet", not a broken channel: wait again for what is left.
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    const auto left = std::max(std::chrono::milliseconds(0), std::chrono::duration_cast<std::chrono::milliseconds>(
                                                                 deadline - std::chrono::steady_clock::now()));
    if (!wait_readable(ch_->fd, left, "rdma event channel")) return std::nullopt;
    rdma_cm_event* ev = nullptr;
    if (rdma_get_cm_event(ch_, &ev) == 0) return CmEvent(ev);
    if (errno != EAGAIN) throw SystemError("rdma_get_cm_event", errno);
  }
}

CmEvent EventChannel::expect(rdma_cm_event_type expected, std::chrono::milliseconds timeout,
                             const std::string& what, const std::string& hint) {
  auto ev = next(timeout);
  if (!ev) {
    throw SystemError(what, std::string("no ") + rdma_event_str(expected) + " within " +
                                std::to_string(timeout.count()) + " ms",
                      hint, ETIMEDOUT);
  }
  if (ev->type() != expected) {
    const int status = ev->status();
    std::string reason = std::string("got ") + ev->name() + " instead of " + rdma_event_str(expected);
    if (ev->type() == RDMA_CM_EVENT_REJECTED) {
      reason += status == 8 ? " (nobody listens on that port)" : " (status " + std::to_string(status) + ")";
    } else if (status) {
      reason += " (" + errno_text(status < 0 ? -status : status) + ")";
    }
    throw SystemError(what, reason, hint, status < 0 ? -status : 0);
  }
  return std::move(*ev);
}

CmId::CmId(EventChannel& channel, void* context) {
  if (rdma_create_id(channel.get(), &id_, context, RDMA_PS_TCP) != 0) {
    throw SystemError("rdma_create_id", errno, "is the rdma_ucm module loaded?");
  }
}

CmId& CmId::operator=(CmId&& o) noexcept {
  if (this != &o) {
    this->~CmId();
    id_ = std::exchange(o.id_, nullptr);
  }
  return *this;
}

CmId::~CmId() {
  if (id_ && rdma_destroy_id(id_) != 0) log()->warn("rdma_destroy_id: {}", errno_text(errno));
}

void CmId::bind(const sockaddr* addr, const std::string& printable) {
  if (rdma_bind_addr(id_, const_cast<sockaddr*>(addr)) != 0) {
    const int err = errno;
    throw SystemError("rdma_bind_addr(" + printable + ")", err,
                      err == EADDRINUSE ? "another process listens on this port; pick another "
                                          "with --port"
                                        : kNoDeviceHint);
  }
}

void CmId::listen(int backlog) {
  if (rdma_listen(id_, backlog) != 0) throw SystemError("rdma_listen", errno);
}

void CmId::resolve_addr(const sockaddr* src, const sockaddr* dst, const std::string& printable,
                        std::chrono::milliseconds timeout) {
  if (rdma_resolve_addr(id_, const_cast<sockaddr*>(src), const_cast<sockaddr*>(dst),
                        static_cast<int>(timeout.count())) != 0) {
    throw SystemError("rdma_resolve_addr(" + printable + ")", errno, kNoDeviceHint);
  }
}

void CmId::resolve_route(std::chrono::milliseconds timeout) {
  if (rdma_resolve_route(id_, static_cast<int>(timeout.count())) != 0) {
    throw SystemError("rdma_resolve_route", errno,
                      "on InfiniBand a subnet manager must be running (opensm)");
  }
}

void CmId::migrate(EventChannel& channel) {
  if (rdma_migrate_id(id_, channel.get()) != 0) throw SystemError("rdma_migrate_id", errno);
}

ProtectionDomain::ProtectionDomain(ibv_context* ctx) : pd_(ibv_alloc_pd(ctx)) {
  if (!pd_) throw SystemError("ibv_alloc_pd", errno);
}

ProtectionDomain& ProtectionDomain::operator=(ProtectionDomain&& o) noexcept {
  if (this != &o) {
    this->~ProtectionDomain();
    pd_ = std::exchange(o.pd_, nullptr);
  }
  return *this;
}

ProtectionDomain::~ProtectionDomain() {
  if (pd_) {
    if (const int rc = ibv_dealloc_pd(pd_); rc != 0) log()->warn("ibv_dealloc_pd: {}", errno_text(rc));
  }
}

CompletionQueue::CompletionQueue(ibv_context* ctx, int depth) : channel_(ibv_create_comp_channel(ctx)) {
  if (!channel_) throw SystemError("ibv_create_comp_channel", errno);
  cq_ = ibv_create_cq(ctx, depth, this, channel_, 0);
  if (!cq_) {
    const int err = errno;
    ibv_destroy_comp_channel(channel_);
    channel_ = nullptr;
    throw SystemError("ibv_create_cq(depth " + std::to_string(depth) + ")", err);
  }
  // Non-blocking once here, not a fcntl() pair per wakeup in take_event(); wait() polls first.
  const int flags = ::fcntl(channel_->fd, F_GETFL);
  if (flags >= 0) ::fcntl(channel_->fd, F_SETFL, flags | O_NONBLOCK);
}

CompletionQueue& CompletionQueue::operator=(CompletionQueue&& o) noexcept {
  if (this != &o) {
    this->~CompletionQueue();
    channel_ = std::exchange(o.channel_, nullptr);
    cq_ = std::exchange(o.cq_, nullptr);
    unacked_events_ = std::exchange(o.unacked_events_, 0);
  }
  return *this;
}

CompletionQueue::~CompletionQueue() {
  if (cq_) {
    if (unacked_events_) ibv_ack_cq_events(cq_, unacked_events_);
    if (const int rc = ibv_destroy_cq(cq_); rc != 0) log()->warn("ibv_destroy_cq: {}", errno_text(rc));
  }
  if (channel_ && ibv_destroy_comp_channel(channel_) != 0) {
    log()->warn("ibv_destroy_comp_channel: {}", errno_text(errno));
  }
}

void CompletionQueue::arm() {
  if (const int rc = ibv_req_notify_cq(cq_, 0); rc != 0) throw SystemError("ibv_req_notify_cq", rc);
}

int CompletionQueue::wait(std::span<ibv_wc> wcs, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    int n = poll(wcs);
    if (n != 0) return n;
    arm();
    n = poll(wcs);  // a completion may have arrived before the arm
    if (n != 0) return n;
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0 || !wait_readable(channel_->fd, left, "completion channel")) return 0;
    ibv_cq* ev_cq = nullptr;
    void* ev_ctx = nullptr;
    if (ibv_get_cq_event(channel_, &ev_cq, &ev_ctx) != 0) throw SystemError("ibv_get_cq_event", errno);
    if (++unacked_events_ >= 64) {
      ibv_ack_cq_events(cq_, unacked_events_);
      unacked_events_ = 0;
    }
  }
}

bool CompletionQueue::take_event() {
  ibv_cq* ev_cq = nullptr;
  void* ev_ctx = nullptr;
  if (ibv_get_cq_event(channel_, &ev_cq, &ev_ctx) != 0) return false;
  if (++unacked_events_ >= 64) {
    ibv_ack_cq_events(cq_, unacked_events_);
    unacked_events_ = 0;
  }
  return true;
}

QueuePair::QueuePair(CmId& id, ProtectionDomain& pd, CompletionQueue& cq, unsigned send_depth,
                     unsigned recv_depth, unsigned max_sge, unsigned max_inline) {
  ibv_qp_init_attr attr{};
  attr.send_cq = cq.get();
  attr.recv_cq = cq.get();
  attr.qp_type = IBV_QPT_RC;
  attr.cap.max_send_wr = send_depth;
  attr.cap.max_recv_wr = recv_depth;
  attr.cap.max_send_sge = max_sge;
  attr.cap.max_recv_sge = max_sge;
  attr.cap.max_inline_data = max_inline;
  attr.sq_sig_all = 0;
  if (rdma_create_qp(id.get(), pd.get(), &attr) != 0) {
    throw SystemError("rdma_create_qp(send " + std::to_string(send_depth) + ", recv " +
                          std::to_string(recv_depth) + ")",
                      errno, "the device may not support this queue depth; try a smaller --queue-depth");
  }
  id_ = id.get();
}

QueuePair& QueuePair::operator=(QueuePair&& o) noexcept {
  if (this != &o) {
    this->~QueuePair();
    id_ = std::exchange(o.id_, nullptr);
  }
  return *this;
}

QueuePair::~QueuePair() {
  if (id_ && id_->qp) rdma_destroy_qp(id_);
}

MemoryRegion::MemoryRegion(ProtectionDomain& pd, void* addr, std::size_t len, int access)
    : mr_(ibv_reg_mr(pd.get(), addr, len, access)) {
  if (!mr_) {
    const int err = errno;
    throw SystemError("ibv_reg_mr(" + std::to_string(len) + " bytes)", err,
                      err == ENOMEM || err == EPERM || err == EAGAIN ? memlock_hint(len) : "");
  }
}

MemoryRegion& MemoryRegion::operator=(MemoryRegion&& o) noexcept {
  if (this != &o) {
    this->~MemoryRegion();
    mr_ = std::exchange(o.mr_, nullptr);
  }
  return *this;
}

MemoryRegion::~MemoryRegion() {
  if (mr_) {
    if (const int rc = ibv_dereg_mr(mr_); rc != 0) log()->warn("ibv_dereg_mr: {}", errno_text(rc));
  }
}

void RegisteredBuffer::Free::operator()(std::byte* p) const noexcept { std::free(p); }

namespace {
std::byte* aligned_alloc_or_throw(std::size_t len) {
  void* p = nullptr;
  if (const int rc = ::posix_memalign(&p, 4096, len ? len : 1); rc != 0) {
    throw SystemError("posix_memalign(" + std::to_string(len) + ")", rc);
  }
  std::memset(p, 0, len);
  return static_cast<std::byte*>(p);
}
}  // namespace

RegisteredBuffer::RegisteredBuffer(ProtectionDomain& pd, std::size_t len, int access)
    : len_(len), mem_(aligned_alloc_or_throw(len)), mr_(pd, mem_.get(), len, access) {}

namespace {
const char* width_name(int w) {
  switch (w) {
    case 1: return "1X";
    case 2: return "4X";
    case 4: return "8X";
    case 8: return "12X";
    case 16: return "2X";
    default: return "?X";
  }
}
int width_lanes(int w) {
  switch (w) {
    case 1: return 1;
    case 2: return 4;
    case 4: return 8;
    case 8: return 12;
    case 16: return 2;
    default: return 0;
  }
}
// Signalling rate per lane in Gb/s, and the generation's name.
std::pair<double, const char*> speed_of(int s) {
  switch (s) {
    case 1: return {2.5, "SDR"};
    case 2: return {5.0, "DDR"};
    case 4: return {10.0, "QDR"};
    case 8: return {10.0, "FDR10"};
    case 16: return {14.0, "FDR"};
    case 32: return {25.0, "EDR"};
    case 64: return {50.0, "HDR"};
    case 128: return {100.0, "NDR"};
    default: return {0.0, "?"};
  }
}
}  // namespace

PortInfo query_port(ibv_context* ctx, int port) {
  ibv_port_attr attr{};
  if (const int rc = ibv_query_port(ctx, static_cast<uint8_t>(port), &attr); rc != 0) {
    throw SystemError("ibv_query_port(" + std::string(ibv_get_device_name(ctx->device)) + ", " +
                          std::to_string(port) + ")",
                      rc);
  }
  PortInfo info;
  info.device = ibv_get_device_name(ctx->device);
  info.port = port;
  info.state = ibv_port_state_str(attr.state);
  for (auto& c : info.state) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  info.link_layer = attr.link_layer == IBV_LINK_LAYER_ETHERNET ? "Ethernet" : "InfiniBand";
  info.active_mtu = 128 << attr.active_mtu;  // IBV_MTU_256 == 1
  const auto [lane, gen] = speed_of(attr.active_speed);
  const double total = lane * width_lanes(attr.active_width);
  char buf[64];
  std::snprintf(buf, sizeof buf, "%s %s (%g Gb/s)", width_name(attr.active_width), gen, total);
  info.rate = buf;
  return info;
}

std::string memlock_hint(std::size_t bytes_needed) {
  rlimit lim{};
  ::getrlimit(RLIMIT_MEMLOCK, &lim);
  const auto kib = [](rlim_t v) {
    return v == RLIM_INFINITY ? std::string("unlimited") : std::to_string(v / 1024) + " KiB";
  };
  return "locked-memory limit (RLIMIT_MEMLOCK) is " + kib(lim.rlim_cur) + ", " +
         std::to_string((bytes_needed + 1023) / 1024) +
         " KiB more are needed: run `ulimit -l unlimited` as root, or set `* - memlock unlimited` "
         "in /etc/security/limits.conf, or LimitMEMLOCK=infinity in the systemd unit";
}

}  // namespace ibdisk::rdma
