// Issue 15 part 2, liveness: a silent peer is noticed on both sides. A silent or stopped
// initiator loses its exclusive writer lease within the target's session timeout plus the
// rejoin grace; a stopped target is declared lost by the Client within its I/O timeout, which
// reconnects and completes the I/O once the target answers again; a slow disk whose target
// still answers heartbeats is no loss. Real `ibdisk serve` processes (or an in-process target)
// over real TCP on loopback; every timeout is short and every wait has generous slack.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "common/checksum.h"
#include "common/error.h"
#include "initiator/client.h"
#include "tests/support/fixtures.h"
#include "tests/support/process.h"
#include "tests/support/raw_peer.h"
#include "tests/support/serve_fixture.h"

namespace ibdisk {
namespace {

using initiator::Client;
using initiator::ClientOptions;
using testing::Child;
using testing::RawPeer;
using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

// The target's session timeout in these tests, and the rejoin grace it is followed by
// (kRejoinGrace in target/queue.cc).
constexpr int kSessionTimeoutS = 2;
constexpr int kRejoinGraceS = 10;
// A loaded two-core machine: what any deadline here may overrun by.
constexpr auto kSlack = 15s;

// `ibdisk serve` of one exclusive export "d" on 127.0.0.1, TCP only, without a key.
class LivenessServe : public testing::ServeFixture {
 protected:
  LivenessServe() : ServeFixture(16 << 20) {}
  // Tries to open "d" writable from a new session until it works or `within` passes; how long
  // it took, or nullopt. Reads the target's output meanwhile so its pipe never fills.
  std::optional<Clock::duration> open_writable_within(Clock::duration within) {
    const auto t0 = Clock::now();
    while (Clock::now() - t0 < within) {
      try {
        auto c = Client::connect(client());
        c->open("d", false);
        return Clock::now() - t0;
      } catch (const std::exception& e) {
        last_refusal_ = e.what();
      }
      pump_output(500);
    }
    return std::nullopt;
  }

  std::string last_refusal_;
};

// F1: an initiator that handshakes, opens the exclusive export writable and then sends nothing
// (a half-open connection, a host that went away) keeps its writer lease no longer than the
// session timeout plus the rejoin grace: then another initiator may open the export writable.
TEST_F(LivenessServe, SilentInitiatorLosesItsWriterLease) {
  start({"--session-timeout", std::to_string(kSessionTimeoutS)});
  RawPeer silent(port_);
  ASSERT_TRUE(silent.handshake().has_welcome());
  ASSERT_TRUE(silent.open("d").has_opened());
  // At once the export is busy: the silent one is its writer.
  EXPECT_FALSE(open_writable_within(1ms).has_value());
  EXPECT_NE(last_refusal_.find("writer"), std::string::npos) << last_refusal_;
  const auto took = open_writable_within(std::chrono::seconds(kSessionTimeoutS + kRejoinGraceS) + kSlack);
  ASSERT_TRUE(took.has_value()) << "the silent initiator still holds the export: " << last_refusal_;
  EXPECT_GE(*took, std::chrono::seconds(kSessionTimeoutS) - 500ms) << "released before the session timeout";
  serve_->wait_for_output("\x01never printed\x01", 200);
  EXPECT_NE(serve_->output().find("--session-timeout"), std::string::npos)
      << "the target's log names the option:\n" << serve_->output();
  // The silent peer was told why, and its connection is closed.
  EXPECT_TRUE(silent.drain_until_closed());
}

// F1: a real initiator process, SIGSTOPped while it holds a session with the export open for
// writing (a hung or suspended host), loses its lease the same way.
TEST_F(LivenessServe, StoppedInitiatorProcessLosesItsWriterLease) {
  start({"--session-timeout", std::to_string(kSessionTimeoutS)});
  int ready[2];
  ASSERT_EQ(::pipe(ready), 0);
  const ClientOptions opts = client();
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    // The child: one session writing now and then, until it is stopped and killed.
    ::close(ready[0]);
    try {
      auto c = Client::connect(opts);
      const std::uint32_t h = c->open("d", false).handle();
      std::vector<std::byte> buf(4096, std::byte{1});
      if (testing::sync(*c, [&](auto d) { c->write(0, h, 0, 4096, buf.data(), 0, d); }) != 0) ::_exit(3);
      if (::write(ready[1], "r", 1) != 1) ::_exit(4);
      for (;;) {
        testing::sync(*c, [&](auto d) { c->write(0, h, 4096, 4096, buf.data(), 0, d); });
        ::usleep(100000);
      }
    } catch (...) {
      ::_exit(2);
    }
  }
  ::close(ready[1]);
  char r = 0;
  ASSERT_EQ(::read(ready[0], &r, 1), 1) << "the child could not open the export";
  ::close(ready[0]);
  EXPECT_FALSE(open_writable_within(1ms).has_value()) << "the running child is the export's writer";
  ::kill(pid, SIGSTOP);
  const auto took = open_writable_within(std::chrono::seconds(kSessionTimeoutS + kRejoinGraceS) + kSlack);
  ::kill(pid, SIGKILL);
  ::waitpid(pid, nullptr, 0);
  ASSERT_TRUE(took.has_value()) << "the stopped initiator still holds the export: " << last_refusal_;
}

// F2: the target stops answering (SIGSTOP) with a write in flight: the Client declares the
// connection lost within its I/O timeout, reconnects once the target runs again, resends, and
// the write completes with the right data. Without liveness the write waited on the old
// connection and nothing was resent.
TEST_F(LivenessServe, StoppedTargetIsLostThenIoCompletesOnANewConnection) {
  start();
  ClientOptions o = client();
  o.heartbeat = 500ms;
  o.io_timeout = 2s;
  o.timeout = 20s;  // the reconnection's handshake waits this long for the stopped target
  auto c = Client::connect(o);
  const std::uint32_t h = c->open("d", false).handle();
  // Resumed well after the I/O timeout: a resend proves the loss was declared before that.
  const auto w = testing::write_while_target_stopped(*c, h, serve_->pid(), 8s);
  EXPECT_EQ(w.error, "");
  EXPECT_GE(c->resent(), 1u) << "the stopped target was not declared lost within 8 s (I/O timeout 2 s)";
  EXPECT_LT(w.took, 8s + kSlack);
}

// A Client that does nothing for several heartbeat intervals (and several of the target's
// session timeouts) keeps its session: heartbeats flow and are answered, nothing is resent.
TEST_F(LivenessServe, IdleSessionStaysUpOnHeartbeats) {
  start({"--session-timeout", "1.5"});
  ClientOptions o = client();
  o.heartbeat = 300ms;
  o.io_timeout = 3s;
  auto c = Client::connect(o);
  const std::uint32_t h = c->open("d", false).handle();
  const auto until = Clock::now() + 5s;
  c->run_until([&] { return Clock::now() >= until; });
  EXPECT_GE(c->heartbeats(), 5u);
  std::vector<std::byte> a(4096, std::byte{7}), back(4096);
  EXPECT_EQ(testing::sync(*c, [&](auto d) { c->write(0, h, 0, 4096, a.data(), 0, d); }), 0);
  EXPECT_EQ(testing::sync(*c, [&](auto d) { c->read(0, h, 0, 4096, back.data(), d); }), 0);
  EXPECT_EQ(back, a);
  EXPECT_EQ(c->resent(), 0u);
  // The target lists the session (its one queue), with how long since it heard from it and
  // the heartbeats it answered; asked from another session (this one is in its data phase).
  const auto st = Client::connect(client())->stats();
  ASSERT_EQ(st.sessions_size(), 2);
  const auto& other = st.sessions(0).session_id() == 0 ? st.sessions(0) : st.sessions(1);
  ASSERT_EQ(other.idle_ms_size(), 1);
  EXPECT_LT(other.idle_ms(0), 1500u);
  EXPECT_GE(other.heartbeats(), 5u);
}

// Version negotiation stays honest: a version-2 initiator (no heartbeats) is served at version
// 2 and not closed for its silence, and a heartbeat on its queue is a protocol error; a
// version-3 one gets version 3 and its heartbeat answered at once, beyond its granted depth.
TEST(Liveness, VersionTwoInitiatorsAreServedWithoutHeartbeats) {
  testing::TempDir dir;
  testing::make_sparse_file(dir.file("d.img"), 1 << 20);
  target::ServerOptions so = testing::loopback_target(dir.file("d.img"));
  so.session_timeout = 1s;
  testing::ServerThread srv(so);
  testing::RawHello v2;
  v2.version = 2;
  v2.queue_depth = 1;
  RawPeer old(srv.port());
  ASSERT_TRUE(old.handshake(v2).has_welcome());
  std::this_thread::sleep_for(2500ms);  // more than the session timeout, and silent
  wire::Command flush;
  flush.opcode = wire::Opcode::kFlush;
  flush.tag = 1;
  flush.handle = 99;  // not open: answered -EBADF, which is all this needs
  old.send_command(flush);
  wire::Completion c;
  ASSERT_TRUE(old.read_completion(&c)) << "the version-2 queue was closed for its silence";
  EXPECT_EQ(c.tag, 1u);
  wire::Command hb;
  hb.opcode = wire::Opcode::kHeartbeat;
  hb.tag = 2;
  old.send_command(hb);
  proto::Control err;
  ASSERT_TRUE(old.read_control(&err));
  EXPECT_EQ(err.error().code(), proto::ERROR_PROTOCOL);

  testing::RawHello v3;
  v3.queue_depth = 1;
  RawPeer now(srv.port());
  ASSERT_TRUE(now.handshake(v3).has_welcome());
  flush.tag = 3;
  hb.tag = 4;
  now.send_command(flush);  // the one command the depth allows, and a heartbeat beside it
  now.send_command(hb);
  wire::Completion a, b;
  ASSERT_TRUE(now.read_completion(&a));
  ASSERT_TRUE(now.read_completion(&b));
  EXPECT_EQ(a.tag + b.tag, 7u);
  EXPECT_EQ((a.tag == 4 ? a : b).status, 0);
}

// F3: a storage command slower than the I/O timeout, while the target answers heartbeats at
// once, is not a lost connection: it completes on the connection that sent it.
TEST(Liveness, SlowStorageWithAnsweredHeartbeatsIsNoLoss) {
  testing::TempDir dir;
  testing::make_sparse_file(dir.file("d.img"), 16 << 20);
  std::atomic<int> held{0};
  testing::ServerThread srv(testing::loopback_target(dir.file("d.img")), [&](target::Server& s) {
    s.worker_engine(0).set_fault_hook([&](const target::IoRequest& r) {
      target::StorageEngine::Fault f;
      if (r.op == target::IoOp::kWrite && r.offset == 8192 && held++ == 0) f.hold = 4s;  // a slow disk
      return f;
    });
  });
  ClientOptions o;
  o.host = "127.0.0.1";
  o.port = srv.port();
  o.transport = "tcp";
  o.heartbeat = 300ms;
  o.io_timeout = 1500ms;
  auto c = Client::connect(o);
  const std::uint32_t h = c->open("disk", false).handle();
  std::vector<std::byte> a(4096, std::byte{9}), back(4096);
  EXPECT_EQ(testing::sync(*c, [&](auto d) { c->write(0, h, 8192, 4096, a.data(), 0, d); }), 0);
  EXPECT_EQ(held.load(), 1) << "the write was sent again: the slow disk was taken for a dead target";
  EXPECT_EQ(c->resent(), 0u);
  EXPECT_GE(c->heartbeats(), 3u) << "heartbeats were not sent while the write was at the disk";
  EXPECT_EQ(testing::sync(*c, [&](auto d) { c->read(0, h, 8192, 4096, back.data(), d); }), 0);
  EXPECT_EQ(back, a);
}

}  // namespace
}  // namespace ibdisk
