#include "transport/buffer_pool.h"

#include <sys/mman.h>

#include <cerrno>

#include "common/error.h"

namespace ibdisk::transport {

BufferPool::BufferPool(std::uint32_t slot_size, unsigned slot_count)
    : slot_size_(slot_size), bytes_(static_cast<std::size_t>(slot_size) * slot_count) {
  void* p = ::mmap(nullptr, bytes_ ? bytes_ : 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    throw SystemError("allocating a " + std::to_string(bytes_ >> 20) + " MiB buffer pool", errno,
                      "lower --buffer-mib or add memory");
  }
  base_ = static_cast<std::byte*>(p);
  free_.reserve(slot_count);
  for (unsigned i = slot_count; i-- > 0;) free_.push_back(base_ + static_cast<std::size_t>(i) * slot_size);
}

BufferPool::~BufferPool() { ::munmap(base_, bytes_ ? bytes_ : 4096); }

}  // namespace ibdisk::transport
