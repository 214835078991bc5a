// TCP half of the self-test, for hosts without RDMA. Same checks as the RDMA one:
//   client -> server  TcpHello (16 bytes), then iterations x size bytes, then SHA-256 (32)
//   server -> client  iterations x size bytes of its own pattern, then SHA-256 (32) of it,
//                     then the SHA-256 (32) of the last block it received, then status (4)
#include <endian.h>

#include <cstring>
#include <thread>
#include <vector>

#include "common/checksum.h"
#include "common/error.h"
#include "common/log.h"
#include "transport/selftest.h"
#include "transport/tcp/asio.h"

namespace ibdisk {
namespace {

namespace asio = boost::asio;
using asio::ip::tcp;

constexpr std::uint32_t kMagic = 0x49424454;  // "IBDT"
constexpr std::uint32_t kMaxSize = 256u << 20;

struct TcpHello {
  std::uint32_t magic;
  std::uint32_t version;
  std::uint32_t size;
  std::uint32_t iterations;
};
static_assert(sizeof(TcpHello) == 16);

auto log() {
  static auto l = ibdisk::logger("selftest");
  return l;
}

double mib_per_s(std::size_t bytes, std::chrono::steady_clock::time_point start) {
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return static_cast<double>(bytes) / (1024.0 * 1024.0) / secs;
}

std::span<std::byte> as_bytes(std::vector<std::byte>& v) { return {v.data(), v.size()}; }

}  // namespace

struct TcpSelftestServer::Impl {
  SelftestOptions opts;
  asio::io_context io;
  tcp::acceptor acceptor{io};
};

TcpSelftestServer::TcpSelftestServer(const SelftestOptions& opts) : impl_(new Impl{opts}) {
  const std::string host = opts.address.empty() ? "0.0.0.0" : opts.address;
  boost::system::error_code ec;
  const auto ip = asio::ip::make_address(host, ec);
  if (ec) throw SystemError("parsing listen address '" + host + "'", ec.message(), "give an IP address, e.g. 0.0.0.0");
  const tcp::endpoint ep(ip, opts.port);
  auto& a = impl_->acceptor;
  a.open(ep.protocol());
  a.set_option(tcp::acceptor::reuse_address(true));
  a.bind(ep, ec);
  if (ec) {
    throw SystemError("binding TCP " + host + ":" + std::to_string(opts.port), ec.value(),
                      "another process uses this port; pick another with --port");
  }
  a.listen();
  log()->info("TCP self-test server listening on {}:{}", host, a.local_endpoint().port());
}

TcpSelftestServer::~TcpSelftestServer() = default;

std::uint16_t TcpSelftestServer::port() const { return impl_->acceptor.local_endpoint().port(); }

unsigned TcpSelftestServer::serve(unsigned max_clients) {
  unsigned served = 0, good = 0;
  while (max_clients == 0 || served < max_clients) {
    tcp::socket sock(impl_->io);
    impl_->acceptor.accept(sock);
    ++served;
    try {
      sock.set_option(tcp::no_delay(true));
      TcpHello hello{};
      asio::read(sock, asio::buffer(&hello, sizeof hello));
      const std::uint32_t size = le32toh(hello.size), iterations = le32toh(hello.iterations);
      if (le32toh(hello.magic) != kMagic || le32toh(hello.version) != 1 || size == 0 || size > kMaxSize ||
          iterations == 0 || iterations > 100000) {
        log()->warn("closing a TCP connection that is not an ibdisk self-test v1");
        continue;
      }
      std::vector<std::byte> in(size), out(size);
      for (std::uint32_t i = 0; i < iterations; ++i) asio::read(sock, asio::buffer(in));
      Sha256 claimed{};
      asio::read(sock, asio::buffer(claimed));
      const Sha256 got = sha256(as_bytes(in));
      fill_pattern(as_bytes(out), 0x5e12e4);
      const Sha256 mine = sha256(as_bytes(out));
      for (std::uint32_t i = 0; i < iterations; ++i) asio::write(sock, asio::buffer(out));
      const std::int32_t status = htole32(got == claimed ? 0 : -EIO);
      asio::write(sock, std::array<asio::const_buffer, 3>{asio::buffer(mine), asio::buffer(got),
                                                         asio::buffer(&status, sizeof status)});
      log()->info("client done: TCP data sha256 {} {}", to_hex(got).substr(0, 16),
                  got == claimed ? "matches" : "DOES NOT MATCH");
      if (got == claimed) ++good;
    } catch (const std::exception& e) {
      log()->error("self-test client failed: {}", e.what());
    }
  }
  return good;
}

SelftestReport tcp_selftest_client(const SelftestOptions& opts) {
  asio::io_context io;
  tcp::socket sock(io);
  boost::system::error_code ec;
  tcp::resolver resolver(io);
  const auto endpoints = resolver.resolve(opts.address, std::to_string(opts.port), ec);
  const std::string where = opts.address + ":" + std::to_string(opts.port);
  if (ec) throw SystemError("resolving " + opts.address, ec.message());
  asio::connect(sock, endpoints, ec);
  if (ec) {
    throw SystemError("TCP connect to " + where, ec.value(),
                      "is `ibdisk selftest --listen` running on the peer, on this port?");
  }
  sock.set_option(tcp::no_delay(true));

  SelftestReport report;
  report.transport = "tcp";
  report.peer = where;
  std::vector<std::byte> out(opts.size), in(opts.size);
  fill_pattern(as_bytes(out), 0xc11e47);
  const Sha256 mine = sha256(as_bytes(out));
  const TcpHello hello{htole32(kMagic), htole32(1), htole32(static_cast<std::uint32_t>(opts.size)),
                       htole32(opts.iterations)};
  asio::write(sock, asio::buffer(&hello, sizeof hello));
  auto start = std::chrono::steady_clock::now();
  for (unsigned i = 0; i < opts.iterations; ++i) asio::write(sock, asio::buffer(out));
  asio::write(sock, asio::buffer(mine));
  // The write figure includes the server draining its socket: wait for its first byte back.
  asio::read(sock, asio::buffer(in.data(), 1));
  report.write_mib_s = mib_per_s(opts.size * opts.iterations, start);
  start = std::chrono::steady_clock::now();
  asio::read(sock, asio::buffer(in.data() + 1, in.size() - 1));
  for (unsigned i = 1; i < opts.iterations; ++i) asio::read(sock, asio::buffer(in));
  report.read_mib_s = mib_per_s(opts.size * opts.iterations, start);
  Sha256 theirs{}, echoed{};
  std::int32_t status = 0;
  asio::read(sock, std::array<asio::mutable_buffer, 3>{asio::buffer(theirs), asio::buffer(echoed),
                                                      asio::buffer(&status, sizeof status)});
  const Sha256 got = sha256(as_bytes(in));
  report.read_sha256 = to_hex(got);
  report.write_sha256 = to_hex(mine);
  report.checksums_match = got == theirs && echoed == mine && le32toh(status) == 0;
  sock.shutdown(tcp::socket::shutdown_both, ec);
  return report;
}

}  // namespace ibdisk
