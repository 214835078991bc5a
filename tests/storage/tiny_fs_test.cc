// The storage engine on a 1 MiB tmpfs: a full file system, and a file system without
// FALLOC_FL_ZERO_RANGE. Mounting needs root (CAP_SYS_ADMIN); without it the tests skip.
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>

#include "tests/storage/storage_env.h"

namespace ibdisk::target::testing {
namespace {

constexpr std::size_t kMiB = std::size_t{1} << 20;

class TinyFsTest : public EngineTest {
 protected:
  void SetUp() override {
    EngineTest::SetUp();
    if (IsSkipped()) return;
    mnt_ = dir_.file("mnt");
    ASSERT_EQ(::mkdir(mnt_.c_str(), 0700), 0);
    if (::mount("ibdisk-test", mnt_.c_str(), "tmpfs", 0, "size=1m") != 0) {
      GTEST_SKIP() << "mount -t tmpfs -o size=1m " << mnt_ << ": " << errno_text(errno) << " (run as root)";
    }
    mounted_ = true;
  }
  void TearDown() override {
    if (mounted_ && ::umount2(mnt_.c_str(), MNT_DETACH) != 0) ADD_FAILURE() << "umount " << mnt_ << ": " << errno_text(errno);
  }
  // A sparse file of SIZE bytes on the tiny file system.
  std::string sparse_file(const std::string& name, std::size_t size) {
    const std::string path = mnt_ + "/" + name;
    const int fd = ::open(path.c_str(), O_CREAT | O_RDWR | O_CLOEXEC, 0600);
    EXPECT_GE(fd, 0);
    EXPECT_EQ(::ftruncate(fd, static_cast<off_t>(size)), 0);
    ::close(fd);
    return path;
  }

  std::string mnt_;
  bool mounted_ = false;
};

// Writing past a full file system reports -ENOSPC through done, and the engine keeps serving I/O.
TEST_F(TinyFsTest, FullFileSystemReportsEnospc) {
  auto f = open_backing(sparse_file("disk", 4 * kMiB), false);
  auto buf = aligned_buffer(2 * kMiB);
  std::fill_n(buf.get(), 2 * kMiB, std::byte{0x77});
  EXPECT_EQ(run(*f, IoOp::kWrite, 0, 2 * kMiB, buf.get()), -ENOSPC);
  EXPECT_EQ(run(*f, IoOp::kWrite, 3 * kMiB, 4096, buf.get()), -ENOSPC);
  EXPECT_EQ(engine_->in_flight(), 0u);
  auto back = aligned_buffer(4096);
  ASSERT_EQ(run(*f, IoOp::kRead, 0, 4096, back.get()), 4096);
  EXPECT_TRUE(std::all_of(back.get(), back.get() + 4096, [](std::byte b) { return b == std::byte{0x77}; }))
      << "the part written before the file system filled up is missing";
  std::fill_n(buf.get(), 4096, std::byte{0x33});
  EXPECT_EQ(run(*f, IoOp::kWrite, 0, 4096, buf.get()), 4096) << "rewriting allocated space must still work";
  ASSERT_EQ(run(*f, IoOp::kRead, 0, 4096, back.get()), 4096);
  EXPECT_EQ(back[4095], std::byte{0x33});
  EXPECT_EQ(run(*f, IoOp::kFlush, 0, 0), 0);
}

// Where fallocate cannot zero a range (tmpfs), write-zeroes writes zeroes instead.
TEST_F(TinyFsTest, WriteZeroesFallsBackToWritingZeroes) {
  auto f = open_backing(sparse_file("disk", 512 * 1024), false);
  auto buf = aligned_buffer(512 * 1024);
  std::fill_n(buf.get(), 512 * 1024, std::byte{0x42});
  ASSERT_EQ(run(*f, IoOp::kWrite, 0, 512 * 1024, buf.get()), 512 * 1024);
  ASSERT_EQ(run(*f, IoOp::kWriteZeroes, 1000, 300000, nullptr, kIoFua), 0);
  EXPECT_EQ(engine_->stats().zero_fills, 1u);
  ASSERT_EQ(run(*f, IoOp::kRead, 0, 512 * 1024, buf.get()), 512 * 1024);
  EXPECT_EQ(buf[999], std::byte{0x42});
  EXPECT_TRUE(std::all_of(buf.get() + 1000, buf.get() + 301000, [](std::byte b) { return b == std::byte{0}; }));
  EXPECT_EQ(buf[301000], std::byte{0x42});
}

}  // namespace
}  // namespace ibdisk::target::testing
