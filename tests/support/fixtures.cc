#include "tests/support/fixtures.h"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <fstream>
#include <mutex>
#include <random>
#include <set>
#include <stdexcept>

#include "common/checksum.h"
#include "common/error.h"
#include "transport/tcp/asio.h"

namespace ibdisk::testing {

TempDir::TempDir() {
  const char* base = std::getenv("TMPDIR");
  std::string templ = std::string(base && *base ? base : "/tmp") + "/ibdisk-test.XXXXXX";
  if (!::mkdtemp(templ.data())) throw std::runtime_error("mkdtemp failed");
  path_ = templ;
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

std::vector<initiator::ExtentRun> seek_map(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) throw std::runtime_error("seek_map: cannot open " + path);
  const off_t size = ::lseek(fd, 0, SEEK_END);
  std::vector<initiator::ExtentRun> runs;
  off_t pos = 0;
  while (pos < size) {
    off_t data = ::lseek(fd, pos, SEEK_DATA);
    if (data < 0) data = size;
    if (data > pos) runs.push_back({static_cast<std::uint64_t>(pos), static_cast<std::uint64_t>(data - pos),
                                    wire::kExtentHole | wire::kExtentZero});
    if (data >= size) break;
    const off_t hole = ::lseek(fd, data, SEEK_HOLE);
    runs.push_back({static_cast<std::uint64_t>(data), static_cast<std::uint64_t>(hole - data), 0});
    pos = hole;
  }
  ::close(fd);
  return runs;
}

std::string read_file(const std::string& path) {
  // One read of the whole file: a character at a time is minutes for 64 MiB under TSan.
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  if (!f) return "";
  std::string out(static_cast<std::size_t>(f.tellg()), '\0');
  f.seekg(0);
  f.read(out.data(), static_cast<std::streamsize>(out.size()));
  return out;
}

void make_sparse_file(const std::string& path, std::uint64_t size) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0 || ::ftruncate(fd, static_cast<off_t>(size)) != 0) throw std::runtime_error("cannot create " + path);
  ::close(fd);
}

target::ServerOptions loopback_target(const std::string& path, bool read_only, unsigned buffer_mib) {
  target::ServerOptions o;
  o.exports.push_back({"disk", path, read_only, false});
  o.listen_address = "127.0.0.1";
  o.port = 0;
  o.threads = 1;
  o.buffer_mib = buffer_mib;
  return o;
}

std::uint16_t free_port() {
  // The kernel may hand the same port to two binds in a row once the first socket is closed:
  // a test asking for two ports (ibdisk's and the NBD one) then got one port twice and its
  // target failed with "Address already in use". Never return a port twice in one process.
  static std::mutex mu;
  static std::set<std::uint16_t> given;
  std::lock_guard lock(mu);
  for (;;) {
    boost::asio::io_context io;
    boost::asio::ip::tcp::acceptor a(io, {boost::asio::ip::make_address("127.0.0.1"), 0});
    const std::uint16_t port = a.local_endpoint().port();
    if (given.insert(port).second) return port;
  }
}

ServerThread::ServerThread(target::ServerOptions opts, const std::function<void(target::Server&)>& before_run)
    : server_(std::make_unique<target::Server>(std::move(opts))) {
  if (before_run) before_run(*server_);
  thread_ = std::thread([this] { server_->run(); });
}

ServerThread::~ServerThread() {
  server_->stop();
  thread_.join();
}

StoppedTargetWrite write_while_target_stopped(initiator::Client& c, std::uint32_t handle, pid_t pid,
                                              std::chrono::seconds stopped_for) {
  std::vector<std::byte> a(65536), b(65536), back(65536);
  fill_pattern(a, 1);
  fill_pattern(b, 2);
  StoppedTargetWrite r;
  if (const int st = sync(c, [&](auto d) { c.write(0, handle, 0, 65536, a.data(), 0, d); }); st != 0) {
    r.error = "the first write failed: " + errno_text(-st);
    return r;
  }
  if (::kill(pid, SIGSTOP) != 0) {
    r.error = "SIGSTOP: " + errno_text(errno);
    return r;
  }
  std::thread resume([pid, stopped_for] {
    std::this_thread::sleep_for(stopped_for);
    ::kill(pid, SIGCONT);
  });
  const auto t0 = std::chrono::steady_clock::now();
  try {
    if (const int st = sync(c, [&](auto d) { c.write(0, handle, 0, 65536, b.data(), 0, d); }); st != 0) {
      r.error = "the write while the target was stopped failed: " + errno_text(-st);
    }
  } catch (const std::exception& e) {
    r.error = std::string("the session was given up: ") + e.what();
  }
  r.took = std::chrono::steady_clock::now() - t0;
  resume.join();
  if (!r.error.empty()) return r;
  if (const int st = sync(c, [&](auto d) { c.read(0, handle, 0, 65536, back.data(), d); }); st != 0) {
    r.error = "reading back failed: " + errno_text(-st);
  } else if (back != b) {
    r.error = "read back other data than the write while the target was stopped";
  }
  return r;
}

}  // namespace ibdisk::testing
