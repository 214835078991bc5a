#pragma once
// One page-aligned region per target worker, cut into max-I/O-sized slots. It is registered
// once with the worker's io_uring (fixed buffer 0) and, for RDMA, with each device's PD, so
// data moves between disk and wire without a copy. Requests take a slot when they need one and
// give it back when their reply is out (target/slot_pool.h shares them fairly among queues).
// Threads: owned and used by one worker thread.
#include <sys/uio.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "transport/connection.h"

namespace ibdisk::transport {

class BufferPool {
 public:
  BufferPool(std::uint32_t slot_size, unsigned slot_count);
  ~BufferPool();
  BufferPool(const BufferPool&) = delete;
  BufferPool& operator=(const BufferPool&) = delete;

  // One free slot into *out; false when none is free.
  bool take(Slot* out) {
    if (free_.empty()) return false;
    *out = Slot{free_.back(), slot_size_, fixed_index_};
    free_.pop_back();
    return true;
  }
  void give(const Slot& s) { free_.push_back(s.data); }
  unsigned free_count() const { return static_cast<unsigned>(free_.size()); }
  unsigned slot_count() const { return static_cast<unsigned>(bytes_ / slot_size_); }
  std::uint32_t slot_size() const { return slot_size_; }
  iovec region() const { return {base_, bytes_}; }
  void set_fixed_index(int index) { fixed_index_ = index; }

 private:
  std::uint32_t slot_size_;
  std::size_t bytes_;
  std::byte* base_;
  int fixed_index_ = -1;
  std::vector<std::byte*> free_;
};

}  // namespace ibdisk::transport
