// The storage engine on a block device: a loop device over a scratch file, attached with the
// loop ioctls (needs root and /dev/loop-control; skips with the reason otherwise).
#include <fcntl.h>
#include <linux/loop.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>

#include "tests/storage/storage_env.h"

namespace ibdisk::target::testing {
namespace {

constexpr std::size_t kMiB = std::size_t{1} << 20;

class BlockDeviceTest : public EngineTest {
 protected:
  void SetUp() override {
    EngineTest::SetUp();
    if (IsSkipped()) return;
    model_ = make_file(dir_.file("backing"), 16 * kMiB, 3);
    const int ctl = ::open("/dev/loop-control", O_RDWR | O_CLOEXEC);
    if (ctl < 0) GTEST_SKIP() << "/dev/loop-control: " << errno_text(errno) << " (needs root and the loop module)";
    const int n = ::ioctl(ctl, LOOP_CTL_GET_FREE);
    ::close(ctl);
    if (n < 0) GTEST_SKIP() << "LOOP_CTL_GET_FREE: " << errno_text(errno);
    device_ = "/dev/loop" + std::to_string(n);
    loop_fd_ = ::open(device_.c_str(), O_RDWR | O_CLOEXEC);
    if (loop_fd_ < 0) GTEST_SKIP() << device_ << ": " << errno_text(errno);
    const int backing = ::open(dir_.file("backing").c_str(), O_RDWR | O_CLOEXEC);
    ASSERT_GE(backing, 0);
    const int ret = ::ioctl(loop_fd_, LOOP_SET_FD, backing);
    const int err = errno;
    ::close(backing);
    if (ret != 0) GTEST_SKIP() << "LOOP_SET_FD " << device_ << ": " << errno_text(err);
    attached_ = true;
    loop_info64 info{};
    info.lo_flags = LO_FLAGS_AUTOCLEAR;  // detach when the last user closes it, even if the test dies
    ::ioctl(loop_fd_, LOOP_SET_STATUS64, &info);
  }
  void TearDown() override {
    if (attached_) ::ioctl(loop_fd_, LOOP_CLR_FD, 0);
    if (loop_fd_ >= 0) ::close(loop_fd_);
  }

  std::vector<std::byte> model_;
  std::string device_;
  int loop_fd_ = -1;
  bool attached_ = false;
};

// open_backing on a block device: size from BLKGETSIZE64, block size from BLKSSZGET, O_DIRECT, discard.
TEST_F(BlockDeviceTest, OpenBackingDescribesTheDevice) {
  const auto f = open_backing(device_, false);
  EXPECT_TRUE(f->block_device);
  EXPECT_EQ(f->size, 16 * kMiB);
  EXPECT_EQ(f->logical_block_size, 512u);
  EXPECT_GE(f->direct_fd, 0);
  EXPECT_TRUE(f->trim_supported) << "a loop device over a file on this file system discards by punching holes";
}

// Reads and writes on the device, through O_DIRECT and the page cache, match the backing file.
TEST_F(BlockDeviceTest, ReadWrite) {
  auto f = open_backing(device_, false);
  auto buf = aligned_buffer(kMiB);
  ASSERT_EQ(run(*f, IoOp::kRead, 3 * kMiB, kMiB, buf.get()), static_cast<int>(kMiB));
  EXPECT_EQ(std::memcmp(buf.get(), model_.data() + 3 * kMiB, kMiB), 0);
  std::fill_n(buf.get(), 65536, std::byte{0xab});
  ASSERT_EQ(run(*f, IoOp::kWrite, kMiB, 65536, buf.get(), kIoFua), 65536);
  ASSERT_EQ(run(*f, IoOp::kWrite, 2 * kMiB + 5, 100, buf.get()), 100);
  ASSERT_EQ(run(*f, IoOp::kFlush, 0, 0), 0);
  EXPECT_EQ(engine_->stats().direct, 2u);
  EXPECT_EQ(engine_->stats().buffered, 1u);
  EXPECT_EQ(run(*f, IoOp::kRead, 16 * kMiB - 512, 1024, buf.get()), -EINVAL);
  ::fsync(loop_fd_);
  const auto backing = read_whole(dir_.file("backing"));
  EXPECT_TRUE(std::all_of(backing.begin() + kMiB, backing.begin() + kMiB + 65536, [](std::byte b) { return b == std::byte{0xab}; }));
  EXPECT_EQ(backing[2 * kMiB + 4], model_[2 * kMiB + 4]);
  EXPECT_EQ(backing[2 * kMiB + 5], std::byte{0xab});
}

// Trim is BLKDISCARD rounded inwards to whole blocks; write-zeroes zeroes exactly, aligned or not.
TEST_F(BlockDeviceTest, TrimAndWriteZeroes) {
  auto f = open_backing(device_, false);
  if (!f->trim_supported) GTEST_SKIP() << device_ << " does not discard";
  ASSERT_EQ(run(*f, IoOp::kTrim, kMiB, kMiB), 0);
  ASSERT_EQ(run(*f, IoOp::kTrim, 100, 200), 0);  // no whole block inside: nothing to discard
  EXPECT_EQ(engine_->stats().discards, 1u) << "BLKDISCARD runs on the engine's helper thread, not the io thread";
  auto buf = aligned_buffer(kMiB);
  ASSERT_EQ(run(*f, IoOp::kRead, kMiB, kMiB, buf.get()), static_cast<int>(kMiB));
  EXPECT_TRUE(std::all_of(buf.get(), buf.get() + kMiB, [](std::byte b) { return b == std::byte{0}; }))
      << "a discarded range of a loop device reads back as zeroes";
  ASSERT_EQ(run(*f, IoOp::kRead, 0, 512, buf.get()), 512);
  EXPECT_EQ(std::memcmp(buf.get(), model_.data(), 512), 0) << "trim inside one block must not change it";

  ASSERT_EQ(run(*f, IoOp::kWriteZeroes, 4 * kMiB, 65536), 0);      // fallocate(ZERO_RANGE) on the device
  ASSERT_EQ(run(*f, IoOp::kWriteZeroes, 5 * kMiB + 7, 1000), 0);   // not whole blocks: writes zeroes
  EXPECT_EQ(engine_->stats().zero_fills, 1u);
  ASSERT_EQ(run(*f, IoOp::kRead, 4 * kMiB, 65536, buf.get()), 65536);
  EXPECT_TRUE(std::all_of(buf.get(), buf.get() + 65536, [](std::byte b) { return b == std::byte{0}; }));
  ASSERT_EQ(run(*f, IoOp::kRead, 5 * kMiB, 4096, buf.get()), 4096);
  EXPECT_EQ(std::memcmp(buf.get(), model_.data() + 5 * kMiB, 7), 0);
  EXPECT_TRUE(std::all_of(buf.get() + 7, buf.get() + 1007, [](std::byte b) { return b == std::byte{0}; }));
  EXPECT_EQ(std::memcmp(buf.get() + 1007, model_.data() + 5 * kMiB + 1007, 4096 - 1007), 0);
}

}  // namespace
}  // namespace ibdisk::target::testing
