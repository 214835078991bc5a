#include "initiator/io_buffers.h"

#include <sys/mman.h>

#include <bit>
#include <algorithm>
#include <cerrno>
#include <utility>

#include "common/error.h"

namespace ibdisk::initiator {
namespace {

unsigned class_of(std::size_t bytes) {
  const std::size_t block = std::bit_ceil(std::max(bytes, IoBufferPool::kMinBlock));
  return static_cast<unsigned>(std::countr_zero(block) - std::countr_zero(IoBufferPool::kMinBlock));
}

std::size_t block_of(unsigned size_class) { return IoBufferPool::kMinBlock << size_class; }

}  // namespace

IoBuffer& IoBuffer::operator=(IoBuffer&& o) noexcept {
  if (this != &o) {
    reset();
    data_ = std::exchange(o.data_, nullptr);
    pool_ = std::exchange(o.pool_, nullptr);
    size_class_ = o.size_class_;
  }
  return *this;
}

void IoBuffer::reset() {
  if (!data_) return;
  if (pool_) pool_->put(data_, size_class_);
  else delete[] data_;
  data_ = nullptr;
  pool_ = nullptr;
}

IoBufferPool::IoBufferPool(std::size_t arena_bytes) : bytes_(arena_bytes) {
  if (bytes_ == 0) return;
  // Faulted in now: a fresh page costs a fault and a clear on the data path otherwise.
  void* p = ::mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
  if (p == MAP_FAILED) throw SystemError("mmap(" + std::to_string(bytes_) + " bytes of request buffers)", errno);
  base_ = static_cast<std::byte*>(p);
}

IoBufferPool::~IoBufferPool() {
  if (base_) ::munmap(base_, bytes_);
}

bool IoBufferPool::exhausted(std::size_t bytes) const {
  if (bytes > kMaxBlock) return false;
  const unsigned c = class_of(bytes);
  return free_[c].empty() && carved_ + block_of(c) > bytes_;
}

IoBuffer IoBufferPool::get(std::size_t bytes) {
  IoBuffer b;
  if (bytes <= kMaxBlock) {
    const unsigned c = class_of(bytes);
    if (!free_[c].empty()) {
      b.data_ = free_[c].back();
      free_[c].pop_back();
    } else if (carved_ + block_of(c) <= bytes_) {
      // Blocks are carved in order and never change class: a class keeps what it once needed.
      b.data_ = base_ + carved_;
      carved_ += block_of(c);
    }
    if (b.data_) {
      b.pool_ = this;
      b.size_class_ = c;
      return b;
    }
    ++misses_;
  }
  b.data_ = new std::byte[std::max<std::size_t>(bytes, 1)];
  return b;
}

}  // namespace ibdisk::initiator
