// `ibdisk bench --local`'s runner (bench/local.h) and its latency histogram.
#include <algorithm>
#include <random>
#include <stdexcept>

#include "bench/histogram.h"
#include "bench/local.h"
#include "tests/storage/storage_env.h"

namespace ibdisk::target::testing {
namespace {

// Quantiles come back within the histogram's 1.6% bucket width, and min/max exactly.
TEST(LatencyHistogram, QuantilesWithinBucketWidth) {
  bench::LatencyHistogram h;
  std::vector<std::uint64_t> v;
  std::mt19937_64 rng(5);
  for (int i = 0; i < 100000; ++i) {
    const std::uint64_t x = 1 + rng() % 5000000;
    v.push_back(x);
    h.record(x);
  }
  std::sort(v.begin(), v.end());
  EXPECT_EQ(h.count(), v.size());
  EXPECT_EQ(h.min(), v.front());
  EXPECT_EQ(h.max(), v.back());
  for (const double q : {0.5, 0.9, 0.99, 0.999}) {
    const double want = static_cast<double>(v[static_cast<std::size_t>(q * static_cast<double>(v.size() - 1))]);
    EXPECT_NEAR(static_cast<double>(h.quantile(q)), want, want * 0.016) << "q=" << q;
  }
  bench::LatencyHistogram small;
  for (std::uint64_t x : {3, 3, 3, 60}) small.record(x);
  EXPECT_EQ(small.quantile(0.5), 3u);
  EXPECT_EQ(small.quantile(1.0), 60u);
}

// A short random-read run moves whole blocks and reports consistent throughput and latency.
TEST_F(EngineTest, BenchLocalRandomRead) {
  make_file(dir_.file("disk"), 8 << 20);
  bench::LocalOptions o;
  o.path = dir_.file("disk");
  o.pattern = bench::Pattern::kRandRead;
  o.block_size = 4096;
  o.iodepth = 8;
  o.runtime_s = 0.3;
  const auto r = bench::run_local(o);
  ASSERT_GT(r.ios, 0u);
  EXPECT_EQ(r.bytes, r.ios * 4096);
  EXPECT_NEAR(r.mb_s, static_cast<double>(r.bytes) / r.seconds / 1e6, 1e-6 * r.mb_s);
  EXPECT_GE(r.seconds, 0.3);
  EXPECT_LE(r.latency.min_us, r.latency.p50_us);
  EXPECT_LE(r.latency.p50_us, r.latency.p99_us);
  EXPECT_LE(r.latency.p99_us, r.latency.max_us);
  EXPECT_EQ(r.direct_ios, 0u) << "without --direct everything goes through the page cache";
  const std::string json = bench::local_json(o, r);
  EXPECT_NE(json.find("\"rw\": \"randread\""), std::string::npos) << json;
  EXPECT_NE(json.find("\"p99.9\""), std::string::npos) << json;
}

// A sequential O_DIRECT write run goes through O_DIRECT and rewrites the file.
TEST_F(EngineTest, BenchLocalDirectSequentialWrite) {
  const auto before = make_file(dir_.file("disk"), 4 << 20);
  bench::LocalOptions o;
  o.path = dir_.file("disk");
  o.pattern = bench::Pattern::kWrite;
  o.block_size = 65536;
  o.iodepth = 4;
  o.runtime_s = 0.2;
  o.direct = true;
  const auto f = open_backing(o.path, true);
  if (f->direct_fd < 0) GTEST_SKIP() << dir_.path() << " refuses O_DIRECT";
  const auto r = bench::run_local(o);
  EXPECT_GT(r.ios, 0u);
  EXPECT_EQ(r.direct_ios, r.ios);
  EXPECT_FALSE(read_whole(o.path) == before);
}

// Bad options are refused before any I/O, each naming the fix.
TEST_F(EngineTest, BenchLocalRefusesBadOptions) {
  make_file(dir_.file("disk"), 1 << 20);
  const auto message = [&](bench::LocalOptions o) {
    o.path = dir_.file("disk");
    o.runtime_s = 0.1;
    try {
      bench::run_local(o);
    } catch (const SystemError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  bench::LocalOptions big;
  big.size = 2 << 20;
  EXPECT_NE(message(big).find("smaller --size"), std::string::npos) << message(big);
  bench::LocalOptions odd;
  odd.direct = true;
  odd.block_size = 1000;
  const std::string m = message(odd);
  EXPECT_TRUE(m.find("multiple of") != std::string::npos || m.find("refuses O_DIRECT") != std::string::npos) << m;
  EXPECT_THROW(bench::parse_pattern("randrw"), std::invalid_argument);
}

}  // namespace
}  // namespace ibdisk::target::testing
