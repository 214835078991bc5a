#include "target/slot_pool.h"

#include <algorithm>

namespace ibdisk::target {

unsigned SlotPool::share() const { return std::max(kMinShare, total() / std::max(1u, busy_)); }

bool SlotPool::acquire(Account& a, Request& r) {
  const bool was_busy = busy(a);
  // A free slot with others waiting means they are over their share: take it while under ours.
  if ((rr_.empty() || a.held < share()) && buffers_.take(&r.slot)) {
    ++a.held;
    if (!was_busy) ++busy_;
    return true;
  }
  a.waiting.push_back(&r);
  ++waits_;
  if (!was_busy) ++busy_;
  if (!a.listed) {
    a.listed = true;
    rr_.push_back(&a);
  }
  return false;
}

void SlotPool::release(Account& a, Request& r) {
  if (r.slot.data == nullptr) {
    // Still waiting: leave the queue.
    const auto it = std::find(a.waiting.begin(), a.waiting.end(), &r);
    if (it == a.waiting.end()) return;
    a.waiting.erase(it);
    if (a.waiting.empty() && a.listed) {
      a.listed = false;
      rr_.erase(std::find(rr_.begin(), rr_.end(), &a));
    }
    if (!busy(a)) --busy_;
    return;
  }
  buffers_.give(r.slot);
  r.slot = {};
  --a.held;
  if (!busy(a)) --busy_;
  hand_out();
}

void SlotPool::forget(Account& a) {
  if (a.listed) rr_.erase(std::find(rr_.begin(), rr_.end(), &a));
  if (busy(a)) --busy_;
  a = Account{};
}

void SlotPool::hand_out() {
  while (!rr_.empty() && buffers_.free_count() > 0) {
    // The first waiting account under its share, or the first in turn when none is.
    const unsigned limit = share();
    auto it = std::find_if(rr_.begin(), rr_.end(), [limit](const Account* x) { return x->held < limit; });
    if (it == rr_.end()) it = rr_.begin();
    Account* a = *it;
    rr_.erase(it);
    Request* r = a->waiting.front();
    a->waiting.pop_front();
    buffers_.take(&r->slot);
    ++a->held;
    if (a->waiting.empty()) a->listed = false;
    else rr_.push_back(a);  // round robin
    boost::asio::post(io_, [r, gen = r->generation()] { r->slot_ready(gen); });
  }
}

}  // namespace ibdisk::target
