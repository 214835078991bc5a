#pragma once
// Cross-checks of the link baselines with the standard tools, when they are installed:
// perftest's ib_write_bw and ib_read_bw (RDMA CM, 1 MiB messages) and iperf3 (both directions),
// run against the target host. Their servers must run there: bench starts them itself when the
// host is this host, and otherwise says which commands to start on the host (server_command).
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

namespace ibdisk::bench {

struct CrossCheckOptions {
  std::string host;
  double seconds = 5;          // iperf3's time per direction
  unsigned perftest_iterations = 1000;  // 1 MiB messages per perftest run
  unsigned in_flight = 8;               // perftest messages in flight (-t, -o)
  bool start_servers = false;  // the host is this host: run the servers here
  bool rdma = true, tcp = true;
  std::uint16_t ib_write_port = 18515, ib_read_port = 18516, iperf3_port = 5201;
};

struct CrossCheck {
  std::string tool;       // "ib_write_bw", "ib_read_bw", "iperf3"
  std::string transport;  // "rdma" or "tcp"
  std::string direction;  // "write": initiator to target; "read": target to initiator
  double mb_s = -1;       // 10^6 B/s; -1 when skipped
  std::string command;    // what ran here
  std::string server_command;  // what must run on the host
  std::string skipped;    // why there is no figure
  std::vector<double> repetitions;  // with bench --repeat: MB/s of each repetition; mb_s is their median
};

std::vector<CrossCheck> run_cross_checks(const CrossCheckOptions& opts);

// The server commands a user starts on the target host for --cross-check, one per line.
std::string cross_check_server_commands(const CrossCheckOptions& opts);

// Parsers of the tools' output, exposed for tests. MB/s (10^6 B/s), or -1 when not found.
double parse_perftest_bw(const std::string& output);  // the client's "#bytes ... BW average" table
double parse_iperf3_json(const std::string& output);  // `iperf3 -J`: end.sum_received

}  // namespace ibdisk::bench
