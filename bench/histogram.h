#pragma once
// Latency histogram with fixed memory: log-linear buckets (64 per power of two, so any value
// is reported within 1.6%), exact min and max. Recording is a few instructions, no allocation.
#include <array>
#include <bit>
#include <cstdint>
#include <limits>

namespace ibdisk::bench {

class LatencyHistogram {
 public:
  static constexpr unsigned kSubBits = 6;  // 64 sub-buckets per power of two
  static constexpr unsigned kSub = 1u << kSubBits;
  static constexpr unsigned kPowers = 64 - kSubBits;
  static_assert(kSubBits < 16, "sub-bucket index must fit the bucket arithmetic");

  void record(std::uint64_t ns) {
    ++counts_[index(ns)];
    ++total_;
    if (ns < min_) min_ = ns;
    if (ns > max_) max_ = ns;
  }

  std::uint64_t count() const { return total_; }
  std::uint64_t min() const { return total_ ? min_ : 0; }
  std::uint64_t max() const { return max_; }

  // The smallest recorded value v such that a fraction q of the samples are <= v (bucket midpoint).
  std::uint64_t quantile(double q) const {
    if (total_ == 0) return 0;
    const auto rank = static_cast<std::uint64_t>(q * static_cast<double>(total_ - 1)) + 1;
    std::uint64_t seen = 0;
    for (unsigned i = 0; i < counts_.size(); ++i) {
      seen += counts_[i];
      if (seen >= rank) {
        const std::uint64_t lo = lower_bound(i), hi = lower_bound(i + 1);
        const std::uint64_t mid = lo + (hi - lo) / 2;
        return mid < min_ ? min_ : (mid > max_ ? max_ : mid);
      }
    }
    return max_;
  }

 private:
  // Values below kSub map one to one; above, 64 buckets per power of two.
  static unsigned index(std::uint64_t v) {
    if (v < kSub) return static_cast<unsigned>(v);
    const unsigned power = 63u - static_cast<unsigned>(std::countl_zero(v));  // >= kSubBits
    const unsigned shift = power - kSubBits;
    return (shift + 1) * kSub + static_cast<unsigned>((v >> shift) & (kSub - 1));
  }
  static std::uint64_t lower_bound(unsigned i) {
    if (i < kSub) return i;
    const unsigned shift = i / kSub - 1;
    if (shift + kSubBits >= 64) return std::numeric_limits<std::uint64_t>::max();
    return (std::uint64_t{kSub} + (i % kSub)) << shift;
  }

  std::array<std::uint64_t, (kPowers + 1) * kSub> counts_{};
  std::uint64_t total_ = 0;
  std::uint64_t min_ = std::numeric_limits<std::uint64_t>::max();
  std::uint64_t max_ = 0;
};

}  // namespace ibdisk::bench
