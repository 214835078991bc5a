// The io_uring storage engine on real files (target/storage.h).
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <random>

#include "tests/storage/storage_env.h"

namespace ibdisk::target::testing {
namespace {

constexpr std::size_t kMiB = std::size_t{1} << 20;

bool all_zero(const std::byte* p, std::size_t n) {
  return std::all_of(p, p + n, [](std::byte b) { return b == std::byte{0}; });
}

// open_backing reports a regular file's size, block size, trim support and an O_DIRECT fd.
TEST_F(EngineTest, OpenBackingDescribesARegularFile) {
  make_file(dir_.file("disk"), 3 * kMiB + 100);
  const auto f = open_backing(dir_.file("disk"), false);
  EXPECT_EQ(f->size, 3 * kMiB + 100);
  EXPECT_GE(f->fd, 0);
  EXPECT_TRUE(f->logical_block_size == 512 || f->logical_block_size == 4096) << f->logical_block_size;
  EXPECT_FALSE(f->block_device);
  EXPECT_TRUE(f->trim_supported);
  EXPECT_FALSE(f->read_only);
  if (f->direct_fd < 0) GTEST_SKIP() << dir_.path() << " refuses O_DIRECT; set IBDISK_STORAGE_TEST_DIR to a disk file system";
  EXPECT_NE(f->direct_fd, f->fd);
}

// open_backing refuses a missing file, a directory, an empty file and a character device, naming each.
TEST_F(EngineTest, OpenBackingRefusesWhatCannotBeADisk) {
  const auto message = [](const std::string& path, bool ro) {
    try {
      open_backing(path, ro);
    } catch (const SystemError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  const std::string missing = message(dir_.file("missing"), false);
  EXPECT_NE(missing.find(dir_.file("missing")), std::string::npos) << missing;
  EXPECT_NE(missing.find("No such file"), std::string::npos) << missing;
  EXPECT_NE(missing.find("truncate -s"), std::string::npos) << missing;

  const std::string directory = message(dir_.path(), true);
  EXPECT_NE(directory.find("directory"), std::string::npos) << directory;

  make_file(dir_.file("empty"), 0);
  const std::string empty = message(dir_.file("empty"), false);
  EXPECT_NE(empty.find("size is 0"), std::string::npos) << empty;

  const std::string chardev = message("/dev/null", true);
  EXPECT_NE(chardev.find("neither a regular file nor a block device"), std::string::npos) << chardev;
}

// A queue depth of 0 is refused at construction with a message that says the valid range.
TEST_F(EngineTest, ZeroQueueDepthIsRefused) {
  try {
    StorageEngine bad(io_, StorageEngine::Options{0});
    FAIL() << "queue depth 0 accepted";
  } catch (const SystemError& e) {
    EXPECT_NE(std::string(e.what()).find("1 to 32768"), std::string::npos) << e.what();
  }
}

// Aligned requests go through O_DIRECT, unaligned ones through the page cache, and both read back.
TEST_F(EngineTest, AlignedUsesDirectUnalignedUsesPageCache) {
  auto model = make_file(dir_.file("disk"), 4 * kMiB);
  auto f = open_backing(dir_.file("disk"), false);
  if (f->direct_fd < 0) GTEST_SKIP() << dir_.path() << " refuses O_DIRECT";
  auto buf = aligned_buffer(2 * kMiB);

  ASSERT_EQ(run(*f, IoOp::kRead, 8192, 65536, buf.get()), 65536);
  EXPECT_EQ(std::memcmp(buf.get(), model.data() + 8192, 65536), 0);
  EXPECT_EQ(engine_->stats().direct, 1u);
  EXPECT_EQ(engine_->stats().buffered, 0u);

  // Unaligned offset, length and buffer address.
  ASSERT_EQ(run(*f, IoOp::kRead, 1001, 3333, buf.get() + 7), 3333);
  EXPECT_EQ(std::memcmp(buf.get() + 7, model.data() + 1001, 3333), 0);
  EXPECT_EQ(engine_->stats().buffered, 1u);

  // Aligned offset and length, unaligned buffer: still the page cache.
  ASSERT_EQ(run(*f, IoOp::kRead, 4096, 4096, buf.get() + 1), 4096);
  EXPECT_EQ(engine_->stats().buffered, 2u);

  std::memset(buf.get(), 0x5a, 4096);
  ASSERT_EQ(run(*f, IoOp::kWrite, 12288, 4096, buf.get()), 4096);
  ASSERT_EQ(run(*f, IoOp::kWrite, 12288 + 4096 + 3, 10, buf.get()), 10);
  EXPECT_EQ(engine_->stats().direct, 2u);
  EXPECT_EQ(engine_->stats().buffered, 3u);
  const auto disk = read_whole(dir_.file("disk"));
  EXPECT_TRUE(std::all_of(disk.begin() + 12288, disk.begin() + 16384, [](std::byte b) { return b == std::byte{0x5a}; }));
  EXPECT_TRUE(std::all_of(disk.begin() + 16387, disk.begin() + 16397, [](std::byte b) { return b == std::byte{0x5a}; }));
  EXPECT_EQ(disk[16386], model[16386]);
  EXPECT_EQ(disk[16397], model[16397]);
}

// submit() only fills SQEs; one io_uring_submit per io_context turn carries the whole batch.
TEST_F(EngineTest, SubmissionsAreBatchedPerTurn) {
  make_file(dir_.file("disk"), 4 * kMiB);
  auto f = open_backing(dir_.file("disk"), true);
  auto buf = aligned_buffer(64 * 4096);
  std::vector<Waiter> w(64);
  for (std::size_t i = 0; i < w.size(); ++i) {
    w[i].req = IoRequest{.op = IoOp::kRead, .offset = i * 4096 * 3, .length = 4096, .data = buf.get() + i * 4096};
    w[i].req.done = &on_done;
    w[i].req.context = &w[i];
    engine_->submit(*f, &w[i].req);
  }
  EXPECT_EQ(engine_->stats().submit_calls, 0u) << "submit() entered the kernel";
  EXPECT_EQ(engine_->in_flight(), 64u);
  ASSERT_TRUE(run_until([&] { return engine_->in_flight() == 0; }));
  EXPECT_EQ(engine_->stats().submit_calls, 1u);
  for (const auto& x : w) EXPECT_EQ(x.result, 4096);
}

// With the SQ full the batch goes out at once, and requests beyond the ring wait in order, never fail.
TEST_F(EngineTest, RequestsBeyondTheRingWaitInThePendingList) {
  make_engine(8);
  auto model = make_file(dir_.file("disk"), 4 * kMiB);
  auto f = open_backing(dir_.file("disk"), true);
  auto buf = aligned_buffer(200 * 512);
  std::vector<Waiter> w(200);
  for (std::size_t i = 0; i < w.size(); ++i) {
    w[i].req = IoRequest{.op = IoOp::kRead, .offset = i * 4096, .length = 512, .data = buf.get() + i * 512};
    w[i].req.done = &on_done;
    w[i].req.context = &w[i];
    engine_->submit(*f, &w[i].req);
    if (i == 7) {
      EXPECT_EQ(engine_->stats().submit_calls, 1u) << "a full SQ was not submitted at once";
    }
  }
  EXPECT_EQ(engine_->stats().pending_peak, 192u);
  ASSERT_TRUE(run_until([&] { return engine_->in_flight() == 0; }));
  for (std::size_t i = 0; i < w.size(); ++i) {
    ASSERT_EQ(w[i].result, 512) << i;
    ASSERT_EQ(std::memcmp(buf.get() + i * 512, model.data() + i * 4096, 512), 0) << i;
  }
}

// A random mix of reads and writes (512 B to 1 MiB, aligned and not, fixed buffers or not, up to
// 64 in flight through a 32-entry ring) matches an in-memory model, and so does the file.
TEST_F(EngineTest, RandomWorkloadMatchesModel) {
  make_engine(32);
  constexpr std::size_t kSize = 32 * kMiB;
  constexpr unsigned kOps = 1500, kSlots = 64;
  auto model = make_file(dir_.file("disk"), kSize, 7);
  auto f = open_backing(dir_.file("disk"), false);
  const bool has_direct = f->direct_fd >= 0;

  struct Slot {
    Waiter w;
    AlignedBuffer buf;
    bool busy = false;
  };
  std::vector<Slot> slots(kSlots);
  std::vector<iovec> fixed;
  for (auto& s : slots) {
    s.buf = aligned_buffer(kMiB + 4096);
    fixed.push_back({s.buf.get(), kMiB + 4096});
  }
  engine_->register_buffers(fixed);

  std::mt19937_64 rng(42);
  unsigned issued = 0, busy = 0, mismatches = 0, failures = 0;
  const auto overlaps = [&](std::uint64_t off, std::uint32_t len) {
    for (const auto& s : slots) {
      if (s.busy && off < s.w.req.offset + s.w.req.length && s.w.req.offset < off + len) return true;
    }
    return false;
  };
  const auto complete = [&](Slot& s) {
    if (s.w.result != static_cast<int>(s.w.req.length)) ++failures;
    if (s.w.req.op == IoOp::kRead &&
        std::memcmp(s.w.req.data, model.data() + s.w.req.offset, s.w.req.length) != 0) {
      ++mismatches;
    }
    s.busy = false;
    --busy;
  };
  while (issued < kOps || busy > 0) {
    for (std::size_t i = 0; i < slots.size() && issued < kOps; ++i) {
      Slot& s = slots[i];
      if (s.busy) continue;
      const bool aligned = rng() % 2 == 0;
      std::uint32_t len = static_cast<std::uint32_t>(512u << (rng() % 12));  // 512 B .. 1 MiB
      if (!aligned) len = static_cast<std::uint32_t>(1 + rng() % len);
      std::uint64_t off = rng() % (kSize - len + 1);
      if (aligned) off &= ~std::uint64_t{4095};
      if (overlaps(off, len)) continue;
      const std::size_t shift = aligned ? 0 : 1 + rng() % 4000;
      const bool write = rng() % 2 == 0;
      s.w = Waiter{};
      s.w.req = IoRequest{.op = write ? IoOp::kWrite : IoOp::kRead,
                          .offset = off,
                          .length = len,
                          .data = s.buf.get() + shift,
                          .fixed_index = rng() % 2 == 0 ? static_cast<int>(i) : -1};
      s.w.req.done = &on_done;
      s.w.req.context = &s.w;
      if (write) {
        for (std::uint32_t k = 0; k < len; ++k) s.w.req.data[k] = static_cast<std::byte>(rng());
        std::memcpy(model.data() + off, s.w.req.data, len);  // no overlapping request is in flight
      }
      s.busy = true;
      ++busy;
      ++issued;
      engine_->submit(*f, &s.w.req);
    }
    io_.run_one_for(std::chrono::milliseconds(100));
    for (auto& s : slots) {
      if (s.busy && s.w.finished) complete(s);
    }
  }
  EXPECT_EQ(failures, 0u);
  EXPECT_EQ(mismatches, 0u);
  EXPECT_EQ(engine_->in_flight(), 0u);
  const auto& st = engine_->stats();
  EXPECT_EQ(st.completed, kOps);
  EXPECT_GT(st.fixed, 0u);
  EXPECT_GT(st.buffered, 0u);
  if (has_direct) {
    EXPECT_GT(st.direct, 0u);
  }
  EXPECT_GT(st.pending_peak, 0u);
  EXPECT_LT(st.submit_calls, st.sqes) << "no batching happened";
  const auto disk = read_whole(dir_.file("disk"));
  EXPECT_TRUE(disk == model) << "the file differs from the model";
}

// Registered buffers are used with READ_FIXED / WRITE_FIXED; an unknown index is -EINVAL.
TEST_F(EngineTest, FixedBuffers) {
  make_file(dir_.file("disk"), kMiB);
  auto f = open_backing(dir_.file("disk"), false);
  auto a = aligned_buffer(65536), b = aligned_buffer(65536);
  const iovec regs[] = {{a.get(), 65536}, {b.get(), 65536}};
  engine_->register_buffers(regs);
  for (std::size_t i = 0; i < 65536; ++i) a[i] = static_cast<std::byte>(i * 7);
  ASSERT_EQ(run(*f, IoOp::kWrite, 4096, 65536, a.get(), 0, 0), 65536);
  ASSERT_EQ(run(*f, IoOp::kRead, 4096 + 100, 5000, b.get() + 3, 0, 1), 5000);  // inside buffer 1, unaligned
  EXPECT_EQ(std::memcmp(b.get() + 3, a.get() + 100, 5000), 0);
  EXPECT_EQ(engine_->stats().fixed, 2u);
  EXPECT_EQ(run(*f, IoOp::kRead, 0, 512, b.get(), 0, 2), -EINVAL);
  EXPECT_EQ(engine_->stats().fixed, 2u);
}

// Requests ending exactly at EOF succeed; one byte further, or an offset+length that overflows, is -EINVAL.
TEST_F(EngineTest, RangeChecksAtEndOfFile) {
  const std::size_t size = kMiB + 100;  // not a whole number of blocks
  auto model = make_file(dir_.file("disk"), size);
  auto f = open_backing(dir_.file("disk"), false);
  auto buf = aligned_buffer(8192);
  ASSERT_EQ(run(*f, IoOp::kRead, size - 100, 100, buf.get()), 100);
  EXPECT_EQ(std::memcmp(buf.get(), model.data() + size - 100, 100), 0);
  ASSERT_EQ(run(*f, IoOp::kRead, kMiB - 4096, 4196, buf.get()), 4196);
  EXPECT_EQ(std::memcmp(buf.get(), model.data() + kMiB - 4096, 4196), 0);
  EXPECT_EQ(run(*f, IoOp::kWrite, size - 4096, 4096, buf.get()), 4096);
  EXPECT_EQ(run(*f, IoOp::kRead, size - 4096, 4097, buf.get()), -EINVAL);
  EXPECT_EQ(run(*f, IoOp::kRead, size, 0, buf.get()), 0);
  EXPECT_EQ(run(*f, IoOp::kRead, size + 1, 0, buf.get()), -EINVAL);
  EXPECT_EQ(run(*f, IoOp::kRead, std::numeric_limits<std::uint64_t>::max() - 10, 20, buf.get()), -EINVAL);
  EXPECT_EQ(run(*f, IoOp::kWrite, std::numeric_limits<std::uint64_t>::max() - 10, 20, buf.get()), -EINVAL);
  EXPECT_EQ(run(*f, IoOp::kTrim, size - 10, std::numeric_limits<std::uint32_t>::max()), -EINVAL);
  EXPECT_EQ(run(*f, IoOp::kWriteZeroes, std::numeric_limits<std::uint64_t>::max(), 1), -EINVAL);
  EXPECT_EQ(std::filesystem::file_size(dir_.file("disk")), size) << "a refused request changed the file";
  EXPECT_EQ(engine_->stats().sqes, 3u) << "a refused request reached the ring";
}

// Invalid requests complete through `done` on a later turn, never inside submit().
TEST_F(EngineTest, RefusalsCompleteAsynchronously) {
  make_file(dir_.file("disk"), kMiB);
  auto f = open_backing(dir_.file("disk"), false);
  Waiter w;
  w.req = IoRequest{.op = IoOp::kRead, .offset = 2 * kMiB, .length = 512};
  w.req.done = &on_done;
  w.req.context = &w;
  auto buf = aligned_buffer(512);
  w.req.data = buf.get();
  engine_->submit(*f, &w.req);
  EXPECT_FALSE(w.finished);
  EXPECT_EQ(engine_->in_flight(), 1u);
  ASSERT_TRUE(run_until([&] { return w.finished; }));
  EXPECT_EQ(w.result, -EINVAL);
  EXPECT_EQ(run(*f, IoOp::kRead, 0, 512, nullptr), -EINVAL);
  EXPECT_EQ(run(*f, static_cast<IoOp>(42), 0, 512, buf.get()), -EINVAL);
  BackingFile closed;
  EXPECT_EQ(run(closed, IoOp::kRead, 0, 512, buf.get()), -EBADF);
}

// A read cut short (the file shrank behind the export) is requeued for the rest and then fails with -EIO.
TEST_F(EngineTest, ShortReadIsRequeuedForTheRemainder) {
  auto model = make_file(dir_.file("disk"), kMiB);
  auto f = open_backing(dir_.file("disk"), false);
  ASSERT_EQ(::truncate(dir_.file("disk").c_str(), kMiB - 1000), 0);
  auto buf = aligned_buffer(8192);
  EXPECT_EQ(run(*f, IoOp::kRead, kMiB - 4000, 3999, buf.get()), -EIO);  // unaligned: page cache
  EXPECT_EQ(engine_->stats().short_requeues, 1u);
  EXPECT_EQ(std::memcmp(buf.get(), model.data() + kMiB - 4000, 3000), 0) << "the part that exists was not read";
}

// A read-only backing file refuses writes, trims and write-zeroes with -EROFS and is left unchanged.
TEST_F(EngineTest, ReadOnlyRefusesChanges) {
  auto model = make_file(dir_.file("disk"), kMiB);
  auto f = open_backing(dir_.file("disk"), true);
  EXPECT_TRUE(f->read_only);
  auto buf = aligned_buffer(4096);
  EXPECT_EQ(run(*f, IoOp::kWrite, 0, 4096, buf.get()), -EROFS);
  EXPECT_EQ(run(*f, IoOp::kWrite, 0, 4096, buf.get(), kIoFua), -EROFS);
  EXPECT_EQ(run(*f, IoOp::kTrim, 0, 4096), -EROFS);
  EXPECT_EQ(run(*f, IoOp::kWriteZeroes, 0, 4096), -EROFS);
  EXPECT_EQ(run(*f, IoOp::kRead, 0, 4096, buf.get()), 4096);
  EXPECT_EQ(run(*f, IoOp::kFlush, 0, 0), 0);
  EXPECT_TRUE(read_whole(dir_.file("disk")) == model);
}

// Flush and FUA writes succeed; FUA on trim / write-zeroes adds a datasync step.
TEST_F(EngineTest, FlushAndFua) {
  make_file(dir_.file("disk"), kMiB);
  auto f = open_backing(dir_.file("disk"), false);
  auto buf = aligned_buffer(8192);
  std::memset(buf.get(), 0x11, 8192);
  EXPECT_EQ(run(*f, IoOp::kWrite, 4096, 8192, buf.get(), kIoFua), 8192);  // O_DIRECT + RWF_DSYNC
  EXPECT_EQ(run(*f, IoOp::kWrite, 100, 50, buf.get(), kIoFua), 50);       // page cache + RWF_DSYNC
  EXPECT_EQ(run(*f, IoOp::kFlush, 0, 0), 0);
  const auto before = engine_->stats().sqes;
  EXPECT_EQ(run(*f, IoOp::kTrim, 0, 4096, nullptr, kIoFua), 0);
  EXPECT_EQ(engine_->stats().sqes - before, 2u) << "FUA trim is fallocate then fdatasync";
  const auto disk = read_whole(dir_.file("disk"));
  EXPECT_TRUE(all_zero(disk.data(), 4096));
  EXPECT_TRUE(std::all_of(disk.begin() + 4096, disk.begin() + 12288, [](std::byte b) { return b == std::byte{0x11}; }));
}

// Trim punches a hole: the range reads back as zeroes and the file's allocated blocks shrink.
TEST_F(EngineTest, TrimPunchesAHole) {
  auto model = make_file(dir_.file("disk"), 8 * kMiB);
  auto f = open_backing(dir_.file("disk"), false);
  struct stat before {}, after {};
  ASSERT_EQ(::stat(dir_.file("disk").c_str(), &before), 0);
  ASSERT_EQ(run(*f, IoOp::kTrim, 2 * kMiB, 4 * kMiB), 0);
  ASSERT_EQ(run(*f, IoOp::kTrim, 100, 50), 0);  // inside a block: zeroed, nothing freed
  ASSERT_EQ(::stat(dir_.file("disk").c_str(), &after), 0);
  EXPECT_LE(after.st_blocks, before.st_blocks - static_cast<blkcnt_t>(4 * kMiB / 512));
  EXPECT_EQ(after.st_size, before.st_size);
  auto buf = aligned_buffer(4 * kMiB);
  ASSERT_EQ(run(*f, IoOp::kRead, 2 * kMiB, 4 * kMiB, buf.get()), static_cast<int>(4 * kMiB));
  EXPECT_TRUE(all_zero(buf.get(), 4 * kMiB));
  ASSERT_EQ(run(*f, IoOp::kRead, 0, 4096, buf.get()), 4096);
  EXPECT_TRUE(all_zero(buf.get() + 100, 50));
  EXPECT_EQ(std::memcmp(buf.get(), model.data(), 100), 0);
  EXPECT_EQ(std::memcmp(buf.get() + 150, model.data() + 150, 4096 - 150), 0);
  ASSERT_EQ(run(*f, IoOp::kRead, 6 * kMiB, 4096, buf.get()), 4096);
  EXPECT_EQ(std::memcmp(buf.get(), model.data() + 6 * kMiB, 4096), 0);
}

// Write-zeroes zeroes exactly its range, aligned or not, through fallocate on this file system.
TEST_F(EngineTest, WriteZeroes) {
  auto model = make_file(dir_.file("disk"), 4 * kMiB);
  auto f = open_backing(dir_.file("disk"), false);
  ASSERT_EQ(run(*f, IoOp::kWriteZeroes, kMiB, kMiB), 0);
  ASSERT_EQ(run(*f, IoOp::kWriteZeroes, 3 * kMiB + 10, 7777, nullptr, kIoFua), 0);
  std::memset(model.data() + kMiB, 0, kMiB);
  std::memset(model.data() + 3 * kMiB + 10, 0, 7777);
  EXPECT_TRUE(read_whole(dir_.file("disk")) == model);
  struct stat st {};
  ASSERT_EQ(::stat(dir_.file("disk").c_str(), &st), 0);
  EXPECT_EQ(st.st_size, static_cast<off_t>(4 * kMiB));
}

// Destroying the engine with I/O in flight waits for it: every callback runs and the data is on disk.
TEST_F(EngineTest, DestructorDrainsInFlightRequests) {
  make_engine(16);
  make_file(dir_.file("disk"), 8 * kMiB);
  auto f = open_backing(dir_.file("disk"), false);
  auto buf = aligned_buffer(64 * 65536);
  for (std::size_t i = 0; i < 64 * 65536; ++i) buf[i] = static_cast<std::byte>(i / 65536 + 1);
  std::vector<Waiter> w(64);
  for (std::size_t i = 0; i < w.size(); ++i) {
    w[i].req = IoRequest{.op = IoOp::kWrite, .offset = i * 65536 * 2, .length = 65536, .data = buf.get() + i * 65536};
    w[i].req.done = &on_done;
    w[i].req.context = &w[i];
    engine_->submit(*f, &w[i].req);
  }
  Waiter bad;
  bad.req = IoRequest{.op = IoOp::kWrite, .offset = 9 * kMiB, .length = 1, .data = buf.get()};
  bad.req.done = &on_done;
  bad.req.context = &bad;
  engine_->submit(*f, &bad.req);
  engine_.reset();  // the io_context never ran
  for (std::size_t i = 0; i < w.size(); ++i) EXPECT_EQ(w[i].result, 65536) << i;
  EXPECT_TRUE(bad.finished);
  EXPECT_EQ(bad.result, -EINVAL);
  const auto disk = read_whole(dir_.file("disk"));
  for (std::size_t i = 0; i < w.size(); ++i) {
    EXPECT_EQ(disk[i * 65536 * 2], static_cast<std::byte>(i + 1)) << i;
  }
  io_.poll();  // handlers the engine left queued must find it gone and do nothing
}

// A callback that submits while the engine is being destroyed gets -ECANCELED, not a hang.
TEST_F(EngineTest, SubmitDuringDestructionIsCancelled) {
  make_file(dir_.file("disk"), kMiB);
  auto f = open_backing(dir_.file("disk"), false);
  auto buf = aligned_buffer(4096);
  struct Chain {
    StorageEngine* engine;
    BackingFile* file;
    IoRequest first, second;
    int first_result = 1, second_result = 1;
  } chain{engine_.get(), f.get()};
  chain.first = IoRequest{.op = IoOp::kRead, .offset = 0, .length = 4096, .data = buf.get()};
  chain.second = chain.first;
  chain.first.context = chain.second.context = &chain;
  chain.first.done = [](IoRequest* r, int res) {
    auto* c = static_cast<Chain*>(r->context);
    c->first_result = res;
    c->engine->submit(*c->file, &c->second);
  };
  chain.second.done = [](IoRequest* r, int res) { static_cast<Chain*>(r->context)->second_result = res; };
  engine_->submit(*f, &chain.first);
  engine_.reset();
  EXPECT_EQ(chain.first_result, 4096);
  EXPECT_EQ(chain.second_result, -ECANCELED);
}

}  // namespace
}  // namespace ibdisk::target::testing
