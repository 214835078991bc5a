#pragma once
// Move-only RAII owners for the verbs and RDMA CM objects ibdisk uses.
//
// Ownership follows the verbs hierarchy: an EventChannel outlives its CmIds; a CmId outlives
// its QueuePair; a ProtectionDomain outlives its MemoryRegions and QueuePairs; a
// CompletionQueue outlives the QueuePairs that use it. Declare members parent first so that
// C++ destroys children first. Destructors log failures and never throw. Every constructor
// that fails throws ibdisk::SystemError naming the call, errno's text and a hint.
#include <rdma/rdma_cma.h>
#include <infiniband/verbs.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace ibdisk::rdma {

// Why RDMA is not usable on this host, or empty if at least one device exists.
// ibv_get_device_list() returns NULL with ENOSYS on a kernel without RDMA support: that is
// "no RDMA here", not an error.
struct DeviceProbe {
  std::vector<std::string> devices;  // names, e.g. "mlx4_0", "rxe0"
  std::string unavailable_reason;    // set when devices is empty
};
DeviceProbe probe_devices();

// A received CM event, acknowledged on destruction.
class CmEvent {
 public:
  CmEvent() = default;
  explicit CmEvent(rdma_cm_event* ev) : ev_(ev) {}
  CmEvent(CmEvent&& o) noexcept : ev_(std::exchange(o.ev_, nullptr)) {}
  CmEvent& operator=(CmEvent&& o) noexcept;
  ~CmEvent();

  rdma_cm_event_type type() const { return ev_->event; }
  int status() const { return ev_->status; }
  rdma_cm_id* id() const { return ev_->id; }
  rdma_cm_id* listen_id() const { return ev_->listen_id; }
  const rdma_conn_param& conn() const { return ev_->param.conn; }
  std::span<const std::byte> private_data() const;
  const char* name() const { return rdma_event_str(ev_->event); }

 private:
  rdma_cm_event* ev_ = nullptr;
};

class EventChannel {
 public:
  EventChannel();  // rdma_create_event_channel
  EventChannel(EventChannel&& o) noexcept : ch_(std::exchange(o.ch_, nullptr)) {}
  EventChannel& operator=(EventChannel&& o) noexcept;
  ~EventChannel();

  rdma_event_channel* get() const { return ch_; }
  int fd() const { return ch_->fd; }

  // Waits for the next event. Returns nullopt on timeout. Throws on channel failure.
  std::optional<CmEvent> next(std::chrono::milliseconds timeout);

  // Waits for the next event and requires it to be `expected`; otherwise throws a SystemError
  // naming `what`, the event actually received, its status and `hint`.
  CmEvent expect(rdma_cm_event_type expected, std::chrono::milliseconds timeout,
                 const std::string& what, const std::string& hint);

 private:
  rdma_event_channel* ch_ = nullptr;
};

class CmId {
 public:
  CmId() = default;
  // rdma_create_id on the channel, RDMA_PS_TCP (reliable connected).
  explicit CmId(EventChannel& channel, void* context = nullptr);
  // Adopts an id created by the CM (the id carried by a CONNECT_REQUEST event).
  static CmId adopt(rdma_cm_id* id) { CmId c; c.id_ = id; return c; }
  CmId(CmId&& o) noexcept : id_(std::exchange(o.id_, nullptr)) {}
  CmId& operator=(CmId&& o) noexcept;
  ~CmId();

  rdma_cm_id* get() const { return id_; }
  rdma_cm_id* operator->() const { return id_; }
  explicit operator bool() const { return id_ != nullptr; }
  // The verbs device this id is bound to, or nullptr before address resolution / bind.
  ibv_context* verbs() const { return id_ ? id_->verbs : nullptr; }

  void bind(const sockaddr* addr, const std::string& printable);
  void listen(int backlog);
  void resolve_addr(const sockaddr* src, const sockaddr* dst, const std::string& printable,
                    std::chrono::milliseconds timeout);
  void resolve_route(std::chrono::milliseconds timeout);
  // Moves the id to another channel (e.g. a connection's own channel after accept).
  void migrate(EventChannel& channel);

 private:
  rdma_cm_id* id_ = nullptr;
};

class ProtectionDomain {
 public:
  explicit ProtectionDomain(ibv_context* ctx);
  ProtectionDomain(ProtectionDomain&& o) noexcept : pd_(std::exchange(o.pd_, nullptr)) {}
  ProtectionDomain& operator=(ProtectionDomain&& o) noexcept;
  ~ProtectionDomain();
  ibv_pd* get() const { return pd_; }

 private:
  ibv_pd* pd_ = nullptr;
};

// A completion queue together with the completion channel that signals it.
class CompletionQueue {
 public:
  CompletionQueue(ibv_context* ctx, int depth);
  CompletionQueue(CompletionQueue&& o) noexcept
      : channel_(std::exchange(o.channel_, nullptr)), cq_(std::exchange(o.cq_, nullptr)) {}
  CompletionQueue& operator=(CompletionQueue&& o) noexcept;
  ~CompletionQueue();

  ibv_cq* get() const { return cq_; }
  int channel_fd() const { return channel_->fd; }

  // Arms notification for the next completion.
  void arm();
  // Polls up to wcs.size() completions without blocking. Returns how many, or -errno.
  int poll(std::span<ibv_wc> wcs) { return ibv_poll_cq(cq_, static_cast<int>(wcs.size()), wcs.data()); }
  // Polls until at least one completion arrives or timeout passes; sleeps on the channel
  // between polls. Returns the count (0 on timeout). Throws on channel failure.
  int wait(std::span<ibv_wc> wcs, std::chrono::milliseconds timeout);
  // Datapath, for a channel fd watched by an event loop: consumes one pending notification
  // without blocking (the channel is non-blocking) and acknowledges them in batches.
  // Returns false when none was pending.
  bool take_event();

 private:
  ibv_comp_channel* channel_ = nullptr;
  ibv_cq* cq_ = nullptr;
  unsigned unacked_events_ = 0;
};

// A reliable-connected QP created on a CM id (rdma_create_qp) and destroyed with it.
class QueuePair {
 public:
  QueuePair(CmId& id, ProtectionDomain& pd, CompletionQueue& cq, unsigned send_depth,
            unsigned recv_depth, unsigned max_sge = 1, unsigned max_inline = 0);
  QueuePair(QueuePair&& o) noexcept : id_(std::exchange(o.id_, nullptr)) {}
  QueuePair& operator=(QueuePair&& o) noexcept;
  ~QueuePair();

  ibv_qp* get() const { return id_->qp; }
  // Datapath: return 0 or errno (never throw).
  int post_send(ibv_send_wr* wr) {
    ibv_send_wr* bad = nullptr;
    return ibv_post_send(id_->qp, wr, &bad);
  }
  int post_recv(ibv_recv_wr* wr) {
    ibv_recv_wr* bad = nullptr;
    return ibv_post_recv(id_->qp, wr, &bad);
  }

 private:
  rdma_cm_id* id_ = nullptr;
};

class MemoryRegion {
 public:
  MemoryRegion(ProtectionDomain& pd, void* addr, std::size_t len, int access);
  MemoryRegion(MemoryRegion&& o) noexcept : mr_(std::exchange(o.mr_, nullptr)) {}
  MemoryRegion& operator=(MemoryRegion&& o) noexcept;
  ~MemoryRegion();

  ibv_mr* get() const { return mr_; }
  std::uint32_t lkey() const { return mr_->lkey; }
  std::uint32_t rkey() const { return mr_->rkey; }
  void* addr() const { return mr_->addr; }
  std::size_t length() const { return mr_->length; }

 private:
  ibv_mr* mr_ = nullptr;
};

// Page-aligned memory, registered with a PD. Members in parent-first order: the memory
// outlives its registration.
class RegisteredBuffer {
 public:
  RegisteredBuffer(ProtectionDomain& pd, std::size_t len, int access);
  std::byte* data() const { return mem_.get(); }
  std::size_t size() const { return len_; }
  std::span<std::byte> span() const { return {mem_.get(), len_}; }
  const MemoryRegion& mr() const { return mr_; }

 private:
  struct Free { void operator()(std::byte* p) const noexcept; };
  std::size_t len_;
  std::unique_ptr<std::byte, Free> mem_;
  MemoryRegion mr_;
};

// Port facts printed by the self-test and used by diagnostics.
struct PortInfo {
  std::string device;
  int port = 0;
  std::string state;       // "ACTIVE", "INIT", ...
  std::string link_layer;  // "InfiniBand" or "Ethernet"
  int active_mtu = 0;      // bytes
  std::string rate;        // e.g. "4X QDR (40 Gb/s)"
};
PortInfo query_port(ibv_context* ctx, int port);

// Human hint for memlock failures (ENOMEM / EPERM from ibv_reg_mr).
std::string memlock_hint(std::size_t bytes_needed);

}  // namespace ibdisk::rdma
