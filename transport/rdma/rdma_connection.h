#pragma once
// The RDMA implementation of the transport interface (verbs + RDMA CM), one RC queue pair per
// initiator queue (listen_rdma() and rdma_connector() in connection.h):
// - connect: RDMA CM with RdmaConnectData (32 bytes, versioned) as private data;
// - control messages (protobuf) and capsules travel as SENDs into posted RECV buffers, each
//   with an 8-byte message header (control messages are cut into fragments);
// - a write's data moves by RDMA READ (target reads the initiator's buffer into its slot),
//   a read's data by RDMA WRITE (target writes its slot into the initiator's buffer), chained
//   in one post with the completion's SEND, only the SEND signalled.
// The target's slots are the worker's BufferPool, registered once per (worker, device) and
// also with io_uring, so disk data is never copied. The initiator copies user data into and
// out of its own registered bounce slots (queue_depth x max_io, allocated at connect): the
// Client API takes any buffer, and registering each one would cost a syscall per I/O.
//
// Files: rdma_msg.cc (private data and message framing: pure decoders, fuzzed in tests/fuzz),
// rdma_endpoint.cc (the memlock check, the device cache, the endpoint both roles share),
// rdma_listener.cc, rdma_client.cc (the initiator) and rdma_datapath.cc (the target's command
// path).
// Threads: every object belongs to the io_context thread it was created for.
#include <sys/resource.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>

#include "transport/buffer_pool.h"
#include "transport/connection.h"
#include "transport/rdma/rdma_msg.h"
#include "transport/rdma/verbs.h"
#include "transport/tcp/asio.h"

namespace ibdisk::transport {

// Connect and reject private data, and kRdmaMsgSize: transport/rdma/rdma_msg.h.
void reject_connect(rdma_cm_id* id, RdmaRejectReason reason);

// Empty when `bytes` of memory may be registered (RLIMIT_MEMLOCK high enough, or the process
// has CAP_IPC_LOCK); otherwise one sentence naming `what`, the limit and the exact settings.
std::string memlock_problem(std::size_t bytes, const std::string& what);
std::string memlock_problem(std::size_t bytes, const std::string& what, rlim_t limit, bool cap_ipc_lock);

// Per target worker: for each RDMA device, a protection domain and the registration of the
// worker's BufferPool. A registration is made once and shared by every connection on that
// device; it lives while a connection uses it, so that a removed device can be released.
class RdmaDeviceCache {
 public:
  struct Device {
    Device(ibv_context* ctx, BufferPool* pool);
    rdma::ProtectionDomain pd;
    std::optional<rdma::MemoryRegion> pool_mr;  // the target's slots; none on the initiator
  };
  explicit RdmaDeviceCache(BufferPool& pool) : pool_(pool) {}
  // Setup path: throws SystemError (e.g. the memlock limit) naming the device.
  std::shared_ptr<Device> get(ibv_context* ctx);
  unsigned registrations() const { return registrations_; }

 private:
  BufferPool& pool_;
  std::map<ibv_context*, std::weak_ptr<Device>> devices_;
  unsigned registrations_ = 0;
};

}  // namespace ibdisk::transport
