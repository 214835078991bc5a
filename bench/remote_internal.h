#pragma once
// What bench/remote.cc (running the workloads) and bench/remote_report.cc (merging repetitions;
// the JSON, text and HTML reports) share: the baselines' constants, the workload table and
// the baseline lookup.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "bench/remote.h"

namespace ibdisk::bench::detail {

inline constexpr std::uint16_t kBaselinePort = 7471;  // `ibdisk selftest --listen`'s default
inline constexpr std::size_t kBaselineSize = 1 << 20;
inline constexpr unsigned kBaselineIterations = 128;
inline constexpr double kMiB = 1024.0 * 1024.0;
inline constexpr std::size_t kLatencySize = 64;
inline constexpr unsigned kLatencyProbes = 5;  // self-test connections of one operation each way

struct WorkloadSpec {
  const char* name;
  Pattern pattern;
  std::uint32_t block_size;
};
inline constexpr WorkloadSpec kWorkloads[] = {
    {"seqread", Pattern::kRead, 1u << 20},
    {"seqwrite", Pattern::kWrite, 1u << 20},
    {"randread", Pattern::kRandRead, 4096},
    {"randwrite", Pattern::kRandWrite, 4096},
};

// The measured (not skipped) link baseline of one transport, or nullptr.
const Baseline* baseline_for(const RemoteReport& r, const std::string& transport);

// One report of several repetitions of a run: every figure the median of the repetitions
// that measured it, each repetition kept (bench/remote_report.cc).
RemoteReport merge_repetitions(const std::vector<RemoteReport>& reps);

}  // namespace ibdisk::bench::detail
