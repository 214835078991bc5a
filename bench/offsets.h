#pragma once
// The offsets of a workload, the same for `ibdisk bench --local` and `ibdisk bench HOST/EXPORT`:
// sequential blocks that wrap at the end (as fio --time_based does), or uniformly random blocks
// from a seeded xorshift64* generator.
#include <cstdint>

namespace ibdisk::bench {

class Offsets {
 public:
  Offsets() = default;
  Offsets(bool sequential, std::uint32_t block_size, std::uint64_t blocks, std::uint64_t seed)
      : sequential_(sequential), block_size_(block_size), blocks_(blocks), rng_(seed * 0x9E3779B97F4A7C15ull + 1) {}

  std::uint64_t next() {
    if (sequential_) {
      const std::uint64_t b = next_block_;
      next_block_ = next_block_ + 1 == blocks_ ? 0 : next_block_ + 1;
      return b * block_size_;
    }
    rng_ ^= rng_ >> 12;
    rng_ ^= rng_ << 25;
    rng_ ^= rng_ >> 27;
    return (rng_ * 0x2545F4914F6CDD1Dull) % blocks_ * block_size_;
  }

 private:
  bool sequential_ = true;
  std::uint32_t block_size_ = 0;
  std::uint64_t blocks_ = 1;
  std::uint64_t next_block_ = 0;
  std::uint64_t rng_ = 1;
};

}  // namespace ibdisk::bench
