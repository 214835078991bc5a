// The NBD front end over real loopback TCP with the real storage engine: a raw protocol client
// for the exact bytes (errors, out-of-order replies, broken streams, export rules), then the
// real clients installed on the host (nbdinfo, nbdcopy, qemu-img) with content checked by
// SHA-256 both ways.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <optional>
#include <thread>

#include "common/checksum.h"
#include "target/acl.h"
#include "target/exports.h"
#include "target/nbd/nbd_server.h"
#include "target/nbd/protocol.h"
#include "target/nbd/tls.h"
#include "target/storage.h"
#include "tests/support/fixtures.h"
#include "tests/support/process.h"
#include "transport/tcp/asio.h"

namespace ibdisk::nbd {
namespace {

namespace fs = std::filesystem;
using boost::asio::ip::tcp;

constexpr std::uint64_t kDiskSize = 4u << 20;
constexpr std::uint64_t kIsoSize = 1u << 20;

std::vector<std::byte> pattern(std::size_t n, std::uint64_t seed) {
  std::vector<std::byte> v(n);
  fill_pattern(v, seed);
  return v;
}

std::vector<std::byte> read_file(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::vector<char> c((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  return {reinterpret_cast<std::byte*>(c.data()), reinterpret_cast<std::byte*>(c.data()) + c.size()};
}

void write_file(const fs::path& p, std::span<const std::byte> data) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size()));
}

std::string file_sha(const fs::path& p) { return sha256_hex(read_file(p)); }

// The tool's absolute path from PATH (the process helper does not search), or empty.
std::string tool(const std::string& name) {
  const char* path = std::getenv("PATH");
  std::string dirs = path ? path : "/usr/bin:/bin";
  for (std::size_t pos = 0; pos <= dirs.size();) {
    const auto end = std::min(dirs.find(':', pos), dirs.size());
    const fs::path candidate = fs::path(dirs.substr(pos, end - pos)) / name;
    if (::access(candidate.c_str(), X_OK) == 0) return candidate.string();
    pos = end + 1;
  }
  return {};
}

// Exports in a temporary folder, the registry, one io thread with the storage engine and the
// NBD server. Members are declared so the registry outlives the engine and the server.
class NbdServerTest : public ::testing::Test {
 protected:
  void SetUp() override { start({}); }

  void start(std::vector<std::string> allow, NbdServerOptions opts = {}) {
    dir_ = fs::temp_directory_path() / ("ibdisk-nbd-" + std::to_string(::getpid()) + "-" +
                                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    write_file(dir_ / "disk.img", std::vector<std::byte>(kDiskSize));
    iso_ = pattern(kIsoSize, 42);
    write_file(dir_ / "iso.img", iso_);
    write_file(dir_ / "shared.img", std::vector<std::byte>(kDiskSize));
    registry_.emplace(std::vector<target::ExportConfig>{
        {"disk", (dir_ / "disk.img").string(), false, false},
        {"iso", (dir_ / "iso.img").string(), true, false},
        {"shared", (dir_ / "shared.img").string(), false, true},
    });
    engine_.emplace(io_, target::StorageEngine::Options{});
    server_.emplace(io_, *registry_, *engine_, target::NetworkAllowList(allow),
                    tcp::endpoint(boost::asio::ip::make_address("127.0.0.1"), 0), opts);
    work_.emplace(io_.get_executor());
    thread_ = std::thread([this] { io_.run(); });
  }

  void TearDown() override {
    work_.reset();
    io_.stop();
    if (thread_.joinable()) thread_.join();
    server_.reset();
    engine_.reset();
    fs::remove_all(dir_);
  }

  std::uint16_t port() const { return server_->port(); }
  std::string uri(const std::string& name) const {
    return "nbd://127.0.0.1:" + std::to_string(port()) + "/" + name;
  }

  fs::path dir_;
  std::vector<std::byte> iso_;
  std::optional<target::ExportRegistry> registry_;
  boost::asio::io_context io_;
  std::optional<target::StorageEngine> engine_;
  std::optional<NbdServer> server_;
  std::optional<boost::asio::executor_work_guard<boost::asio::io_context::executor_type>> work_;
  std::thread thread_;
};

// A blocking NBD client that speaks the bytes itself.
class RawClient {
 public:
  explicit RawClient(std::uint16_t port) : socket_(io_) {
    socket_.connect({boost::asio::ip::make_address("127.0.0.1"), port});
  }

  void send(std::span<const std::byte> b) { boost::asio::write(socket_, boost::asio::buffer(b.data(), b.size())); }
  template <typename Wire>
  void send_wire(const Wire& w) { send(bytes_of(w)); }

  std::vector<std::byte> recv(std::size_t n) {
    std::vector<std::byte> b(n);
    boost::asio::read(socket_, boost::asio::buffer(b));
    return b;
  }
  template <typename Wire>
  Wire recv_wire() {
    const auto b = recv(sizeof(Wire));
    return load<Wire>(b);
  }

  // true when the server closed the connection (read sees EOF or a reset) within 10 s.
  bool closed_by_server() {
    pollfd p{socket_.native_handle(), POLLIN, 0};
    if (::poll(&p, 1, 10000) != 1) return false;
    std::byte b;
    boost::system::error_code ec;
    boost::asio::read(socket_, boost::asio::buffer(&b, 1), ec);
    return ec == boost::asio::error::eof || ec == boost::asio::error::connection_reset;
  }

  void greet(std::uint32_t flags = kClientFlagFixedNewstyle | kClientFlagNoZeroes) {
    const auto g = recv_wire<GreetingWire>();
    ASSERT_EQ(g.magic.get(), kNbdMagic);
    ASSERT_EQ(g.option_magic.get(), kOptionMagic);
    ASSERT_EQ(g.handshake_flags.get(), kFlagFixedNewstyle | kFlagNoZeroes);
    Be32 f;
    f.set(flags);
    send_wire(f);
  }

  struct OptReply {
    std::uint32_t type;
    std::vector<std::byte> data;
    std::string text() const { return {reinterpret_cast<const char*>(data.data()), data.size()}; }
  };
  void send_option(std::uint32_t option, std::span<const std::byte> data) {
    OptionHeaderWire h;
    h.magic.set(kOptionMagic);
    h.option.set(option);
    h.length.set(static_cast<std::uint32_t>(data.size()));
    send_wire(h);
    send(data);
  }
  // Sends an option; returns its replies up to and including the final one.
  std::vector<OptReply> option(std::uint32_t option, std::span<const std::byte> data = {}) {
    send_option(option, data);
    std::vector<OptReply> out;
    for (;;) {
      const auto h = recv_wire<OptionReplyHeaderWire>();
      EXPECT_EQ(h.magic.get(), kOptionReplyMagic);
      EXPECT_EQ(h.option.get(), option);
      out.push_back({h.type.get(), recv(h.length.get())});
      if (out.back().type != kRepServer && out.back().type != kRepInfo) return out;
    }
  }
  static std::vector<std::byte> query(std::string_view name) {
    std::vector<std::byte> d(4 + name.size() + 2);
    Be32 len;
    len.set(static_cast<std::uint32_t>(name.size()));
    std::memcpy(d.data(), &len, 4);
    std::memcpy(d.data() + 4, name.data(), name.size());
    return d;
  }
  // Handshake through NBD_OPT_GO; returns the final reply and keeps the transmission flags.
  OptReply go(std::string_view name, bool structured = false) {
    greet();
    if (structured) {
      auto r = option(kOptStructuredReply);
      EXPECT_EQ(r.back().type, kRepAck);
    }
    auto r = option(kOptGo, query(name));
    for (const auto& x : r) {
      if (x.type == kRepInfo && load<Be16>(x.data).get() == kInfoExport) {
        const auto info = load<InfoExportWire>(x.data);
        size_ = info.size.get();
        flags_ = info.transmission_flags.get();
      }
    }
    return r.back();
  }

  void request(std::uint16_t type, std::uint64_t cookie, std::uint64_t offset, std::uint32_t length,
               std::uint16_t flags = 0, std::span<const std::byte> payload = {}) {
    RequestWire w;
    w.magic.set(kRequestMagic);
    w.flags.set(flags);
    w.type.set(type);
    w.cookie.set(cookie);
    w.offset.set(offset);
    w.length.set(length);
    send_wire(w);
    send(payload);
  }
  // A simple reply's (error, cookie).
  std::pair<std::uint32_t, std::uint64_t> simple() {
    const auto r = recv_wire<SimpleReplyWire>();
    EXPECT_EQ(r.magic.get(), kSimpleReplyMagic);
    return {r.error.get(), r.cookie.get()};
  }

  std::uint64_t size_ = 0;
  std::uint16_t flags_ = 0;

 private:
  boost::asio::io_context io_;
  tcp::socket socket_;
};

// --- raw protocol ---------------------------------------------------------------------------

// Every command on a writable export: write with FUA, read back, flush, trim, write-zeroes,
// then NBD_CMD_DISC ends the connection cleanly and the bytes are in the backing file.
TEST_F(NbdServerTest, CommandsRoundTripAndReachTheFile) {
  RawClient c(port());
  ASSERT_EQ(c.go("disk").type, kRepAck);
  EXPECT_EQ(c.size_, kDiskSize);
  EXPECT_TRUE(c.flags_ & kFlagSendFua);
  EXPECT_FALSE(c.flags_ & kFlagReadOnly);

  const auto data = pattern(64 << 10, 7);
  c.request(kCmdWrite, 1, 4096, static_cast<std::uint32_t>(data.size()), kCmdFlagFua, data);
  EXPECT_EQ(c.simple(), std::make_pair(0u, std::uint64_t{1}));
  c.request(kCmdRead, 2, 4096, static_cast<std::uint32_t>(data.size()));
  EXPECT_EQ(c.simple(), std::make_pair(0u, std::uint64_t{2}));
  EXPECT_EQ(c.recv(data.size()), data);
  c.request(kCmdFlush, 3, 0, 0);
  EXPECT_EQ(c.simple(), std::make_pair(0u, std::uint64_t{3}));
  // Unaligned write: through the page cache.
  const auto odd = pattern(1000, 8);
  c.request(kCmdWrite, 4, 123457, 1000, 0, odd);
  EXPECT_EQ(c.simple().first, 0u);
  c.request(kCmdWriteZeroes, 5, 4096 + 8192, 8192);
  EXPECT_EQ(c.simple().first, 0u);
  c.request(kCmdRead, 6, 4096 + 8192, 8192);
  EXPECT_EQ(c.simple().first, 0u);
  EXPECT_EQ(c.recv(8192), std::vector<std::byte>(8192));
  if (c.flags_ & kFlagSendTrim) {
    c.request(kCmdTrim, 7, 1 << 20, 1 << 20);
    EXPECT_EQ(c.simple().first, 0u);
  }
  c.request(kCmdDisc, 8, 0, 0);
  EXPECT_TRUE(c.closed_by_server());

  auto expect = std::vector<std::byte>(kDiskSize);
  std::copy(data.begin(), data.end(), expect.begin() + 4096);
  std::fill(expect.begin() + 4096 + 8192, expect.begin() + 4096 + 16384, std::byte{0});
  std::copy(odd.begin(), odd.end(), expect.begin() + 123457);
  EXPECT_EQ(sha256_hex(read_file(dir_ / "disk.img")), sha256_hex(expect));
}

// NBD_CMD_WRITE_ZEROES without NBD_CMD_FLAG_NO_HOLE may deallocate, and on a file export it
// does (a hole: the space comes back, issue 21); with NO_HOLE the blocks stay allocated. Both
// read back as zeros.
TEST_F(NbdServerTest, WriteZeroesPunchesUnlessNoHole) {
  RawClient c(port());
  ASSERT_EQ(c.go("disk").type, kRepAck);
  ASSERT_TRUE(c.flags_ & kFlagSendWriteZeroes);
  const auto data = pattern(1 << 20, 9);
  for (std::uint64_t at : {0ull, 2ull << 20}) {
    c.request(kCmdWrite, 1, at, 1 << 20, kCmdFlagFua, data);
    ASSERT_EQ(c.simple().first, 0u);
  }
  c.request(kCmdWriteZeroes, 2, 0, 1 << 20);
  EXPECT_EQ(c.simple().first, 0u);
  c.request(kCmdWriteZeroes, 3, 2 << 20, 1 << 20, kCmdFlagNoHole);
  EXPECT_EQ(c.simple().first, 0u);
  for (std::uint64_t at : {0ull, 2ull << 20}) {
    c.request(kCmdRead, 4, at, 1 << 20);
    EXPECT_EQ(c.simple().first, 0u);
    EXPECT_EQ(c.recv(1 << 20), std::vector<std::byte>(1 << 20)) << "at " << at;
  }
  c.request(kCmdDisc, 5, 0, 0);
  EXPECT_TRUE(c.closed_by_server());
  const int fd = ::open((dir_ / "disk.img").c_str(), O_RDONLY);
  ASSERT_GE(fd, 0);
  EXPECT_EQ(::lseek(fd, 0, SEEK_HOLE), 0) << "write-zeroes without NO_HOLE leaves a hole";
  EXPECT_EQ(::lseek(fd, 2 << 20, SEEK_DATA), 2 << 20) << "write-zeroes with NO_HOLE keeps the blocks";
  EXPECT_GE(::lseek(fd, 2 << 20, SEEK_HOLE), 3 << 20) << "write-zeroes with NO_HOLE keeps the blocks";
  ::close(fd);
}

// Many requests in flight on one connection; replies matched by cookie, in any order.
TEST_F(NbdServerTest, ManyRequestsInFlightMatchedByCookie) {
  RawClient c(port());
  ASSERT_EQ(c.go("disk").type, kRepAck);
  constexpr int kN = 48;
  constexpr std::uint32_t kLen = 16 << 10;
  for (int i = 0; i < kN; ++i) {
    c.request(kCmdWrite, 1000 + i, std::uint64_t(i) * kLen, kLen, 0, pattern(kLen, i));
  }
  std::map<std::uint64_t, int> seen;
  for (int i = 0; i < kN; ++i) {
    const auto [err, cookie] = c.simple();
    EXPECT_EQ(err, 0u);
    ++seen[cookie];
  }
  EXPECT_EQ(seen.size(), std::size_t(kN));
  for (int i = 0; i < kN; ++i) c.request(kCmdRead, 5000 + i, std::uint64_t(i) * kLen, kLen);
  for (int i = 0; i < kN; ++i) {
    const auto [err, cookie] = c.simple();
    ASSERT_EQ(err, 0u);
    ASSERT_GE(cookie, 5000u);
    ASSERT_LT(cookie, 5000u + kN);
    EXPECT_EQ(c.recv(kLen), pattern(kLen, cookie - 5000)) << "cookie " << cookie;
  }
}

// Bad requests get an error reply and the connection keeps serving, in step.
TEST_F(NbdServerTest, BadRequestsGetErrorsAndServingContinues) {
  RawClient c(port());
  ASSERT_EQ(c.go("disk").type, kRepAck);
  c.request(kCmdRead, 1, kDiskSize - 512, 1024);
  EXPECT_EQ(c.simple(), std::make_pair(std::uint32_t{kEinval}, std::uint64_t{1}));
  // A write past the end: ENOSPC, and its payload is skipped so the next header is found.
  const auto junk = pattern(4096, 3);
  c.request(kCmdWrite, 2, kDiskSize, 4096, 0, junk);
  EXPECT_EQ(c.simple(), std::make_pair(std::uint32_t{kEnospc}, std::uint64_t{2}));
  c.request(kCmdWrite, 3, 0, 4096, kCmdFlagFastZero, junk);
  EXPECT_EQ(c.simple(), std::make_pair(std::uint32_t{kEinval}, std::uint64_t{3}));
  c.request(77, 4, 0, 512);
  EXPECT_EQ(c.simple(), std::make_pair(std::uint32_t{kEinval}, std::uint64_t{4}));
  c.request(kCmdRead, 5, 0, 0);
  EXPECT_EQ(c.simple().first, std::uint32_t{kEinval});
  c.request(kCmdRead, 6, ~0ull - 10, 4096);
  EXPECT_EQ(c.simple().first, std::uint32_t{kEinval});
  // A write larger than the maximum block size: refused, payload read past.
  const std::vector<std::byte> big(kMaxPayload + 4096);
  c.request(kCmdWrite, 7, 0, static_cast<std::uint32_t>(big.size()), 0, big);
  EXPECT_EQ(c.simple(), std::make_pair(std::uint32_t{kEinval}, std::uint64_t{7}));
  c.request(kCmdWrite, 8, 0, 4096, 0, junk);
  EXPECT_EQ(c.simple(), std::make_pair(0u, std::uint64_t{8}));
  c.request(kCmdRead, 9, 0, 4096);
  EXPECT_EQ(c.simple(), std::make_pair(0u, std::uint64_t{9}));
  EXPECT_EQ(c.recv(4096), junk);
}

// Pages of [offset, offset + length) of the file at p that are in the page cache.
std::size_t resident_pages(const fs::path& p, std::uint64_t offset, std::uint64_t length) {
  const int fd = ::open(p.c_str(), O_RDONLY);
  if (fd < 0) return 0;
  void* m = ::mmap(nullptr, length, PROT_READ, MAP_SHARED, fd, static_cast<off_t>(offset));
  ::close(fd);
  if (m == MAP_FAILED) return 0;
  const std::size_t page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
  std::vector<unsigned char> v((length + page - 1) / page);
  const int rc = ::mincore(m, length, v.data());
  ::munmap(m, length);
  if (rc != 0) return 0;
  return static_cast<std::size_t>(std::count_if(v.begin(), v.end(), [](unsigned char c) { return c & 1; }));
}

// NBD_CMD_CACHE (issue 21): offered, checked like a read (range, length), answered at once,
// and on an export read through the page cache the range is read into it (readahead) with
// no read sent.
TEST_F(NbdServerTest, CacheCommandPrefetchesTheRange) {
  RawClient c(port());
  ASSERT_EQ(c.go("iso").type, kRepAck);
  ASSERT_TRUE(c.flags_ & kFlagSendCache);
  c.request(kCmdCache, 1, kIsoSize - 4096, 8192);
  EXPECT_EQ(c.simple(), std::make_pair(std::uint32_t{kEinval}, std::uint64_t{1}));
  c.request(kCmdCache, 2, 0, 0);
  EXPECT_EQ(c.simple().first, std::uint32_t{kEinval});

  const fs::path img = dir_ / "iso.img";
  const std::uint64_t half = kIsoSize / 2;
  {
    const int fd = ::open(img.c_str(), O_RDONLY);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::fdatasync(fd), 0);
    ASSERT_EQ(::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED), 0);
    ::close(fd);
  }
  const std::size_t pages = half / static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
  if (resident_pages(img, half, half) == pages) GTEST_SKIP() << "the file system keeps " << img << " in memory";
  c.request(kCmdCache, 3, half, static_cast<std::uint32_t>(half));
  EXPECT_EQ(c.simple(), std::make_pair(0u, std::uint64_t{3}));
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (resident_pages(img, half, half) < pages && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_EQ(resident_pages(img, half, half), pages);
  // The hint does not change what a read returns.
  c.request(kCmdRead, 4, half, 4096);
  EXPECT_EQ(c.simple(), std::make_pair(0u, std::uint64_t{4}));
  EXPECT_EQ(c.recv(4096), std::vector<std::byte>(iso_.begin() + half, iso_.begin() + half + 4096));
}

// A read-only export is advertised as such, reads work, writes get EPERM.
TEST_F(NbdServerTest, ReadOnlyExportRefusesWrites) {
  RawClient c(port());
  ASSERT_EQ(c.go("iso").type, kRepAck);
  EXPECT_TRUE(c.flags_ & kFlagReadOnly);
  EXPECT_FALSE(c.flags_ & kFlagSendTrim);
  c.request(kCmdRead, 1, 0, 8192);
  EXPECT_EQ(c.simple().first, 0u);
  EXPECT_EQ(c.recv(8192), std::vector<std::byte>(iso_.begin(), iso_.begin() + 8192));
  const auto junk = pattern(512, 1);
  c.request(kCmdWrite, 2, 0, 512, 0, junk);
  EXPECT_EQ(c.simple(), std::make_pair(std::uint32_t{kEperm}, std::uint64_t{2}));
  c.request(kCmdRead, 3, 512, 512);
  EXPECT_EQ(c.simple().first, 0u);
  EXPECT_EQ(c.recv(512), std::vector<std::byte>(iso_.begin() + 512, iso_.begin() + 1024));
  EXPECT_EQ(read_file(dir_ / "iso.img"), iso_);
}

// With structured replies: reads are one OFFSET_DATA chunk, errors an ERROR chunk with a
// message, other commands a NONE chunk; all marked DONE.
TEST_F(NbdServerTest, StructuredReplies) {
  RawClient c(port());
  ASSERT_EQ(c.go("iso", true).type, kRepAck);
  EXPECT_TRUE(c.flags_ & kFlagSendDf);
  c.request(kCmdRead, 11, 4096, 4096, kCmdFlagDf);
  auto h = c.recv_wire<StructuredReplyWire>();
  EXPECT_EQ(h.magic.get(), kStructuredReplyMagic);
  EXPECT_EQ(h.flags.get(), kReplyFlagDone);
  EXPECT_EQ(h.type.get(), kReplyOffsetData);
  EXPECT_EQ(h.cookie.get(), 11u);
  ASSERT_EQ(h.length.get(), 8u + 4096);
  EXPECT_EQ(c.recv_wire<OffsetDataChunkWire>().offset.get(), 4096u);
  EXPECT_EQ(c.recv(4096), std::vector<std::byte>(iso_.begin() + 4096, iso_.begin() + 8192));

  c.request(kCmdRead, 12, kIsoSize, 512);
  h = c.recv_wire<StructuredReplyWire>();
  EXPECT_EQ(h.type.get(), kReplyError);
  EXPECT_EQ(h.flags.get(), kReplyFlagDone);
  EXPECT_EQ(h.cookie.get(), 12u);
  const auto e = c.recv_wire<ErrorChunkWire>();
  EXPECT_EQ(e.error.get(), std::uint32_t{kEinval});
  ASSERT_EQ(h.length.get(), 6u + e.message_length.get());
  const auto msg = c.recv(e.message_length.get());
  EXPECT_NE(std::string(reinterpret_cast<const char*>(msg.data()), msg.size()).find("beyond the end"), std::string::npos);

  c.request(kCmdFlush, 13, 0, 0);
  h = c.recv_wire<StructuredReplyWire>();
  EXPECT_EQ(h.type.get(), kReplyNone);
  EXPECT_EQ(h.flags.get(), kReplyFlagDone);
  EXPECT_EQ(h.cookie.get(), 13u);
  EXPECT_EQ(h.length.get(), 0u);
}

// Garbage where a request header belongs closes that connection only.
TEST_F(NbdServerTest, BadMagicClosesOnlyThatConnection) {
  RawClient good(port());
  ASSERT_EQ(good.go("iso").type, kRepAck);
  RawClient bad(port());
  ASSERT_EQ(bad.go("shared").type, kRepAck);
  std::vector<std::byte> junk(28, std::byte{0x5a});
  bad.send(junk);
  EXPECT_TRUE(bad.closed_by_server());
  good.request(kCmdRead, 1, 0, 512);
  EXPECT_EQ(good.simple().first, 0u);
  EXPECT_EQ(good.recv(512), std::vector<std::byte>(iso_.begin(), iso_.begin() + 512));
}

// A stream cut inside a request header or a write payload closes that connection; the
// server goes on accepting, and the exclusive export becomes free again.
TEST_F(NbdServerTest, TruncatedStreamClosesConnectionAndFreesTheExport) {
  {
    RawClient c(port());
    ASSERT_EQ(c.go("disk").type, kRepAck);
    c.request(kCmdWrite, 1, 0, 4096, 0, pattern(100, 1));  // 100 of 4096 payload bytes
  }
  {
    RawClient c(port());
    ASSERT_EQ(c.go("iso").type, kRepAck);
    c.send(std::vector<std::byte>(10, std::byte{0x25}));
  }
  // The export is released once the server has seen the close; retry briefly.
  RawClient::OptReply last{};
  for (int i = 0; i < 100; ++i) {
    RawClient c(port());
    last = c.go("disk");
    if (last.type == kRepAck) {
      c.request(kCmdRead, 1, 0, 512);
      EXPECT_EQ(c.simple().first, 0u);
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_EQ(last.type, kRepAck) << last.text();
}

// Exclusive export: a second client is refused with NBD_REP_ERR_POLICY and a message, may
// pick another export, and gets the first one after its writer left.
TEST_F(NbdServerTest, ExclusiveExportHasOneClientAtATime) {
  auto a = std::make_unique<RawClient>(port());
  ASSERT_EQ(a->go("disk").type, kRepAck);
  RawClient b(port());
  b.greet();
  auto r = b.option(kOptGo, RawClient::query("disk"));
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0].type, kRepErrPolicy);
  EXPECT_NE(r[0].text().find("already has a writer"), std::string::npos) << r[0].text();
  r = b.option(kOptInfo, RawClient::query("disk"));
  EXPECT_EQ(r.back().type, kRepErrPolicy);
  r = b.option(kOptGo, RawClient::query("iso"));
  EXPECT_EQ(r.back().type, kRepAck);

  a->request(kCmdDisc, 0, 0, 0);
  EXPECT_TRUE(a->closed_by_server());
  a.reset();
  RawClient::OptReply last{};
  for (int i = 0; i < 100 && last.type != kRepAck; ++i) {
    RawClient c(port());
    last = c.go("disk");
    if (last.type != kRepAck) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_EQ(last.type, kRepAck) << last.text();
}

// Shared export: several writers at once, multi-conn advertised.
TEST_F(NbdServerTest, SharedExportTakesSeveralWriters) {
  RawClient a(port()), b(port());
  ASSERT_EQ(a.go("shared").type, kRepAck);
  ASSERT_EQ(b.go("shared").type, kRepAck);
  EXPECT_TRUE(a.flags_ & kFlagCanMultiConn);
  const auto d = pattern(4096, 9);
  a.request(kCmdWrite, 1, 0, 4096, kCmdFlagFua, d);
  EXPECT_EQ(a.simple().first, 0u);
  b.request(kCmdRead, 2, 0, 4096);
  EXPECT_EQ(b.simple().first, 0u);
  EXPECT_EQ(b.recv(4096), d);
}

// The handshake's option paths over the socket: LIST, unknown export, unknown option, a bad
// option magic closes.
TEST_F(NbdServerTest, HandshakeOptions) {
  RawClient c(port());
  c.greet();
  auto r = c.option(kOptList);
  ASSERT_EQ(r.size(), 4u);
  EXPECT_EQ(r[0].type, kRepServer);
  EXPECT_EQ(r[3].type, kRepAck);
  r = c.option(kOptGo, RawClient::query("missing"));
  EXPECT_EQ(r.back().type, kRepErrUnknown);
  EXPECT_NE(r.back().text().find("disk, iso, shared"), std::string::npos) << r.back().text();
  r = c.option(4242);
  EXPECT_EQ(r.back().type, kRepErrUnsup);
  Be64 junk;
  junk.set(0x1234);
  c.send_wire(junk);
  c.send_wire(junk);
  EXPECT_TRUE(c.closed_by_server());

  RawClient d(port());
  d.greet(0x10);  // unknown client flag: the server must close
  EXPECT_TRUE(d.closed_by_server());

  RawClient e(port());
  e.greet();
  OptionHeaderWire h;
  h.magic.set(kOptionMagic);
  h.option.set(kOptGo);
  h.length.set(kMaxOptionLength + 1);
  e.send_wire(h);
  EXPECT_TRUE(e.closed_by_server());
}

// NBD_OPT_EXPORT_NAME (the old way in): size, flags and 124 zeroes unless NO_ZEROES.
TEST_F(NbdServerTest, ExportNameOption) {
  RawClient c(port());
  c.greet(kClientFlagFixedNewstyle);
  const std::string name = "iso";
  c.send_option(kOptExportName, std::as_bytes(std::span(name)));
  const auto rep = c.recv_wire<ExportNameReplyWire>();
  EXPECT_EQ(rep.size.get(), kIsoSize);
  EXPECT_TRUE(rep.transmission_flags.get() & kFlagReadOnly);
  EXPECT_EQ(c.recv(kExportNameZeroes), std::vector<std::byte>(kExportNameZeroes));
  c.request(kCmdRead, 1, 0, 16);
  EXPECT_EQ(c.simple().first, 0u);
  EXPECT_EQ(c.recv(16), std::vector<std::byte>(iso_.begin(), iso_.begin() + 16));
}

class NbdServerAclTest : public NbdServerTest {
 protected:
  void SetUp() override { start({"10.99.0.0/16"}); }
};

// A peer outside the allowed networks is disconnected before the greeting.
TEST_F(NbdServerAclTest, DisallowedPeerIsRefused) {
  RawClient c(port());
  EXPECT_TRUE(c.closed_by_server());
}

// stop() closes open connections and the listener.
TEST_F(NbdServerTest, StopClosesConnectionsAndTheListener) {
  RawClient c(port());
  ASSERT_EQ(c.go("iso").type, kRepAck);
  server_->stop();
  EXPECT_TRUE(c.closed_by_server());
  boost::asio::io_context io;
  tcp::socket s(io);
  boost::system::error_code ec;
  for (int i = 0; i < 100 && !ec; ++i) {  // the listener closes on the io thread
    s.close();
    s.connect({boost::asio::ip::make_address("127.0.0.1"), port()}, ec);
    if (!ec) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(ec, boost::asio::error::connection_refused);
}

class NbdServerTimeoutTest : public NbdServerTest {
 protected:
  void SetUp() override {
    NbdServerOptions o;
    o.handshake_timeout_s = 1;
    start({}, o);
  }
};

// A client that stalls in the handshake is dropped; one in transmission is not.
TEST_F(NbdServerTimeoutTest, StalledHandshakeIsDropped) {
  RawClient working(port());
  ASSERT_EQ(working.go("iso").type, kRepAck);
  RawClient stalled(port());
  stalled.recv(sizeof(GreetingWire));
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_TRUE(stalled.closed_by_server());
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(5));
  working.request(kCmdRead, 1, 0, 512);
  EXPECT_EQ(working.simple().first, 0u);
  EXPECT_EQ(working.recv(512), std::vector<std::byte>(iso_.begin(), iso_.begin() + 512));
}

// --- real clients ---------------------------------------------------------------------------

#define REQUIRE_TOOL(name) \
  if (tool(name).empty()) GTEST_SKIP() << name << " is not installed (scripts/install-deps installs it)"

TEST_F(NbdServerTest, NbdinfoListsAndDescribesExports) {
  REQUIRE_TOOL("nbdinfo");
  auto r = testing::run({tool("nbdinfo"), "--list", "nbd://127.0.0.1:" + std::to_string(port())});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("export=\"disk\""), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("export=\"iso\""), std::string::npos) << r.output;
  r = testing::run({tool("nbdinfo"), "--size", uri("disk")});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(std::stoull(r.output), kDiskSize);
  r = testing::run({tool("nbdinfo"), uri("iso")});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("is_read_only: true"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("can_cache: true"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("export-size: " + std::to_string(kIsoSize)), std::string::npos) << r.output;
  r = testing::run({tool("nbdinfo"), uri("nonexistent")});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("nonexistent"), std::string::npos) << r.output;
}

// nbdcopy both ways, content checked by SHA-256 on the backing file and on the copy.
TEST_F(NbdServerTest, NbdcopyBothWays) {
  REQUIRE_TOOL("nbdcopy");
  const auto src = pattern(kDiskSize, 1234);
  write_file(dir_ / "src.img", src);
  auto r = testing::run({tool("nbdcopy"), (dir_ / "src.img").string(), uri("disk")});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(file_sha(dir_ / "disk.img"), sha256_hex(src));
  r = testing::run({tool("nbdcopy"), uri("disk"), (dir_ / "back.img").string()});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(file_sha(dir_ / "back.img"), sha256_hex(src));
  // A read-only export copies out, several connections at once (multi-conn).
  r = testing::run({tool("nbdcopy"), "--connections=4", uri("iso"), (dir_ / "iso-copy.img").string()});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(file_sha(dir_ / "iso-copy.img"), sha256_hex(iso_));
  // And refuses to be written.
  r = testing::run({tool("nbdcopy"), (dir_ / "src.img").string(), uri("iso")});
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_EQ(read_file(dir_ / "iso.img"), iso_);
}

TEST_F(NbdServerTest, QemuImgInfoAndConvertBothWays) {
  REQUIRE_TOOL("qemu-img");
  auto r = testing::run({tool("qemu-img"), "info", "--output=json", uri("disk")});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("\"virtual-size\": " + std::to_string(kDiskSize)), std::string::npos) << r.output;
  const auto src = pattern(kDiskSize, 99);
  write_file(dir_ / "src.img", src);
  r = testing::run({tool("qemu-img"), "convert", "-n", "-f", "raw", "-O", "raw", (dir_ / "src.img").string(), uri("disk")});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(file_sha(dir_ / "disk.img"), sha256_hex(src));
  r = testing::run({tool("qemu-img"), "convert", "-f", "raw", "-O", "raw", uri("iso"), (dir_ / "iso-copy.img").string()});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(file_sha(dir_ / "iso-copy.img"), sha256_hex(iso_));
  r = testing::run({tool("qemu-img"), "compare", "-f", "raw", "-F", "raw", (dir_ / "src.img").string(), uri("disk")});
  EXPECT_EQ(r.exit_code, 0) << r.output;
}

// --- TLS (serve --nbd-tls psk:FILE) ---------------------------------------------------------

// Relays loopback TCP connections to the server and records every byte both ways: what a
// capture of the wire would see.
class RecordingRelay {
 public:
  explicit RecordingRelay(std::uint16_t to) : to_(to), acceptor_(io_, tcp::endpoint(boost::asio::ip::make_address("127.0.0.1"), 0)) {
    port_ = acceptor_.local_endpoint().port();
    thread_ = std::thread([this] { accept_loop(); });
  }
  ~RecordingRelay() {
    stop_ = true;  // the loops poll with a timeout and see it
    thread_.join();
    for (auto& t : pumps_) t.join();
  }
  std::uint16_t port() const { return port_; }
  std::string captured() {
    std::lock_guard<std::mutex> l(mu_);
    return captured_;
  }

 private:
  void accept_loop() {
    while (!stop_) {
      pollfd p{acceptor_.native_handle(), POLLIN, 0};
      if (::poll(&p, 1, 100) != 1) continue;
      boost::system::error_code ec;
      tcp::socket client(io_);
      acceptor_.accept(client, ec);
      if (ec) continue;
      auto server = std::make_shared<tcp::socket>(io_);
      server->connect({boost::asio::ip::make_address("127.0.0.1"), to_}, ec);
      if (ec) continue;
      pumps_.emplace_back([this, c = std::make_shared<tcp::socket>(std::move(client)), server] { pump(*c, *server); });
    }
  }
  // Both directions of one connection until either side closes.
  void pump(tcp::socket& a, tcp::socket& b) {
    std::array<char, 65536> buf;
    for (;;) {
      pollfd p[2] = {{a.native_handle(), POLLIN, 0}, {b.native_handle(), POLLIN, 0}};
      if (::poll(p, 2, 100) < 0 || stop_) break;
      for (int i = 0; i < 2; ++i) {
        if (!(p[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
        const ssize_t n = ::read(p[i].fd, buf.data(), buf.size());
        if (n <= 0) return;
        {
          std::lock_guard<std::mutex> l(mu_);
          captured_.append(buf.data(), static_cast<std::size_t>(n));
        }
        const int to = i == 0 ? b.native_handle() : a.native_handle();
        for (ssize_t done = 0; done < n;) {
          const ssize_t w = ::write(to, buf.data() + done, static_cast<std::size_t>(n - done));
          if (w <= 0) return;
          done += w;
        }
      }
    }
  }

  std::uint16_t to_;
  boost::asio::io_context io_;
  tcp::acceptor acceptor_;
  std::uint16_t port_ = 0;
  std::atomic<bool> stop_{false};
  std::thread thread_;
  std::vector<std::thread> pumps_;
  std::mutex mu_;
  std::string captured_;
};

// A disk image of a text everyone would recognize on the wire.
std::vector<std::byte> canary_image(std::size_t n) {
  static constexpr std::string_view kLine = "IBDISK-PLAINTEXT-CANARY the quick brown fox 0123456789\n";
  std::vector<std::byte> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<std::byte>(kLine[i % kLine.size()]);
  return v;
}

// The NBD front end with TLS required, a psktool key file for identity "alice" in its own
// folder as keys.psk (the name qemu's tls-creds-psk looks for), and a second, wrong key.
class NbdServerTlsTest : public NbdServerTest {
 protected:
  void SetUp() override {
    keys_ = fs::temp_directory_path() / ("ibdisk-nbd-tls-" + std::to_string(::getpid()));
    fs::remove_all(keys_);
    fs::create_directories(keys_ / "wrong");
    write_new_psk_file((keys_ / "keys.psk").string(), "alice");
    write_new_psk_file((keys_ / "wrong" / "keys.psk").string(), "alice");
    NbdServerOptions o;
    o.tls = NbdTls::psk_file((keys_ / "keys.psk").string());
    start({}, o);
  }
  void TearDown() override {
    NbdServerTest::TearDown();
    fs::remove_all(keys_);
  }
  std::string tls_uri(const std::string& name, std::uint16_t p = 0, const std::string& who = "alice",
                      const fs::path& key = {}) const {
    return "nbds://" + who + "@127.0.0.1:" + std::to_string(p ? p : port()) + "/" + name +
           "?tls-psk-file=" + (key.empty() ? keys_ / "keys.psk" : key).string();
  }
  std::vector<std::string> qemu_tls(const fs::path& dir) const {
    return {"--object", "tls-creds-psk,id=tls0,endpoint=client,username=alice,dir=" + dir.string()};
  }
  std::string qemu_target(const std::string& name) const {
    return "driver=nbd,host=127.0.0.1,port=" + std::to_string(port()) + ",export=" + name + ",tls-creds=tls0";
  }

  fs::path keys_;
};

TEST_F(NbdServerTlsTest, NbdinfoNbdcopyAndQemuImgCopyByteExactOverTlsPsk) {
  REQUIRE_TOOL("nbdinfo");
  auto r = testing::run({tool("nbdinfo"), "--size", tls_uri("disk")});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(std::stoull(r.output), kDiskSize);
  if (!tool("nbdcopy").empty()) {
    const auto src = pattern(kDiskSize, 77);
    write_file(dir_ / "src.img", src);
    r = testing::run({tool("nbdcopy"), (dir_ / "src.img").string(), tls_uri("disk")});
    ASSERT_EQ(r.exit_code, 0) << r.output;
    EXPECT_EQ(file_sha(dir_ / "disk.img"), sha256_hex(src));
    r = testing::run({tool("nbdcopy"), tls_uri("disk"), (dir_ / "back.img").string()});
    ASSERT_EQ(r.exit_code, 0) << r.output;
    EXPECT_EQ(file_sha(dir_ / "back.img"), sha256_hex(src));
    r = testing::run({tool("nbdcopy"), "--connections=4", tls_uri("iso"), (dir_ / "iso-copy.img").string()});
    ASSERT_EQ(r.exit_code, 0) << r.output;
    EXPECT_EQ(file_sha(dir_ / "iso-copy.img"), sha256_hex(iso_));
  }
  if (!tool("qemu-img").empty()) {
    const auto src = pattern(kDiskSize, 78);
    write_file(dir_ / "q.img", src);
    std::vector<std::string> up = {tool("qemu-img"), "convert", "-n"};
    for (auto& a : qemu_tls(keys_)) up.push_back(a);
    for (auto a : {"-f", "raw", "--target-image-opts"}) up.push_back(a);
    up.insert(up.end(), {(dir_ / "q.img").string(), qemu_target("disk")});
    r = testing::run(up);
    ASSERT_EQ(r.exit_code, 0) << r.output;
    EXPECT_EQ(file_sha(dir_ / "disk.img"), sha256_hex(src));
    std::vector<std::string> down = {tool("qemu-img"), "convert"};
    for (auto& a : qemu_tls(keys_)) down.push_back(a);
    down.insert(down.end(), {"--image-opts", qemu_target("iso"), "-O", "raw", (dir_ / "iso-q.img").string()});
    r = testing::run(down);
    ASSERT_EQ(r.exit_code, 0) << r.output;
    EXPECT_EQ(file_sha(dir_ / "iso-q.img"), sha256_hex(iso_));
  }
}

// No downgrade: a plaintext client gets NBD_REP_ERR_TLS_REQD for everything, and no export.
TEST_F(NbdServerTlsTest, PlaintextClientIsRefused) {
  RawClient c(port());
  const auto reply = c.go("disk");
  EXPECT_EQ(reply.type, kRepErrTlsReqd);
  EXPECT_NE(reply.text().find("requires TLS"), std::string::npos) << reply.text();
  EXPECT_EQ(c.option(kOptList).back().type, kRepErrTlsReqd);
  if (!tool("nbdinfo").empty()) {
    const auto r = testing::run({tool("nbdinfo"), "--size", uri("disk")});
    EXPECT_NE(r.exit_code, 0) << r.output;
  }
  if (!tool("nbdcopy").empty()) {  // and writes nothing
    write_file(dir_ / "src.img", pattern(kDiskSize, 5));
    const auto r = testing::run({tool("nbdcopy"), (dir_ / "src.img").string(), uri("disk")});
    EXPECT_NE(r.exit_code, 0) << r.output;
    EXPECT_EQ(read_file(dir_ / "disk.img"), std::vector<std::byte>(kDiskSize));
  }
}

// A wrong key, or an identity the key file does not hold, fails the TLS handshake; the
// server goes on serving the right key.
TEST_F(NbdServerTlsTest, WrongKeyOrUnknownIdentityFails) {
  REQUIRE_TOOL("nbdinfo");
  auto r = testing::run({tool("nbdinfo"), "--size", tls_uri("disk", 0, "alice", keys_ / "wrong" / "keys.psk")});
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("TLS"), std::string::npos) << r.output;  // GnuTLS: "A TLS fatal alert ..."
  write_new_psk_file((keys_ / "bob.psk").string(), "bob");
  r = testing::run({tool("nbdinfo"), "--size", tls_uri("disk", 0, "bob", keys_ / "bob.psk")});
  EXPECT_NE(r.exit_code, 0) << r.output;
  r = testing::run({tool("nbdinfo"), "--size", tls_uri("disk")});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(std::stoull(r.output), kDiskSize);
}

// The wire between nbdcopy and the server holds none of the plaintext written through it;
// the same relay without TLS (next test) sees it, so the check can fail.
TEST_F(NbdServerTlsTest, CaptureOfTheWireShowsNoPlaintext) {
  REQUIRE_TOOL("nbdcopy");
  const auto src = canary_image(kDiskSize);
  write_file(dir_ / "src.img", src);
  RecordingRelay relay(port());
  auto r = testing::run({tool("nbdcopy"), (dir_ / "src.img").string(), tls_uri("disk", relay.port())});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = testing::run({tool("nbdcopy"), tls_uri("disk", relay.port()), (dir_ / "back.img").string()});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(file_sha(dir_ / "back.img"), sha256_hex(src));
  const std::string wire = relay.captured();
  EXPECT_GT(wire.size(), 2 * kDiskSize);  // both copies went through the relay
  EXPECT_EQ(wire.find("CANARY"), std::string::npos);
  EXPECT_EQ(wire.find("quick brown"), std::string::npos);
}

TEST_F(NbdServerTest, CaptureOfThePlainWireShowsThePlaintext) {
  REQUIRE_TOOL("nbdcopy");
  write_file(dir_ / "src.img", canary_image(kDiskSize));
  RecordingRelay relay(port());
  const auto r = testing::run({tool("nbdcopy"), (dir_ / "src.img").string(),
                               "nbd://127.0.0.1:" + std::to_string(relay.port()) + "/disk"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(relay.captured().find("CANARY"), std::string::npos);
}

// X.509 (serve --nbd-tls x509:DIR): certificates from tests/nbd/make-test-certs; a client
// certificate signed by the CA gets in (nbdinfo, qemu-img), none or another CA's does not.
class NbdServerX509Test : public NbdServerTest {
 protected:
  void SetUp() override {
    certs_ = fs::temp_directory_path() / ("ibdisk-nbd-x509-" + std::to_string(::getpid()));
    fs::remove_all(certs_);
    const auto made = testing::run({IBDISK_SOURCE_DIR "/tests/nbd/make-test-certs", certs_.string()});
    if (made.exit_code != 0) GTEST_SKIP() << "no test certificates: " << made.output;
    NbdServerOptions o;
    o.tls = NbdTls::from_spec("x509:" + certs_.string());
    start({}, o);
  }
  void TearDown() override {
    NbdServerTest::TearDown();
    fs::remove_all(certs_);
  }
  std::string x509_uri(const fs::path& dir) const {
    return "nbds://127.0.0.1:" + std::to_string(port()) + "/disk?tls-certificates=" + dir.string();
  }
  fs::path certs_;
};

TEST_F(NbdServerX509Test, ClientCertificateSignedByTheCaGetsInOthersDoNot) {
  REQUIRE_TOOL("nbdinfo");
  auto r = testing::run({tool("nbdinfo"), "--size", x509_uri(certs_)});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(std::stoull(r.output), kDiskSize);
  // The CA alone: the client shows no certificate.
  fs::create_directories(certs_ / "ca-only");
  fs::copy_file(certs_ / "ca-cert.pem", certs_ / "ca-only" / "ca-cert.pem");
  r = testing::run({tool("nbdinfo"), "--size", x509_uri(certs_ / "ca-only")});
  EXPECT_NE(r.exit_code, 0) << r.output;
  // A client certificate of another CA (which the client trusts; the server does not).
  const fs::path other = certs_ / "other";
  ASSERT_EQ(testing::run({IBDISK_SOURCE_DIR "/tests/nbd/make-test-certs", other.string(), "another CA"}).exit_code, 0);
  fs::copy_file(certs_ / "ca-cert.pem", other / "ca-cert.pem", fs::copy_options::overwrite_existing);
  r = testing::run({tool("nbdinfo"), "--size", x509_uri(other)});
  EXPECT_NE(r.exit_code, 0) << r.output;
  // Plaintext: refused before any export.
  RawClient c(port());
  EXPECT_EQ(c.go("disk").type, kRepErrTlsReqd);
  if (!tool("qemu-img").empty()) {
    const auto src = pattern(kDiskSize, 79);
    write_file(dir_ / "q.img", src);
    const std::string obj = "tls-creds-x509,id=tls0,endpoint=client,dir=" + certs_.string();
    const std::string target = "driver=nbd,host=127.0.0.1,port=" + std::to_string(port()) + ",export=disk,tls-creds=tls0";
    r = testing::run({tool("qemu-img"), "convert", "-n", "--object", obj, "-f", "raw", "--target-image-opts",
                      (dir_ / "q.img").string(), target});
    ASSERT_EQ(r.exit_code, 0) << r.output;
    EXPECT_EQ(file_sha(dir_ / "disk.img"), sha256_hex(src));
  }
}

// base:allocation: disk.img made sparse with data in a few places; nbdinfo --map and
// qemu-img map list the same extents from this server as from `nbdkit file` on the same
// file, and nbdcopy (which skips holes) still copies it byte for byte, leaving holes.
TEST_F(NbdServerTest, BlockStatusMatchesNbdkitFile) {
  REQUIRE_TOOL("nbdinfo");
  REQUIRE_TOOL("nbdkit");
  const fs::path img = dir_ / "disk.img";
  {
    const int fd = ::open(img.c_str(), O_RDWR);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, kDiskSize), 0);
    const auto data = pattern(64 << 10, 7);
    for (const off_t at : {off_t{0}, off_t{1} << 20, (off_t{3} << 20) + 8192, off_t(kDiskSize) - 4096}) {
      const std::size_t n = std::min<std::size_t>(data.size(), kDiskSize - at);
      ASSERT_EQ(::pwrite(fd, data.data(), n, at), static_cast<ssize_t>(n));
    }
    ::close(fd);
  }
  const std::uint16_t kit_port = testing::free_port();
  testing::Child kit({tool("nbdkit"), "-f", "-r", "-i", "127.0.0.1", "-p", std::to_string(kit_port), "file", img.string()});
  const std::string kit_uri = "nbd://127.0.0.1:" + std::to_string(kit_port) + "/";
  for (int i = 0; i < 100 && testing::run({tool("nbdinfo"), "--size", kit_uri}).exit_code != 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  const auto ours = testing::run({tool("nbdinfo"), "--map", uri("disk")});
  const auto theirs = testing::run({tool("nbdinfo"), "--map", kit_uri});
  ASSERT_EQ(ours.exit_code, 0) << ours.output;
  ASSERT_EQ(theirs.exit_code, 0) << theirs.output;
  EXPECT_EQ(ours.output, theirs.output);
  EXPECT_NE(ours.output.find("hole,zero"), std::string::npos) << ours.output;
  if (!tool("qemu-img").empty()) {
    const auto q1 = testing::run({tool("qemu-img"), "map", "--output=json", "-f", "raw", uri("disk")});
    const auto q2 = testing::run({tool("qemu-img"), "map", "--output=json", "-f", "raw", kit_uri});
    ASSERT_EQ(q1.exit_code, 0) << q1.output;
    EXPECT_EQ(q1.output, q2.output);
    EXPECT_NE(q1.output.find("\"data\": false"), std::string::npos) << q1.output;
  }
  if (!tool("nbdcopy").empty()) {
    const auto r = testing::run({tool("nbdcopy"), uri("disk"), (dir_ / "copy.img").string()});
    ASSERT_EQ(r.exit_code, 0) << r.output;
    EXPECT_EQ(file_sha(dir_ / "copy.img"), file_sha(img));
    struct stat a {}, b {};
    ASSERT_EQ(::stat(img.c_str(), &a), 0);
    ASSERT_EQ(::stat((dir_ / "copy.img").c_str(), &b), 0);
    EXPECT_LE(b.st_blocks, a.st_blocks + a.st_blocks / 10) << "the copy should keep the holes";
  }
}

// A client that selected no metadata context (plain, simple replies) gets EINVAL for
// NBD_CMD_BLOCK_STATUS and the connection keeps serving.
TEST_F(NbdServerTest, BlockStatusWithoutAContextIsRefused) {
  RawClient c(port());
  ASSERT_EQ(c.go("disk").type, kRepAck);
  c.request(kCmdBlockStatus, 1, 0, 4096);
  EXPECT_EQ(c.simple(), std::make_pair(std::uint32_t{kEinval}, std::uint64_t{1}));
  c.request(kCmdRead, 2, 0, 512);
  EXPECT_EQ(c.simple(), std::make_pair(0u, std::uint64_t{2}));
  EXPECT_EQ(c.recv(512).size(), 512u);
}

}  // namespace
}  // namespace ibdisk::nbd
