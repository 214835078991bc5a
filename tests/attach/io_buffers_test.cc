// IoBufferPool (initiator/io_buffers.h): attach's request buffers.
#include "initiator/io_buffers.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <set>
#include <vector>

namespace ibdisk::initiator {
namespace {

bool inside(const IoBufferPool& pool, const std::byte* p, std::size_t n) {
  return p >= pool.base() && p + n <= pool.base() + pool.size();
}

// Blocks come from the arena, page-aligned, distinct while held, and large enough to use whole.
TEST(IoBufferPool, BlocksAreAlignedDistinctAndInsideTheArena) {
  IoBufferPool pool(8 << 20);
  std::vector<IoBuffer> held;
  std::set<const std::byte*> seen;
  for (std::size_t bytes : {1ul, 512ul, 4096ul, 4097ul, 65536ul, 300000ul, 1ul << 20}) {
    IoBuffer b = pool.get(bytes);
    ASSERT_TRUE(b.pooled()) << bytes;
    EXPECT_TRUE(inside(pool, b.get(), bytes)) << bytes;
    EXPECT_EQ(reinterpret_cast<std::uintptr_t>(b.get()) % 4096, 0u) << bytes;
    std::fill_n(b.get(), bytes, std::byte{0x5a});  // writable end to end
    EXPECT_TRUE(seen.insert(b.get()).second) << bytes;
    held.push_back(std::move(b));
  }
  EXPECT_EQ(pool.misses(), 0u);
}

// A block given back is handed out again for the same size class, not carved anew.
TEST(IoBufferPool, ReleasedBlocksAreReused) {
  IoBufferPool pool(2 << 20);
  const std::byte* first = nullptr;
  {
    IoBuffer a = pool.get(1 << 20);
    first = a.get();
  }
  IoBuffer b = pool.get(700000);
  EXPECT_EQ(b.get(), first);
  IoBuffer moved = std::move(b);
  EXPECT_EQ(moved.get(), first);
  EXPECT_EQ(b.get(), nullptr);
}

// Used up, the pool hands out heap memory and counts the miss; larger than a block is heap
// memory and no miss.
TEST(IoBufferPool, ExhaustedOrOversizedFallsBackToTheHeap) {
  IoBufferPool pool(2 << 20);
  IoBuffer a = pool.get(1 << 20), b = pool.get(1 << 20);
  ASSERT_TRUE(a.pooled() && b.pooled());
  EXPECT_TRUE(pool.exhausted(1 << 20));
  IoBuffer c = pool.get(1 << 20);
  EXPECT_FALSE(c.pooled());
  EXPECT_FALSE(inside(pool, c.get(), 1 << 20));
  EXPECT_EQ(pool.misses(), 1u);
  IoBuffer big = pool.get(3 << 20);
  EXPECT_FALSE(big.pooled());
  std::fill_n(big.get(), 3 << 20, std::byte{1});
  EXPECT_EQ(pool.misses(), 1u);
  a.reset();
  EXPECT_FALSE(pool.exhausted(1 << 20));
  EXPECT_TRUE(pool.get(1 << 20).pooled());
}

}  // namespace
}  // namespace ibdisk::initiator
