#pragma once
// Shared pieces of the storage engine tests: a scratch directory on a real file system, an
// engine on an io_context, and a synchronous helper that runs one request to completion.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "common/error.h"
#include "target/storage.h"

namespace ibdisk::target::testing {

struct FreeDeleter {
  void operator()(std::byte* p) const { std::free(p); }
};
using AlignedBuffer = std::unique_ptr<std::byte[], FreeDeleter>;

inline AlignedBuffer aligned_buffer(std::size_t bytes, std::size_t alignment = 4096) {
  const std::size_t rounded = (bytes + alignment - 1) / alignment * alignment;
  auto* p = static_cast<std::byte*>(std::aligned_alloc(alignment, rounded == 0 ? alignment : rounded));
  std::memset(p, 0, rounded == 0 ? alignment : rounded);
  return AlignedBuffer(p);
}

// A fresh directory under /var/tmp (a disk file system, so O_DIRECT works; /tmp may be tmpfs),
// removed with its contents at the end.
class ScratchDir {
 public:
  ScratchDir() {
    const char* base = std::getenv("IBDISK_STORAGE_TEST_DIR");
    std::string tmpl = std::string(base ? base : "/var/tmp") + "/ibdisk-storage-XXXXXX";
    if (::mkdtemp(tmpl.data()) == nullptr) throw SystemError("mkdtemp(" + tmpl + ")", errno);
    path_ = tmpl;
  }
  ~ScratchDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }
  std::string file(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// Writes SIZE bytes of a pattern derived from SEED (byte i = f(i, seed)) and returns them.
inline std::vector<std::byte> make_file(const std::string& path, std::size_t size, unsigned seed = 1) {
  std::vector<std::byte> data(size);
  std::uint64_t x = 0x9e3779b97f4a7c15ull * (seed + 1);
  for (std::size_t i = 0; i < size; ++i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    data[i] = static_cast<std::byte>(x);
  }
  const int fd = ::open(path.c_str(), O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0600);
  if (fd < 0) throw SystemError("open(" + path + ")", errno);
  std::size_t done = 0;
  while (done < size) {
    const ssize_t n = ::pwrite(fd, data.data() + done, size - done, static_cast<off_t>(done));
    if (n <= 0) {
      ::close(fd);
      throw SystemError("pwrite(" + path + ")", errno);
    }
    done += static_cast<std::size_t>(n);
  }
  ::fsync(fd);
  ::close(fd);
  return data;
}

inline std::vector<std::byte> read_whole(const std::string& path) {
  std::vector<std::byte> out(std::filesystem::file_size(path));
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  std::size_t done = 0;
  while (fd >= 0 && done < out.size()) {
    const ssize_t n = ::pread(fd, out.data() + done, out.size() - done, static_cast<off_t>(done));
    if (n <= 0) break;
    done += static_cast<std::size_t>(n);
  }
  if (fd >= 0) ::close(fd);
  return out;
}

// Engine and io_context; skips the test with the reason when this kernel refuses io_uring.
class EngineTest : public ::testing::Test {
 protected:
  void SetUp() override { make_engine(256); }

  void make_engine(unsigned queue_depth) {
    engine_.reset();
    try {
      engine_ = std::make_unique<StorageEngine>(io_, StorageEngine::Options{queue_depth});
    } catch (const SystemError& e) {
      if (e.error_code() == ENOSYS || e.error_code() == EPERM) GTEST_SKIP() << "io_uring unavailable: " << e.what();
      throw;
    }
  }

  // Runs the io_context until pred() holds; fails after 20 s.
  bool run_until(const std::function<bool()>& pred) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (!pred()) {
      if (std::chrono::steady_clock::now() > deadline) return false;
      io_.run_one_for(std::chrono::milliseconds(50));
      if (io_.stopped()) io_.restart();
    }
    return true;
  }

  struct Waiter {
    IoRequest req;
    bool finished = false;
    int result = 0;
  };
  static void on_done(IoRequest* r, int res) {
    auto* w = static_cast<Waiter*>(r->context);
    w->finished = true;
    w->result = res;
  }

  // Submits one request and returns its result once `done` ran.
  int run(BackingFile& f, IoOp op, std::uint64_t offset, std::uint32_t length, std::byte* data = nullptr,
          std::uint32_t flags = 0, int fixed_index = -1) {
    Waiter w;
    w.req.op = op;
    w.req.offset = offset;
    w.req.length = length;
    w.req.data = data;
    w.req.flags = flags;
    w.req.fixed_index = fixed_index;
    w.req.done = &on_done;
    w.req.context = &w;
    engine_->submit(f, &w.req);
    EXPECT_TRUE(run_until([&] { return w.finished; })) << "request did not complete";
    return w.result;
  }

  boost::asio::io_context io_;
  std::unique_ptr<StorageEngine> engine_;
  ScratchDir dir_;
};

}  // namespace ibdisk::target::testing
