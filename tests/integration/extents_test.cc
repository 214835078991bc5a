// The extents command over a real target on real TCP: a sparse file's runs as SEEK_DATA /
// SEEK_HOLE give them, a clear error for ranges outside the export, replies bounded to
// wire::kMaxExtents runs (the initiator asks again), and, with writes in flight, never a hole
// where a write already acknowledged put data.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <random>
#include <set>
#include <vector>

#include "initiator/client.h"
#include "initiator/extents.h"
#include "tests/support/fixtures.h"

namespace ibdisk {
namespace {

using initiator::Client;
using initiator::ExtentRun;

constexpr std::uint64_t kSize = 64ull << 20;

// The runs of a local file, by SEEK_DATA / SEEK_HOLE: the reference.
void pwrite_at(const std::string& path, std::uint64_t offset, std::size_t length, unsigned char fill) {
  const int fd = ::open(path.c_str(), O_WRONLY);
  ASSERT_GE(fd, 0);
  std::vector<unsigned char> buf(length, fill);
  ASSERT_EQ(::pwrite(fd, buf.data(), length, static_cast<off_t>(offset)), static_cast<ssize_t>(length));
  ::fsync(fd);
  ::close(fd);
}

bool same(const std::vector<ExtentRun>& a, const std::vector<ExtentRun>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (a[i].offset != b[i].offset || a[i].length != b[i].length || a[i].type != b[i].type) return false;
  }
  return true;
}

std::string show(const std::vector<ExtentRun>& runs) {
  std::string s;
  for (const auto& r : runs) s += std::to_string(r.offset) + "+" + std::to_string(r.length) + (r.hole() ? " hole\n" : " data\n");
  return s;
}

class Extents : public ::testing::TestWithParam<bool> {
 protected:
  void SetUp() override {
    path_ = dir_.file("sparse.img");
    testing::make_sparse_file(path_, kSize);
    if (GetParam()) {
      auto probe = target::open_backing(path_, false);
      if (probe->direct_fd < 0) GTEST_SKIP() << "the file system of " << dir_.path() << " refuses O_DIRECT";
    }
  }
  void serve() {
    auto o = testing::loopback_target(path_);
    o.exports[0].direct = GetParam();
    srv_ = std::make_unique<testing::ServerThread>(o);
    initiator::ClientOptions c;
    c.host = "127.0.0.1";
    c.port = srv_->port();
    c.queues = 2;
    c.transport = "tcp";
    client_ = Client::connect(c);
    const auto opened = client_->open("disk", false);
    ASSERT_TRUE(opened.extents());
    handle_ = opened.handle();
  }
  int one(std::uint64_t offset, std::uint32_t length, wire::ExtentList* out) {
    bool done = false;
    int status = 1;
    client_->extents(0, handle_, offset, length, [&](int st, const wire::ExtentList& l) {
      status = st;
      *out = l;
      done = true;
    });
    client_->run_until([&] { return done; });
    return status;
  }

  testing::TempDir dir_;
  std::string path_;
  std::unique_ptr<testing::ServerThread> srv_;
  std::unique_ptr<Client> client_;
  std::uint32_t handle_ = 0;
};

TEST_P(Extents, ASparseFileMatchesSeekDataAndSeekHole) {
  pwrite_at(path_, 1 << 20, 64 << 10, 0xaa);
  pwrite_at(path_, 5 << 20, 4096, 0xbb);
  pwrite_at(path_, 20 << 20, 3 << 20, 0xcc);
  pwrite_at(path_, kSize - 4096, 4096, 0xdd);  // data up to the end
  serve();
  const auto want = testing::seek_map(path_);
  ASSERT_GE(want.size(), 7u) << show(want);
  const auto got = initiator::map_extents(*client_, 0, handle_, 0, kSize, true);
  EXPECT_TRUE(got.exact);
  EXPECT_TRUE(same(got.runs, want)) << "target:\n" << show(got.runs) << "SEEK_DATA/SEEK_HOLE:\n" << show(want);
  // A range that starts and ends inside runs is cut to the range.
  wire::ExtentList l;
  ASSERT_EQ(one((1 << 20) + 4096, 8 << 20, &l), 0);
  ASSERT_GE(l.count, 3u);
  EXPECT_EQ(l.runs[0].type, 0u);
  EXPECT_EQ(l.runs[0].length, (64u << 10) - 4096);
  EXPECT_EQ(l.runs[1].type, wire::kExtentHole | wire::kExtentZero);
  std::uint64_t covered = 0;
  for (std::uint32_t i = 0; i < l.count; ++i) covered += l.runs[i].length;
  EXPECT_EQ(covered, 8u << 20);
}

TEST_P(Extents, OutOfRangeIsEinvalAndTheQueueKeepsServing) {
  serve();
  wire::ExtentList l;
  EXPECT_EQ(one(kSize, 1, &l), -EINVAL);
  EXPECT_EQ(one(kSize - 4096, 8192, &l), -EINVAL);
  EXPECT_EQ(one(~0ull - 10, 4096, &l), -EINVAL);  // offset + length overflows
  EXPECT_EQ(one(0, 0, &l), -EINVAL);              // refused by the client before it is sent
  ASSERT_EQ(one(0, 4096, &l), 0);
  ASSERT_EQ(l.count, 1u);
  EXPECT_EQ(l.runs[0].type, wire::kExtentHole | wire::kExtentZero);
}

TEST_P(Extents, AReplyIsBoundedAndTheInitiatorAsksForTheRest) {
  // 600 data runs: more than one reply holds.
  for (unsigned i = 0; i < 600; ++i) pwrite_at(path_, std::uint64_t{i} * (64 << 10), 4096, 0x11);
  serve();
  wire::ExtentList l;
  ASSERT_EQ(one(0, static_cast<std::uint32_t>(kSize), &l), 0);
  EXPECT_EQ(l.count, wire::kMaxExtents);
  std::uint64_t covered = 0;
  for (std::uint32_t i = 0; i < l.count; ++i) covered += l.runs[i].length;
  EXPECT_LT(covered, kSize) << "a reply of at most " << wire::kMaxExtents << " runs covers only part of 1200 runs";
  const auto got = initiator::map_extents(*client_, 1, handle_, 0, kSize, true);
  const auto want = testing::seek_map(path_);
  EXPECT_EQ(want.size(), 1200u);  // 600 data runs, each followed by a hole
  EXPECT_TRUE(same(got.runs, want)) << "got " << got.runs.size() << " runs, want " << want.size();
}

TEST_P(Extents, NeverAHoleWhereAnAcknowledgedWriteIs) {
  serve();
  // Queue 0 writes 4 KiB pieces at random places in a sparse image; queue 1 asks for the whole
  // map again and again. Every write acknowledged before an extents request was sent must lie
  // in data in its reply.
  std::mt19937_64 rng(21);
  std::vector<std::byte> buf(4096, std::byte{0x5a});
  std::vector<std::uint64_t> acked;
  std::set<std::uint64_t> used;
  unsigned writes_in_flight = 0, writes_left = 400, checks = 0;
  int failures = 0;
  const auto issue_write = [&] {
    std::uint64_t off;
    do off = (rng() % (kSize / 4096)) * 4096; while (!used.insert(off).second);
    ++writes_in_flight;
    --writes_left;
    client_->write(0, handle_, off, 4096, buf.data(), 0, [&, off](int st) {
      --writes_in_flight;
      if (st != 0) ++failures;
      acked.push_back(off);
    });
  };
  bool query_busy = false;
  std::string bad;
  while (writes_left > 0 || writes_in_flight > 0 || query_busy) {
    while (writes_left > 0 && writes_in_flight < 16) issue_write();
    if (!query_busy) {
      query_busy = true;
      auto before = std::make_shared<std::vector<std::uint64_t>>(acked);  // acknowledged before it was sent
      client_->extents(1, handle_, 0, static_cast<std::uint32_t>(kSize), [&, before](int st, const wire::ExtentList& l) {
        query_busy = false;
        ++checks;
        if (st != 0) {
          ++failures;
          return;
        }
        std::uint64_t end = 0;
        for (std::uint32_t i = 0; i < l.count; ++i) end += l.runs[i].length;
        for (const std::uint64_t off : *before) {
          std::uint64_t at = 0;
          for (std::uint32_t i = 0; i < l.count; ++i) {
            if (off < at + l.runs[i].length) {
              if (l.runs[i].type & wire::kExtentHole) bad = "acknowledged write at " + std::to_string(off) + " reported as a hole";
              break;
            }
            at += l.runs[i].length;
          }
        }
      });
    }
    const unsigned w = writes_in_flight;
    const bool q = query_busy;
    client_->run_until([&] { return writes_in_flight < w || query_busy != q || (writes_left == 0 && w == 0 && !q); });
    if (!bad.empty()) break;
  }
  EXPECT_EQ(failures, 0);
  EXPECT_TRUE(bad.empty()) << bad;
  EXPECT_GT(checks, 5u) << "too few extents replies ran beside the writes to show anything";
  // And at the end, every write is data.
  const auto m = initiator::map_extents(*client_, 1, handle_, 0, kSize, true);
  for (const std::uint64_t off : acked) {
    for (const auto& r : m.runs) {
      if (off >= r.offset && off < r.offset + r.length) {
        EXPECT_FALSE(r.hole()) << off;
        break;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Paths, Extents, ::testing::Values(false, true),
                         [](const auto& info) { return info.param ? "direct" : "cached"; });

}  // namespace
}  // namespace ibdisk
