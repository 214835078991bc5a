#include "common/json.h"
#include "bench/local.h"

#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <vector>

#include "bench/histogram.h"
#include "bench/offsets.h"
#include "common/error.h"
#include "target/request.h"
#include "target/storage.h"
#include "transport/tcp/asio.h"

namespace ibdisk::bench {
namespace {

using Clock = std::chrono::steady_clock;

// The storage engine through the target's request path (target/request.h), as the target
// serves sessions: one request per unit of queue depth, each with its own buffer, started
// again as soon as it is FREE. The port has no transport: a write's data is in its buffer
// already and a reply is only counted.
struct Run final : target::RequestPort {
  struct Slot {
    target::Request req;
    transport::Slot buffer;
    Clock::time_point started;
  };

  target::StorageEngine* engine_ = nullptr;
  boost::asio::io_context* io_ = nullptr;
  target::BackingFile* file = nullptr;
  Pattern pattern = Pattern::kRead;
  std::uint32_t block_size = 0;
  Offsets offsets;
  Clock::time_point deadline;
  bool stopping = false;
  unsigned active = 0;
  LatencyHistogram latency;
  std::uint64_t ios = 0, bytes = 0;
  double latency_sum_ns = 0;
  int error = 0;
  std::uint64_t error_offset = 0;
  Clock::time_point last_done;

  static Slot& of(target::Request& r) { return *static_cast<Slot*>(r.port_data); }

  void issue(Slot& s) {
    wire::Command cmd;
    cmd.opcode = is_write(pattern) ? wire::Opcode::kWrite : wire::Opcode::kRead;
    cmd.length = block_size;
    cmd.offset = offsets.next();
    s.started = Clock::now();
    s.req.start(*this, cmd);
  }

  Resolved resolve(target::Request&) override { return {Verdict::kOk, file, is_write(pattern), nullptr}; }
  bool acquire_slot(target::Request& r) override {
    r.slot = of(r).buffer;
    return true;
  }
  void release_slot(target::Request& r) override { r.slot = {}; }
  void receive_data(target::Request& r) override { r.data_received(0); }
  void send_reply(target::Request& r) override {
    const auto now = Clock::now();
    last_done = now;
    if (r.status < 0) {
      if (error == 0) {
        error = -r.status;
        error_offset = r.cmd.offset;
      }
      stopping = true;
    } else {
      const auto ns = static_cast<std::uint64_t>(
          std::chrono::duration_cast<std::chrono::nanoseconds>(now - of(r).started).count());
      latency.record(ns);
      latency_sum_ns += static_cast<double>(ns);
      ++ios;
      bytes += r.cmd.length;
    }
    r.reply_sent(0);
  }
  void request_done(target::Request& r) override {
    if (stopping || Clock::now() >= deadline) {
      stopping = true;
      --active;
      return;
    }
    issue(of(r));
  }
  target::StorageEngine& engine() override { return *engine_; }
  boost::asio::io_context& io() override { return *io_; }
};

double cpu_seconds(const timeval& tv) { return static_cast<double>(tv.tv_sec) + static_cast<double>(tv.tv_usec) / 1e6; }

struct Mapping {
  void* addr = MAP_FAILED;
  std::size_t len = 0;
  ~Mapping() {
    if (addr != MAP_FAILED) ::munmap(addr, len);
  }
};

}  // namespace

Pattern parse_pattern(const std::string& name) {
  if (name == "read") return Pattern::kRead;
  if (name == "write") return Pattern::kWrite;
  if (name == "randread") return Pattern::kRandRead;
  if (name == "randwrite") return Pattern::kRandWrite;
  throw std::invalid_argument("workload '" + name + "': use read, write, randread or randwrite");
}

const char* pattern_name(Pattern p) {
  switch (p) {
    case Pattern::kRead:
      return "read";
    case Pattern::kWrite:
      return "write";
    case Pattern::kRandRead:
      return "randread";
    case Pattern::kRandWrite:
      return "randwrite";
  }
  return "?";
}

LocalResult run_local(const LocalOptions& opts, const std::function<void(double)>& progress) {
  const bool write = is_write(opts.pattern);
  auto file = target::open_backing(opts.path, !write);
  const std::string what = "bench --local " + opts.path;
  const std::uint64_t size = opts.size == 0 ? file->size : opts.size;
  if (size > file->size) {
    throw SystemError(what, "--size " + std::to_string(size) + " is larger than the file (" +
                                std::to_string(file->size) + " bytes)",
                      "give a smaller --size, or grow the file");
  }
  if (opts.block_size == 0 || opts.block_size > size) {
    throw SystemError(what, "block size " + std::to_string(opts.block_size) + " does not fit " + std::to_string(size) + " bytes",
                      "give --bs between 512 and --size");
  }
  if (opts.iodepth == 0 || opts.iodepth > 4096) {
    throw SystemError(what, "iodepth " + std::to_string(opts.iodepth) + " is out of range", "give --iodepth from 1 to 4096");
  }
  if (opts.direct) {
    if (file->direct_fd < 0) {
      throw SystemError(what, std::string("the file system refuses O_DIRECT"), "run without --direct");
    }
    if (opts.block_size % file->logical_block_size != 0) {
      throw SystemError(what, "block size " + std::to_string(opts.block_size) + " is not a multiple of the " +
                                  std::to_string(file->logical_block_size) + "-byte logical block O_DIRECT needs",
                        "give --bs as a multiple of " + std::to_string(file->logical_block_size));
    }
  } else if (file->direct_fd >= 0) {
    ::close(file->direct_fd);  // the engine then takes the page cache for everything, as fio --direct=0
    file->direct_fd = -1;
  }

  boost::asio::io_context io;
  target::StorageEngine engine(io, target::StorageEngine::Options{std::max(opts.iodepth, 8u)});

  const std::size_t stride = (opts.block_size + 4095) / 4096 * 4096;
  Mapping buffers;
  buffers.len = stride * opts.iodepth;
  buffers.addr = ::mmap(nullptr, buffers.len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
  if (buffers.addr == MAP_FAILED) {
    throw SystemError("mmap(" + std::to_string(buffers.len) + " bytes of I/O buffers)", errno,
                      "lower --iodepth or --bs");
  }
  auto* base = static_cast<std::byte*>(buffers.addr);
  if (write) {
    std::uint64_t x = opts.seed | 1;  // incompressible data, so no layer below can shortcut it
    for (std::size_t i = 0; i + 8 <= buffers.len; i += 8) {
      x ^= x << 13;
      x ^= x >> 7;
      x ^= x << 17;
      std::memcpy(base + i, &x, 8);
    }
  }
  if (opts.fixed_buffers) {
    std::vector<iovec> iov(opts.iodepth);
    for (unsigned i = 0; i < opts.iodepth; ++i) iov[i] = {base + i * stride, stride};
    try {
      engine.register_buffers(iov);
    } catch (const SystemError& e) {
      throw SystemError(e.call(), e.error_code(), e.hint() + ", or run with --no-fixed-buffers");
    }
  }

  Run run;
  run.engine_ = &engine;
  run.io_ = &io;
  run.file = file.get();
  run.pattern = opts.pattern;
  run.block_size = opts.block_size;
  run.offsets = Offsets(opts.pattern == Pattern::kRead || opts.pattern == Pattern::kWrite, opts.block_size,
                        size / opts.block_size, opts.seed);
  std::vector<Run::Slot> slots(opts.iodepth);
  for (unsigned i = 0; i < opts.iodepth; ++i) {
    Run::Slot& s = slots[i];
    s.req.port_data = &s;
    s.buffer = transport::Slot{base + i * stride, static_cast<std::uint32_t>(stride),
                               opts.fixed_buffers ? static_cast<int>(i) : -1};
  }

  rusage ru0{}, ru1{};
  ::getrusage(RUSAGE_SELF, &ru0);
  const auto start = Clock::now();
  const auto runtime = std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(opts.runtime_s));
  run.deadline = start + runtime;
  run.last_done = start;
  for (auto& s : slots) {
    ++run.active;
    run.issue(s);
  }

  boost::asio::steady_timer tick(io);
  std::function<void()> arm_tick = [&] {
    tick.expires_after(std::chrono::milliseconds(500));
    tick.async_wait([&](const boost::system::error_code& ec) {
      if (ec || run.stopping) return;
      progress(std::min(1.0, std::chrono::duration<double>(Clock::now() - start) / runtime));
      arm_tick();
    });
  };
  if (progress) arm_tick();
  while (run.active > 0) io.run_one();
  tick.cancel();
  ::getrusage(RUSAGE_SELF, &ru1);

  if (run.error != 0) {
    throw SystemError(std::string(write ? "write" : "read") + " of " + std::to_string(opts.block_size) + " bytes at " +
                          std::to_string(run.error_offset) + " in " + opts.path,
                      run.error, "check the device and the kernel log (dmesg)");
  }

  LocalResult r;
  r.ios = run.ios;
  r.bytes = run.bytes;
  r.seconds = std::chrono::duration<double>(run.last_done - start).count();
  if (r.seconds > 0) {
    r.mb_s = static_cast<double>(r.bytes) / r.seconds / 1e6;
    r.iops = static_cast<double>(r.ios) / r.seconds;
    r.cpu_user_percent = 100 * (cpu_seconds(ru1.ru_utime) - cpu_seconds(ru0.ru_utime)) / r.seconds;
    r.cpu_sys_percent = 100 * (cpu_seconds(ru1.ru_stime) - cpu_seconds(ru0.ru_stime)) / r.seconds;
  }
  const auto us = [](std::uint64_t ns) { return static_cast<double>(ns) / 1000.0; };
  r.latency.min_us = us(run.latency.min());
  r.latency.mean_us = run.ios ? run.latency_sum_ns / static_cast<double>(run.ios) / 1000.0 : 0;
  r.latency.p50_us = us(run.latency.quantile(0.50));
  r.latency.p99_us = us(run.latency.quantile(0.99));
  r.latency.p999_us = us(run.latency.quantile(0.999));
  r.latency.max_us = us(run.latency.max());
  r.submit_calls = engine.stats().submit_calls;
  r.direct_ios = engine.stats().direct;
  r.buffered_ios = engine.stats().buffered;
  r.file_size = file->size;
  r.logical_block_size = file->logical_block_size;
  return r;
}

std::string local_json(const LocalOptions& opts, const LocalResult& r) {
  const double per_submit = r.submit_calls ? static_cast<double>(r.ios) / static_cast<double>(r.submit_calls) : 0;
  return json_document(
      {{"mode", "local"},
       {"path", opts.path},
       {"rw", pattern_name(opts.pattern)},
       {"bs", opts.block_size},
       {"iodepth", opts.iodepth},
       {"size", opts.size == 0 ? r.file_size : opts.size},
       {"runtime_s", opts.runtime_s},
       {"direct", opts.direct},
       {"fixed_buffers", opts.fixed_buffers},
       {"ios", r.ios},
       {"bytes", r.bytes},
       {"seconds", r.seconds},
       {"mb_s", r.mb_s},
       {"iops", r.iops},
       {"latency_us",
        {{"min", r.latency.min_us}, {"mean", r.latency.mean_us}, {"p50", r.latency.p50_us}, {"p99", r.latency.p99_us},
         {"p99.9", r.latency.p999_us}, {"max", r.latency.max_us}}},
       {"cpu", {{"user_percent", r.cpu_user_percent}, {"sys_percent", r.cpu_sys_percent}}},
       {"engine",
        {{"submit_calls", r.submit_calls},
         {"ios_per_submit", per_submit},
         {"direct_ios", r.direct_ios},
         {"buffered_ios", r.buffered_ios},
         {"logical_block_size", r.logical_block_size}}}});
}

std::string local_text(const LocalOptions& opts, const LocalResult& r) {
  char buf[1024];
  const double per_submit = r.submit_calls ? static_cast<double>(r.ios) / static_cast<double>(r.submit_calls) : 0;
  std::snprintf(buf, sizeof buf,
                "storage engine on %s: %s, bs %u, iodepth %u, %s, %s, %.1f s\n"
                "  throughput  %.1f MB/s  %.0f IOPS  (%llu I/Os)\n"
                "  latency us  min %.1f  p50 %.1f  p99 %.1f  p99.9 %.1f  max %.1f  mean %.1f\n"
                "  cpu         user %.1f%%  sys %.1f%%  (%.1f I/Os per io_uring_submit)\n",
                opts.path.c_str(), pattern_name(opts.pattern), opts.block_size, opts.iodepth,
                opts.direct ? "O_DIRECT" : "page cache", opts.fixed_buffers ? "fixed buffers" : "plain buffers",
                r.seconds, r.mb_s, r.iops, static_cast<unsigned long long>(r.ios), r.latency.min_us,
                r.latency.p50_us, r.latency.p99_us, r.latency.p999_us, r.latency.max_us, r.latency.mean_us,
                r.cpu_user_percent, r.cpu_sys_percent, per_submit);
  return buf;
}

}  // namespace ibdisk::bench
