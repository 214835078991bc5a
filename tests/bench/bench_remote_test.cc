// `ibdisk bench HOST/EXPORT` over loopback TCP: the runner in process, and the CLI end to end.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "bench/remote.h"
#include "tests/support/fixtures.h"
#include "tests/support/process.h"

namespace ibdisk {
namespace {

constexpr std::uint64_t kExportSize = 32 << 20;

class BenchRemote : public ::testing::Test {
 protected:
  void SetUp() override {
    img_ = dir_.file("disk.img");
    testing::make_sparse_file(img_, kExportSize);
    server_ = std::make_unique<testing::ServerThread>(testing::loopback_target(img_));
  }
  bench::RemoteOptions options() const {
    bench::RemoteOptions o;
    o.host = "127.0.0.1";
    o.port = server_->port();
    o.export_name = "disk";
    o.transports = {"tcp"};
    o.runtime_s = 0.3;
    o.iodepth = 4;
    o.qd_sweep = {1, 8};
    return o;
  }

  testing::TempDir dir_;
  std::string img_;
  std::unique_ptr<testing::ServerThread> server_;
};

// Every workload ran with data moved and sane latency order, verify matched, TCP baseline and ratios present.
TEST_F(BenchRemote, AllWorkloadsVerifyAndBaseline) {
  auto o = options();
  o.allow_write = true;
  o.verify = true;
  o.verify_bytes = 8 << 20;
  const auto r = bench::run_remote(o);
  ASSERT_EQ(r.transports.size(), 1u);
  const auto& t = r.transports[0];
  ASSERT_TRUE(t.skipped.empty()) << t.skipped;
  ASSERT_EQ(t.workloads.size(), 4u);
  const char* names[] = {"seqread", "seqwrite", "randread", "randwrite"};
  for (std::size_t i = 0; i < 4; ++i) {
    const auto& w = t.workloads[i];
    EXPECT_EQ(w.name, names[i]);
    EXPECT_TRUE(w.skipped.empty()) << w.skipped;
    EXPECT_GT(w.ios, 0u) << w.name;
    EXPECT_EQ(w.bytes, w.ios * w.block_size) << w.name;
    EXPECT_LE(w.latency.min_us, w.latency.p50_us) << w.name;
    EXPECT_LE(w.latency.p50_us, w.latency.p99_us) << w.name;
    EXPECT_LE(w.latency.p999_us, w.latency.max_us) << w.name;
    EXPECT_GT(w.link_fraction, 0) << w.name;
  }
  EXPECT_EQ(t.workloads[0].block_size, 1u << 20);
  EXPECT_EQ(t.workloads[2].block_size, 4096u);
  ASSERT_EQ(t.sweep.size(), 2u);
  EXPECT_EQ(t.sweep[0].in_flight, 1u);
  EXPECT_EQ(t.sweep[1].in_flight, 8u);
  EXPECT_TRUE(t.verify.ran);
  EXPECT_EQ(t.verify.blocks, 8u);
  EXPECT_TRUE(t.verify.ok()) << t.verify.bad_blocks << " bad, " << t.verify.error;
  ASSERT_EQ(r.baselines.size(), 1u);
  EXPECT_EQ(r.baselines[0].transport, "tcp");
  EXPECT_TRUE(r.baselines[0].skipped.empty()) << r.baselines[0].skipped;
  EXPECT_GT(r.baselines[0].read_mb_s, 0);
  EXPECT_TRUE(r.ok());

  // The pattern the verify pass wrote is on disk: the target really stored what was sent.
  std::ifstream in(img_, std::ios::binary);
  std::vector<char> head(4096);
  in.read(head.data(), static_cast<std::streamsize>(head.size()));
  EXPECT_NE(std::count(head.begin(), head.end(), 0), static_cast<long>(head.size()));

  const auto j = nlohmann::json::parse(bench::remote_json(r));
  EXPECT_TRUE(j["ok"].get<bool>());
  EXPECT_EQ(j["transports"][0]["workloads"].size(), 4u);
  EXPECT_TRUE(j["transports"][0]["verify"]["ok"].get<bool>());
  const auto html = bench::remote_html(r);
  EXPECT_NE(html.find("<svg"), std::string::npos);
  EXPECT_EQ(html.find("<script"), std::string::npos);  // self-contained, no JS
  EXPECT_EQ(html.find("<link"), std::string::npos);  // no external stylesheet
  EXPECT_EQ(html.find("src="), std::string::npos);   // no external image or script
  EXPECT_EQ(j["schema"].get<int>(), 1);
  // Without --cross-check the link reference is the self-test, and each figure says so.
  EXPECT_EQ(j["transports"][0]["workloads"][0]["link_reference"], "self-test");
  // Axes: labelled, log scales said so, tick labels 1, 2 or 5 x 10^k apart (no 3.47e+03).
  EXPECT_NE(html.find("requests in flight"), std::string::npos);
  EXPECT_NE(html.find("IOPS (log scale)"), std::string::npos);
  EXPECT_EQ(html.find("e+"), std::string::npos);
  // The environment names the date, the version, the kernel, the CPU and the command line.
  for (const char* key : {"date", "ibdisk", "kernel", "cpu", "command"}) {
    EXPECT_TRUE(j["environment"].contains(key)) << key << ": " << j["environment"].dump();
  }
}

// Without --allow-write the write workloads are skipped with the reason; reads still run.
TEST_F(BenchRemote, ReadOnlySkipsWrites) {
  auto o = options();
  o.baselines = false;
  o.qd_sweep = {2};
  const auto r = bench::run_remote(o);
  const auto& t = r.transports.at(0);
  ASSERT_TRUE(t.skipped.empty()) << t.skipped;
  EXPECT_GT(t.workloads.at(0).ios, 0u);
  EXPECT_NE(t.workloads.at(1).skipped.find("--allow-write"), std::string::npos);
  EXPECT_NE(t.workloads.at(3).skipped.find("--allow-write"), std::string::npos);
  EXPECT_TRUE(r.ok());
}

// --verify without --allow-write is refused before anything is written.
TEST_F(BenchRemote, VerifyNeedsAllowWrite) {
  auto o = options();
  o.verify = true;
  try {
    bench::run_remote(o);
    FAIL() << "verify without allow_write ran";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("--allow-write"), std::string::npos) << e.what();
  }
}

// An unavailable transport is reported with its reason, not silently dropped.
TEST_F(BenchRemote, RdmaOnLoopbackIsSkippedWithReason) {
  auto o = options();
  o.transports = {"rdma", "tcp"};
  o.baselines = false;
  o.qd_sweep = {1};
  const auto r = bench::run_remote(o);
  ASSERT_EQ(r.transports.size(), 2u);
  EXPECT_FALSE(r.transports[0].skipped.empty());
  EXPECT_TRUE(r.transports[1].skipped.empty()) << r.transports[1].skipped;
}

// The CLI end to end: JSON on stdout holds every workload, the sweep and the verify pass; HTML written.
TEST_F(BenchRemote, CliJsonAndHtml) {
  const std::string out = dir_.file("bench.json"), html = dir_.file("bench.html");
  const std::string cmd = std::string(IBDISK_BINARY) + " bench 127.0.0.1:" + std::to_string(server_->port()) +
                          "/disk --transports tcp --runtime 0.3 --iodepth 4 --qd-sweep 1,4 --allow-write --verify "
                          "--json --html " + html + " > " + out;
  const auto res = testing::run({"/bin/sh", "-c", cmd});
  ASSERT_EQ(res.exit_code, 0) << res.output;
  std::ifstream in(out);
  std::stringstream ss;
  ss << in.rdbuf();
  const auto j = nlohmann::json::parse(ss.str());
  ASSERT_EQ(j["transports"].size(), 1u);
  const auto& t = j["transports"][0];
  EXPECT_EQ(t["name"], "tcp");
  std::vector<std::string> names;
  for (const auto& w : t["workloads"]) {
    names.push_back(w["name"]);
    EXPECT_GT(w["iops"].get<double>(), 0) << w;
    EXPECT_TRUE(w["latency_us"].contains("p99.9")) << w;
  }
  EXPECT_EQ(names, (std::vector<std::string>{"seqread", "seqwrite", "randread", "randwrite"}));
  EXPECT_EQ(t["qd_sweep"].size(), 2u);
  EXPECT_TRUE(t["verify"]["ok"].get<bool>());
  EXPECT_EQ(j["baselines"][0]["transport"], "tcp");
  EXPECT_GT(j["baselines"][0]["read_mb_s"].get<double>(), 0);
  std::ifstream h(html);
  std::stringstream hs;
  hs << h.rdbuf();
  EXPECT_NE(hs.str().find("Queue-depth sweep"), std::string::npos);

  const auto refused = testing::run({IBDISK_BINARY, "bench", "127.0.0.1:" + std::to_string(server_->port()) + "/disk",
                                     "--transports", "tcp", "--verify"});
  EXPECT_NE(refused.exit_code, 0);
  EXPECT_NE(refused.output.find("--allow-write"), std::string::npos) << refused.output;
}

// Without --server-pid the target's CPU comes from its own Stats reply (a target in another
// process, as on a remote host): every workload has a figure.
TEST_F(BenchRemote, TargetCpuFromStatsReply) {
  auto o = options();
  o.baselines = false;
  o.workloads = {"seqread", "randread"};
  o.qd_sweep = {4};
  const auto r = bench::run_remote(o);
  const auto& t = r.transports.at(0);
  ASSERT_TRUE(t.skipped.empty()) << t.skipped;
  EXPECT_EQ(t.server_cpu, "stats");
  ASSERT_EQ(t.workloads.size(), 2u);  // --workloads picks
  EXPECT_EQ(t.workloads[1].name, "randread");
  for (const auto& w : t.workloads) EXPECT_GE(w.server_cpu_percent, 0) << w.name;
  EXPECT_GE(t.sweep.at(0).server_cpu_percent, 0);
}

// An unknown --workloads name is refused with the list of valid ones.
TEST_F(BenchRemote, UnknownWorkloadRefused) {
  auto o = options();
  o.workloads = {"seqread", "scan"};
  try {
    bench::run_remote(o);
    FAIL() << "an unknown workload ran";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("randwrite"), std::string::npos) << e.what();
  }
}

// The repetitions' summary: median (mean of the two middle values for an even count), range,
// and the values in the order they ran.
TEST(BenchSpread, MedianMinMaxValues) {
  const auto odd = bench::spread_of({3, 1, 2});
  EXPECT_EQ(odd.median, 2);
  EXPECT_EQ(odd.min, 1);
  EXPECT_EQ(odd.max, 3);
  EXPECT_EQ(odd.values, (std::vector<double>{3, 1, 2}));
  EXPECT_EQ(bench::spread_of({4, 1, 3, 2}).median, 2.5);
  const auto one = bench::spread_of({7.5});
  EXPECT_EQ(one.median, 7.5);
  EXPECT_EQ(one.min, 7.5);
  EXPECT_EQ(one.max, 7.5);
  const auto none = bench::spread_of({});
  EXPECT_TRUE(none.values.empty());
  EXPECT_EQ(none.median, 0);
}

// --repeat 2: every figure is the median of its repetitions, each repetition kept; the link
// fraction is the median of per-repetition ratios (each against its own baseline run), the
// baselines measured once per repetition, and the verify pass runs once.
TEST_F(BenchRemote, RepetitionsMedianAndSpread) {
  auto o = options();
  o.workloads = {"seqread", "randread"};
  o.qd_sweep = {2};
  o.runtime_s = 0.15;
  o.repeat = 2;
  const auto r = bench::run_remote(o);
  const auto& t = r.transports.at(0);
  ASSERT_TRUE(t.skipped.empty()) << t.skipped;
  ASSERT_EQ(t.workloads.size(), 2u);
  for (const auto* w : {&t.workloads[0], &t.workloads[1], &t.sweep.at(0)}) {
    ASSERT_EQ(w->repetitions.size(), 2u) << w->name;
    const auto& a = w->repetitions[0];
    const auto& b = w->repetitions[1];
    EXPECT_DOUBLE_EQ(w->mb_s, (a.mb_s + b.mb_s) / 2) << w->name;
    EXPECT_DOUBLE_EQ(w->iops, (a.iops + b.iops) / 2) << w->name;
    EXPECT_EQ(w->ios, a.ios + b.ios) << w->name;
    ASSERT_GT(a.link_fraction, 0) << w->name;
    ASSERT_GT(b.link_fraction, 0) << w->name;
    EXPECT_DOUBLE_EQ(w->link_fraction, (a.link_fraction + b.link_fraction) / 2) << w->name;
    EXPECT_TRUE(a.repetitions.empty());
  }
  ASSERT_EQ(r.baselines.size(), 1u);
  const auto& base = r.baselines[0];
  ASSERT_EQ(base.read_repetitions.size(), 2u);
  EXPECT_DOUBLE_EQ(base.read_mb_s, (base.read_repetitions[0] + base.read_repetitions[1]) / 2);
  // Each repetition's ratio is against the baseline measured in that repetition.
  const auto& w = t.workloads[0];
  EXPECT_DOUBLE_EQ(w.repetitions[1].link_fraction, w.repetitions[1].mb_s / base.read_repetitions[1]);

  const auto j = nlohmann::json::parse(bench::remote_json(r));
  EXPECT_EQ(j["schema"].get<int>(), 1);
  EXPECT_EQ(j["options"]["repeat"].get<int>(), 2);
  const auto& reps = j["transports"][0]["workloads"][0]["repetitions"];
  EXPECT_EQ(reps["count"].get<int>(), 2);
  EXPECT_EQ(reps["mb_s"]["values"].size(), 2u);
  EXPECT_DOUBLE_EQ(reps["mb_s"]["median"].get<double>(), j["transports"][0]["workloads"][0]["mb_s"].get<double>());
  EXPECT_EQ(j["baselines"][0]["repetitions"]["read_mb_s"]["values"].size(), 2u);
  const auto text = bench::remote_text(r);
  EXPECT_NE(text.find("MB/s range"), std::string::npos) << text;
  EXPECT_NE(text.find("median of per-repetition ratios"), std::string::npos) << text;
  const auto html = bench::remote_html(r);
  EXPECT_NE(html.find("MB/s per repetition"), std::string::npos);
}

// One repetition (the default) keeps the table as it was: no range column.
TEST_F(BenchRemote, OneRepetitionKeepsTheTable) {
  auto o = options();
  o.baselines = false;
  o.workloads = {"randread"};
  o.qd_sweep = {1};
  o.runtime_s = 0.1;
  const auto r = bench::run_remote(o);
  const auto& w = r.transports.at(0).workloads.at(0);
  ASSERT_EQ(w.repetitions.size(), 1u);
  EXPECT_EQ(w.mb_s, w.repetitions[0].mb_s);
  EXPECT_EQ(bench::remote_text(r).find("MB/s range"), std::string::npos);
}

// The tools' outputs as they print them (perftest 6.06 on Soft-RoCE, iperf3 3.12), trimmed.
TEST(CrossCheckParse, PerftestAndIperf3) {
  const std::string perftest =
      " Data ex. method : rdma_cm\n"
      "---------------------------------------------------------------------------------------\n"
      " #bytes     #iterations    BW peak[MB/sec]    BW average[MB/sec]   MsgRate[Mpps]\n"
      " 1048576    152              0.00               50.00   \t\t   0.000050\n"
      "---------------------------------------------------------------------------------------\n";
  EXPECT_DOUBLE_EQ(bench::parse_perftest_bw(perftest), 50.0 * 1.048576);  // perftest's MB is 2^20 bytes
  EXPECT_DOUBLE_EQ(bench::parse_perftest_bw(" #bytes #iterations BW peak[Gb/sec] BW average[Gb/sec] MsgRate[Mpps]\n"
                                            " 1048576 100 0.00 8.00 0.001\n"),
                   1000.0);
  // A run that moved nothing (perftest -D shorter than its margins) is no figure.
  EXPECT_LT(bench::parse_perftest_bw(" #bytes #iterations BW peak[MB/sec] BW average[MB/sec] MsgRate[Mpps]\n"
                                     " 1048576 0 0.00 0.00 0.000000\n"),
            0);
  EXPECT_LT(bench::parse_perftest_bw("Unable to init the socket connection\n"), 0);
  const std::string iperf3 = R"({"start": {"version": "iperf 3.12"}, "intervals": [],
    "end": {"sum_sent": {"bits_per_second": 206434074.9}, "sum_received": {"bits_per_second": 195962025.18}}})";
  EXPECT_NEAR(bench::parse_iperf3_json(iperf3), 24.495, 0.001);
  EXPECT_LT(bench::parse_iperf3_json(R"({"error": "unable to connect to server: Connection refused"})"), 0);
  EXPECT_LT(bench::parse_iperf3_json("iperf3: error"), 0);
}

// --cross-check on this host: bench starts iperf3's server itself and reports both directions
// beside the TCP self-test baseline; perftest without an RDMA device is a skip with the reason.
TEST_F(BenchRemote, CrossCheckWithIperf3) {
  if (testing::run({"/bin/sh", "-c", "command -v iperf3"}).exit_code != 0) GTEST_SKIP() << "iperf3 is not installed";
  auto o = options();
  o.transports = {"rdma", "tcp"};
  o.workloads = {"seqread"};
  o.qd_sweep = {};
  o.runtime_s = 1;
  o.cross_check = true;
  o.cross_check_iterations = 20;
  const auto r = bench::run_remote(o);
  ASSERT_EQ(r.cross_checks.size(), 4u);
  for (const auto& c : r.cross_checks) {
    if (c.tool == "iperf3") {
      EXPECT_TRUE(c.skipped.empty()) << c.direction << ": " << c.skipped;
      EXPECT_GT(c.mb_s, 0) << c.direction;
      EXPECT_TRUE(c.server_command.empty());  // started here
    } else {
      EXPECT_EQ(c.transport, "rdma");
      if (c.skipped.empty()) {
        EXPECT_GT(c.mb_s, 0);  // a host with an RDMA device
      }
    }
  }
  EXPECT_EQ(r.cross_checks[2].direction, "write");
  EXPECT_EQ(r.cross_checks[3].direction, "read");
  const auto j = nlohmann::json::parse(bench::remote_json(r));
  ASSERT_EQ(j["cross_checks"].size(), 4u);
  EXPECT_GT(j["cross_checks"][3]["mb_s"].get<double>(), 0);
  EXPECT_GT(j["cross_checks"][3]["baseline_mb_s"].get<double>(), 0);
  EXPECT_NE(bench::remote_text(r).find("iperf3"), std::string::npos);
  EXPECT_NE(bench::remote_html(r).find("Cross-checks"), std::string::npos);
  // iperf3 measured the TCP link: it is the reference of TCP's "% of link", not the self-test.
  for (const auto& t : r.transports) {
    if (t.name != "tcp") continue;
    ASSERT_FALSE(t.workloads.empty());
    EXPECT_EQ(t.workloads[0].link_reference, "iperf3");
    EXPECT_NE(bench::remote_text(r).find("tcp: % of link: read against iperf3"), std::string::npos) << bench::remote_text(r);
  }
}

// Against a host that is not this one, the servers are the user's to start: the commands are given.
TEST(CrossCheck, RemoteHostNamesTheServerCommands) {
  bench::CrossCheckOptions o;
  o.host = "192.0.2.1";  // TEST-NET-1: nothing answers
  o.seconds = 1;
  o.rdma = false;
  const auto cmds = bench::cross_check_server_commands(o);
  EXPECT_NE(cmds.find("iperf3 -s -p 5201"), std::string::npos) << cmds;
  o.rdma = true;
  EXPECT_NE(bench::cross_check_server_commands(o).find("ib_read_bw -R -F -s 1048576 -n 1000 -t 8 -p 18516 -o 8"),
            std::string::npos);
}

}  // namespace
}  // namespace ibdisk
