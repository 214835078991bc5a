// The RDMA data path end to end on Soft-RoCE: the random workload checked against a model,
// extents, the fallback to TCP and why, a forced RDMA connect to a TCP-only target, foreign private
// data, and the memlock message.
#include <arpa/inet.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "common/checksum.h"
#include "common/error.h"
#include "initiator/client.h"
#include "initiator/extents.h"
#include "tests/rdma/rdma_env.h"
#include "tests/support/fixtures.h"
#include "tests/support/workload.h"
#include "transport/rdma/rdma_connection.h"

namespace ibdisk {
namespace {

using initiator::Client;
using initiator::ClientOptions;
using testing::ServerThread;
using testing::TempDir;

constexpr std::uint64_t kImage = 256ull << 20;  // small: the guest CPU is emulated

target::ServerOptions rdma_target(const std::string& img, bool rdma = true) {
  target::ServerOptions o;
  o.exports.push_back({"disk", img, false, false});
  o.listen_address = testing::rdma_addr();
  o.insecure = true;  // the guest's private veth address
  o.port = 0;
  o.threads = 2;
  o.buffer_mib = 48;
  o.rdma = rdma;
  return o;
}

// A fresh sparse image exported as "disk" by a target on the guest's RDMA address.
struct ImageTarget {
  explicit ImageTarget(std::uint64_t size, bool rdma = true) : srv(rdma_target(sparse(dir.file("d.img"), size), rdma)) {}
  static std::string sparse(const std::string& path, std::uint64_t size) {
    testing::make_sparse_file(path, size);
    return path;
  }
  TempDir dir;
  ServerThread srv;
};

ClientOptions client_for(std::uint16_t port, unsigned queues, unsigned depth, const std::string& transport) {
  ClientOptions c;
  c.host = testing::rdma_addr();
  c.port = port;
  c.queues = queues;
  c.queue_depth = depth;
  c.transport = transport;
  return c;
}

using testing::sync;

// Random reads and writes of 512 B to 1 MiB on 2 queues x depth 16 over RDMA, never
// overlapping while in flight: every byte read matches the model, then a full read-back.
TEST(RdmaDataPath, RandomWorkloadMatchesModel) {
  IBDISK_REQUIRE_RDMA();
  ImageTarget t(kImage);
  ServerThread& srv = t.srv;
  ASSERT_NE(srv.server().rdma_port(), 0) << srv.server().rdma_status();
  ClientOptions co = client_for(srv.port(), 2, 16, "rdma");
  co.client_name = "workload";  // another session's stats show its name, not its id
  auto client = Client::connect(co);
  for (unsigned q = 0; q < client->queue_count(); ++q) ASSERT_EQ(client->transport(q), "rdma");
  EXPECT_EQ(client->queue_depth(0), 16u);
  const auto opened = client->open("disk", false);
  std::vector<std::byte> model(kImage);
  testing::RandomWorkload workload(*client, opened.handle(), model, {.seed = 42, .max_in_flight = 32, .mostly_small = true});
  workload.run(400);
  const auto [completed, errors, mismatches, bytes] = workload.result();
  EXPECT_EQ(errors, 0u);
  EXPECT_EQ(mismatches, 0u);
  EXPECT_GT(bytes, 20u << 20);
  EXPECT_EQ(sync(*client, [&](auto cb) { client->flush(0, opened.handle(), cb); }), 0);
  EXPECT_EQ(testing::read_back_mismatches(*client, opened.handle(), model), 0u);
  // The target's stats (asked by another session: this one is in its data phase) name the
  // transport of every queue.
  auto observer = Client::connect(client_for(srv.port(), 1, 4, "auto"));
  const auto st = observer->stats();
  bool found = false;
  for (const auto& s : st.sessions()) {
    if (s.client_name() != "workload") continue;
    EXPECT_EQ(s.session_id(), 0u) << "another session's id is the owner's to know";
    found = true;
    ASSERT_EQ(s.transports_size(), 2);
    for (const auto& t : s.transports()) EXPECT_EQ(t, "rdma");
  }
  EXPECT_TRUE(found);
  std::printf("RDMA workload: %u ops, %llu MiB, 0 errors expected, %u errors, %u mismatches\n", completed,
              static_cast<unsigned long long>(bytes >> 20), errors, mismatches);
}

// Flush, FUA, trim, write-zeroes and an out-of-range read over RDMA: statuses as over TCP.
TEST(RdmaDataPath, NonDataCommandsAndErrors) {
  IBDISK_REQUIRE_RDMA();
  ImageTarget t(16 << 20);
  ServerThread& srv = t.srv;
  auto c = Client::connect(client_for(srv.port(), 1, 4, "rdma"));
  const auto h = c->open("disk", false);
  std::vector<std::byte> data(1 << 20), back(1 << 20);
  fill_pattern(data, 3);
  EXPECT_EQ(sync(*c, [&](auto cb) { c->write(0, h.handle(), 0, 1 << 20, data.data(), wire::kFlagFua, cb); }), 0);
  EXPECT_EQ(sync(*c, [&](auto cb) { c->write_zeroes(0, h.handle(), 0, 4096, 0, cb); }), 0);
  EXPECT_EQ(sync(*c, [&](auto cb) { c->trim(0, h.handle(), 8192, 4096, cb); }), 0);
  EXPECT_EQ(sync(*c, [&](auto cb) { c->flush(0, h.handle(), cb); }), 0);
  EXPECT_EQ(sync(*c, [&](auto cb) { c->read(0, h.handle(), 0, 1 << 20, back.data(), cb); }), 0);
  EXPECT_EQ(std::vector<std::byte>(back.begin(), back.begin() + 4096), std::vector<std::byte>(4096));
  EXPECT_TRUE(std::equal(back.begin() + 12288, back.end(), data.begin() + 12288));
  EXPECT_EQ(sync(*c, [&](auto cb) { c->read(0, h.handle(), (16 << 20) - 512, 4096, back.data(), cb); }), -EINVAL);
  EXPECT_EQ(sync(*c, [&](auto cb) { c->read(0, h.handle() + 7, 0, 4096, back.data(), cb); }), -EBADF);
}

// The extents command over RDMA (its reply comes back by RDMA WRITE, like a read's data):
// after writes over RDMA, the map of the export is the image file's SEEK_DATA / SEEK_HOLE
// runs, exact, and a range inside the data is one data run.
TEST(RdmaDataPath, ExtentsMatchTheImageFile) {
  IBDISK_REQUIRE_RDMA();
  constexpr std::uint64_t kSize = 16 << 20;
  ImageTarget t(kSize);
  auto c = Client::connect(client_for(t.srv.port(), 2, 4, "rdma"));
  ASSERT_EQ(c->transport(0), "rdma");
  const auto h = c->open("disk", false);
  ASSERT_TRUE(h.extents());
  std::vector<std::byte> data(256 << 10);
  fill_pattern(data, 9);
  for (const std::uint64_t off : {std::uint64_t{1} << 20, std::uint64_t{6} << 20, kSize - (256 << 10)}) {
    ASSERT_EQ(sync(*c, [&](auto cb) { c->write(0, h.handle(), off, 256 << 10, data.data(), 0, cb); }), 0);
  }
  ASSERT_EQ(sync(*c, [&](auto cb) { c->flush(0, h.handle(), cb); }), 0);
  const auto want = testing::seek_map(t.dir.file("d.img"));
  const auto got = initiator::map_extents(*c, 1, h.handle(), 0, kSize, true);
  EXPECT_TRUE(got.exact);
  ASSERT_EQ(got.runs.size(), want.size());
  for (std::size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ(got.runs[i].offset, want[i].offset) << "run " << i;
    EXPECT_EQ(got.runs[i].length, want[i].length) << "run " << i;
    EXPECT_EQ(got.runs[i].type, want[i].type) << "run " << i;
  }
  const auto inside = initiator::map_extents(*c, 0, h.handle(), (1 << 20) + 4096, 64 << 10, true);
  ASSERT_EQ(inside.runs.size(), 1u);
  EXPECT_FALSE(inside.runs[0].hole());
}

// Buffers inside memory given to register_memory() are read and written by the target
// directly, with no bounce copy; one that only partly lies inside, and heap memory, go through
// the bounce buffers. The data is right either way.
TEST(RdmaDataPath, RegisteredMemoryMovesDataWithoutBounceCopies) {
  IBDISK_REQUIRE_RDMA();
  ImageTarget t(16 << 20);
  ServerThread& srv = t.srv;
  auto c = Client::connect(client_for(srv.port(), 2, 8, "rdma"));
  const auto h = c->open("disk", false);
  constexpr std::size_t kRegion = 4 << 20;
  std::vector<std::byte> region(kRegion);
  c->register_memory(region.data(), region.size());
  std::vector<std::byte> pattern(1 << 20);
  fill_pattern(pattern, 11);
  std::copy(pattern.begin(), pattern.end(), region.begin());
  // Inside: a 1 MiB write from the region and reads back into another part of it, on both queues.
  EXPECT_EQ(sync(*c, [&](auto cb) { c->write(0, h.handle(), 0, 1 << 20, region.data(), 0, cb); }), 0);
  EXPECT_EQ(sync(*c, [&](auto cb) { c->read(1, h.handle(), 0, 1 << 20, region.data() + (2 << 20), cb); }), 0);
  EXPECT_EQ(sync(*c, [&](auto cb) { c->read(0, h.handle(), 4096, 4096, region.data() + (3 << 20), cb); }), 0);
  EXPECT_EQ(c->bounced(), 0u);
  EXPECT_TRUE(std::equal(pattern.begin(), pattern.end(), region.begin() + (2 << 20)));
  EXPECT_TRUE(std::equal(pattern.begin() + 4096, pattern.begin() + 8192, region.begin() + (3 << 20)));
  // Partly inside (the last 4 KiB of the region and beyond it), and heap memory: bounced.
  std::vector<std::byte> heap(1 << 20);
  EXPECT_EQ(sync(*c, [&](auto cb) { c->read(0, h.handle(), 0, 1 << 20, heap.data(), cb); }), 0);
  EXPECT_EQ(heap, pattern);
  std::vector<std::byte> wide(kRegion + (1 << 20));
  c->register_memory(wide.data(), kRegion);  // only the first kRegion bytes
  EXPECT_EQ(sync(*c, [&](auto cb) { c->read(1, h.handle(), 0, 8192, wide.data() + kRegion - 4096, cb); }), 0);
  EXPECT_TRUE(std::equal(pattern.begin(), pattern.begin() + 8192, wide.begin() + kRegion - 4096));
  EXPECT_EQ(c->bounced(), 2u);
}

// A target without RDMA: auto connects over TCP and says why; a forced rdma fails clearly.
TEST(RdmaFallback, AutoUsesTcpAndSaysWhyForcedRdmaFails) {
  IBDISK_REQUIRE_RDMA();
  ImageTarget t(16 << 20, /*rdma=*/false);
  ServerThread& srv = t.srv;
  EXPECT_EQ(srv.server().rdma_port(), 0);
  const auto start = std::chrono::steady_clock::now();
  auto c = Client::connect(client_for(srv.port(), 2, 8, "auto"));
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(8));
  EXPECT_EQ(c->transport(0), "tcp");
  EXPECT_EQ(c->transport(1), "tcp");
  EXPECT_NE(c->rdma_not_used().find("nothing listens for RDMA"), std::string::npos) << c->rdma_not_used();
  const auto h = c->open("disk", false);
  std::vector<std::byte> buf(4096);
  EXPECT_EQ(sync(*c, [&](auto cb) { c->read(0, h.handle(), 0, 4096, buf.data(), cb); }), 0);
  try {
    Client::connect(client_for(srv.port(), 1, 8, "rdma"));
    FAIL() << "--transport rdma to a TCP-only target must fail";
  } catch (const SystemError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("over RDMA"), std::string::npos) << what;
    EXPECT_NE(what.find("nothing listens for RDMA"), std::string::npos) << what;
  }
}

// Connect requests with foreign private data are rejected (with a reason), the target keeps
// serving RDMA queues.
TEST(RdmaConnect, ForeignPrivateDataRejectedTargetKeepsServing) {
  IBDISK_REQUIRE_RDMA();
  ImageTarget t(16 << 20);
  ServerThread& srv = t.srv;
  ASSERT_NE(srv.server().rdma_port(), 0) << srv.server().rdma_status();
  auto try_connect = [&](const void* data, std::uint8_t len) {
    rdma::EventChannel ch;
    rdma::CmId id(ch);
    sockaddr_in dst{};
    dst.sin_family = AF_INET;
    dst.sin_port = htons(srv.server().rdma_port());
    ::inet_pton(AF_INET, testing::rdma_addr().c_str(), &dst.sin_addr);
    id.resolve_addr(nullptr, reinterpret_cast<sockaddr*>(&dst), "target", std::chrono::milliseconds(3000));
    ch.expect(RDMA_CM_EVENT_ADDR_RESOLVED, std::chrono::milliseconds(3000), "resolve", "");
    id.resolve_route(std::chrono::milliseconds(3000));
    ch.expect(RDMA_CM_EVENT_ROUTE_RESOLVED, std::chrono::milliseconds(3000), "route", "");
    rdma::ProtectionDomain pd(id.verbs());
    rdma::CompletionQueue cq(id.verbs(), 4);
    rdma::QueuePair qp(id, pd, cq, 2, 2);
    rdma_conn_param p{};
    p.private_data = data;
    p.private_data_len = len;
    EXPECT_EQ(rdma_connect(id.get(), &p), 0);
    auto ev = ch.next(std::chrono::milliseconds(5000));
    EXPECT_TRUE(ev.has_value());
    return ev ? ev->type() : RDMA_CM_EVENT_CONNECT_ERROR;
  };
  const char junk[32] = "not-ibdisk-private-data";
  EXPECT_EQ(try_connect(junk, sizeof junk), RDMA_CM_EVENT_REJECTED);
  transport::RdmaConnectData future;
  future.version = 99;
  future.queue_depth = 8;
  future.max_io = 4096;
  future.msg_size = transport::kRdmaMsgSize;
  const auto bytes = transport::encode(future);
  EXPECT_EQ(try_connect(bytes.data(), static_cast<std::uint8_t>(bytes.size())), RDMA_CM_EVENT_REJECTED);
  auto c = Client::connect(client_for(srv.port(), 1, 4, "rdma"));
  EXPECT_EQ(c->transport(0), "rdma");
  const auto h = c->open("disk", true);
  std::vector<std::byte> buf(4096);
  EXPECT_EQ(sync(*c, [&](auto cb) { c->read(0, h.handle(), 0, 4096, buf.data(), cb); }), 0);
}

// Connect data: the encoder and the checks a target applies to what it receives.
TEST(RdmaConnect, ConnectDataChecks) {
  transport::RdmaConnectData d;
  d.queue_depth = 16;
  d.max_io = 1 << 20;
  d.msg_size = transport::kRdmaMsgSize;
  auto bytes = transport::encode(d);
  transport::RdmaConnectData out;
  EXPECT_EQ(transport::decode_connect_data(bytes, &out), "");
  EXPECT_EQ(out.queue_depth, 16u);
  EXPECT_NE(transport::decode_connect_data(std::span(bytes).first(16), &out), "");
  auto bad = bytes;
  bad[0] = std::byte{0};
  EXPECT_NE(transport::decode_connect_data(bad, &out).find("magic"), std::string::npos);
  bad = bytes;
  bad[8] = std::byte{0};  // depth 0
  EXPECT_NE(transport::decode_connect_data(bad, &out).find("queue depth"), std::string::npos);
  bad = bytes;
  bad[24] = std::byte{1};
  EXPECT_NE(transport::decode_connect_data(bad, &out).find("reserved"), std::string::npos);
}

// A locked-memory limit below what the buffers need names the exact settings to fix it.
TEST(RdmaMemlock, MessageNamesTheSettings) {
  const std::size_t need = 256ull << 20;
  const std::string m = transport::memlock_problem(need, "the target's RDMA buffer pools", 8 << 20, false);
  EXPECT_NE(m.find("256 MiB"), std::string::npos) << m;
  EXPECT_NE(m.find("RLIMIT_MEMLOCK is 8192 KiB"), std::string::npos) << m;
  EXPECT_NE(m.find("ulimit -l 263168"), std::string::npos) << m;
  EXPECT_NE(m.find("memlock 263168"), std::string::npos) << m;
  EXPECT_NE(m.find("LimitMEMLOCK=263168K"), std::string::npos) << m;
  EXPECT_EQ(transport::memlock_problem(need, "x", RLIM_INFINITY, false), "");
  EXPECT_EQ(transport::memlock_problem(need, "x", 8 << 20, /*cap_ipc_lock=*/true), "");
  EXPECT_EQ(transport::memlock_problem(need, "x", need, false), "");
}

}  // namespace
}  // namespace ibdisk
