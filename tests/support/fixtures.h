#pragma once
// Shared helpers for tests that run a target: temporary directories, sparse files, free
// ports, and an in-process server on its own thread.
#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "initiator/client.h"
#include "initiator/extents.h"
#include "target/server.h"

namespace ibdisk::testing {

// A fresh directory under $TMPDIR, removed with its contents on destruction.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  const std::filesystem::path& path() const { return path_; }
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
};

// Creates a sparse file of `size` bytes.
void make_sparse_file(const std::string& path, std::uint64_t size);
// A whole file's bytes ("" when it cannot be read).
std::string read_file(const std::string& path);
// A file's data and hole runs as SEEK_DATA / SEEK_HOLE tell them (what the extents command
// must answer for it).
std::vector<initiator::ExtentRun> seek_map(const std::string& path);

// A target on 127.0.0.1 (any free port) exporting `path` as "disk", small enough for tests.
target::ServerOptions loopback_target(const std::string& path, bool read_only = false, unsigned buffer_mib = 64);

// A TCP port on 127.0.0.1 that was free a moment ago.
std::uint16_t free_port();

// Runs one asynchronous Client request to completion; returns its status.
template <typename Fn>
int sync(initiator::Client& c, Fn&& fn) {
  bool done = false;
  int status = 1;
  fn([&](int st) {
    status = st;
    done = true;
  });
  c.run_until([&] { return done; });
  return status;
}

// The liveness tests' core: writes pattern 1 at offset 0 of `handle`, stops the target process
// `pid` (SIGSTOP; SIGCONT after `stopped_for`), writes pattern 2 over it meanwhile, and reads it
// back after. The Client must declare the silent connection lost and resend for the second
// write to succeed. `error` is "" or what went wrong.
struct StoppedTargetWrite {
  std::string error;
  std::chrono::steady_clock::duration took{};  // of the second write
};
StoppedTargetWrite write_while_target_stopped(initiator::Client& c, std::uint32_t handle, pid_t pid,
                                              std::chrono::seconds stopped_for);

// An ibdisk target running in this process until destroyed.
class ServerThread {
 public:
  // before_run: called with the server before it starts serving (add_listener, fault hooks).
  explicit ServerThread(target::ServerOptions opts, const std::function<void(target::Server&)>& before_run = {});
  ~ServerThread();
  target::Server& server() { return *server_; }
  std::uint16_t port() const { return server_->port(); }

 private:
  std::unique_ptr<target::Server> server_;
  std::thread thread_;
};

}  // namespace ibdisk::testing
