#pragma once
// One page-aligned region per target worker, cut into max-I/O-sized slots. It is registered
// once with the worker's io_uring (fixed buffer 0) and, for RDMA, with each device's PD, so
// data moves between disk and wire without a copy. Connections reserve their queue depth of
// slots when the queue is granted and return them when they go away.
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

  // Reserves up to n slots; returns as many as are free.
  std::vector<Slot> reserve(unsigned n);
  void release(const std::vector<Slot>& slots);
  unsigned free_count() const { return static_cast<unsigned>(free_.size()); }
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
