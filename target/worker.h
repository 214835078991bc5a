#pragma once
// Internal to the target: what every queue shares (options, exports, key, sessions) and what
// each worker thread owns (its loop, buffers, storage engine, RDMA registrations, queues).
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <unordered_map>

#include "target/acl.h"
#include "target/exports.h"
#include "target/server.h"
#include "target/session.h"
#include "target/slot_pool.h"
#include "target/storage.h"
#include "transport/buffer_pool.h"
#include "transport/connection.h"
#include "transport/rdma/rdma_connection.h"

namespace ibdisk::target {

class QueueHandler;

struct Shared {
  explicit Shared(ServerOptions o) : opts(std::move(o)), registry(opts.exports), allow(opts.allow) {}
  ServerOptions opts;
  ExportRegistry registry;
  NetworkAllowList allow;
  std::string key;
  const uid_t uid = ::geteuid();  // without a key, only this user and root may connect
  std::mutex sessions_mu;
  std::map<std::uint64_t, std::shared_ptr<Session>> sessions;
  std::atomic<std::uint64_t> rejected{0}, protocol_errors{0};
  std::chrono::steady_clock::time_point started = std::chrono::steady_clock::now();
  std::atomic<bool> stopping{false};

  // Ends the session unless a queue joined it meanwhile.
  void end_session(std::uint64_t id);
};

// Destroyed in reverse: the engine first (it completes what it still holds, into queues that
// still exist), then the queues (and their connections), then the slot pool, the RDMA
// registrations and the buffers they use.
struct Worker {
  unsigned index = 0;
  boost::asio::io_context io;
  std::unique_ptr<transport::BufferPool> buffers;
  std::unique_ptr<transport::RdmaDeviceCache> rdma;
  std::unique_ptr<SlotPool> slots;
  transport::AcceptContext accept;
  std::unordered_map<QueueHandler*, std::unique_ptr<QueueHandler>> queues;
  std::unique_ptr<StorageEngine> engine;
  std::unique_ptr<boost::asio::steady_timer> stop_timer;
  std::thread thread;
};

}  // namespace ibdisk::target
