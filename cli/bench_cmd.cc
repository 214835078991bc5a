// `ibdisk bench`: throughput and latency. `--local PATH` runs the target's storage engine alone
// on a file or block device (no network), with fio's workload vocabulary so the two compare;
// `HOST[:PORT]/EXPORT` runs the same workloads over RDMA and TCP through the initiator's Client.
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>

#include "bench/local.h"
#include "bench/remote.h"
#include "initiator/client.h"
#include "cli/commands.h"
#include "common/error.h"

namespace ibdisk::cli {
namespace {

struct Args {
  bench::LocalOptions local;
  std::string rw = "randread";
  bool json = false;
  bool force = false;
  // HOST[:PORT]/EXPORT mode
  std::string target;
  bench::RemoteOptions remote;
  std::string transports = "rdma,tcp";
  std::string qd_sweep = "1,4,16,64";
  std::string workloads = "seqread,seqwrite,randread,randwrite";
  std::string html;
  double timeout_s = 10;
  bool no_baselines = false;
};

std::vector<std::string> split_list(const std::string& text) {
  std::vector<std::string> out;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    if (!item.empty()) out.push_back(item);
  }
  return out;
}

void draw_bar(const std::string& step, double f) {
  const int width = 40, filled = static_cast<int>(f * width);
  std::fprintf(stderr, "\r[%.*s%*s] %3.0f%% %-50.50s", filled, "########################################", width - filled, "",
               f * 100, step.c_str());
  std::fflush(stderr);
}

int run_remote(Args& a) {
  initiator::RemoteName name;
  if (!initiator::parse_remote(a.target, &name) || name.export_name.empty()) {
    throw SystemError("ibdisk bench " + a.target, std::string("not HOST[:PORT]/EXPORT"),
                      "give the target as HOST/EXPORT, e.g. 10.0.0.1/disk, or --local PATH for the storage engine alone");
  }
  auto& o = a.remote;
  o.host = name.host;
  o.port = name.port;
  o.export_name = name.export_name;
  o.runtime_s = a.local.runtime_s;
  o.size = a.local.size;
  o.iodepth = a.local.iodepth;
  o.seed = a.local.seed;
  o.timeout = std::chrono::milliseconds(static_cast<long>(a.timeout_s * 1000));
  o.baselines = !a.no_baselines;
  o.transports = split_list(a.transports);
  o.workloads = split_list(a.workloads);
  o.qd_sweep.clear();
  for (const auto& q : split_list(a.qd_sweep)) {
    char* end = nullptr;
    const unsigned long v = std::strtoul(q.c_str(), &end, 10);
    if (*end != '\0' || v == 0 || v > 4096) {
      throw SystemError("ibdisk bench --qd-sweep " + a.qd_sweep, "'" + q + "' is not a queue depth from 1 to 4096",
                        "give a comma-separated list such as 1,4,16,64");
    }
    o.qd_sweep.push_back(static_cast<unsigned>(v));
  }
  if (!o.allow_write) {
    std::fprintf(stderr, "bench: read workloads only; seqwrite and randwrite need --allow-write, which DESTROYS the "
                         "data on export %s\n", o.export_name.c_str());
  }
  const bool tty = ::isatty(STDERR_FILENO);
  bench::RemoteProgress progress;
  if (tty) {
    progress = draw_bar;
  } else if (o.repeat > 1) {
    // No bar off a terminal; a log still says which repetition runs.
    progress = [last = std::string()](const std::string& step, double) mutable {
      const auto colon = step.find(':');
      if (step.rfind("repetition ", 0) != 0 || colon == std::string::npos || step.compare(0, colon, last) == 0) return;
      last = step.substr(0, colon);
      std::fprintf(stderr, "bench: %s\n", last.c_str());
    };
  }
  const auto report = bench::run_remote(o, progress);
  if (tty) std::fprintf(stderr, "\r%100s\r", "");
  if (!a.html.empty()) {
    std::ofstream out(a.html);
    out << bench::remote_html(report);
    if (!out) throw SystemError("writing " + a.html, errno, "give --html a path in a writable directory");
  }
  std::cout << (a.json ? bench::remote_json(report) : bench::remote_text(report));
  if (!report.ok()) {
    std::fprintf(stderr, "bench: FAILED: %s\n",
                 o.verify ? "a transport did not run or its verify pass found bad data (see above)"
                          : "no transport could run (see the reasons above)");
    return 1;
  }
  return 0;
}

int run_local(Args& a) {
  a.local.pattern = bench::parse_pattern(a.rw);
  struct stat st {};
  if (bench::is_write(a.local.pattern) && ::stat(a.local.path.c_str(), &st) == 0 && S_ISBLK(st.st_mode) && !a.force) {
    throw SystemError("bench --local " + a.local.path + " --rw " + a.rw,
                      std::string("a write workload destroys the data on this block device"),
                      "add --force if that is intended, or use a read workload");
  }
  const bool tty = !a.json && ::isatty(STDERR_FILENO);
  std::function<void(double)> progress;
  if (tty) {
    progress = [](double f) {
      const int width = 40, filled = static_cast<int>(f * width);
      std::fprintf(stderr, "\r[%.*s%*s] %3.0f%%", filled, "########################################", width - filled, "",
                   f * 100);
      std::fflush(stderr);
    };
  }
  const auto result = bench::run_local(a.local, progress);
  if (tty) std::fprintf(stderr, "\r%60s\r", "");
  std::cout << (a.json ? bench::local_json(a.local, result) : bench::local_text(a.local, result));
  return 0;
}

}  // namespace

void add_bench(CLI::App& app, const std::function<void(CLI::App*, Runner)>& on_run) {
  auto args = std::make_shared<Args>();
  auto* sub = app.add_subcommand(
      "bench",
      "Measure throughput (MB/s, IOPS) and latency (min/p50/p99/p99.9/max).\n"
      "--local PATH: the target's io_uring storage engine alone on a file or block device, no network;\n"
      "compare with `fio --ioengine=io_uring` using the same --rw/--bs/--iodepth/--direct (bench/storage-vs-fio).\n"
      "HOST[:PORT]/EXPORT: sequential 1 MiB and random 4 KiB reads and writes over RDMA and TCP, a queue-depth\n"
      "sweep, link baselines from the self-test, an optional --verify pass; --json, --html FILE.\n"
      "--repeat N runs it all N times (references and ibdisk alternating) and reports medians with min-max.\n"
      "Write workloads overwrite the data of PATH, or of EXPORT when --allow-write is given.");
  sub->add_option("target", args->target, "HOST[:PORT]/EXPORT to measure over the network");
  sub->add_option("--local", args->local.path, "file or block device to measure the storage engine on (no network)");
  sub->add_option("--rw", args->rw, "workload")
      ->capture_default_str()
      ->check(CLI::IsMember({"read", "write", "randread", "randwrite"}));
  sub->add_option("--bs", args->local.block_size, "bytes per I/O; k/m suffixes are powers of 1024")
      ->capture_default_str()
      ->transform(CLI::AsSizeValue(false))
      ->check(CLI::Range(std::uint32_t{512}, std::uint32_t{64} << 20));
  sub->add_option("--iodepth", args->local.iodepth, "I/Os in flight")
      ->capture_default_str()
      ->check(CLI::Range(1u, 4096u));
  sub->add_option("--size", args->local.size, "bytes from the start of PATH to use (default: all of it)")
      ->transform(CLI::AsSizeValue(false));
  sub->add_option("--runtime,--time", args->local.runtime_s, "seconds to run")
      ->capture_default_str()
      ->check(CLI::Range(0.1, 86400.0));
  sub->add_flag("--direct", args->local.direct, "O_DIRECT (bypass the page cache), like fio --direct=1");
  sub->add_flag("--fixed-buffers,!--no-fixed-buffers", args->local.fixed_buffers,
                "registered buffers (READ_FIXED/WRITE_FIXED), as the target uses")
      ->capture_default_str();
  sub->add_option("--seed", args->local.seed, "random offsets seed")->capture_default_str();
  sub->add_flag("--json", args->json, "one JSON object on stdout instead of the table");
  sub->add_flag("--force", args->force, "allow write workloads on a block device");
  sub->add_option("--transports", args->transports, "network mode: transports to measure, comma-separated")
      ->capture_default_str();
  sub->add_option("--queues", args->remote.queues, "network mode: queues (connections)")
      ->capture_default_str()
      ->check(CLI::Range(1u, 64u));
  sub->add_option("--workloads", args->workloads, "network mode: workloads to run, comma-separated")
      ->capture_default_str();
  sub->add_option("--qd-sweep", args->qd_sweep, "network mode: requests in flight for the 4 KiB random-read sweep")
      ->capture_default_str();
  sub->add_flag("--allow-write", args->remote.allow_write,
                "network mode: run seqwrite/randwrite and --verify; DESTROYS the export's data");
  sub->add_flag("--verify", args->remote.verify,
                "network mode: write a pattern, read it back and compare; a mismatch fails the run");
  sub->add_option("--html", args->html, "network mode: also write one self-contained HTML page with charts");
  sub->add_option("--baseline-peer", args->remote.baseline_peer,
                  "network mode: HOST[:PORT] running `ibdisk selftest --listen` for the link baselines "
                  "(default: in-process when HOST is this host)");
  sub->add_flag("--no-baselines", args->no_baselines, "network mode: skip the link baselines");
  sub->add_flag("--cross-check", args->remote.cross_check,
                "network mode: also measure the links with perftest (ib_write_bw, ib_read_bw) and iperf3 when "
                "installed; their servers are started here when HOST is this host, else bench prints the commands "
                "to start on HOST");
  sub->add_option("--cross-check-iterations", args->remote.cross_check_iterations,
                  "network mode: 1 MiB messages per perftest run for --cross-check")
      ->capture_default_str()
      ->check(CLI::Range(5u, 1000000u));
  sub->add_option("--repeat", args->remote.repeat,
                  "network mode: run the link references and every workload N times, alternating which goes "
                  "first; report each figure's median, its min-max range and every repetition (--json, --html)")
      ->capture_default_str()
      ->check(CLI::Range(1u, 100u));
  sub->add_option("--server-pid", args->remote.server_pid,
                  "network mode: read the target's CPU use from /proc for this process on this host "
                  "(default: from the target's Stats reply)");
  sub->add_option("-k,--key-file", args->remote.key_file, "network mode: the target's pre-shared key");
  sub->add_option("--timeout", args->timeout_s, "network mode: seconds to wait for the target")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  // Each mode is one branch here; --local is the storage engine alone.
  on_run(sub, [args, sub] {
    if (!args->local.path.empty() && !args->target.empty()) {
      throw UsageError("both --local PATH and HOST/EXPORT given: give one of them");
    }
    // An option of the other mode would be silently ignored: refuse it instead.
    const bool local = !args->local.path.empty();
    const std::vector<std::string> others =
        local ? std::vector<std::string>{"--transports", "--queues", "--workloads", "--qd-sweep", "--allow-write", "--verify",
                                         "--html", "--baseline-peer", "--no-baselines", "--cross-check",
                                         "--cross-check-iterations", "--repeat", "--server-pid", "--key-file", "--timeout"}
              : std::vector<std::string>{"--rw", "--bs", "--direct", "--fixed-buffers", "--force"};
    for (const auto& name : others) {
      if (sub->count(name) > 0) {
        throw UsageError(name + " is for " + (local ? "the network mode (HOST/EXPORT)" : "--local PATH") + ", not " +
                         (local ? "--local PATH" : "the network mode"));
      }
    }
    if (!args->local.path.empty()) return run_local(*args);
    if (!args->target.empty()) return run_remote(*args);
    throw SystemError("ibdisk bench", std::string("nothing to measure"),
                      "give HOST[:PORT]/EXPORT to measure over the network, or --local PATH for the storage engine alone");
  });
}

}  // namespace ibdisk::cli
