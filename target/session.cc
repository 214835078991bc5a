#include "target/session.h"

#include <algorithm>

namespace ibdisk::target {

std::uint32_t Session::open(std::shared_ptr<ExportLease> lease) {
  std::lock_guard lock(mu_);
  const std::uint32_t h = next_handle_++;
  handles_.emplace(h, std::move(lease));
  return h;
}

bool Session::close(std::uint32_t handle) {
  std::shared_ptr<ExportLease> gone;  // released outside the lock, once in-flight I/O lets go
  {
    std::lock_guard lock(mu_);
    const auto it = handles_.find(handle);
    if (it == handles_.end()) return false;
    gone = std::move(it->second);
    handles_.erase(it);
    handles_version_.fetch_add(1, std::memory_order_release);
  }
  return true;
}

std::shared_ptr<ExportLease> Session::find(std::uint32_t handle) const {
  std::lock_guard lock(mu_);
  const auto it = handles_.find(handle);
  return it == handles_.end() ? nullptr : it->second;
}

std::vector<std::string> Session::export_names() const {
  std::lock_guard lock(mu_);
  std::vector<std::string> out;
  for (const auto& [h, lease] : handles_) out.push_back(lease->name() + (lease->writable() ? "" : " (ro)"));
  return out;
}

std::uint32_t Session::add_queue(QueueRef ref) {
  std::lock_guard lock(mu_);
  const std::uint32_t id = next_queue_++;
  queues_.emplace(id, Queue{std::move(ref), {}});
  return id;
}

bool Session::remove_queue(std::uint32_t id) {
  std::vector<std::function<void()>> waiting;
  bool last = false;
  {
    std::lock_guard lock(mu_);
    const auto it = queues_.find(id);
    if (it == queues_.end()) return false;
    waiting = std::move(it->second.on_gone);
    queues_.erase(it);
    last = queues_.empty();
  }
  for (auto& f : waiting) f();
  return last;
}

void Session::fence(std::uint32_t id, std::function<void()> done) {
  std::function<void()> fence;
  boost::asio::io_context* io = nullptr;
  {
    std::lock_guard lock(mu_);
    const auto it = queues_.find(id);
    if (it != queues_.end()) {
      it->second.on_gone.push_back(std::move(done));
      fence = it->second.ref.fence;
      io = it->second.ref.io;
    }
  }
  if (!io) return done();  // gone already, with all of its I/O
  boost::asio::post(*io, std::move(fence));
}

std::vector<std::string> Session::transports() const {
  std::lock_guard lock(mu_);
  std::vector<std::string> out;
  for (const auto& [id, q] : queues_) out.push_back(q.ref.transport);
  return out;
}

std::vector<std::uint64_t> Session::idle_ms() const {
  const auto now = std::chrono::duration_cast<std::chrono::milliseconds>(
                       std::chrono::steady_clock::now().time_since_epoch()).count();
  std::lock_guard lock(mu_);
  std::vector<std::uint64_t> out;
  for (const auto& [id, q] : queues_) {
    const std::int64_t heard = q.ref.last_heard ? q.ref.last_heard->load(std::memory_order_relaxed) : now;
    out.push_back(static_cast<std::uint64_t>(std::max<std::int64_t>(0, now - heard)));
  }
  return out;
}

bool Session::has_queues() const {
  std::lock_guard lock(mu_);
  return !queues_.empty();
}

}  // namespace ibdisk::target
