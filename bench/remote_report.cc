// `ibdisk bench`'s reports of a RemoteReport: JSON (docs/json.md), text, and a self-contained
// HTML page; and the environment summary they carry.
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

std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}

std::string html_escape(const std::string& s) {
  std::string out;
  for (const char c : s) {
    switch (c) {
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '&': out += "&amp;"; break;
      case '"': out += "&quot;"; break;
      default: out += c;
    }
  }
  return out;
}

Json or_null(double v) { return v < 0 ? Json(nullptr) : Json(v); }

Json spread_json(const std::vector<double>& values) {
  if (values.empty()) return nullptr;
  const Spread s = spread_of(values);
  return {{"median", s.median}, {"min", s.min}, {"max", s.max}, {"values", s.values}};
}

// A figure of each repetition that has it (>= 0).
std::vector<double> figures(const std::vector<WorkloadResult>& reps, double (*get)(const WorkloadResult&)) {
  std::vector<double> v;
  for (const auto& w : reps) {
    if (const double d = get(w); d >= 0) v.push_back(d);
  }
  return v;
}
double mb_s_of(const WorkloadResult& w) { return w.mb_s; }
double iops_of(const WorkloadResult& w) { return w.iops; }
double fraction_of(const WorkloadResult& w) { return w.link_fraction; }
double p50_of(const WorkloadResult& w) { return w.latency.p50_us; }
double p99_of(const WorkloadResult& w) { return w.latency.p99_us; }

// "1020.3-1100.9": the range of a figure over the repetitions.
std::string range_text(const std::vector<WorkloadResult>& reps, double (*get)(const WorkloadResult&), const char* f) {
  const Spread s = spread_of(figures(reps, get));
  if (s.values.empty()) return "-";
  return fmt(f, s.min) + "-" + fmt(f, s.max);
}

Json workload_json(const WorkloadResult& w) {
  Json j = {{"name", w.name}, {"rw", pattern_name(w.pattern)}, {"bs", w.block_size}};
  if (!w.skipped.empty()) {
    j["skipped"] = w.skipped;
    return j;
  }
  j["in_flight"] = w.in_flight;
  j["ios"] = w.ios;
  j["bytes"] = w.bytes;
  j["seconds"] = w.seconds;
  j["mb_s"] = w.mb_s;
  j["iops"] = w.iops;
  j["latency_us"] = {{"min", w.latency.min_us}, {"mean", w.latency.mean_us}, {"p50", w.latency.p50_us},
                     {"p99", w.latency.p99_us}, {"p99.9", w.latency.p999_us}, {"max", w.latency.max_us}};
  j["cpu"] = {{"client_percent", w.client_cpu_percent}, {"server_percent", or_null(w.server_cpu_percent)}};
  j["link_fraction"] = or_null(w.link_fraction);
  j["link_reference"] = w.link_reference.empty() ? Json(nullptr) : Json(w.link_reference);
  j["repetitions"] = {{"count", w.repetitions.size()},
                      {"mb_s", spread_json(figures(w.repetitions, mb_s_of))},
                      {"iops", spread_json(figures(w.repetitions, iops_of))},
                      {"link_fraction", spread_json(figures(w.repetitions, fraction_of))},
                      {"latency_us",
                       {{"p50", spread_json(figures(w.repetitions, p50_of))},
                        {"p99", spread_json(figures(w.repetitions, p99_of))}}}};
  return j;
}

std::string pct(double f) { return f < 0 ? "-" : fmt("%.0f%%", f * 100); }

// The median of the figures get() gives the repetitions, those that are >= 0; -1 when none is.
template <typename T, typename Get>
double median_over(const std::vector<T>& reps, Get get) {
  std::vector<double> v;
  for (const auto& x : reps) {
    if (const double d = get(x); d >= 0) v.push_back(d);
  }
  return v.empty() ? -1 : spread_of(std::move(v)).median;
}

// One workload over its repetitions (the same workload of the same transport in each).
WorkloadResult merge_workload(const std::vector<WorkloadResult>& all) {
  std::vector<WorkloadResult> reps;
  for (const auto& w : all) {
    if (w.skipped.empty()) reps.push_back(w);
  }
  if (reps.empty()) return all.front();
  WorkloadResult w = reps.front();
  w.ios = w.bytes = 0;
  w.seconds = 0;
  std::string refs;
  for (const auto& x : reps) {
    w.ios += x.ios;
    w.bytes += x.bytes;
    w.seconds += x.seconds;
    if (!x.link_reference.empty() && ("+" + refs + "+").find("+" + x.link_reference + "+") == std::string::npos) {
      refs += (refs.empty() ? "" : "+") + x.link_reference;
    }
  }
  w.mb_s = median_over(reps, [](const WorkloadResult& x) { return x.mb_s; });
  w.iops = median_over(reps, [](const WorkloadResult& x) { return x.iops; });
  w.latency.min_us = median_over(reps, [](const WorkloadResult& x) { return x.latency.min_us; });
  w.latency.mean_us = median_over(reps, [](const WorkloadResult& x) { return x.latency.mean_us; });
  w.latency.p50_us = median_over(reps, [](const WorkloadResult& x) { return x.latency.p50_us; });
  w.latency.p99_us = median_over(reps, [](const WorkloadResult& x) { return x.latency.p99_us; });
  w.latency.p999_us = median_over(reps, [](const WorkloadResult& x) { return x.latency.p999_us; });
  w.latency.max_us = median_over(reps, [](const WorkloadResult& x) { return x.latency.max_us; });
  w.client_cpu_percent = median_over(reps, [](const WorkloadResult& x) { return x.client_cpu_percent; });
  w.server_cpu_percent = median_over(reps, [](const WorkloadResult& x) { return x.server_cpu_percent; });
  w.link_fraction = median_over(reps, [](const WorkloadResult& x) { return x.link_fraction; });
  w.link_reference = refs;
  w.repetitions = std::move(reps);
  return w;
}

std::vector<WorkloadResult> merge_workloads(const std::vector<const std::vector<WorkloadResult>*>& lists) {
  std::vector<WorkloadResult> out;
  for (std::size_t i = 0; i < lists.front()->size(); ++i) {
    std::vector<WorkloadResult> reps;
    for (const auto* l : lists) {
      if (i < l->size()) reps.push_back((*l)[i]);
    }
    out.push_back(merge_workload(reps));
  }
  return out;
}

}  // namespace

// The repetitions, each a whole report with its own references and fractions, as one report:
// every figure the median of the repetitions that measured it, each repetition kept.
RemoteReport detail::merge_repetitions(const std::vector<RemoteReport>& reps) {
  RemoteReport r;
  r.options = reps.front().options;
  for (std::size_t k = 0; k < reps.front().transports.size(); ++k) {
    std::vector<const TransportResult*> ran;
    for (const auto& one : reps) {
      if (one.transports[k].skipped.empty()) ran.push_back(&one.transports[k]);
    }
    if (ran.empty()) {
      r.transports.push_back(reps.front().transports[k]);
      continue;
    }
    TransportResult t = *ran.front();
    std::vector<const std::vector<WorkloadResult>*> workloads, sweeps;
    for (const auto* x : ran) {
      workloads.push_back(&x->workloads);
      sweeps.push_back(&x->sweep);
      if (x->verify.ran) t.verify = x->verify;
    }
    t.workloads = merge_workloads(workloads);
    t.sweep = merge_workloads(sweeps);
    r.transports.push_back(std::move(t));
  }
  for (std::size_t k = 0; k < reps.front().baselines.size(); ++k) {
    std::vector<Baseline> ran;
    for (const auto& one : reps) {
      if (k < one.baselines.size() && one.baselines[k].skipped.empty()) ran.push_back(one.baselines[k]);
    }
    if (ran.empty()) {
      r.baselines.push_back(reps.front().baselines[k]);
      continue;
    }
    Baseline b = ran.front();
    for (const auto& x : ran) {
      b.write_repetitions.push_back(x.write_mb_s);
      b.read_repetitions.push_back(x.read_mb_s);
      b.checksums_match = b.checksums_match && x.checksums_match;
      if (b.latency_skipped.empty()) b.latency_skipped = x.latency_skipped;
    }
    b.write_mb_s = spread_of(b.write_repetitions).median;
    b.read_mb_s = spread_of(b.read_repetitions).median;
    b.write_lat_us = median_over(ran, [](const Baseline& x) { return x.write_lat_us; });
    b.read_lat_us = median_over(ran, [](const Baseline& x) { return x.read_lat_us; });
    if (b.write_lat_us >= 0) b.latency_skipped.clear();
    r.baselines.push_back(std::move(b));
  }
  for (std::size_t k = 0; k < reps.front().cross_checks.size(); ++k) {
    std::vector<CrossCheck> ran;
    for (const auto& one : reps) {
      if (k < one.cross_checks.size() && one.cross_checks[k].skipped.empty() && one.cross_checks[k].mb_s > 0) {
        ran.push_back(one.cross_checks[k]);
      }
    }
    if (ran.empty()) {
      r.cross_checks.push_back(reps.front().cross_checks[k]);
      continue;
    }
    CrossCheck c = ran.front();
    for (const auto& x : ran) c.repetitions.push_back(x.mb_s);
    c.mb_s = spread_of(c.repetitions).median;
    r.cross_checks.push_back(std::move(c));
  }
  return r;
}

std::vector<std::pair<std::string, std::string>> environment_summary() {
  std::vector<std::pair<std::string, std::string>> env;
  char name[256] = {};
  ::gethostname(name, sizeof name - 1);
  env.emplace_back("host", name);
  // When, with what, on what: enough to tell two reports apart without asking.
  const std::time_t now = std::time(nullptr);
  char date[64];
  std::strftime(date, sizeof date, "%Y-%m-%d %H:%M:%S UTC", std::gmtime(&now));
  env.emplace_back("date", date);
  env.emplace_back("ibdisk", std::string(kVersion)
#ifdef NDEBUG
                                 + " (optimised build)"
#else
                                 + " (debug build)"
#endif
  );
  utsname u{};
  ::uname(&u);
  env.emplace_back("kernel", std::string(u.sysname) + " " + u.release + " " + u.machine);
  {
    std::ifstream cpuinfo("/proc/cpuinfo");
    std::string line, model;
    unsigned cpus = 0;
    while (std::getline(cpuinfo, line)) {
      if (line.rfind("processor", 0) == 0) ++cpus;
      if (model.empty() && line.rfind("model name", 0) == 0) model = line.substr(line.find(':') + 2);
    }
    env.emplace_back("cpu", std::to_string(cpus) + " x " + (model.empty() ? std::string("unknown") : model));
  }
  {
    std::ifstream cmdline("/proc/self/cmdline", std::ios::binary);
    std::string arg, command;
    while (std::getline(cmdline, arg, '\0')) command += (command.empty() ? "" : " ") + arg;
    env.emplace_back("command", command);
  }
  setup::Inventory inv;
  try {
    inv = setup::read_inventory(setup::Root("/"));
  } catch (const std::exception& e) {
    env.emplace_back("inventory", std::string("unavailable: ") + e.what());
    return env;
  }
  if (inv.devices.empty()) env.emplace_back("RDMA devices", "none");
  for (const auto& d : inv.devices) {
    std::string v = d.soft_roce ? "Soft-RoCE on " + d.parent : (d.hca_type.empty() ? d.node_type : d.hca_type);
    if (!d.fw_ver.empty()) v += ", firmware " + d.fw_ver;
    if (d.pci) {
      v += ", PCIe " + fmt("%.1f", d.pci->cur_speed_gts) + " GT/s x" + std::to_string(d.pci->cur_width) + " (card: " +
           fmt("%.1f", d.pci->max_speed_gts) + " GT/s x" + std::to_string(d.pci->max_width) + ")";
      if (!d.pci->model.empty()) v += ", " + d.pci->model;
    }
    env.emplace_back("device " + d.name, v);
    for (const auto& p : d.ports) {
      std::string pv = p.state + ", " + p.link_layer + ", " + p.rate;
      if (const setup::NetDevice* n = inv.netdev(p.netdev)) {
        pv += ", netdev " + n->name + " MTU " + std::to_string(n->mtu);
        if (n->is_ipoib()) pv += ", IPoIB " + (n->mode.empty() ? std::string("mode unknown") : n->mode);
      }
      env.emplace_back("  port " + d.name + "/" + std::to_string(p.number), pv);
    }
  }
  for (const auto& n : inv.netdevs) {
    if (!n.is_ipoib()) continue;
    env.emplace_back("IPoIB " + n.name, "mode " + n.mode + ", MTU " + std::to_string(n.mtu));
  }
  return env;
}

std::string remote_json(const RemoteReport& r) {
  const auto& o = r.options;
  Json env = Json::object();
  for (const auto& [k, v] : r.environment) env[k] = v;
  Json baselines = Json::array();
  for (const auto& b : r.baselines) {
    Json j = {{"transport", b.transport}, {"peer", b.peer}};
    if (!b.skipped.empty()) {
      j["skipped"] = b.skipped;
    } else {
      j["write_mb_s"] = b.write_mb_s;
      j["read_mb_s"] = b.read_mb_s;
      if (!b.latency_skipped.empty()) j["latency_skipped"] = b.latency_skipped;
      if (b.write_lat_us >= 0) j["latency_us"] = {{"size", kLatencySize}, {"write", b.write_lat_us}, {"read", b.read_lat_us}};
      j["checksums_match"] = b.checksums_match;
      j["repetitions"] = {{"count", b.read_repetitions.size()},
                          {"write_mb_s", spread_json(b.write_repetitions)},
                          {"read_mb_s", spread_json(b.read_repetitions)}};
    }
    baselines.push_back(j);
  }
  Json checks = Json::array();
  for (const auto& c : r.cross_checks) {
    const Baseline* b = baseline_for(r, c.transport);
    const double own = !b || !b->skipped.empty() ? -1 : c.direction == "write" ? b->write_mb_s : b->read_mb_s;
    Json j = {{"tool", c.tool}, {"transport", c.transport}, {"direction", c.direction}, {"command", c.command}};
    if (!c.server_command.empty()) j["server_command"] = c.server_command;
    if (!c.skipped.empty()) {
      j["skipped"] = c.skipped;
    } else {
      j["mb_s"] = c.mb_s;
      j["baseline_mb_s"] = own > 0 ? Json(own) : Json(nullptr);
      j["baseline_ratio"] = own > 0 ? Json(own / c.mb_s) : Json(nullptr);
      if (!c.repetitions.empty()) j["repetitions"] = {{"count", c.repetitions.size()}, {"mb_s", spread_json(c.repetitions)}};
    }
    checks.push_back(j);
  }
  Json transports = Json::array();
  for (const auto& t : r.transports) {
    Json j = {{"name", t.name}};
    if (!t.skipped.empty()) {
      j["skipped"] = t.skipped;
      transports.push_back(j);
      continue;
    }
    j["server_cpu"] = t.server_cpu;
    j["queues"] = t.queues;
    j["queue_depth"] = t.queue_depth;
    j["export_size"] = t.export_size;
    j["used_size"] = t.used_size;
    j["workloads"] = Json::array();
    for (const auto& w : t.workloads) j["workloads"].push_back(workload_json(w));
    j["qd_sweep"] = Json::array();
    for (const auto& w : t.sweep) j["qd_sweep"].push_back(workload_json(w));
    if (t.verify.ran) {
      j["verify"] = {{"bytes", t.verify.bytes},
                     {"blocks", t.verify.blocks},
                     {"bad_blocks", t.verify.bad_blocks},
                     {"first_bad_offset", t.verify.bad_blocks ? Json(t.verify.first_bad_offset) : Json(nullptr)},
                     {"error", t.verify.error.empty() ? Json(nullptr) : Json(t.verify.error)},
                     {"ok", t.verify.ok()}};
    }
    transports.push_back(j);
  }
  return json_document({{"mode", "remote"},
                        {"target", o.host + ":" + std::to_string(o.port) + "/" + o.export_name},
                        {"options",
                         {{"runtime_s", o.runtime_s},
                          {"size", o.size},
                          {"queues", o.queues},
                          {"iodepth", o.iodepth},
                          {"allow_write", o.allow_write},
                          {"verify", o.verify},
                          {"qd_sweep", o.qd_sweep},
                          {"workloads", o.workloads},
                          {"repeat", o.repeat}}},
                        {"environment", env},
                        {"baselines", baselines},
                        {"cross_checks", checks},
                        {"transports", transports},
                        {"ok", r.ok()}});
}

std::string remote_text(const RemoteReport& r) {
  std::string s;
  char line[512];
  s += "ibdisk bench " + r.options.host + ":" + std::to_string(r.options.port) + "/" + r.options.export_name + "\n";
  const bool reps = r.options.repeat > 1;
  if (reps) {
    s += std::to_string(r.options.repeat) + " repetitions, the link references before ibdisk in odd ones and after it "
         "in even ones: each figure is the median, MB/s range the lowest-highest repetition\n";
  }
  s += "link baselines (ibdisk self-test, 1 MiB transfers):\n";
  if (r.baselines.empty()) s += "  none (--no-baselines)\n";
  for (const auto& b : r.baselines) {
    if (!b.skipped.empty()) {
      s += "  " + b.transport + ": skipped: " + b.skipped + "\n";
    } else {
      std::snprintf(line, sizeof line, "  %-4s  write %.1f MB/s  read %.1f MB/s  (%s)\n", b.transport.c_str(),
                    b.write_mb_s, b.read_mb_s, b.peer.c_str());
      s += line;
      if (reps) {
        const Spread w = spread_of(b.write_repetitions), rd = spread_of(b.read_repetitions);
        std::snprintf(line, sizeof line, "        %zu repetitions: write %.1f-%.1f MB/s  read %.1f-%.1f MB/s\n",
                      w.values.size(), w.min, w.max, rd.min, rd.max);
        s += line;
      }
      if (b.write_lat_us >= 0) {
        std::snprintf(line, sizeof line, "        64-byte latency: WRITE %.1f us  READ %.1f us\n", b.write_lat_us,
                      b.read_lat_us);
        s += line;
      }
    }
  }
  if (!r.cross_checks.empty()) s += "cross-checks (perftest, iperf3; self-test/tool in the same direction):\n";
  bool need_servers = false;
  for (const auto& c : r.cross_checks) {
    if (!c.skipped.empty()) {
      s += "  " + c.transport + " " + c.direction + " " + c.tool + ": skipped: " + c.skipped + "\n";
      need_servers = need_servers || !c.server_command.empty();
      continue;
    }
    const Baseline* b = baseline_for(r, c.transport);
    const double own = !b || !b->skipped.empty() ? -1 : c.direction == "write" ? b->write_mb_s : b->read_mb_s;
    std::snprintf(line, sizeof line, "  %-4s  %-5s %-11s %9.1f MB/s  self-test %s\n", c.transport.c_str(),
                  c.direction.c_str(), c.tool.c_str(), c.mb_s,
                  own > 0 ? (fmt("%.1f MB/s", own) + " (" + fmt("%.2fx", own / c.mb_s) + ")").c_str() : "-");
    s += line;
  }
  if (need_servers) {
    CrossCheckOptions co;
    co.seconds = r.options.runtime_s;
    co.perftest_iterations = r.options.cross_check_iterations;
    co.in_flight = std::max(1u, r.options.iodepth * r.options.queues);
    s += "  to cross-check, start on " + r.options.host + ":\n";
    std::istringstream cmds(cross_check_server_commands(co));
    for (std::string c; std::getline(cmds, c);) s += "    " + c + "\n";
  }
  std::snprintf(line, sizeof line, "\n%-5s %-10s %7s %5s %10s%s %10s %8s %8s %8s %8s %9s %6s %6s %6s\n", "link",
                "workload", "bs", "qd", "MB/s", reps ? "      MB/s range" : "",
                "IOPS", "min us", "p50 us", "p99 us", "p99.9 us", "max us", "cli%", "srv%", "link%");
  s += line;
  for (const auto& t : r.transports) {
    if (!t.skipped.empty()) {
      s += t.name + ": skipped: " + t.skipped + "\n";
      continue;
    }
    const auto row = [&](const WorkloadResult& w, const std::string& label) {
      if (!w.skipped.empty()) {
        std::snprintf(line, sizeof line, "%-5s %-10s skipped: %s\n", t.name.c_str(), label.c_str(), w.skipped.c_str());
      } else {
        std::string range;
        if (reps) {
          char cell[64];
          std::snprintf(cell, sizeof cell, " %15s", range_text(w.repetitions, mb_s_of, "%.1f").c_str());
          range = cell;
        }
        std::snprintf(line, sizeof line, "%-5s %-10s %7s %5u %10.1f%s %10.0f %8.1f %8.1f %8.1f %8.1f %9.1f %6.0f %6s %6s\n",
                      t.name.c_str(), label.c_str(),
                      w.block_size >= (1u << 20) ? (std::to_string(w.block_size >> 20) + "M").c_str()
                                                 : (std::to_string(w.block_size >> 10) + "K").c_str(),
                      w.in_flight, w.mb_s, range.c_str(), w.iops, w.latency.min_us, w.latency.p50_us, w.latency.p99_us,
                      w.latency.p999_us, w.latency.max_us, w.client_cpu_percent,
                      w.server_cpu_percent < 0 ? "-" : fmt("%.0f", w.server_cpu_percent).c_str(),
                      pct(w.link_fraction).c_str());
      }
      s += line;
    };
    for (const auto& w : t.workloads) row(w, w.name);
    for (const auto& w : t.sweep) row(w, "sweep");
    std::string refs;
    for (const auto* list : {&t.workloads, &t.sweep}) {
      for (const auto& w : *list) {
        const std::string ref = std::string(is_write(w.pattern) ? "write" : "read") + " against " + w.link_reference;
        if (!w.link_reference.empty() && refs.find(ref) == std::string::npos) refs += (refs.empty() ? "" : ", ") + ref;
      }
    }
    if (!refs.empty()) {
      s += t.name + ": % of link: " + refs +
           (reps ? " (median of per-repetition ratios, reference and ibdisk alternating)" : "") + "\n";
    }
    if (t.verify.ran) {
      if (t.verify.ok()) {
        s += t.name + ": verify: " + std::to_string(t.verify.blocks) + " blocks (" + std::to_string(t.verify.bytes) +
             " bytes) written and read back, all match\n";
      } else if (!t.verify.error.empty()) {
        s += t.name + ": verify FAILED: " + t.verify.error + "\n";
      } else {
        s += t.name + ": verify FAILED: " + std::to_string(t.verify.bad_blocks) + " of " +
             std::to_string(t.verify.blocks) + " blocks differ, the first at offset " +
             std::to_string(t.verify.first_bad_offset) + "\n";
      }
    }
  }
  s += "(srv%: the target's CPU, % of one core, from its Stats reply or /proc with --server-pid; link%: MB/s as a "
       "fraction of the baseline in the same direction)\n";
  return s;
}

namespace {

const char* kColors[] = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"};

// Grouped bar chart: one group per label, one bar per series; log scale when asked.
std::string bar_chart(const std::string& title, const std::string& unit, const std::vector<std::string>& groups,
                      const std::vector<std::string>& series, const std::vector<std::vector<double>>& values, bool log,
                      const std::string& x_label = "workload") {
  const double w = 1100, h = 380, left = 70, bottom = 60, top = 40, right = 160;
  double vmax = 0, vmin = 1e300;
  for (const auto& row : values) {
    for (const double v : row) {
      if (v > 0) vmax = std::max(vmax, v), vmin = std::min(vmin, v);
    }
  }
  if (vmax <= 0) vmax = 1, vmin = 1;
  // Ticks a reader can use: 1, 2 or 5 x 10^k apart on a linear axis, every decade on a log one.
  const double raw_step = vmax * 1.05 / 5;
  const double mag = std::pow(10, std::floor(std::log10(raw_step)));
  const double step = raw_step / mag <= 1 ? mag : raw_step / mag <= 2 ? 2 * mag : raw_step / mag <= 5 ? 5 * mag : 10 * mag;
  double lo = 0, hi = std::ceil(vmax * 1.05 / step) * step;
  if (log) lo = std::floor(std::log10(vmin)), hi = std::ceil(std::log10(vmax * 1.01));
  if (log && hi <= lo) hi = lo + 1;
  const int ticks = log ? static_cast<int>(hi - lo) : static_cast<int>(std::lround(hi / step));
  const auto ypos = [&](double v) {
    const double f = log ? (v > 0 ? (std::log10(v) - lo) / (hi - lo) : 0) : v / hi;
    return top + (h - top - bottom) * (1 - std::clamp(f, 0.0, 1.0));
  };
  std::string s = "<svg xmlns='http://www.w3.org/2000/svg' width='" + fmt("%.0f", w) + "' height='" + fmt("%.0f", h) +
                  "' font-family='sans-serif' font-size='12'>";
  s += "<text x='" + fmt("%.0f", w / 2) + "' y='20' text-anchor='middle' font-size='15'>" + html_escape(title) + "</text>";
  for (int i = 0; i <= ticks; ++i) {
    const double v = log ? std::pow(10, lo + i) : step * i;
    const double y = ypos(v);
    s += "<line x1='" + fmt("%.0f", left) + "' x2='" + fmt("%.0f", w - right) + "' y1='" + fmt("%.1f", y) + "' y2='" +
         fmt("%.1f", y) + "' stroke='#ddd'/>";
    s += "<text x='" + fmt("%.0f", left - 5) + "' y='" + fmt("%.1f", y + 4) + "' text-anchor='end'>" +
         fmt(v >= 100 || v == std::floor(v) ? "%.0f" : "%g", v) + "</text>";
  }
  s += "<text x='15' y='" + fmt("%.0f", h / 2) + "' transform='rotate(-90 15 " + fmt("%.0f", h / 2) +
       ")' text-anchor='middle'>" + html_escape(unit) + "</text>";
  s += "<text x='" + fmt("%.0f", left + (w - left - right) / 2) + "' y='" + fmt("%.0f", h - 12) +
       "' text-anchor='middle' fill='#555'>" + html_escape(x_label) + "</text>";
  const double gw = (w - left - right) / std::max<std::size_t>(1, groups.size());
  const double bw = gw * 0.8 / std::max<std::size_t>(1, series.size());
  for (std::size_t g = 0; g < groups.size(); ++g) {
    const double gx = left + gw * static_cast<double>(g) + gw * 0.1;
    for (std::size_t k = 0; k < series.size(); ++k) {
      const double v = g < values.size() && k < values[g].size() ? values[g][k] : 0;
      if (v <= 0) continue;
      const double y = ypos(v), x = gx + bw * static_cast<double>(k);
      s += "<rect x='" + fmt("%.1f", x) + "' y='" + fmt("%.1f", y) + "' width='" + fmt("%.1f", bw * 0.92) +
           "' height='" + fmt("%.1f", h - bottom - y) + "' fill='" + kColors[k % std::size(kColors)] + "'><title>" +
           html_escape(groups[g] + " " + series[k] + ": " + fmt("%.1f", v) + " " + unit) + "</title></rect>";
    }
    s += "<text x='" + fmt("%.1f", gx + gw * 0.4) + "' y='" + fmt("%.0f", h - bottom + 16) + "' text-anchor='middle'>" +
         html_escape(groups[g]) + "</text>";
  }
  for (std::size_t k = 0; k < series.size(); ++k) {
    const double y = top + 18 * static_cast<double>(k);
    s += "<rect x='" + fmt("%.0f", w - right + 15) + "' y='" + fmt("%.0f", y) + "' width='12' height='12' fill='" +
         kColors[k % std::size(kColors)] + "'/><text x='" + fmt("%.0f", w - right + 32) + "' y='" + fmt("%.0f", y + 10) +
         "'>" + html_escape(series[k]) + "</text>";
  }
  return s + "</svg>";
}

}  // namespace

namespace {
// MB/s min, max and each repetition's, as table cells that leave the next cell open.
std::string repetition_cells(const WorkloadResult& w) {
  const Spread m = spread_of(figures(w.repetitions, mb_s_of));
  std::string each;
  for (const double v : m.values) each += (each.empty() ? "" : ", ") + fmt("%.1f", v);
  return fmt("%.1f", m.min) + "</td><td>" + fmt("%.1f", m.max) + "</td><td>" + each + "</td><td>";
}
}  // namespace

std::string remote_html(const RemoteReport& r) {
  const std::string title = "ibdisk bench " + r.options.host + ":" + std::to_string(r.options.port) + "/" + r.options.export_name;
  std::string s = "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>" + html_escape(title) +
                  "</title><style>body{font-family:sans-serif;margin:20px}table{border-collapse:collapse;margin:10px 0}"
                  "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f0f0f0}"
                  "td.l{text-align:left}.bad{color:#b00;font-weight:bold}.ok{color:#070}</style></head><body>\n";
  s += "<h1>" + html_escape(title) + "</h1>\n";
  s += std::string("<p class='") + (r.ok() ? "ok'>result: ok" : "bad'>result: FAILED") + "</p>\n";

  std::vector<std::string> groups, series;
  for (const auto& spec : kWorkloads) groups.push_back(spec.name);
  for (const auto& t : r.transports) {
    if (t.skipped.empty()) series.push_back(t.name);
  }
  std::vector<std::vector<double>> mbs(groups.size()), iops(groups.size());
  for (std::size_t g = 0; g < groups.size(); ++g) {
    for (const auto& t : r.transports) {
      if (!t.skipped.empty()) continue;
      double v = 0, io = 0;
      for (const auto& w : t.workloads) {
        if (w.name == groups[g] && w.skipped.empty()) v = w.mb_s, io = w.iops;
      }
      mbs[g].push_back(v);
      iops[g].push_back(io);
    }
  }
  // Baselines as extra series on the throughput chart, so the bars show the fraction at a glance.
  for (const auto& b : r.baselines) {
    if (!b.skipped.empty()) continue;
    series.push_back(b.transport + " link baseline");
    for (std::size_t g = 0; g < groups.size(); ++g) mbs[g].push_back(is_write(kWorkloads[g].pattern) ? b.write_mb_s : b.read_mb_s);
  }
  s += bar_chart("Throughput by workload and transport", "MB/s", groups, series, mbs, false) + "\n";
  std::vector<std::string> tseries(series.begin(), series.begin() + static_cast<long>(iops.empty() ? 0 : iops[0].size()));
  s += bar_chart("IOPS by workload and transport", "IOPS (log scale)", groups, tseries, iops, true) + "\n";

  std::vector<std::string> lgroups, lseries = {"min", "p50", "p99", "p99.9", "max"};
  std::vector<std::vector<double>> lat;
  for (const auto& t : r.transports) {
    for (const auto& w : t.workloads) {
      if (!w.skipped.empty()) continue;
      lgroups.push_back(t.name + " " + w.name);
      lat.push_back({w.latency.min_us, w.latency.p50_us, w.latency.p99_us, w.latency.p999_us, w.latency.max_us});
    }
  }
  s += bar_chart("Latency percentiles", "microseconds (log scale)", lgroups, lseries, lat, true, "transport and workload") + "\n";

  std::vector<std::string> sgroups, sseries;
  for (const unsigned qd : r.options.qd_sweep) sgroups.push_back("qd " + std::to_string(qd));
  std::vector<std::vector<double>> sweep(sgroups.size());
  for (const auto& t : r.transports) {
    if (!t.skipped.empty()) continue;
    sseries.push_back(t.name + " IOPS");
    for (std::size_t i = 0; i < sgroups.size(); ++i) sweep[i].push_back(i < t.sweep.size() ? t.sweep[i].iops : 0);
  }
  s += bar_chart("Queue-depth sweep: 4 KiB random reads", "IOPS", sgroups, sseries, sweep, false, "requests in flight") + "\n";

  const bool reps = r.options.repeat > 1;
  const std::string extra = reps ? "3" : "0";  // columns of the repetitions
  if (reps) {
    s += "<p>" + std::to_string(r.options.repeat) +
         " repetitions, the link references before ibdisk in odd ones and after it in even ones. Each figure is the "
         "median of the repetitions; the ratio to the link is the median of the per-repetition ratios.</p>\n";
  }
  s += std::string("<h2>Results</h2><table><tr><th>transport</th><th>workload</th><th>bs</th><th>in flight</th><th>MB/s") +
       (reps ? " (median)</th><th>MB/s min</th><th>MB/s max</th><th>MB/s per repetition" : "") +
       "</th><th>IOPS</th><th>min us</th><th>p50 us</th><th>p99 us</th><th>p99.9 us</th><th>max us</th><th>client CPU %</th>"
       "<th>target CPU %</th><th>of link</th></tr>\n";
  for (const auto& t : r.transports) {
    if (!t.skipped.empty()) {
      s += "<tr><td class='l'>" + html_escape(t.name) + "</td><td class='l' colspan='" + std::to_string(13 + std::stoi(extra)) + "'>skipped: " +
           html_escape(t.skipped) + "</td></tr>\n";
      continue;
    }
    const auto row = [&](const WorkloadResult& w, const std::string& label) {
      if (!w.skipped.empty()) {
        s += "<tr><td class='l'>" + t.name + "</td><td class='l'>" + label + "</td><td class='l' colspan='" + std::to_string(12 + std::stoi(extra)) + "'>skipped: " +
             html_escape(w.skipped) + "</td></tr>\n";
        return;
      }
      s += "<tr><td class='l'>" + t.name + "</td><td class='l'>" + label + "</td><td>" + std::to_string(w.block_size) +
           "</td><td>" + std::to_string(w.in_flight) + "</td><td>" + fmt("%.1f", w.mb_s) + "</td><td>" +
           (reps ? repetition_cells(w) : std::string()) + fmt("%.0f", w.iops) + "</td><td>" + fmt("%.1f", w.latency.min_us) + "</td><td>" +
           fmt("%.1f", w.latency.p50_us) + "</td><td>" + fmt("%.1f", w.latency.p99_us) + "</td><td>" +
           fmt("%.1f", w.latency.p999_us) + "</td><td>" + fmt("%.1f", w.latency.max_us) + "</td><td>" +
           fmt("%.0f", w.client_cpu_percent) + "</td><td>" +
           (w.server_cpu_percent < 0 ? std::string("-") : fmt("%.0f", w.server_cpu_percent)) + "</td><td>" +
           pct(w.link_fraction) + (w.link_reference.empty() ? "" : " <small>(" + html_escape(w.link_reference) + ")</small>") +
           "</td></tr>\n";
    };
    for (const auto& w : t.workloads) row(w, w.name);
    for (const auto& w : t.sweep) row(w, "sweep randread");
  }
  s += "</table>\n<h2>Verify</h2><ul>";
  for (const auto& t : r.transports) {
    if (!t.skipped.empty()) continue;
    if (!t.verify.ran) {
      s += "<li>" + t.name + ": not run (--verify)</li>";
    } else if (t.verify.ok()) {
      s += "<li class='ok'>" + t.name + ": " + std::to_string(t.verify.blocks) + " blocks written and read back, all match</li>";
    } else {
      s += "<li class='bad'>" + t.name + ": FAILED, " + std::to_string(t.verify.bad_blocks) + " bad blocks " +
           html_escape(t.verify.error) + "</li>";
    }
  }
  s += "</ul>\n<h2>Link baselines</h2><table><tr><th>transport</th><th>peer</th><th>write MB/s</th><th>read MB/s</th><th>64-byte WRITE us</th><th>64-byte READ us</th></tr>\n";
  for (const auto& b : r.baselines) {
    if (!b.skipped.empty()) {
      s += "<tr><td class='l'>" + b.transport + "</td><td class='l' colspan='5'>skipped: " + html_escape(b.skipped) + "</td></tr>\n";
    } else {
      s += "<tr><td class='l'>" + b.transport + "</td><td class='l'>" + html_escape(b.peer) + "</td><td>" +
           fmt("%.1f", b.write_mb_s) + "</td><td>" + fmt("%.1f", b.read_mb_s) + "</td><td>" +
           (b.write_lat_us < 0 ? std::string("-") : fmt("%.1f", b.write_lat_us)) + "</td><td>" +
           (b.read_lat_us < 0 ? std::string("-") : fmt("%.1f", b.read_lat_us)) + "</td></tr>\n";
    }
  }
  if (!r.cross_checks.empty()) {
    s += "</table>\n<h2>Cross-checks: perftest and iperf3</h2><table><tr><th>transport</th><th>direction</th>"
         "<th>tool</th><th>MB/s</th><th>self-test MB/s</th><th>command</th></tr>\n";
    for (const auto& c : r.cross_checks) {
      const Baseline* b = baseline_for(r, c.transport);
      const double own = !b || !b->skipped.empty() ? -1 : c.direction == "write" ? b->write_mb_s : b->read_mb_s;
      s += "<tr><td class='l'>" + c.transport + "</td><td class='l'>" + c.direction + "</td><td class='l'>" + c.tool +
           "</td>" +
           (c.skipped.empty() ? "<td>" + fmt("%.1f", c.mb_s) + "</td><td>" + (own > 0 ? fmt("%.1f", own) : "-") +
                                    "</td><td class='l'>" + html_escape(c.command) + "</td>"
                              : "<td class='l' colspan='3'>skipped: " + html_escape(c.skipped) + "</td>") +
           "</tr>\n";
    }
  }
  s += "</table>\n<h2>Environment</h2><table>\n";
  for (const auto& [k, v] : r.environment) {
    s += "<tr><td class='l'>" + html_escape(k) + "</td><td class='l'>" + html_escape(v) + "</td></tr>\n";
  }
  s += "</table>\n<p>runtime " + fmt("%.1f", r.options.runtime_s) + " s per workload, " +
       std::to_string(r.options.queues) + " queue(s), iodepth " + std::to_string(r.options.iodepth) +
       " per queue</p>\n</body></html>\n";
  return s;
}

}  // namespace ibdisk::bench
