#pragma once
// Request buffers for `ibdisk attach`: one arena, mapped and faulted in once, handed out in
// power-of-two blocks of 4 KiB to 1 MiB. The arena is registered with the session
// (Client::register_memory), so over RDMA the target reads and writes these buffers directly,
// with no bounce copy; and a reply's payload is passed to the kernel from them by vmsplice, so a
// buffer may be reused only once the kernel has read it (initiator/attach.cc tracks that).
// A request larger than a block, or one that finds the arena used up, gets heap memory: it works
// the same, through the transport's bounce buffers.
// Threads: one (attach's).
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

namespace ibdisk::initiator {

class IoBufferPool;

// A buffer of at least the size asked for; returns itself to its pool (or the heap) when it goes.
class IoBuffer {
 public:
  IoBuffer() = default;
  IoBuffer(IoBuffer&& o) noexcept { *this = std::move(o); }
  IoBuffer& operator=(IoBuffer&& o) noexcept;
  ~IoBuffer() { reset(); }
  std::byte* get() const { return data_; }
  bool pooled() const { return pool_ != nullptr; }
  void reset();

 private:
  friend class IoBufferPool;
  std::byte* data_ = nullptr;
  IoBufferPool* pool_ = nullptr;  // null: heap memory
  unsigned size_class_ = 0;
};

class IoBufferPool {
 public:
  static constexpr std::size_t kMinBlock = 4096;
  static constexpr std::size_t kMaxBlock = 1u << 20;
  static constexpr unsigned kClasses = 9;  // 4 KiB, 8 KiB, ..., 1 MiB
  static_assert(kMinBlock << (kClasses - 1) == kMaxBlock);

  // Throws SystemError when the arena cannot be mapped.
  explicit IoBufferPool(std::size_t arena_bytes);
  ~IoBufferPool();
  IoBufferPool(const IoBufferPool&) = delete;
  IoBufferPool& operator=(const IoBufferPool&) = delete;

  IoBuffer get(std::size_t bytes);
  std::byte* base() const { return base_; }
  std::size_t size() const { return bytes_; }
  // Blocks that came from the heap because the arena was used up (not for oversized requests).
  std::uint64_t misses() const { return misses_; }
  bool exhausted(std::size_t bytes) const;

 private:
  friend class IoBuffer;
  void put(std::byte* p, unsigned size_class) { free_[size_class].push_back(p); }

  std::byte* base_ = nullptr;
  std::size_t bytes_ = 0;
  std::size_t carved_ = 0;  // the arena's first carved_ bytes belong to some size class
  std::vector<std::byte*> free_[kClasses];
  std::uint64_t misses_ = 0;
};

}  // namespace ibdisk::initiator
