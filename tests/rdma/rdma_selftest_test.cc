// The first real RDMA exchange: two `ibdisk selftest` processes over Soft-RoCE, plus the
// failure cases a user meets (nobody listening, a peer speaking another protocol).
#include <arpa/inet.h>
#include <gtest/gtest.h>

#include <thread>

#include "common/error.h"
#include "tests/rdma/rdma_env.h"
#include "tests/support/process.h"
#include "transport/selftest.h"

namespace ibdisk {
namespace {

using testing::Child;

// Server and client are separate processes: they connect through RDMA CM, exchange SENDs,
// RDMA WRITE and READ 1 MiB each, compare checksums on both sides and disconnect cleanly (both
// exit 0). One guest is one host (rxe loopback); tests/vm's vm.rdma-two-hosts runs the same
// pair across two guests.
TEST(RdmaSelftest, TwoProcessesWriteReadAndAgree) {
  IBDISK_REQUIRE_RDMA();
  Child server({IBDISK_BINARY, "selftest", "--listen", testing::rdma_addr(), "--transport", "rdma",
                "--clients", "1", "--port", "7481"});
  ASSERT_TRUE(server.wait_for_output("listening", 20000)) << server.wait(1000).output;
  const auto client = testing::run({IBDISK_BINARY, "selftest", testing::rdma_addr(), "--transport", "rdma", "--port", "7481",
                                    "--size", "1048576", "--iterations", "8"});
  const auto srv = server.wait(client.exit_code == 0 ? 60000 : 1000);
  std::cout << "--- client ---\n" << client.output << "--- server ---\n" << srv.output;
  EXPECT_EQ(client.exit_code, 0);
  EXPECT_EQ(srv.exit_code, 0);
  EXPECT_NE(client.output.find("transport:  rdma"), std::string::npos);
  EXPECT_NE(client.output.find("device:     rxe"), std::string::npos);
  EXPECT_NE(client.output.find("port state: ACTIVE"), std::string::npos);
  EXPECT_NE(client.output.find("checksums:  match on both sides"), std::string::npos);
  EXPECT_NE(srv.output.find("matches"), std::string::npos);
}

// With no arguments the user command finds the RDMA address itself and runs both ends.
TEST(RdmaSelftest, LocalDefaultUsesRdma) {
  IBDISK_REQUIRE_RDMA();
  const auto r = testing::run({IBDISK_BINARY, "selftest", "--iterations", "4"});
  std::cout << r.output;
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_NE(r.output.find("transport:  rdma"), std::string::npos);
  EXPECT_NE(r.output.find("selftest: PASS"), std::string::npos);
}

// Nobody listening: the client fails with an error naming the peer, not a hang or a crash;
// with --transport auto it falls back to TCP and says why.
TEST(RdmaSelftest, NoListenerIsAClearErrorAndAutoFallsBack) {
  IBDISK_REQUIRE_RDMA();
  SelftestOptions opts;
  opts.address = testing::rdma_addr();
  opts.port = 7482;
  opts.timeout = std::chrono::milliseconds(3000);
  try {
    rdma_selftest_client(opts);
    FAIL() << "connect with no listener must fail";
  } catch (const SystemError& e) {
    EXPECT_NE(std::string(e.what()).find(testing::rdma_addr() + ":7482"), std::string::npos) << e.what();
  }
  Child tcp_server({IBDISK_BINARY, "selftest", "--listen", testing::rdma_addr(), "--transport", "tcp",
                    "--clients", "1", "--port", "7482"});
  ASSERT_TRUE(tcp_server.wait_for_output("listening", 20000));
  const auto r = testing::run({IBDISK_BINARY, "selftest", testing::rdma_addr(), "--port", "7482",
                               "--iterations", "2", "--timeout", "3"});
  std::cout << r.output;
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_NE(r.output.find("RDMA not used:"), std::string::npos);
  EXPECT_NE(r.output.find("transport:  tcp"), std::string::npos);
}

// A connection request with foreign private data is rejected, and the server keeps serving.
TEST(RdmaSelftest, ForeignConnectRejectedServerContinues) {
  IBDISK_REQUIRE_RDMA();
  SelftestOptions sopts;
  sopts.address = testing::rdma_addr();
  sopts.port = 7483;
  sopts.size = 64 << 10;
  sopts.iterations = 2;
  RdmaSelftestServer server(sopts);
  unsigned good = 0;
  std::thread t([&] { good = server.serve(2); });

  {
    rdma::EventChannel ch;
    rdma::CmId id(ch);
    sockaddr_in dst{};
    dst.sin_family = AF_INET;
    dst.sin_port = htons(7483);
    ::inet_pton(AF_INET, testing::rdma_addr().c_str(), &dst.sin_addr);
    id.resolve_addr(nullptr, reinterpret_cast<sockaddr*>(&dst), "server", std::chrono::milliseconds(3000));
    ch.expect(RDMA_CM_EVENT_ADDR_RESOLVED, std::chrono::milliseconds(3000), "resolve", "");
    id.resolve_route(std::chrono::milliseconds(3000));
    ch.expect(RDMA_CM_EVENT_ROUTE_RESOLVED, std::chrono::milliseconds(3000), "route", "");
    rdma::ProtectionDomain pd(id.verbs());
    rdma::CompletionQueue cq(id.verbs(), 4);
    rdma::QueuePair qp(id, pd, cq, 2, 2);
    const char junk[16] = "not-ibdisk-data";
    rdma_conn_param p{};
    p.private_data = junk;
    p.private_data_len = sizeof junk;
    ASSERT_EQ(rdma_connect(id.get(), &p), 0);
    auto ev = ch.next(std::chrono::milliseconds(5000));
    ASSERT_TRUE(ev.has_value());
    EXPECT_EQ(ev->type(), RDMA_CM_EVENT_REJECTED) << ev->name();
  }
  SelftestOptions copts = sopts;
  EXPECT_TRUE(rdma_selftest_client(copts).checksums_match);
  t.join();
  EXPECT_EQ(good, 1u);
}

}  // namespace
}  // namespace ibdisk
