// `ibdisk bench`: throughput and latency. `--local PATH` runs the target's storage engine alone
// on a file or block device (no network), with fio's workload vocabulary so the two compare.
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <iostream>

#include "bench/local.h"
#include "cli/commands.h"
#include "common/error.h"

namespace ibdisk::cli {
namespace {

struct Args {
  bench::LocalOptions local;
  std::string rw = "randread";
  bool json = false;
  bool force = false;
};

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
      "Write workloads overwrite PATH's data.");
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
  // Each mode is one branch here; --local is the storage engine alone.
  on_run(sub, [args] {
    if (!args->local.path.empty()) return run_local(*args);
    throw SystemError("ibdisk bench", std::string("nothing to measure"),
                      "give --local PATH to measure the storage engine on a file or block device");
  });
}

}  // namespace ibdisk::cli
