// `ibdisk selftest`: checks the RDMA stack (or TCP, where RDMA is unavailable) in one line.
#include <cstdio>
#include <iostream>
#include <thread>

#include "cli/commands.h"
#include "common/error.h"
#include "common/json.h"
#include "common/log.h"
#include "transport/selftest.h"

namespace ibdisk::cli {
namespace {

struct Args {
  std::string peer;
  std::string listen;
  bool listen_set = false;
  std::string transport = "auto";
  SelftestOptions opts;
  unsigned clients = 0;
  double timeout_s = 5;
  bool json = false;
};

int report(const SelftestReport& r, const Args& a, const std::string& rdma_not_used);

void print_report(const SelftestReport& r, std::size_t size, unsigned iterations) {
  const char* up = r.transport == "rdma" ? "RDMA WRITE" : "TCP send";
  const char* down = r.transport == "rdma" ? "RDMA READ " : "TCP recv";
  std::printf("transport:  %s\n", r.transport.c_str());
  if (r.transport == "rdma") {
    std::printf("device:     %s port %d\nport state: %s\nlink layer: %s\nactive MTU: %d\nrate:       %s\n",
                r.port.device.c_str(), r.port.port, r.port.state.c_str(), r.port.link_layer.c_str(),
                r.port.active_mtu, r.port.rate.c_str());
  }
  std::printf("peer:       %s\n", r.peer.c_str());
  std::printf("%s %u x %zu KiB: %.1f MiB/s\n", up, iterations, size / 1024, r.write_mib_s);
  std::printf("%s %u x %zu KiB: %.1f MiB/s\n", down, iterations, size / 1024, r.read_mib_s);
  std::printf("sha256 sent:     %s\nsha256 received: %s\n", r.write_sha256.c_str(), r.read_sha256.c_str());
  std::printf("checksums:  %s\n", r.checksums_match ? "match on both sides" : "MISMATCH");
  std::printf("selftest: %s\n", r.checksums_match ? "PASS" : "FAIL");
}

int report(const SelftestReport& r, const Args& a, const std::string& rdma_not_used) {
  if (!a.json) {
    print_report(r, a.opts.size, a.opts.iterations);
    return r.checksums_match ? 0 : 1;
  }
  Json j = {{"result", r.checksums_match ? "pass" : "fail"}, {"transport", r.transport}, {"peer", r.peer}};
  if (r.transport == "rdma") {
    j["port"] = {{"device", r.port.device}, {"port", r.port.port},           {"state", r.port.state},
                 {"link_layer", r.port.link_layer}, {"active_mtu", r.port.active_mtu}, {"rate", r.port.rate}};
  }
  j["rdma_not_used"] = rdma_not_used.empty() ? Json(nullptr) : Json(rdma_not_used);
  j["transfer_bytes"] = a.opts.size;
  j["iterations"] = a.opts.iterations;
  j["write_mib_per_second"] = r.write_mib_s;
  j["read_mib_per_second"] = r.read_mib_s;
  j["sha256"] = {{"sent", r.write_sha256}, {"received", r.read_sha256}, {"match", r.checksums_match}};
  std::cout << json_document(j);
  return r.checksums_match ? 0 : 1;
}

int run_listen(Args& a) {
  a.opts.address = a.listen;
  const auto probe = rdma::probe_devices();
  std::unique_ptr<RdmaSelftestServer> rdma_server;
  std::unique_ptr<TcpSelftestServer> tcp_server;
  if (a.transport != "tcp") {
    if (!probe.devices.empty()) {
      rdma_server = std::make_unique<RdmaSelftestServer>(a.opts);
    } else if (a.transport == "rdma") {
      throw SystemError("RDMA self-test server", probe.unavailable_reason);
    } else {
      logger("selftest")->warn("no RDMA listener: {}", probe.unavailable_reason);
    }
  }
  if (a.transport != "rdma") tcp_server = std::make_unique<TcpSelftestServer>(a.opts);
  std::printf("selftest: listening (%s%s%s) on port %u\n", rdma_server ? "rdma" : "",
              rdma_server && tcp_server ? "+" : "", tcp_server ? "tcp" : "", a.opts.port);
  std::fflush(stdout);
  unsigned good_rdma = 0, good_tcp = 0;
  std::thread tcp_thread;
  if (tcp_server) tcp_thread = std::thread([&] { good_tcp = tcp_server->serve(a.clients); });
  if (rdma_server) good_rdma = rdma_server->serve(a.clients);
  if (tcp_thread.joinable()) tcp_thread.join();
  const unsigned want = a.clients * ((rdma_server ? 1 : 0) + (tcp_server ? 1 : 0));
  return good_rdma + good_tcp == want ? 0 : 1;
}

int run_client(Args& a) {
  const auto probe = rdma::probe_devices();
  const bool local = a.peer.empty();
  std::string why_not_rdma = probe.unavailable_reason;
  std::string rdma_addr;
  if (why_not_rdma.empty() && local) {
    rdma_addr = find_rdma_address();
    if (rdma_addr.empty()) {
      why_not_rdma = "RDMA device " + probe.devices.front() +
                     " found, but no IPv4 address is on an RDMA-capable interface (assign one, e.g. to ib0)";
    }
  }
  if (a.transport == "rdma" && !why_not_rdma.empty()) throw SystemError("RDMA self-test", why_not_rdma);

  if (a.transport != "tcp" && why_not_rdma.empty()) {
    try {
      SelftestReport r;
      if (local) {
        SelftestOptions sopts = a.opts;
        sopts.address = rdma_addr;
        RdmaSelftestServer server(sopts);
        std::thread t([&] { server.serve(1); });
        SelftestOptions copts = a.opts;
        copts.address = rdma_addr;
        try {
          r = rdma_selftest_client(copts);
        } catch (...) {
          t.detach();
          throw;
        }
        t.join();
      } else {
        a.opts.address = a.peer;
        r = rdma_selftest_client(a.opts);
      }
      return report(r, a, "");
    } catch (const std::exception& e) {
      if (a.transport == "rdma") throw;
      why_not_rdma = e.what();
    }
  }
  if (!why_not_rdma.empty()) {
    std::fprintf(a.json ? stderr : stdout, "RDMA not used: %s\nfalling back to TCP\n", why_not_rdma.c_str());
  }
  SelftestReport r;
  if (local) {
    SelftestOptions sopts = a.opts;
    sopts.address = "127.0.0.1";
    sopts.port = 0;
    TcpSelftestServer server(sopts);
    std::thread t([&] { server.serve(1); });
    SelftestOptions copts = a.opts;
    copts.address = "127.0.0.1";
    copts.port = server.port();
    try {
      r = tcp_selftest_client(copts);
    } catch (...) {
      t.detach();
      throw;
    }
    t.join();
  } else {
    a.opts.address = a.peer;
    r = tcp_selftest_client(a.opts);
  }
  return report(r, a, why_not_rdma);
}

}  // namespace

void add_selftest(CLI::App& app, const std::function<void(CLI::App*, Runner)>& on_run) {
  auto args = std::make_shared<Args>();
  auto* sub = app.add_subcommand(
      "selftest",
      "Check the RDMA stack (or TCP where RDMA is unavailable): connect, exchange messages, move data\n"
      "both ways, compare SHA-256 on both sides, print device, port state, link layer, MTU and bandwidth.\n"
      "With no PEER both ends run in this process over the local RDMA device (or loopback TCP).\n"
      "Two hosts: `ibdisk selftest --listen` on one, `ibdisk selftest HOST` on the other.");
  sub->add_option("peer", args->peer, "host running `ibdisk selftest --listen`");
  sub->add_option("--listen", args->listen, "serve self-test clients on this address (default all)")
      ->expected(0, 1);
  sub->add_option("--transport", args->transport, "auto tries RDMA, then TCP")
      ->capture_default_str()
      ->check(CLI::IsMember({"auto", "rdma", "tcp"}));
  sub->add_option("--port", args->opts.port, "RDMA CM and TCP port")->capture_default_str();
  sub->add_option("--source", args->opts.source, "local address to connect from (selects the RDMA device)");
  sub->add_option("--size", args->opts.size, "bytes per transfer")
      ->capture_default_str()
      ->check(CLI::Range(std::size_t{4096}, std::size_t{256} << 20));
  sub->add_option("--iterations", args->opts.iterations, "transfers each way")
      ->capture_default_str()
      ->check(CLI::Range(1u, 100000u));
  sub->add_option("--clients", args->clients, "with --listen: exit after this many clients (0 = never)")
      ->capture_default_str();
  sub->add_option("--timeout", args->timeout_s, "seconds to wait for each connection step")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  sub->add_flag("--json", args->json, "print the report as JSON (not with --listen)");
  on_run(sub, [args, sub] {
    args->opts.timeout = std::chrono::milliseconds(static_cast<long>(args->timeout_s * 1000));
    if (sub->count("--listen") > 0 && !args->peer.empty()) {
      throw UsageError("--listen and PEER " + args->peer + ": a self-test either serves or connects");
    }
    if (sub->count("--listen") > 0 && args->json) throw UsageError("--json reports a client's run: not with --listen");
    if (sub->count("--listen") > 0) return run_listen(*args);
    return run_client(*args);
  });
}

}  // namespace ibdisk::cli
