// The TCP self-test over real loopback sockets.
#include <gtest/gtest.h>

#include <thread>

#include "common/error.h"
#include "transport/selftest.h"
#include "transport/tcp/asio.h"

namespace ibdisk {
namespace {

// Client and server move data both ways and agree on both checksums.
TEST(TcpSelftest, LoopbackExchangeMatches) {
  SelftestOptions opts;
  opts.address = "127.0.0.1";
  opts.port = 0;
  opts.size = 256 << 10;
  opts.iterations = 4;
  TcpSelftestServer server(opts);
  unsigned good = 0;
  std::thread t([&] { good = server.serve(1); });
  opts.port = server.port();
  const SelftestReport r = tcp_selftest_client(opts);
  t.join();
  EXPECT_TRUE(r.checksums_match);
  EXPECT_EQ(good, 1u);
  EXPECT_EQ(r.transport, "tcp");
  EXPECT_GT(r.write_mib_s, 0);
  EXPECT_EQ(r.write_sha256.size(), 64u);
}

// A peer speaking something else is dropped, and the server goes on serving the next client.
TEST(TcpSelftest, GarbageClientDroppedServerContinues) {
  SelftestOptions opts;
  opts.address = "127.0.0.1";
  opts.port = 0;
  opts.size = 64 << 10;
  opts.iterations = 1;
  TcpSelftestServer server(opts);
  unsigned good = 0;
  std::thread t([&] { good = server.serve(2); });
  {
    boost::asio::io_context io;
    boost::asio::ip::tcp::socket s(io);
    s.connect({boost::asio::ip::make_address("127.0.0.1"), server.port()});
    const char junk[16] = "GET / HTTP/1.0\n";
    boost::asio::write(s, boost::asio::buffer(junk));
  }
  opts.port = server.port();
  EXPECT_TRUE(tcp_selftest_client(opts).checksums_match);
  t.join();
  EXPECT_EQ(good, 1u);
}

// Connecting where nobody listens names the address and what to do.
TEST(TcpSelftest, RefusedConnectionNamesPeer) {
  SelftestOptions opts;
  opts.address = "127.0.0.1";
  opts.port = 1;  // nothing listens on tcpmux
  try {
    tcp_selftest_client(opts);
    FAIL() << "expected an error";
  } catch (const SystemError& e) {
    EXPECT_NE(std::string(e.what()).find("127.0.0.1:1"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("selftest --listen"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace ibdisk
