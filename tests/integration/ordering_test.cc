// Issue 14, finding 1, deterministic: on an O_DIRECT export a request never runs beside one in
// flight on the same page by the other path (direct vs page cache), whichever worker and
// queue each arrives on. The storage engine's fault hook holds the first direct write at the
// engine (a slow device); a buffered write to the same page sent meanwhile on another queue
// must reach the engine only after it, and one to another page must not wait for it. Over the
// real TCP target; tests/nbd/odirect-same-page-test shows the same with qemu-io over NBD.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <functional>
#include <mutex>
#include <vector>

#include "initiator/client.h"
#include "tests/support/fixtures.h"

namespace ibdisk {
namespace {

using initiator::Client;
using initiator::ClientOptions;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

struct Seen {
  std::uint64_t offset;
  std::uint32_t length;
  bool direct;
  Clock::time_point at;
};

class DirectOrder : public ::testing::Test {
 protected:
  void SetUp() override {
    testing::make_sparse_file(dir_.file("d.img"), 16 << 20);
    auto probe = target::open_backing(dir_.file("d.img"), false);
    if (probe->direct_fd < 0) GTEST_SKIP() << "the file system of " << dir_.path() << " refuses O_DIRECT";
    auto o = testing::loopback_target(dir_.file("d.img"));
    o.exports[0].direct = true;
    o.threads = 2;
    srv_ = std::make_unique<testing::ServerThread>(o, [this](target::Server& s) {
      for (unsigned i = 0; i < s.worker_count(); ++i) {
        s.worker_engine(i).set_fault_hook([this](const target::IoRequest& r) {
          target::StorageEngine::Fault f;
          if (r.op != target::IoOp::kWrite) return f;
          std::lock_guard lock(mu_);
          seen_.push_back({r.offset, r.length, r.direct_, Clock::now()});
          if (!held_ && hold_if_(r)) {
            held_ = true;
            f.hold = 1s;  // long enough that a loaded machine still shows what waited
            released_ = Clock::now() + f.hold;
          }
          return f;
        });
      }
    });
    ClientOptions c;
    c.host = "127.0.0.1";
    c.port = srv_->port();
    c.queues = 2;  // two connections: one per worker
    client_ = Client::connect(c);
    handle_ = client_->open("disk", false).handle();
  }

  const Seen* find(std::uint64_t offset, std::uint32_t length) {
    std::lock_guard lock(mu_);
    for (const auto& s : seen_) {
      if (s.offset == offset && s.length == length) return &s;
    }
    return nullptr;
  }

  testing::TempDir dir_;
  std::unique_ptr<testing::ServerThread> srv_;
  std::unique_ptr<Client> client_;
  std::uint32_t handle_ = 0;
  std::mutex mu_;
  std::vector<Seen> seen_;
  // The first write this picks is held at the engine for 1 s (a slow device).
  std::function<bool(const target::IoRequest&)> hold_if_ = [](const target::IoRequest& r) {
    return r.direct_ && r.offset == 0;
  };
  bool held_ = false;
  Clock::time_point released_{};
};

TEST_F(DirectOrder, ABufferedWriteWaitsForADirectWriteOfTheSamePage) {
  std::vector<std::byte> page(4096, std::byte{0x11}), small(100, std::byte{0x22}), other(100, std::byte{0x33});
  int done = 0, failed = 0;
  const auto count = [&](int st) {
    ++done;
    failed += st != 0;
  };
  client_->write(0, handle_, 0, 4096, page.data(), 0, count);         // aligned: O_DIRECT, held 1 s
  client_->run_until([&] { return find(0, 4096) != nullptr; });
  client_->write(1, handle_, 1000, 100, small.data(), 0, count);      // same page, page cache
  client_->write(1, handle_, 8192 + 1000, 100, other.data(), 0, count);  // another page, page cache
  client_->run_until([&] { return done == 3; });
  EXPECT_EQ(failed, 0);
  const Seen* direct = find(0, 4096);
  const Seen* same = find(1000, 100);
  const Seen* elsewhere = find(8192 + 1000, 100);
  ASSERT_TRUE(direct && same && elsewhere);
  EXPECT_TRUE(direct->direct);
  EXPECT_FALSE(same->direct);
  EXPECT_GE(same->at, released_) << "the buffered write of page 0 reached the engine "
                                 << std::chrono::duration_cast<std::chrono::milliseconds>(released_ - same->at).count()
                                 << " ms before the direct write of that page was done";
  EXPECT_LT(elsewhere->at, released_) << "a write to another page waited for it";
  std::vector<std::byte> back(4096), want = page;
  std::memcpy(want.data() + 1000, small.data(), small.size());
  EXPECT_EQ(testing::sync(*client_, [&](auto cb) { client_->flush(0, handle_, cb); }), 0);
  EXPECT_EQ(testing::sync(*client_, [&](auto cb) { client_->read(0, handle_, 0, 4096, back.data(), cb); }), 0);
  EXPECT_EQ(back, want);
}

TEST_F(DirectOrder, ADirectWriteWaitsForABufferedWriteOfTheSamePage) {
  {
    std::lock_guard lock(mu_);
    hold_if_ = [](const target::IoRequest& r) { return !r.direct_ && r.offset == 1000; };
  }
  std::vector<std::byte> page(4096, std::byte{0x44}), small(100, std::byte{0x55});
  int done = 0, failed = 0;
  const auto count = [&](int st) {
    ++done;
    failed += st != 0;
  };
  client_->write(1, handle_, 1000, 100, small.data(), 0, count);  // page cache, held 1 s
  client_->run_until([&] { return find(1000, 100) != nullptr; });
  client_->write(0, handle_, 0, 4096, page.data(), 0, count);  // the whole page, O_DIRECT
  client_->run_until([&] { return done == 2; });
  EXPECT_EQ(failed, 0);
  const Seen* direct = find(0, 4096);
  ASSERT_TRUE(direct);
  EXPECT_TRUE(direct->direct);
  EXPECT_GE(direct->at, released_) << "the direct write reached the engine "
                                   << std::chrono::duration_cast<std::chrono::milliseconds>(released_ - direct->at).count()
                                   << " ms before a buffered write of its page was done";
  std::vector<std::byte> back(4096);
  EXPECT_EQ(testing::sync(*client_, [&](auto cb) { client_->read(0, handle_, 0, 4096, back.data(), cb); }), 0);
  EXPECT_EQ(back, page) << "the later direct write must win";
}

}  // namespace
}  // namespace ibdisk
