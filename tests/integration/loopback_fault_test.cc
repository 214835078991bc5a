// Failover, resend, fencing and fault handling between a real target::Server and a real
// initiator::Client over the in-memory loopback transport with its fault injector: cut, drop,
// delay, reorder, duplicate and error-inject commands at chosen points, and check that the
// export ends up exactly as the initiator's model says, with no error the caller did not ask
// for. The same paths run over real RDMA in the guest (vm.rdma-failover).
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <thread>

#include "common/error.h"
#include "initiator/client.h"
#include "tests/support/fixtures.h"
#include "tests/support/workload.h"
#include "transport/loopback/loopback.h"

namespace ibdisk {
namespace {

using initiator::Client;
using initiator::ClientOptions;
using transport::Fault;
using transport::LoopbackNetwork;
using namespace std::chrono_literals;

constexpr std::uint64_t kSize = 64ull << 20;

class LoopbackFaults : public ::testing::Test {
 protected:
  void start(unsigned threads = 2, const std::function<void(target::Server&)>& more = {}) {
    testing::make_sparse_file(dir_.file("d.img"), kSize);
    auto o = testing::loopback_target(dir_.file("d.img"));
    o.threads = threads;
    srv_ = std::make_unique<testing::ServerThread>(o, [&](target::Server& s) {
      s.add_listener([&](auto next, auto accept) { return net_.listen(next, accept); });
      if (more) more(s);
    });
  }
  // A Client whose primary transport is the faulty connector (standing in for RDMA, so a loss
  // is failed over) and whose fallback is a clean one.
  std::unique_ptr<Client> client(std::shared_ptr<transport::Connector> primary, unsigned queues, unsigned depth) {
    ClientOptions o;
    o.host = "loopback";
    o.port = 1;
    o.queues = queues;
    o.queue_depth = depth;
    o.primary = std::move(primary);
    o.fallback = net_.connector();
    o.client_name = ::testing::UnitTest::GetInstance()->current_test_info()->name();
    return Client::connect(o);
  }
  // The target's count of protocol errors, asked by a Client of its own (a Client in its data
  // phase makes no control calls).
  std::uint64_t protocol_errors() { return client(net_.connector(), 1, 1)->stats().protocol_errors(); }

  testing::TempDir dir_;
  LoopbackNetwork net_;
  std::unique_ptr<testing::ServerThread> srv_;
  std::vector<std::byte> model_ = std::vector<std::byte>(kSize);
};

// Connections cut at four points of a random workload on four queues: every command the lost
// connections carried is sent again on new ones, no caller sees an error, nothing is lost.
TEST_F(LoopbackFaults, CutsMidWorkloadLoseNothing) {
  start();
  auto c = client(net_.connector({{Fault::Kind::kDisconnect, 50}, {Fault::Kind::kDisconnect, 120},
                                  {Fault::Kind::kDisconnect, 200}, {Fault::Kind::kDisconnect, 333}}),
                  4, 16);
  const auto h = c->open("disk", false).handle();
  testing::RandomWorkload w(*c, h, model_, {.seed = 11, .max_in_flight = 64});
  w.run(600);
  EXPECT_EQ(w.result().errors, 0u);
  EXPECT_EQ(w.result().mismatches, 0u);
  EXPECT_EQ(net_.counters().cuts.load(), 4u);
  EXPECT_GT(c->resent(), 0u);
  EXPECT_EQ(testing::read_back_mismatches(*c, h, model_), 0u);
}

// A queue lost with 32 commands in flight comes back granted a depth of 4: it sends them again
// 4 at a time (more would be a protocol error on the target), and a later connection granted 32
// again carries 32.
TEST_F(LoopbackFaults, ResendsFitTheNewQueuesDepthAndTheDepthGrowsBack) {
  start();
  auto c = client(net_.connector({{Fault::Kind::kDisconnect, 40}}, {32, 4, 32}), 1, 32);
  ASSERT_EQ(c->queue_depth(0), 32u);
  const auto h = c->open("disk", false).handle();
  testing::RandomWorkload w(*c, h, model_, {.seed = 12, .max_in_flight = 32, .mostly_small = true});
  w.run(200);
  EXPECT_EQ(w.result().errors, 0u);
  EXPECT_EQ(c->queue_depth(0), 4u) << "the queue keeps the depth its new connection was granted";
  net_.cut_all();
  w.run(200);
  EXPECT_EQ(w.result().errors, 0u);
  EXPECT_EQ(w.result().mismatches, 0u);
  EXPECT_EQ(c->queue_depth(0), 32u) << "the depth grows back with a connection granted more";
  EXPECT_EQ(testing::read_back_mismatches(*c, h, model_), 0u);
  EXPECT_EQ(protocol_errors(), 0u) << "a resend went beyond the granted depth";
}

// The lost queue's copy of a write is still at the storage engine (a slow device) when the
// initiator sends it again on a new queue and then overwrites the range: the target ends the
// old queue and lets its write finish before the new queue carries anything, so the old copy
// never lands after the overwrite.
TEST_F(LoopbackFaults, AResendNeverRunsBesideTheLostQueuesCopy) {
  std::atomic<int> writes_seen{0};
  std::atomic<std::int64_t> held_until_ns{0}, resend_started_ns{0};
  const auto now_ns = [] {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
  };
  start(1, [&](target::Server& s) {
    s.worker_engine(0).set_fault_hook([&](const target::IoRequest& r) {
      target::StorageEngine::Fault f;
      if (r.op != target::IoOp::kWrite || r.offset != 0) return f;
      const int n = ++writes_seen;
      if (n == 1) {
        f.hold = 400ms;  // the first copy: a slow device
        held_until_ns = now_ns() + 400'000'000;
      } else if (n == 2) {
        resend_started_ns = now_ns();
      }
      return f;
    });
  });
  auto c = client(net_.connector(), 1, 4);
  const auto h = c->open("disk", false).handle();
  std::vector<std::byte> a(4096, std::byte{0xaa}), b(4096, std::byte{0xbb}), back(4096);
  bool a_done = false;
  int a_status = 1;
  c->write(0, h, 0, 4096, a.data(), 0, [&](int st) {
    a_status = st;
    a_done = true;
  });
  // Lose the connection while its write is held at the engine.
  c->run_until([&] { return writes_seen.load() >= 1 || a_done; });
  ASSERT_EQ(writes_seen.load(), 1);
  net_.cut_all();
  c->run_until([&] { return a_done; });
  EXPECT_EQ(a_status, 0);
  EXPECT_EQ(testing::sync(*c, [&](auto cb) { c->write(0, h, 0, 4096, b.data(), 0, cb); }), 0);
  EXPECT_EQ(testing::sync(*c, [&](auto cb) { c->read(0, h, 0, 4096, back.data(), cb); }), 0);
  EXPECT_EQ(back, b) << "the lost queue's late copy of the first write overwrote the second";
  ASSERT_GE(writes_seen.load(), 2);
  EXPECT_GE(resend_started_ns.load(), held_until_ns.load())
      << "the resent write reached the engine while the lost queue's copy was still there";
  EXPECT_GE(c->resent(), 1u);
}

// A dropped command (never reaches the target) is sent again when its connection is lost later.
// One queue: the loss must be the dropped command's own connection (no deadline yet notices a
// command that is never answered).
TEST_F(LoopbackFaults, ADroppedCommandIsSentAgainAfterALoss) {
  start();
  auto c = client(net_.connector({{Fault::Kind::kDrop, 10}, {Fault::Kind::kDisconnect, 30}}), 1, 8);
  const auto h = c->open("disk", false).handle();
  testing::RandomWorkload w(*c, h, model_, {.seed = 13, .max_in_flight = 16, .mostly_small = true});
  w.run(150);
  EXPECT_EQ(w.result().errors, 0u);
  EXPECT_EQ(w.result().mismatches, 0u);
  EXPECT_EQ(testing::read_back_mismatches(*c, h, model_), 0u);
}

// A duplicated command runs twice on the target (writes are idempotent overwrites); its second
// completion names a tag the initiator no longer has, which ends that connection, and the
// initiator carries on on a new one.
TEST_F(LoopbackFaults, DuplicatedCommandsAreHarmless) {
  start();
  auto c = client(net_.connector({{Fault::Kind::kDuplicate, 5}, {Fault::Kind::kDuplicate, 17}}), 2, 8);
  const auto h = c->open("disk", false).handle();
  testing::RandomWorkload w(*c, h, model_, {.seed = 14, .max_in_flight = 16, .mostly_small = true});
  w.run(150);
  EXPECT_EQ(w.result().errors, 0u);
  EXPECT_EQ(w.result().mismatches, 0u);
  EXPECT_EQ(testing::read_back_mismatches(*c, h, model_), 0u);
}

// Commands that reach the target late or out of order (the protocol promises no order between
// commands in flight) still leave the export as the model says.
TEST_F(LoopbackFaults, DelayedAndReorderedCommandsStayCorrect) {
  start();
  auto c = client(net_.connector({{Fault::Kind::kDelay, 3, 80ms},
                                  {Fault::Kind::kDelay, 8, 30ms},
                                  {Fault::Kind::kReorder, 12},
                                  {Fault::Kind::kDelay, 20, 120ms},
                                  {Fault::Kind::kReorder, 25}}),
                  2, 8);
  const auto h = c->open("disk", false).handle();
  testing::RandomWorkload w(*c, h, model_, {.seed = 15, .max_in_flight = 16, .mostly_small = true});
  w.run(120);
  EXPECT_EQ(w.result().errors, 0u);
  EXPECT_EQ(w.result().mismatches, 0u);
  EXPECT_EQ(net_.counters().faults.load(), 5u);
  EXPECT_EQ(testing::read_back_mismatches(*c, h, model_), 0u);
}

// Every queue lost at once, as when the RDMA device is removed: the target ends the session (it
// saw its last queue go), the primary transport refuses to connect, and the fallback's connect
// runs the initiator's event loop as TCP's does, so the other queues' losses are handled while
// one queue is still connecting. The queues must end up in one new session that has the
// export open again, no reconnecting queue may name a queue id of the ended session in the new
// one (that ends an unrelated queue of the new session: vm.rdma-failover saw "Broken pipe"),
// and no caller sees an error.
class SwitchableConnector final : public transport::Connector {
 public:
  SwitchableConnector(std::shared_ptr<transport::Connector> inner, bool runs_loop)
      : inner_(std::move(inner)), runs_loop_(runs_loop) {}
  std::string transport_name() const override { return inner_->transport_name(); }
  std::unique_ptr<transport::ClientConnection> connect(boost::asio::io_context& io, const std::string& host,
                                                       std::uint16_t port, const transport::ConnectOptions& opts,
                                                       std::string* why_not) override {
    if (down) {
      *why_not = "the device was removed";
      return nullptr;
    }
    if (runs_loop_) transport::run_until(io, [] { return false; }, 20ms);  // as an async TCP connect does
    return inner_->connect(io, host, port, opts, why_not);
  }
  std::atomic<bool> down{false};

 private:
  std::shared_ptr<transport::Connector> inner_;
  bool runs_loop_;
};

TEST_F(LoopbackFaults, EveryQueueLostAtOnceGoesOnInOneNewSession) {
  start();
  auto primary = std::make_shared<SwitchableConnector>(net_.connector(), false);
  ClientOptions o;
  o.host = "loopback";
  o.port = 1;
  o.queues = 4;
  o.queue_depth = 16;
  o.primary = primary;
  o.fallback = std::make_shared<SwitchableConnector>(net_.connector(), true);
  o.client_name = "all-lost";
  auto c = Client::connect(o);
  const auto h = c->open("disk", false).handle();
  const auto first_session = c->session_id();
  testing::RandomWorkload w(*c, h, model_, {.seed = 17, .max_in_flight = 64, .mostly_small = true});
  w.run_while([&] {
    if (w.issued() == 100) {
      primary->down = true;
      net_.cut_all(transport::CloseCode::kPeerClosed);
    }
    return w.issued() < 400;
  });
  EXPECT_EQ(w.result().errors, 0u);
  EXPECT_EQ(w.result().mismatches, 0u);
  EXPECT_NE(c->session_id(), first_session) << "the target ended the first session";
  EXPECT_GT(c->resent(), 0u);
  EXPECT_EQ(testing::read_back_mismatches(*c, h, model_), 0u);
  const auto stats = client(net_.connector(), 1, 1)->stats();
  unsigned sessions_of_ours = 0;
  for (const auto& s : stats.sessions()) {
    if (s.client_name() != "all-lost") continue;
    ++sessions_of_ours;
    EXPECT_EQ(s.transports_size(), 4) << "every queue is in the client's one session";
    EXPECT_EQ(s.exports_size(), 1) << "with the export open again";
  }
  EXPECT_EQ(sessions_of_ours, 1u);
  EXPECT_EQ(protocol_errors(), 0u);
}

// An error injected into one completion reaches that command's caller only; the session goes on.
TEST_F(LoopbackFaults, AnInjectedErrorFailsOnlyItsCommand) {
  start();
  auto c = client(net_.connector({{Fault::Kind::kError, 7, 0ms, -EIO}}), 1, 8);
  const auto h = c->open("disk", false).handle();
  testing::RandomWorkload w(*c, h, model_, {.seed = 16, .max_in_flight = 8, .mostly_small = true});
  w.run(60);
  EXPECT_EQ(w.result().errors, 1u);
  EXPECT_EQ(w.result().mismatches, 0u);
  EXPECT_EQ(testing::read_back_mismatches(*c, h, model_), 0u);
}

}  // namespace
}  // namespace ibdisk
