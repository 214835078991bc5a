#pragma once
// A worker's data buffers, shared fairly by its queues. A request takes a slot when it needs
// one (NEED_SLOT) and gives it back once its reply is out; nothing is reserved for a queue at
// admission, so idle queues hold nothing. While others wait, a queue gets at most its fair
// share (the slots over the queues that hold or want some, at least kMinShare), and freed
// slots go round robin to the queues that wait.
// Threads: owned and used by one worker thread.
#include <deque>
#include <vector>

#include "target/request.h"
#include "transport/buffer_pool.h"

namespace ibdisk::target {

class SlotPool {
 public:
  static constexpr unsigned kMinShare = 4;

  // One per queue; the pool's view of what it holds and waits for.
  struct Account {
    unsigned held = 0;
    std::deque<Request*> waiting;
    bool listed = false;  // in the round robin of waiting accounts
  };

  SlotPool(transport::BufferPool& buffers, boost::asio::io_context& io) : buffers_(buffers), io_(io) {}
  SlotPool(const SlotPool&) = delete;
  SlotPool& operator=(const SlotPool&) = delete;

  // A slot for r now (true, in r.slot), or r waits and r.slot_ready() runs once it has one.
  bool acquire(Account& a, Request& r);
  // r's slot back; or, while r waits for one, r out of the queue.
  void release(Account& a, Request& r);
  // An account going away must hold and wait for nothing.
  void forget(Account& a);

  unsigned total() const { return buffers_.slot_count(); }
  unsigned free() const { return buffers_.free_count(); }
  unsigned share() const;
  std::uint64_t waits() const { return waits_; }

 private:
  bool busy(const Account& a) const { return a.held > 0 || !a.waiting.empty(); }
  void hand_out();

  transport::BufferPool& buffers_;
  boost::asio::io_context& io_;
  std::deque<Account*> rr_;  // accounts with waiting requests, in turn order
  unsigned busy_ = 0;        // accounts that hold or wait for slots
  std::uint64_t waits_ = 0;  // requests that had to wait, for stats
};

}  // namespace ibdisk::target
