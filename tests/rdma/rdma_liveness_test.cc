// Liveness over real RDMA (Soft-RoCE, in the guest): heartbeats flow on an idle RDMA queue and
// keep it, and the target's session timeout, satisfied; a stopped `ibdisk serve` (whose RDMA
// device still acknowledges everything, so no RDMA error ever comes) is declared lost within the
// Client's I/O timeout and the write completes once the target runs again.
#include <gtest/gtest.h>
#include <signal.h>

#include <chrono>
#include <thread>

#include "common/checksum.h"
#include "initiator/client.h"
#include "tests/rdma/rdma_env.h"
#include "tests/support/fixtures.h"
#include "tests/support/process.h"

namespace ibdisk {
namespace {

using initiator::Client;
using initiator::ClientOptions;
using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

ClientOptions rdma_client(std::uint16_t port, const std::string& transport) {
  ClientOptions c;
  c.host = testing::rdma_addr();
  c.port = port;
  c.queue_depth = 4;
  c.transport = transport;
  c.heartbeat = 300ms;
  c.io_timeout = 3s;
  return c;
}

// An RDMA queue idle for ten heartbeat intervals (and twice the target's session timeout)
// stays up on RDMA: its heartbeats went out and were answered, nothing was resent.
TEST(RdmaLiveness, IdleQueueStaysUpOnHeartbeats) {
  IBDISK_REQUIRE_RDMA();
  testing::TempDir dir;
  testing::make_sparse_file(dir.file("d.img"), 16 << 20);
  target::ServerOptions so;
  so.exports.push_back({"disk", dir.file("d.img"), false, false});
  so.listen_address = testing::rdma_addr();
  so.insecure = true;
  so.port = 0;
  so.threads = 1;
  so.buffer_mib = 16;
  so.session_timeout = 1500ms;
  testing::ServerThread srv(so);
  ASSERT_NE(srv.server().rdma_port(), 0) << srv.server().rdma_status();
  ClientOptions o = rdma_client(srv.port(), "rdma");
  o.client_name = "idle";
  auto c = Client::connect(o);
  ASSERT_EQ(c->transport(0), "rdma");
  const auto h = c->open("disk", false).handle();
  const auto until = Clock::now() + 3s;
  c->run_until([&] { return Clock::now() >= until; });
  EXPECT_GE(c->heartbeats(), 5u);
  std::vector<std::byte> a(8192), back(8192);
  fill_pattern(a, 5);
  EXPECT_EQ(testing::sync(*c, [&](auto d) { c->write(0, h, 0, 8192, a.data(), 0, d); }), 0);
  EXPECT_EQ(testing::sync(*c, [&](auto d) { c->read(0, h, 0, 8192, back.data(), d); }), 0);
  EXPECT_EQ(back, a);
  EXPECT_EQ(c->resent(), 0u);
  EXPECT_EQ(c->transport(0), "rdma");
  auto observer = Client::connect(rdma_client(srv.port(), "auto"));
  const auto stats = observer->stats();
  bool found = false;
  for (const auto& s : stats.sessions()) {
    if (s.client_name() != "idle") continue;
    found = true;
    EXPECT_GE(s.heartbeats(), 5u) << "the target answered fewer heartbeats than were sent";
    ASSERT_EQ(s.transports_size(), 1);
    EXPECT_EQ(s.transports(0), "rdma");
  }
  EXPECT_TRUE(found) << "the idle session was closed by the target";
}

// SIGSTOP of the target process with a write in flight on RDMA: the Client declares the queue
// lost within its I/O timeout (the device keeps acknowledging, so nothing else would), moves it
// to a new connection (TCP, `auto`, since RDMA connects need the stopped process), and the write
// completes with the right data after SIGCONT.
TEST(RdmaLiveness, StoppedServeIsDetected) {
  IBDISK_REQUIRE_RDMA();
  testing::TempDir dir;
  testing::make_sparse_file(dir.file("d.img"), 16 << 20);
  const std::uint16_t port = testing::free_port();
  const std::string where = testing::rdma_addr() + ":" + std::to_string(port);
  testing::Child serve({IBDISK_BINARY, "serve", "--export", "disk=" + dir.file("d.img"), "--listen", where, "--insecure",
                        "--threads", "1", "--buffer-mib", "16"});
  ASSERT_TRUE(serve.wait_for_output("export disk", 30000)) << serve.wait(1000).output;
  ASSERT_NE(serve.output().find("RDMA port"), std::string::npos) << serve.output();
  ClientOptions o = rdma_client(port, "auto");
  o.timeout = 30s;  // the replacement's handshake waits this long for the stopped target
  auto c = Client::connect(o);
  ASSERT_EQ(c->transport(0), "rdma") << c->rdma_not_used();
  const auto h = c->open("disk", false).handle();
  EXPECT_EQ(testing::write_while_target_stopped(*c, h, serve.pid(), 12s).error, "");
  EXPECT_GE(c->silent_losses(), 1u);
  EXPECT_GE(c->resent(), 1u) << "the stopped target was not declared lost within 12 s (I/O timeout 3 s)";
  std::printf("after the stop: queue on %s, %llu heartbeat(s), %llu silent loss(es)\n", c->transport(0).c_str(),
              static_cast<unsigned long long>(c->heartbeats()), static_cast<unsigned long long>(c->silent_losses()));
}

}  // namespace
}  // namespace ibdisk
