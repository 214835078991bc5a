#include "target/range_lock.h"

namespace ibdisk::target {

void RangeLock::set_range(Entry& e, std::uint64_t offset, std::uint64_t length) {
  e.first = offset / kPage;
  e.last = (offset + (length ? length - 1 : 0)) / kPage;
}

void RangeLock::List::push(Entry& e) {
  e.prev = tail;
  e.next = nullptr;
  if (tail) tail->next = &e;
  else head = &e;
  tail = &e;
  ++count[static_cast<unsigned>(e.mode)];
}

void RangeLock::List::erase(Entry& e) {
  if (e.prev) e.prev->next = e.next;
  else head = e.next;
  if (e.next) e.next->prev = e.prev;
  else tail = e.prev;
  e.prev = e.next = nullptr;
  --count[static_cast<unsigned>(e.mode)];
}

bool RangeLock::conflict(const Entry& a, const Entry& b) {
  if (a.last < b.first || b.last < a.first) return false;
  if (a.mode == Mode::kExclusive || b.mode == Mode::kExclusive) return true;
  if (a.mode == Mode::kQuery || b.mode == Mode::kQuery) return false;
  return a.mode != b.mode;
}

bool RangeLock::conflicts(const List& l, const Entry& e, const Entry* stop) {
  // Only entries of another mode (or exclusive ones) can conflict: skip the scan when none.
  const auto n = [&l](Mode m) { return l.count[static_cast<unsigned>(m)]; };
  const unsigned others = e.mode == Mode::kExclusive ? l.size()
                          : e.mode == Mode::kQuery   ? n(Mode::kExclusive)
                                                     : l.size() - n(e.mode) - n(Mode::kQuery);
  if (others == 0) return false;
  for (const Entry* x = l.head; x && x != stop; x = x->next) {
    if (conflict(*x, e)) return true;
  }
  return false;
}

bool RangeLock::acquire(Entry& e) {
  std::lock_guard lock(mu_);
  if (conflicts(waiting_, e) || conflicts(active_, e)) {
    e.at = Entry::At::kWaiting;
    waiting_.push(e);
    return false;
  }
  e.at = Entry::At::kActive;
  active_.push(e);
  return true;
}

void RangeLock::release(Entry& e) {
  std::lock_guard lock(mu_);
  if (e.at != Entry::At::kActive) return;
  active_.erase(e);
  e.at = Entry::At::kNone;
  if (waiting_.head == nullptr) return;
  // Grant, in order, every waiter that conflicts neither with a holder nor with an earlier waiter.
  for (Entry* w = waiting_.head; w;) {
    Entry* next = w->next;
    if (!conflicts(active_, *w) && !conflicts(waiting_, *w, w)) {
      waiting_.erase(*w);
      w->at = Entry::At::kActive;
      active_.push(*w);
      boost::asio::post(*w->io, [fn = w->wake, ctx = w->ctx] { fn(ctx); });
    }
    w = next;
  }
}

bool RangeLock::cancel(Entry& e) {
  std::lock_guard lock(mu_);
  if (e.at != Entry::At::kWaiting) return false;
  waiting_.erase(e);
  e.at = Entry::At::kNone;
  return true;
}

unsigned RangeLock::active() const {
  std::lock_guard lock(mu_);
  return active_.size();
}

unsigned RangeLock::waiting() const {
  std::lock_guard lock(mu_);
  return waiting_.size();
}

}  // namespace ibdisk::target
