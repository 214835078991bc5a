#include "bench/remote.h"

#include <netdb.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <fstream>
#include <memory>
#include <sstream>
#include <thread>

#include "bench/histogram.h"
#include "bench/offsets.h"
#include "bench/remote_internal.h"
#include "common/error.h"
#include "common/json.h"
#include "common/version.h"
#include "initiator/client.h"
#include "setup/inventory.h"
#include "transport/selftest.h"

namespace ibdisk::bench {
namespace {

using namespace detail;  // bench/remote_internal.h

using Clock = std::chrono::steady_clock;
using initiator::Client;

double thread_cpu_seconds() {
  rusage ru{};
  ::getrusage(RUSAGE_THREAD, &ru);
  const auto s = [](const timeval& tv) { return static_cast<double>(tv.tv_sec) + static_cast<double>(tv.tv_usec) / 1e6; };
  return s(ru.ru_utime) + s(ru.ru_stime);
}

// utime + stime of a process from /proc/PID/stat, or -1 when it cannot be read.
double process_cpu_seconds(int pid) {
  if (pid <= 0) return -1;
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(in, line)) return -1;
  const auto close = line.rfind(')');  // the command name may hold spaces
  if (close == std::string::npos) return -1;
  std::istringstream rest(line.substr(close + 2));
  std::string field;
  unsigned long long utime = 0, stime = 0;
  for (int i = 3; i <= 15 && rest >> field; ++i) {
    if (i == 14) utime = std::strtoull(field.c_str(), nullptr, 10);
    if (i == 15) stime = std::strtoull(field.c_str(), nullptr, 10);
  }
  return static_cast<double>(utime + stime) / static_cast<double>(::sysconf(_SC_CLK_TCK));
}

// The target's CPU seconds around a workload: from /proc for --server-pid (a process on this
// host), else from the target's own Stats reply, asked over a separate one-queue TCP session
// because the measured session is past its setup phase and takes no control calls.
class TargetCpu {
 public:
  TargetCpu(const RemoteOptions& opts, initiator::ClientOptions co) : pid_(opts.server_pid) {
    if (pid_ > 0) {
      source = "pid";
      return;
    }
    co.transport = "tcp";
    co.queues = 1;
    co.queue_depth = 1;
    co.client_name = "ibdisk-bench-stats";
    try {
      control_ = Client::connect(co);
      const auto st = control_->stats();
      if (st.cpu_user_us() == 0 && st.cpu_system_us() == 0) {
        source = "the target does not report its CPU time (an older ibdisk); give --server-pid on its host";
        control_.reset();
      } else {
        source = "stats";
      }
    } catch (const std::exception& e) {
      source = std::string("cannot ask the target for its CPU time: ") + e.what();
    }
  }
  // CPU seconds the target has used, or -1 when unknown.
  double seconds() {
    if (pid_ > 0) return process_cpu_seconds(pid_);
    if (!control_) return -1;
    try {
      const auto st = control_->stats();
      return static_cast<double>(st.cpu_user_us() + st.cpu_system_us()) / 1e6;
    } catch (const std::exception&) {
      return -1;
    }
  }
  std::string source;  // "pid", "stats", or why the target's CPU is not measured

 private:
  int pid_;
  std::unique_ptr<Client> control_;
};

struct AlignedBuffer {
  explicit AlignedBuffer(std::size_t n) : size(n) {
    void* p = nullptr;
    if (::posix_memalign(&p, 4096, n) != 0) throw SystemError("allocating " + std::to_string(n) + " bytes of bench buffers", ENOMEM, "lower --iodepth or --queues");
    data = static_cast<std::byte*>(p);
  }
  ~AlignedBuffer() { std::free(data); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  std::byte* data = nullptr;
  std::size_t size = 0;
};

std::uint64_t splitmix(std::uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// The verify pattern: every 8-byte word is a function of its offset and the seed, so a block
// written to or read from the wrong place, or not at all, cannot match.
void fill_pattern(std::byte* p, std::uint64_t offset, std::size_t len, std::uint64_t seed) {
  for (std::size_t i = 0; i + 8 <= len; i += 8) {
    const std::uint64_t v = splitmix(seed ^ (offset + i));
    std::memcpy(p + i, &v, 8);
  }
}

// One workload: slots in flight over all queues, each resubmitted as it completes until the deadline.
struct IoRun {
  Client* client = nullptr;
  std::uint32_t handle = 0;
  Pattern pattern = Pattern::kRead;
  std::uint32_t block_size = 0;
  Offsets offsets;
  Clock::time_point deadline, last_done;
  bool stopping = false;
  unsigned active = 0;
  LatencyHistogram latency;
  double latency_sum_ns = 0;
  std::uint64_t ios = 0, bytes = 0;
  int error = 0;
  std::uint64_t error_offset = 0;

  struct Slot {
    std::byte* buf = nullptr;
    unsigned queue = 0;
    Clock::time_point started;
    std::uint64_t offset = 0;
  };

  void issue(Slot& s) {
    s.offset = offsets.next();
    s.started = Clock::now();
    auto done = [this, &s](int status) { complete(s, status); };
    if (is_write(pattern)) {
      client->write(s.queue, handle, s.offset, block_size, s.buf, 0, done);
    } else {
      client->read(s.queue, handle, s.offset, block_size, s.buf, done);
    }
  }

  void complete(Slot& s, int status) {
    const auto now = Clock::now();
    last_done = now;
    if (status < 0) {
      if (error == 0) {
        error = -status;
        error_offset = s.offset;
      }
      stopping = true;
    } else {
      const auto ns = static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(now - s.started).count());
      latency.record(ns);
      latency_sum_ns += static_cast<double>(ns);
      ++ios;
      bytes += block_size;
    }
    if (stopping || now >= deadline) {
      stopping = true;
      --active;
      return;
    }
    issue(s);
  }
};

WorkloadResult run_workload(Client& client, TargetCpu& target_cpu, std::uint32_t handle, std::uint64_t size,
                            const std::string& name, Pattern pattern, std::uint32_t block_size, unsigned in_flight, const RemoteOptions& opts,
                            const std::function<void(double)>& progress) {
  WorkloadResult w;
  w.name = name;
  w.pattern = pattern;
  w.block_size = block_size;
  w.in_flight = in_flight;
  AlignedBuffer buffers(static_cast<std::size_t>(block_size) * in_flight);
  if (is_write(pattern)) fill_pattern(buffers.data, opts.seed << 32, buffers.size, opts.seed);  // incompressible

  IoRun run;
  run.client = &client;
  run.handle = handle;
  run.pattern = pattern;
  run.block_size = block_size;
  run.offsets = Offsets(pattern == Pattern::kRead || pattern == Pattern::kWrite, block_size, size / block_size, opts.seed);
  std::vector<IoRun::Slot> slots(in_flight);
  for (unsigned i = 0; i < in_flight; ++i) {
    slots[i].buf = buffers.data + static_cast<std::size_t>(i) * block_size;
    slots[i].queue = i % client.queue_count();
  }

  const double server0 = target_cpu.seconds();
  const double client0 = thread_cpu_seconds();
  const auto start = Clock::now();
  const auto runtime = std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(opts.runtime_s));
  run.deadline = start + runtime;
  run.last_done = start;
  for (auto& s : slots) {
    ++run.active;
    run.issue(s);
  }
  client.run_until([&] {
    if (progress) progress(std::min(1.0, std::chrono::duration<double>(Clock::now() - start) / runtime));
    return run.active == 0;
  });
  const double client1 = thread_cpu_seconds();
  const double server1 = target_cpu.seconds();

  if (run.error != 0) {
    throw SystemError(std::string(name) + " over " + client.transport(0) + ": " + (is_write(pattern) ? "write" : "read") +
                          " of " + std::to_string(block_size) + " bytes at offset " + std::to_string(run.error_offset) +
                          " of export " + opts.export_name,
                      run.error, "check the target's log");
  }
  w.ios = run.ios;
  w.bytes = run.bytes;
  w.seconds = std::chrono::duration<double>(run.last_done - start).count();
  if (w.seconds > 0) {
    w.mb_s = static_cast<double>(w.bytes) / w.seconds / 1e6;
    w.iops = static_cast<double>(w.ios) / w.seconds;
    w.client_cpu_percent = 100 * (client1 - client0) / w.seconds;
    if (server0 >= 0 && server1 >= 0) w.server_cpu_percent = 100 * (server1 - server0) / w.seconds;
  }
  const auto us = [](std::uint64_t ns) { return static_cast<double>(ns) / 1000.0; };
  w.latency.min_us = us(run.latency.min());
  w.latency.mean_us = run.ios ? run.latency_sum_ns / static_cast<double>(run.ios) / 1000.0 : 0;
  w.latency.p50_us = us(run.latency.quantile(0.50));
  w.latency.p99_us = us(run.latency.quantile(0.99));
  w.latency.p999_us = us(run.latency.quantile(0.999));
  w.latency.max_us = us(run.latency.max());
  return w;
}

// Writes the pattern over [0, bytes), flushes, reads it back and compares block by block.
VerifyResult run_verify(Client& client, std::uint32_t handle, std::uint64_t bytes, unsigned in_flight,
                        std::uint64_t seed) {
  VerifyResult v;
  v.ran = true;
  const std::uint32_t block = std::min<std::uint32_t>(client.max_io(), 1u << 20);
  bytes = bytes / block * block;
  v.bytes = bytes;
  v.blocks = bytes / block;
  AlignedBuffer buffers(static_cast<std::size_t>(block) * in_flight);
  AlignedBuffer expected(block);
  for (const bool writing : {true, false}) {
    std::vector<std::byte*> free;
    for (unsigned i = 0; i < in_flight; ++i) free.push_back(buffers.data + static_cast<std::size_t>(i) * block);
    std::uint64_t next = 0, done = 0;
    unsigned rr = 0;
    std::function<void()> fill = [&] {
      while (v.error.empty() && !free.empty() && next < bytes) {
        std::byte* buf = free.back();
        free.pop_back();
        const std::uint64_t off = next;
        next += block;
        auto finish = [&, buf, off](int st) {
          if (st < 0 && v.error.empty()) {
            v.error = std::string(writing ? "writing" : "reading") + " the pattern at offset " + std::to_string(off) +
                      ": " + errno_text(-st);
          }
          if (st == 0 && !writing) {
            fill_pattern(expected.data, off, block, seed);
            if (std::memcmp(expected.data, buf, block) != 0) {
              if (v.bad_blocks == 0) v.first_bad_offset = off;
              ++v.bad_blocks;
            }
          }
          ++done;
          free.push_back(buf);
          fill();
        };
        const unsigned q = rr++ % client.queue_count();
        if (writing) {
          fill_pattern(buf, off, block, seed);
          client.write(q, handle, off, block, buf, 0, finish);
        } else {
          std::memset(buf, 0, block);  // a read that moves no data must not pass on stale buffers
          client.read(q, handle, off, block, buf, finish);
        }
      }
    };
    fill();
    client.run_until([&] { return (!v.error.empty() || done * block >= bytes) && client.in_flight() == 0; });
    if (!v.error.empty()) break;
    if (writing) {
      bool flushed = false;
      client.flush(0, handle, [&](int st) {
        if (st < 0) v.error = std::string("flushing after the pattern: ") + errno_text(-st);
        flushed = true;
      });
      client.run_until([&] { return flushed; });
      if (!v.error.empty()) break;
    }
  }
  return v;
}

bool is_local_address(const std::string& host) {
  addrinfo hints{};
  hints.ai_socktype = SOCK_DGRAM;
  addrinfo* res = nullptr;
  if (::getaddrinfo(host.c_str(), nullptr, &hints, &res) != 0) return false;
  bool local = false;
  for (addrinfo* a = res; a && !local; a = a->ai_next) {
    const int fd = ::socket(a->ai_family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) continue;
    local = ::bind(fd, a->ai_addr, a->ai_addrlen) == 0;  // port 0: binds only to this host's own addresses
    ::close(fd);
  }
  ::freeaddrinfo(res);
  return local;
}

Baseline baseline_from(const SelftestReport& rep, const std::string& transport, const std::string& peer) {
  Baseline b;
  b.transport = transport;
  b.peer = peer;
  b.write_mb_s = rep.write_mib_s * kMiB / 1e6;
  b.read_mb_s = rep.read_mib_s * kMiB / 1e6;
  b.checksums_match = rep.checksums_match;
  if (!rep.checksums_match) b.skipped = "the self-test's checksums differ: the link corrupts data, its figures are not used";
  return b;
}

// RDMA small-message latency: self-test connections moving one 64-byte buffer each way, so
// the self-test's time for the transfer is one operation posted to its completion.
void measure_latency(Baseline& b, SelftestOptions so) {
  so.size = kLatencySize;
  so.iterations = 1;
  std::vector<double> w, r;
  for (unsigned i = 0; i < kLatencyProbes; ++i) {
    SelftestReport rep;
    try {
      rep = rdma_selftest_client(so);
    } catch (const std::exception& e) {
      b.latency_skipped = std::string("the 64-byte self-test failed: ") + e.what();
      throw;
    }
    if (rep.write_mib_s > 0) w.push_back(kLatencySize / (rep.write_mib_s * kMiB) * 1e6);
    if (rep.read_mib_s > 0) r.push_back(kLatencySize / (rep.read_mib_s * kMiB) * 1e6);
  }
  const auto median = [](std::vector<double>& v) {
    if (v.empty()) return -1.0;
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  b.write_lat_us = median(w);
  b.read_lat_us = median(r);
}

// One transport's self-test against an in-process server on HOST. A client that fails leaves the
// server waiting: its thread is then detached, owning the server.
template <typename Server, typename ClientFn>
Baseline local_baseline(const std::string& transport, const std::string& host, ClientFn client_fn) {
  Baseline b;
  b.transport = transport;
  b.peer = host + " (in-process self-test server)";
  SelftestOptions so;
  so.address = host;
  so.port = transport == "tcp" ? 0 : kBaselinePort;
  so.size = kBaselineSize;
  so.iterations = kBaselineIterations;
  std::shared_ptr<Server> server;
  try {
    server = std::make_shared<Server>(so);
  } catch (const std::exception& e) {
    b.skipped = std::string("cannot listen for the ") + transport + " self-test on " + host + ": " + e.what();
    return b;
  }
  if constexpr (std::is_same_v<Server, TcpSelftestServer>) so.port = server->port();
  const bool rdma = transport == "rdma";
  std::thread serving([server, rdma] { server->serve(rdma ? 1 + kLatencyProbes : 1); });
  try {
    b = baseline_from(client_fn(so), transport, b.peer);
    if (rdma) {
      try {
        measure_latency(b, so);
      } catch (const std::exception&) {
        serving.detach();  // the server still waits for the probes that did not come
        return b;
      }
    }
    serving.join();
  } catch (const std::exception& e) {
    b.skipped = std::string("the ") + transport + " self-test failed: " + e.what();
    serving.detach();
  }
  return b;
}

std::vector<Baseline> run_baselines(const RemoteOptions& opts) {
  std::vector<Baseline> out;
  const bool want_rdma = std::find(opts.transports.begin(), opts.transports.end(), "rdma") != opts.transports.end();
  const bool want_tcp = std::find(opts.transports.begin(), opts.transports.end(), "tcp") != opts.transports.end();
  if (!opts.baseline_peer.empty()) {
    std::string host;
    std::uint16_t port = kBaselinePort;
    initiator::parse_host_port(opts.baseline_peer, &host, &port);
    SelftestOptions so;
    so.address = host;
    so.port = port;
    so.size = kBaselineSize;
    so.iterations = kBaselineIterations;
    const auto remote = [&](const std::string& t, SelftestReport (*fn)(const SelftestOptions&)) {
      try {
        out.push_back(baseline_from(fn(so), t, opts.baseline_peer));
        if (t == "rdma") {
          try {
            measure_latency(out.back(), so);
          } catch (const std::exception&) {
            // recorded in latency_skipped; the bandwidth figures stand
          }
        }
      } catch (const std::exception& e) {
        Baseline b;
        b.transport = t;
        b.peer = opts.baseline_peer;
        b.skipped = std::string("the ") + t + " self-test against " + opts.baseline_peer + " failed: " + e.what() +
                    " (is `ibdisk selftest --listen` running there with --transport " + t + "?)";
        out.push_back(b);
      }
    };
    if (want_rdma) remote("rdma", &rdma_selftest_client);
    if (want_tcp) remote("tcp", &tcp_selftest_client);
    return out;
  }
  if (!is_local_address(opts.host)) {
    for (const char* t : {"rdma", "tcp"}) {
      if ((std::string(t) == "rdma" && !want_rdma) || (std::string(t) == "tcp" && !want_tcp)) continue;
      Baseline b;
      b.transport = t;
      b.skipped = "no baseline peer: run `ibdisk selftest --listen` on " + opts.host + " and give --baseline-peer " +
                  opts.host;
      out.push_back(b);
    }
    return out;
  }
  if (want_rdma) out.push_back(local_baseline<RdmaSelftestServer>("rdma", opts.host, &rdma_selftest_client));
  if (want_tcp) out.push_back(local_baseline<TcpSelftestServer>("tcp", opts.host, &tcp_selftest_client));
  return out;
}


// The link reference of one transport and direction: perftest or iperf3 where --cross-check
// measured it (they saturate a link the self-test does not), else the self-test baseline.
std::pair<double, std::string> link_reference(const RemoteReport& r, const std::string& transport, bool write) {
  for (const auto& c : r.cross_checks) {
    if (c.transport == transport && c.direction == (write ? "write" : "read") && c.skipped.empty() && c.mb_s > 0) {
      return {c.mb_s, c.tool};
    }
  }
  if (const Baseline* b = baseline_for(r, transport)) return {write ? b->write_mb_s : b->read_mb_s, "self-test"};
  return {-1, ""};
}

void apply_fractions(RemoteReport& r) {
  for (auto& t : r.transports) {
    for (auto* list : {&t.workloads, &t.sweep}) {
      for (auto& w : *list) {
        const auto [link, tool] = link_reference(r, t.name, is_write(w.pattern));
        if (w.skipped.empty() && link > 0) {
          w.link_fraction = w.mb_s / link;
          w.link_reference = tool;
        }
      }
    }
  }
}

bool wanted(const RemoteOptions& opts, const std::string& workload) {
  return opts.workloads.empty() || std::find(opts.workloads.begin(), opts.workloads.end(), workload) != opts.workloads.end();
}

TransportResult run_transport(const RemoteOptions& opts, const std::string& transport, double step0, double steps,
                              const RemoteProgress& progress, const std::string& label, bool verify) {
  TransportResult t;
  t.name = transport;
  const unsigned sweep_max = opts.qd_sweep.empty() ? 1 : *std::max_element(opts.qd_sweep.begin(), opts.qd_sweep.end());
  initiator::ClientOptions co;
  co.host = opts.host;
  co.port = opts.port;
  co.key_file = opts.key_file;
  co.queues = opts.queues;
  co.queue_depth = std::max(opts.iodepth, (sweep_max + opts.queues - 1) / opts.queues);
  co.timeout = opts.timeout;
  co.transport = transport;
  co.client_name = "ibdisk-bench";
  std::unique_ptr<Client> client;
  try {
    client = Client::connect(co);
  } catch (const std::exception& e) {
    t.skipped = std::string("cannot connect over ") + transport + ": " + e.what();
    return t;
  }
  if (client->transport(0) != transport) {
    t.skipped = "the session runs over " + client->transport(0) + ", not " + transport;
    return t;
  }
  t.queues = client->queue_count();
  t.queue_depth = client->queue_depth(0);
  const proto::Opened opened = client->open(opts.export_name, !opts.allow_write);
  t.export_size = opened.info().size();
  if (opts.size > t.export_size) {
    throw SystemError("bench " + opts.host + "/" + opts.export_name,
                      "--size " + std::to_string(opts.size) + " is larger than the export (" +
                          std::to_string(t.export_size) + " bytes)",
                      "give a smaller --size");
  }
  TargetCpu target_cpu(opts, co);
  t.server_cpu = target_cpu.source;
  t.used_size = opts.size ? opts.size : t.export_size;
  if (t.used_size < (1u << 20)) {
    throw SystemError("bench " + opts.host + "/" + opts.export_name,
                      "the area measured is " + std::to_string(t.used_size) + " bytes, less than one 1 MiB block",
                      "use an export or --size of at least 1 MiB");
  }
  double step = step0;
  const auto sub = [&](const std::string& what) {
    return [&, what](double f) {
      if (progress) progress(label + transport + " " + what, (step + f) / steps);
    };
  };
  for (const auto& spec : kWorkloads) {
    if (!wanted(opts, spec.name)) continue;
    if (is_write(spec.pattern) && !opts.allow_write) {
      WorkloadResult w;
      w.name = spec.name;
      w.pattern = spec.pattern;
      w.block_size = spec.block_size;
      w.skipped = "writes overwrite the export's data: add --allow-write to run them";
      t.workloads.push_back(w);
      step += 1;
      continue;
    }
    const std::uint32_t bs = std::min(spec.block_size, client->max_io());
    t.workloads.push_back(run_workload(*client, target_cpu, opened.handle(), t.used_size, spec.name, spec.pattern, bs,
                                       opts.iodepth * t.queues, opts, sub(spec.name)));
    step += 1;
  }
  for (const unsigned qd : opts.qd_sweep) {
    t.sweep.push_back(run_workload(*client, target_cpu, opened.handle(), t.used_size, "randread", Pattern::kRandRead, 4096, qd, opts,
                                   sub("randread qd " + std::to_string(qd))));
    step += 1;
  }
  if (verify) {
    if (progress) progress(label + transport + " verify", step / steps);
    t.verify = run_verify(*client, opened.handle(), std::min(opts.verify_bytes, t.used_size),
                          std::max(1u, opts.iodepth * t.queues), opts.seed + (transport == "rdma" ? 1 : 2));
  }
  return t;
}

}  // namespace

namespace detail {

const Baseline* baseline_for(const RemoteReport& r, const std::string& transport) {
  for (const auto& b : r.baselines) {
    if (b.transport == transport && b.skipped.empty()) return &b;
  }
  return nullptr;
}

}  // namespace detail

Spread spread_of(std::vector<double> values) {
  Spread s;
  s.values = values;
  if (values.empty()) return s;
  std::sort(values.begin(), values.end());
  const std::size_t n = values.size();
  s.min = values.front();
  s.max = values.back();
  s.median = n % 2 ? values[n / 2] : (values[n / 2 - 1] + values[n / 2]) / 2;
  return s;
}

bool RemoteReport::ok() const {
  bool any = false;
  for (const auto& t : transports) {
    if (!t.skipped.empty()) continue;
    any = true;
    if (options.verify && !t.verify.ok()) return false;
  }
  return any;
}

RemoteReport run_remote(const RemoteOptions& opts, const RemoteProgress& progress) {
  const std::string what = "bench " + opts.host + "/" + opts.export_name;
  if (opts.verify && !opts.allow_write) {
    throw SystemError(what + " --verify", std::string("the verify pass writes a pattern over the export's data"),
                      "add --allow-write if the export's data may be destroyed");
  }
  if (opts.queues == 0 || opts.iodepth == 0) throw SystemError(what, std::string("--queues and --iodepth must be at least 1"), "give positive values");
  for (const auto& t : opts.transports) {
    if (t != "rdma" && t != "tcp") throw SystemError(what, "transport '" + t + "' is unknown", "give --transports rdma,tcp or one of them");
  }
  for (const auto& w : opts.workloads) {
    if (std::none_of(std::begin(kWorkloads), std::end(kWorkloads), [&](const WorkloadSpec& s) { return w == s.name; })) {
      throw SystemError(what, "workload '" + w + "' is unknown", "give --workloads as a list of seqread, seqwrite, randread, randwrite");
    }
  }
  if (opts.repeat < 1 || opts.repeat > 100) {
    throw SystemError(what, "--repeat " + std::to_string(opts.repeat) + " is not from 1 to 100", "give --repeat 1 to 100");
  }
  const auto workloads = std::count_if(std::begin(kWorkloads), std::end(kWorkloads),
                                       [&](const WorkloadSpec& s) { return wanted(opts, s.name); });
  const double per_transport = static_cast<double>(static_cast<std::size_t>(workloads) + opts.qd_sweep.size());
  const double transports = static_cast<double>(opts.transports.size());
  const double steps = per_transport * transports * opts.repeat + (opts.verify ? transports : 0);
  double step = 0;
  // Each repetition is a whole run, references and ibdisk, so that a ratio is taken between
  // figures measured close together; the order alternates so neither side always runs first
  // (after the other has warmed caches and clocks, or while a neighbour's load ramps up).
  std::vector<RemoteReport> reps;
  std::vector<bool> verified(opts.transports.size(), !opts.verify);
  for (unsigned i = 0; i < opts.repeat; ++i) {
    const std::string label =
        opts.repeat > 1 ? "repetition " + std::to_string(i + 1) + "/" + std::to_string(opts.repeat) + ": " : "";
    RemoteReport one;
    one.options = opts;
    const auto references = [&] {
      if (opts.baselines) {
        if (progress) progress(label + "link baselines", step / steps);
        one.baselines = run_baselines(opts);
      }
      if (opts.cross_check) {
        if (progress) progress(label + "perftest and iperf3 cross-checks", step / steps);
        CrossCheckOptions co;
        co.host = opts.host;
        co.seconds = opts.runtime_s;
        co.perftest_iterations = opts.cross_check_iterations;
        co.in_flight = std::max(1u, opts.iodepth * opts.queues);  // as the sequential workloads
        co.start_servers = is_local_address(opts.host);
        co.rdma = std::find(opts.transports.begin(), opts.transports.end(), "rdma") != opts.transports.end();
        co.tcp = std::find(opts.transports.begin(), opts.transports.end(), "tcp") != opts.transports.end();
        one.cross_checks = run_cross_checks(co);
      }
    };
    const bool references_first = i % 2 == 0;
    if (references_first) references();
    for (std::size_t k = 0; k < opts.transports.size(); ++k) {
      const bool verify = !verified[k];
      one.transports.push_back(run_transport(opts, opts.transports[k], step, steps, progress, label, verify));
      if (verify && one.transports.back().verify.ran) verified[k] = true;
      step += per_transport + (verify ? 1 : 0);
    }
    if (!references_first) references();
    apply_fractions(one);
    reps.push_back(std::move(one));
  }
  RemoteReport r = merge_repetitions(reps);
  r.environment = environment_summary();
  if (progress) progress("done", 1);
  return r;
}

}  // namespace ibdisk::bench
