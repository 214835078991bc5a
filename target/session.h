#pragma once
// A session: one initiator's queues, its open exports (handles) and its secret. Joining needs
// proof of the secret, which only the session's first Welcome carried; closing a handle
// revokes it on every queue at once (each queue's handle cache checks the session's version).
// A queue has an id in its session that is never reused; a queue that replaces a lost one
// names it, and the target ends the old one, and lets its storage I/O finish, first.
// Threads: any; every member is behind mu_ or atomic.
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "target/exports.h"
#include "transport/tcp/asio.h"

namespace ibdisk::target {

class Session {
 public:
  Session(std::uint64_t id, std::string secret, std::string peer, std::string client_name)
      : id_(id), secret_(std::move(secret)), peer_(std::move(peer)), client_name_(std::move(client_name)) {}

  std::uint64_t id() const { return id_; }
  const std::string& secret() const { return secret_; }
  const std::string& peer() const { return peer_; }
  const std::string& client_name() const { return client_name_; }

  // --- handles ---
  std::uint32_t open(std::shared_ptr<ExportLease> lease);
  // False when no export has that handle.
  bool close(std::uint32_t handle);
  std::shared_ptr<ExportLease> find(std::uint32_t handle) const;
  // Changes whenever a handle closes: queues drop their caches then.
  std::uint64_t handles_version() const { return handles_version_.load(std::memory_order_acquire); }
  std::vector<std::string> export_names() const;  // for stats: "name" or "name (ro)"

  // --- queues ---
  // How another worker ends a queue: `fence` runs on `io`, the queue's own thread.
  struct QueueRef {
    std::string transport;
    boost::asio::io_context* io = nullptr;
    std::function<void()> fence;
    // When the queue last received anything (steady_clock, ms), kept by its thread; for stats.
    std::shared_ptr<const std::atomic<std::int64_t>> last_heard;
  };
  std::uint32_t add_queue(QueueRef ref);  // its id
  // The queue is gone and none of its I/O is left: runs what waited for it.
  // Returns true when it was the session's last queue.
  bool remove_queue(std::uint32_t id);
  // Ends queue `id` if it still lives and calls `done` once it is gone (at once when it is).
  void fence(std::uint32_t id, std::function<void()> done);
  std::vector<std::string> transports() const;
  // Per queue, in the order of transports(): ms since it last received anything.
  std::vector<std::uint64_t> idle_ms() const;
  bool has_queues() const;

  std::atomic<std::uint64_t> reads{0}, writes{0}, bytes_read{0}, bytes_written{0}, errors{0}, heartbeats{0};

 private:
  const std::uint64_t id_;
  const std::string secret_;
  const std::string peer_;
  const std::string client_name_;
  mutable std::mutex mu_;
  std::map<std::uint32_t, std::shared_ptr<ExportLease>> handles_;
  std::uint32_t next_handle_ = 1;
  std::atomic<std::uint64_t> handles_version_{0};
  struct Queue {
    QueueRef ref;
    std::vector<std::function<void()>> on_gone;
  };
  std::map<std::uint32_t, Queue> queues_;
  std::uint32_t next_queue_ = 1;
};

}  // namespace ibdisk::target
