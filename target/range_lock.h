#pragma once
// Per-export ordering of requests by page: a request never runs beside one in flight on the
// same pages by the other path (O_DIRECT vs the page cache), from any worker thread or front
// end. A direct write next to a buffered write of the same page can leave a dirty page with
// the old bytes of the direct range, which writeback then puts back on disk ("Page cache
// invalidation failure on direct I/O"): completed writes lost. Requests of the same mode may
// overlap (their order is the initiator's business, as NBD says); trim and write-zeroes are
// exclusive; extents queries wait only for those. Waiters are served in order, so none starves.
// Threads: any; a waiter is woken on its own io_context.
#include <cstdint>
#include <mutex>

#include "transport/tcp/asio.h"

namespace ibdisk::target {

class RangeLock {
 public:
  static constexpr std::uint64_t kPage = 4096;
  // kQuery (an extents request) reads only the allocation map: it waits for exclusive
  // requests (trim, write-zeroes) on its pages, and runs beside reads and writes of both paths.
  enum class Mode : std::uint8_t { kDirect = 0, kBuffered = 1, kExclusive = 2, kQuery = 3 };

  struct Entry {
    std::uint64_t first = 0, last = 0;  // pages, inclusive
    Mode mode = Mode::kDirect;
    boost::asio::io_context* io = nullptr;  // where the waiter is woken
    void (*wake)(void* ctx) = nullptr;
    void* ctx = nullptr;
    // Owned by the lock:
    enum class At : std::uint8_t { kNone, kActive, kWaiting } at = At::kNone;
    Entry* prev = nullptr;
    Entry* next = nullptr;
  };

  // Sets e's pages for [offset, offset + length).
  static void set_range(Entry& e, std::uint64_t offset, std::uint64_t length);
  // True: e holds its range now. False: it waits; e.wake(e.ctx) runs on e.io once it holds it.
  bool acquire(Entry& e);
  void release(Entry& e);
  // Takes a waiting entry out of the queue (true), or false when it was granted already: its
  // wake is on the way, and it must be released then.
  bool cancel(Entry& e);
  // For tests and stats: entries holding a range, and waiting.
  unsigned active() const;
  unsigned waiting() const;

 private:
  struct List {
    Entry* head = nullptr;
    Entry* tail = nullptr;
    unsigned count[4] = {0, 0, 0, 0};  // by mode
    unsigned size() const { return count[0] + count[1] + count[2] + count[3]; }
    void push(Entry& e);
    void erase(Entry& e);
  };
  static bool conflict(const Entry& a, const Entry& b);
  // Whether e conflicts with anything in l before `stop` (all of l when stop is null).
  static bool conflicts(const List& l, const Entry& e, const Entry* stop = nullptr);

  mutable std::mutex mu_;
  List active_, waiting_;
};

}  // namespace ibdisk::target
