// RDMA to TCP failover and back, on the guest's real Soft-RoCE device, as on two real hosts: the
// target is an `ibdisk serve` process, this process is the initiator. A random workload (4
// queues x depth 16, 512 B to 1 MiB, checked against a model) runs while `rdma link delete rxe0`
// removes the device both ends use: I/O continues on TCP with no error and no mismatch; after
// `rdma link add` the session moves back to RDMA (the Client API and `ibdisk stats` agree), the
// workload finishes and every byte of the export is read back; then rxe1, a device no
// connection uses, is removed while both processes run, and must go within 90 s; last, rxe0's
// netdev goes down and up, and a new initiator must get in over RDMA again. Runs as
// vm.rdma-failover: it deletes and re-creates the guest's devices, so it has a guest of its own.
#include <dirent.h>
#include <signal.h>
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <optional>
#include <sstream>
#include <thread>

#include "initiator/client.h"
#include "tests/rdma/rdma_env.h"
#include "tests/support/fixtures.h"
#include "tests/support/process.h"
#include "tests/support/workload.h"

namespace ibdisk {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using initiator::Client;

constexpr std::uint64_t kImage = 128ull << 20;
constexpr unsigned kQueues = 4;
constexpr unsigned kDepth = 16;
constexpr const char* kClientName = "failover-test";
// Generous: the guest's CPU is emulated and shared with other guests.
constexpr auto kDeleteLimit = 90s;
constexpr auto kBackLimit = 90s;

const Clock::time_point t0 = Clock::now();
double since_start() { return std::chrono::duration<double>(Clock::now() - t0).count(); }

#define SAY(...)                                 \
  do {                                           \
    std::printf("[%7.2f s] ", since_start());    \
    std::printf(__VA_ARGS__);                    \
    std::printf("\n");                           \
    std::fflush(stdout);                         \
  } while (0)

std::string slurp(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

std::string sh(const std::string& cmd, int* exit_code = nullptr) {
  auto r = testing::run({"/bin/sh", "-c", cmd}, 60000);
  if (exit_code) *exit_code = r.exit_code;
  return r.output;
}

// Polls `path` until it contains `needle`.
bool wait_for_file(const std::string& path, const std::string& needle, std::chrono::milliseconds limit) {
  const auto deadline = Clock::now() + limit;
  while (slurp(path).find(needle) == std::string::npos) {
    if (Clock::now() > deadline) return false;
    std::this_thread::sleep_for(50ms);
  }
  return true;
}

// Which processes hold a uverbs device open, and where a stuck process waits in the kernel:
// what to look at when `rdma link delete` does not return.
std::string uverbs_holders(int stuck_pid) {
  std::string out = "kernel stack of `rdma link delete` (pid " + std::to_string(stuck_pid) + "):\n" +
                    slurp("/proc/" + std::to_string(stuck_pid) + "/stack") + "open uverbs files:\n";
  DIR* proc = ::opendir("/proc");
  while (dirent* p = proc ? ::readdir(proc) : nullptr) {
    const std::string pid = p->d_name;
    if (pid.find_first_not_of("0123456789") != std::string::npos) continue;
    const std::string fd_dir = "/proc/" + pid + "/fd";
    DIR* fds = ::opendir(fd_dir.c_str());
    while (dirent* f = fds ? ::readdir(fds) : nullptr) {
      char target[256] = {};
      const std::string link = fd_dir + "/" + f->d_name;
      if (::readlink(link.c_str(), target, sizeof target - 1) > 0 && std::string(target).find("infiniband") != std::string::npos) {
        std::string comm = slurp("/proc/" + pid + "/comm");
        if (!comm.empty() && comm.back() == '\n') comm.pop_back();
        out += "  pid " + pid + " (" + comm + ") fd " + f->d_name + " -> " + target + "\n";
      }
    }
    if (fds) ::closedir(fds);
  }
  if (proc) ::closedir(proc);
  return out;
}

// The transports `ibdisk stats --json` lists for our session, e.g. "rdma,rdma,tcp,rdma".
std::string stats_transports(const std::string& ibdisk, const std::string& where) {
  int rc = 0;
  const std::string out = sh(ibdisk + " stats --json " + where + " 2>/dev/null", &rc);
  const auto j = nlohmann::json::parse(out, nullptr, false);
  if (rc != 0 || j.is_discarded()) return "(no stats: " + out + ")";
  for (const auto& session : j["sessions"]) {
    if (session["name"] != kClientName) continue;
    std::string list;
    for (const auto& t : session["transports"]) list += (list.empty() ? "" : ",") + t.get<std::string>();
    return list;
  }
  return "(no session: " + out + ")";
}

// Runs an ibdisk command as a user would and expects `needle` in what it prints.
void expect_says(const std::string& cmd, const std::string& needle) {
  const std::string out = sh(cmd + " 2>&1");
  EXPECT_NE(out.find(needle), std::string::npos) << cmd << ":\n" << out;
}

std::string repeat(const std::string& word, unsigned n) {
  std::string s;
  for (unsigned i = 0; i < n; ++i) s += (i ? "," : "") + word;
  return s;
}

bool all_on(const Client& c, const std::string& transport) {
  for (unsigned q = 0; q < c.queue_count(); ++q) {
    if (c.transport(q) != transport) return false;
  }
  return true;
}

TEST(RdmaFailover, LinkDeleteMidWorkloadContinuesOnTcpThenBackOnRdma) {
  IBDISK_REQUIRE_RDMA();
  // In the guest (tests/vm/run) the layout is known: anything else there is a failure.
  const bool in_guest = std::getenv("IBDISK_VM") != nullptr;
  if (::geteuid() != 0) {
    if (in_guest) FAIL() << "the guest runs tests as root";
    GTEST_SKIP() << "needs root to delete and add the RDMA link";
  }
  const std::string link = sh("rdma link show 2>&1");
  if (link.find("link rxe0/1 state ACTIVE physical_state LINK_UP netdev veth0") == std::string::npos) {
    if (in_guest) FAIL() << "the guest has no active rxe0 on veth0: " << link;
    GTEST_SKIP() << "no active rxe0 on veth0 (the layout of tests/vm/run): " << link;
  }
  const std::string ibdisk = IBDISK_BINARY;
  const std::string addr = testing::rdma_addr();
  testing::TempDir dir;
  const std::string img = dir.file("disk.img"), log = dir.file("target.log");
  testing::make_sparse_file(img, kImage);
  const std::uint16_t port = testing::free_port();
  const std::string where = addr + ":" + std::to_string(port);

  // The target, a process of its own as on a real host.
  testing::Child target({"/bin/sh", "-c",
                         "exec " + ibdisk + " serve --export disk=" + img + " --listen " + where +
                             " --insecure --threads 2 >" + log + " 2>&1"});
  struct PrintLog {  // whatever happens, the target's side of the story goes in the test's output
    std::string path;
    ~PrintLog() { std::printf("--- target log ---\n%s--- end of target log ---\n", slurp(path).c_str()); }
  } print_log{log};
  ASSERT_TRUE(wait_for_file(log, "ibdisk serve: listening", 30000ms)) << slurp(log);
  ASSERT_NE(slurp(log).find("RDMA port"), std::string::npos) << slurp(log);
  SAY("target pid %d listening on %s (tcp and RDMA)", target.pid(), where.c_str());

  initiator::ClientOptions o;
  o.host = addr;
  o.port = port;
  o.queues = kQueues;
  o.queue_depth = kDepth;
  o.transport = "auto";
  o.client_name = kClientName;
  o.timeout = 30s;
  auto client = Client::connect(o);
  ASSERT_TRUE(all_on(*client, "rdma")) << client->rdma_not_used();
  const auto opened = client->open("disk", false);
  std::vector<std::byte> model(kImage);
  testing::RandomWorkload work(*client, opened.handle(), model,
                               {.seed = 7, .max_in_flight = kQueues * kDepth, .mostly_small = true});

  // 1. On RDMA; what the user sees says so.
  work.run(200);
  SAY("on RDMA: %u requests, %llu MiB, %u errors, %u mismatches", work.result().completed,
      static_cast<unsigned long long>(work.result().bytes >> 20), work.result().errors, work.result().mismatches);
  EXPECT_EQ(stats_transports(ibdisk, where), repeat("rdma", kQueues));
  expect_says(ibdisk + " ls " + where, "transport rdma");
  expect_says(ibdisk + " info " + where + "/disk", "transport:   rdma");

  // 2. The device goes away under full load.
  std::unique_ptr<testing::Child> del;
  std::optional<testing::ProcessResult> deleted;
  Clock::time_point t_delete, t_deleted, t_tcp;
  struct DeleteGuard {  // if the test ends while the delete still waits: evidence, and no reaping
    std::unique_ptr<testing::Child>& del;
    std::optional<testing::ProcessResult>& deleted;
    ~DeleteGuard() {
      if (!del || deleted) return;
      std::printf("the test ended while `rdma link delete rxe0` still waits.\n%s", uverbs_holders(del->pid()).c_str());
      (void)del.release();  // a process in the kernel's wait cannot be reaped; it ends once we exit
    }
  } delete_guard{del, deleted};
  unsigned in_flight_at_delete = 0, completed_at_tcp = 0;
  const unsigned start = work.issued();
  work.run_while([&] {
    if (!del && work.issued() >= start + 100) {
      in_flight_at_delete = client->in_flight();
      t_delete = Clock::now();
      SAY("rdma link delete rxe0 (%u requests in flight)", in_flight_at_delete);
      del = std::make_unique<testing::Child>(std::vector<std::string>{"/usr/bin/env", "rdma", "link", "delete", "rxe0"});
    }
    if (del && !deleted) {
      deleted = del->try_wait();
      if (deleted) {
        t_deleted = Clock::now();
        SAY("rdma link delete returned %d after %.2f s%s%s", deleted->exit_code,
            std::chrono::duration<double>(t_deleted - t_delete).count(), deleted->output.empty() ? "" : ": ",
            deleted->output.c_str());
      } else if (Clock::now() - t_delete > kDeleteLimit) {
        // The kernel waits for every user of the device to close it: show who still does.
        std::printf("rdma link delete rxe0 did not return within %lld s.\n%s\ntarget log:\n%s\n",
                    static_cast<long long>(kDeleteLimit.count()), uverbs_holders(del->pid()).c_str(),
                    slurp(log).c_str());
        std::fflush(stdout);
        std::_Exit(1);  // the stuck process cannot be reaped; the guest powers off
      }
    }
    if (t_tcp == Clock::time_point{} && del && all_on(*client, "tcp")) {
      t_tcp = Clock::now();
      completed_at_tcp = work.result().completed;
      SAY("every queue on TCP %.2f s after the delete began", std::chrono::duration<double>(t_tcp - t_delete).count());
    }
    return !(deleted && t_tcp != Clock::time_point{} && work.result().completed >= completed_at_tcp + 200);
  });
  ASSERT_EQ(deleted->exit_code, 0) << deleted->output;
  SAY("on TCP: %u requests so far, %u errors, %u mismatches", work.result().completed, work.result().errors,
      work.result().mismatches);
  EXPECT_EQ(work.result().errors, 0u);
  EXPECT_EQ(work.result().mismatches, 0u);
  EXPECT_EQ(stats_transports(ibdisk, where), repeat("tcp", kQueues));
  expect_says(ibdisk + " ls " + where, "transport tcp");

  // 3. The device comes back: the session moves back to RDMA with I/O in flight.
  int rc = 0;
  const std::string added = sh("rdma link add rxe0 type rxe netdev veth0 2>&1", &rc);
  ASSERT_EQ(rc, 0) << added;
  const auto t_added = Clock::now();
  SAY("rdma link add rxe0 type rxe netdev veth0");
  work.run_while([&] { return !all_on(*client, "rdma") && Clock::now() - t_added < kBackLimit; });
  ASSERT_TRUE(all_on(*client, "rdma")) << "the session did not move back to RDMA within " << kBackLimit.count() << " s";
  SAY("every queue back on RDMA %.2f s after the link was added",
      std::chrono::duration<double>(Clock::now() - t_added).count());
  // The target sees the TCP queues go once their last commands complete.
  std::string seen;
  const auto stats_deadline = Clock::now() + 60s;
  while ((seen = stats_transports(ibdisk, where)) != repeat("rdma", kQueues) && Clock::now() < stats_deadline) {
    work.run(50);
  }
  EXPECT_EQ(seen, repeat("rdma", kQueues));
  SAY("ibdisk stats: session %s on %s", kClientName, seen.c_str());
  expect_says(ibdisk + " ls " + where, "transport rdma");

  // 4. Finish on RDMA and check every byte.
  work.run(200);
  ASSERT_EQ(testing::sync(*client, [&](auto cb) { client->flush(0, opened.handle(), cb); }), 0);
  EXPECT_EQ(testing::read_back_mismatches(*client, opened.handle(), model), 0u);
  const auto& r = work.result();
  EXPECT_EQ(r.errors, 0u);
  EXPECT_EQ(r.mismatches, 0u);
  SAY("done: %u requests, %llu MiB, %u errors, %u mismatches, %u in flight at the delete, read-back of %llu MiB matched",
      r.completed, static_cast<unsigned long long>(r.bytes >> 20), r.errors, r.mismatches, in_flight_at_delete,
      static_cast<unsigned long long>(kImage >> 20));

  // 5. A device neither side has a connection on (rxe1; librdmacm opened a context on it in
  // both processes when rxe0 went) can be removed while both run (issue 15: it used to block
  // in ib_uverbs_remove_one for as long as the target ran).
  const auto t_unused = Clock::now();
  testing::Child del1({"/usr/bin/env", "rdma", "link", "delete", "rxe1"});
  std::optional<testing::ProcessResult> deleted1;
  while (!(deleted1 = del1.try_wait()) && Clock::now() - t_unused < kDeleteLimit) std::this_thread::sleep_for(50ms);
  if (!deleted1) {
    std::printf("rdma link delete rxe1 (unused) did not return within %lld s.\n%s\n",
                static_cast<long long>(kDeleteLimit.count()), uverbs_holders(del1.pid()).c_str());
    std::fflush(stdout);
    std::_Exit(1);  // the stuck process cannot be reaped; the guest powers off
  }
  ASSERT_EQ(deleted1->exit_code, 0) << deleted1->output;
  SAY("rdma link delete rxe1 (a device no connection used) returned after %.2f s",
      std::chrono::duration<double>(Clock::now() - t_unused).count());
  EXPECT_EQ(sh("rdma link add rxe1 type rxe netdev veth1 2>&1", &rc), "");
  EXPECT_EQ(rc, 0);
  work.run(50);
  EXPECT_EQ(work.result().errors, 0u);
  EXPECT_TRUE(all_on(*client, "rdma")) << client->rdma_not_used();

  // 6. rxe0's netdev down and up (a cable out and back in) while an initiator tries to
  // connect: it must fail at once, naming the port, and get in over RDMA once the link is up.
  // It used to send its connect request down the dead port, and after that Soft-RoCE's
  // connection manager answered no connect request (of any process) until rxe0 was re-created.
  client.reset();
  EXPECT_EQ(sh("ip link set veth0 down 2>&1", &rc), "");
  o.transport = "rdma";
  o.timeout = 5s;
  const auto t_down = Clock::now();
  try {
    Client::connect(o);
    ADD_FAILURE() << "connected over RDMA with veth0 down";
  } catch (const std::exception& e) {
    SAY("connecting with veth0 down: %s (%.2f s)", e.what(), std::chrono::duration<double>(Clock::now() - t_down).count());
    EXPECT_NE(std::string(e.what()).find("RDMA port rxe0/1 is"), std::string::npos) << e.what();
  }
  std::this_thread::sleep_for(2s);
  EXPECT_EQ(sh("ip link set veth0 up 2>&1", &rc), "");
  const auto t_up = Clock::now();
  SAY("ip link set veth0 up");
  std::string last;
  while (!client && Clock::now() - t_up < kBackLimit) {
    try {
      client = Client::connect(o);
    } catch (const std::exception& e) {
      last = e.what();
      std::this_thread::sleep_for(500ms);
    }
  }
  ASSERT_TRUE(client) << "no RDMA connection within " << kBackLimit.count() << " s of veth0 up: " << last
                      << "\ntarget log:\n" << slurp(log);
  SAY("a new initiator connected over RDMA %.2f s after veth0 up",
      std::chrono::duration<double>(Clock::now() - t_up).count());
  const auto reopened = client->open("disk", false);
  std::vector<std::byte> block(4096);
  EXPECT_EQ(testing::sync(*client, [&](auto cb) { client->read(0, reopened.handle(), 0, 4096, block.data(), cb); }), 0);

  client.reset();
  ::kill(target.pid(), SIGTERM);
  EXPECT_EQ(target.wait(30000).exit_code, 0);
}

}  // namespace
}  // namespace ibdisk
