#pragma once
// `ibdisk bench HOST[:PORT]/EXPORT`: the same workloads over RDMA and over TCP through the
// initiator's Client (sequential 1 MiB, random 4 KiB, a queue-depth sweep), an optional verify
// pass, and link baselines from the project's own self-test so every storage figure is also a
// fraction of what its link can carry. Reports as a table, JSON or one self-contained HTML page.
#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "bench/crosscheck.h"
#include "bench/local.h"

namespace ibdisk::bench {

struct RemoteOptions {
  std::string host;
  std::uint16_t port = 7420;
  std::string export_name;
  std::string key_file;
  std::vector<std::string> transports = {"rdma", "tcp"};
  double runtime_s = 5;      // per workload and per sweep point
  std::uint64_t size = 0;    // bytes from the start of the export to use; 0 = all of it
  unsigned queues = 1;
  unsigned iodepth = 16;     // requests in flight per queue for the four workloads
  std::vector<unsigned> qd_sweep = {1, 4, 16, 64};  // total in flight, 4 KiB random reads
  // Of seqread, seqwrite, randread, randwrite: the ones to run; empty = all four.
  std::vector<std::string> workloads;
  bool allow_write = false;  // write workloads and --verify overwrite the export's data
  bool verify = false;
  std::uint64_t verify_bytes = 64ull << 20;
  std::chrono::milliseconds timeout{10000};
  // Link baselines: "" = in-process self-test servers when HOST is a local address, else none;
  // otherwise a host running `ibdisk selftest --listen` (HOST or HOST:PORT).
  std::string baseline_peer;
  bool baselines = true;
  // Also measure the links with perftest and iperf3 (bench/crosscheck.h) when installed.
  bool cross_check = false;
  unsigned cross_check_iterations = 1000;  // perftest's 1 MiB messages per direction
  int server_pid = 0;  // the target's process on this host, for its CPU use; 0 = ask the target
  std::uint64_t seed = 1;
  // Runs of the whole measurement (link references and every transport's workloads), 1 to 100.
  // The references run before ibdisk in odd repetitions and after it in even ones.
  unsigned repeat = 1;
};

// One figure over the repetitions: the median is the headline (for an even count, the mean of
// the two middle values), min and max its spread, values in the order the repetitions ran.
struct Spread {
  std::vector<double> values;
  double median = 0, min = 0, max = 0;  // 0 when there are no values
};
Spread spread_of(std::vector<double> values);

struct WorkloadResult {
  std::string name;  // "seqread", "seqwrite", "randread", "randwrite"
  Pattern pattern = Pattern::kRead;
  std::uint32_t block_size = 0;
  unsigned in_flight = 0;  // requests kept in flight over all queues
  std::uint64_t ios = 0, bytes = 0;
  double seconds = 0, mb_s = 0, iops = 0;
  LatencySummary latency;
  double client_cpu_percent = 0;   // user+sys of the bench thread, % of one core
  double server_cpu_percent = -1;  // of the target process (% of one core); -1 = not measured
  double link_fraction = -1;       // mb_s / the link reference in the same direction; -1 = none
  std::string link_reference;      // what that was measured with: "iperf3", "ib_read_bw", ... or "self-test"
  std::string skipped;             // why it did not run, when it did not
  // Each repetition that ran, in order (their own `repetitions` empty). The figures above
  // summarize them: MB/s, IOPS, latencies and CPU are medians, link_fraction is the median of
  // the per-repetition ratios (each against the reference measured in the same repetition),
  // ios, bytes and seconds are sums.
  std::vector<WorkloadResult> repetitions;
};

struct VerifyResult {
  bool ran = false;
  std::uint64_t bytes = 0;
  std::uint64_t blocks = 0, bad_blocks = 0;
  std::uint64_t first_bad_offset = 0;
  std::string error;  // an I/O error, if one stopped the pass
  bool ok() const { return ran && bad_blocks == 0 && error.empty(); }
};

struct TransportResult {
  std::string name;     // what was asked for: "rdma" or "tcp"
  std::string skipped;  // why it did not run
  unsigned queues = 0, queue_depth = 0;
  std::uint64_t export_size = 0, used_size = 0;
  std::vector<WorkloadResult> workloads;
  std::vector<WorkloadResult> sweep;
  VerifyResult verify;
  std::string server_cpu;  // how the target's CPU was measured: "pid", "stats", or why it was not
};

struct Baseline {
  std::string transport;  // "rdma" or "tcp"
  std::string peer;
  std::string skipped;
  double write_mb_s = 0, read_mb_s = 0;  // client->server, server->client; 10^6 B/s
  bool checksums_match = false;
  // RDMA only: one signalled 64-byte WRITE or READ, posted to completion, median of a few
  // self-test connections; -1 when not measured.
  double write_lat_us = -1, read_lat_us = -1;
  std::string latency_skipped;  // why the latency was not measured, when it was tried
  // MB/s of each repetition that measured the link; write_mb_s and read_mb_s are their medians.
  std::vector<double> write_repetitions, read_repetitions;
};

struct RemoteReport {
  RemoteOptions options;
  std::vector<TransportResult> transports;
  std::vector<Baseline> baselines;
  std::vector<CrossCheck> cross_checks;  // with --cross-check
  std::vector<std::pair<std::string, std::string>> environment;  // label, value
  bool ok() const;  // every transport that ran verified (when asked), no workload error
};

// Progress: what runs now and the fraction of the whole run done.
using RemoteProgress = std::function<void(const std::string& step, double fraction)>;

// Runs everything on the calling thread. Throws SystemError for bad options or an unreachable
// target; a transport that cannot connect is recorded as skipped with the reason.
RemoteReport run_remote(const RemoteOptions& opts, const RemoteProgress& progress = {});

std::string remote_json(const RemoteReport& r);
std::string remote_text(const RemoteReport& r);
std::string remote_html(const RemoteReport& r);

// The host's RDMA devices, link rates, PCIe slots, MTUs and IPoIB modes from the setup inventory.
std::vector<std::pair<std::string, std::string>> environment_summary();

}  // namespace ibdisk::bench
