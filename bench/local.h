#pragma once
// `ibdisk bench --local PATH`: the target's storage engine alone on a file or block device, no
// network, with fio's vocabulary (rw, bs, iodepth, size, runtime, direct) so the two compare.
#include <cstdint>
#include <functional>
#include <string>

namespace ibdisk::bench {

enum class Pattern { kRead, kWrite, kRandRead, kRandWrite };

// "read", "write", "randread", "randwrite"; throws std::invalid_argument naming the choices.
Pattern parse_pattern(const std::string& name);
const char* pattern_name(Pattern p);
inline bool is_write(Pattern p) { return p == Pattern::kWrite || p == Pattern::kRandWrite; }

struct LocalOptions {
  std::string path;
  Pattern pattern = Pattern::kRandRead;
  std::uint32_t block_size = 4096;
  unsigned iodepth = 16;
  std::uint64_t size = 0;  // bytes from the start of PATH to use; 0 = all of it
  double runtime_s = 10;
  bool direct = false;        // O_DIRECT, like fio --direct=1; otherwise the page cache
  bool fixed_buffers = true;  // READ_FIXED / WRITE_FIXED, as the target serves sessions
  std::uint64_t seed = 1;
};

struct LatencySummary {
  double min_us = 0, mean_us = 0, p50_us = 0, p99_us = 0, p999_us = 0, max_us = 0;
};

struct LocalResult {
  std::uint64_t ios = 0;
  std::uint64_t bytes = 0;
  double seconds = 0;
  double mb_s = 0;  // 10^6 bytes per second, as fio's "MB/s"
  double iops = 0;
  LatencySummary latency;  // submit() to `done`, per request
  double cpu_user_percent = 0, cpu_sys_percent = 0;  // of one core, over the run
  std::uint64_t submit_calls = 0;                    // io_uring_submit() calls (syscalls)
  std::uint64_t direct_ios = 0, buffered_ios = 0;
  std::uint64_t file_size = 0;
  std::uint32_t logical_block_size = 0;
};

// Runs the workload on the calling thread. Throws SystemError for a bad path or option (naming
// it and the fix) and for a failed I/O (naming the offset and errno text). progress(fraction)
// is called about twice a second when given.
LocalResult run_local(const LocalOptions& opts, const std::function<void(double)>& progress = {});

// The result as one JSON object (fio-like field names), and as a few lines for people.
std::string local_json(const LocalOptions& opts, const LocalResult& r);
std::string local_text(const LocalOptions& opts, const LocalResult& r);

}  // namespace ibdisk::bench
