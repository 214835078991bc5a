// `ibdisk serve`: export disks and image files.
#include <sys/stat.h>

#include <algorithm>
#include <csignal>
#include <cstdio>
#include <thread>

#include <systemd/sd-daemon.h>

#include "cli/commands.h"
#include "cli/format.h"
#include "common/error.h"
#include "common/log.h"
#include "initiator/client.h"
#include "target/nbd/nbd_server.h"
#include "target/nbd/tls.h"
#include "target/server.h"
#include "transport/rdma/rdma_connection.h"
#include "proto/wire.h"

namespace ibdisk::cli {
namespace {

struct ServeArgs {
  std::vector<std::string> exports;
  std::string listen;
  target::ServerOptions opts;
  bool nbd = false;
  std::uint16_t nbd_port = nbd::kDefaultPort;
  std::string nbd_tls;
  double handshake_timeout_s = 30;
  double stop_timeout_s = 10;
  double session_timeout_s = 20;
};

// Plain NBD has no authentication of its own: beyond loopback it needs TLS (--nbd-tls, the
// key admits a client), or an allow-list (or --insecure), even when ibdisk's own port is
// protected by a key.
std::unique_ptr<nbd::NbdServer> start_nbd(ServeArgs& a, target::Server& server) {
  const std::string listen = server.listen_description();
  const std::string host = listen.front() == '[' ? listen.substr(1, listen.find(']') - 1) : listen.substr(0, listen.rfind(':'));
  const auto addr = boost::asio::ip::make_address(host);
  nbd::NbdServerOptions no;
  if (!a.nbd_tls.empty()) no.tls = nbd::NbdTls::from_spec(a.nbd_tls);
  if (!addr.is_loopback() && a.opts.allow.empty() && !a.opts.insecure && !no.tls) {
    throw SystemError("NBD front end on " + host, std::string("NBD clients do not authenticate without TLS"),
                      "give --nbd-tls psk:FILE (docs/nbd.md, TLS), or --allow CIDR for the hosts that may use plain NBD, "
                      "or --insecure on a network you trust");
  }
  no.any_local_user = a.opts.insecure;
  return std::make_unique<nbd::NbdServer>(server.worker_io(0), server.exports(), server.worker_engine(0),
                                          server.allow_list(), boost::asio::ip::tcp::endpoint(addr, a.nbd_port), no);
}

// A path with a comma that does not exist, whose part before the comma does, is an unknown
// option (`x=disk.img,foo`), not a path: say so instead of failing to open "disk.img,foo".
target::ExportConfig parse_export(const std::string& spec) {
  target::ExportConfig c = target::parse_export_spec(spec);
  struct stat st{};
  const auto comma = c.path.rfind(',');
  if (comma != std::string::npos && ::stat(c.path.c_str(), &st) != 0) {
    throw UsageError("export '" + spec + "': unknown option '" + c.path.substr(comma + 1) +
                     "' (known: ro, rw, shared, direct, cached)");
  }
  return c;
}

// io_uring registers every worker's buffers, and RLIMIT_MEMLOCK bounds that for a user
// without CAP_IPC_LOCK: say so before the registration fails with a bare ENOMEM.
void check_memlock(const target::ServerOptions& o) {
  const std::size_t slot = wire::kMaxIoSize;
  const std::size_t per_worker = std::max<std::size_t>(1, (std::size_t{o.buffer_mib} << 20) / slot) * slot;
  const std::string m = transport::memlock_problem(
      o.threads * per_worker, "the target's data buffers (--threads " + std::to_string(o.threads) + " x --buffer-mib " +
                                  std::to_string(o.buffer_mib) + ", registered with io_uring and RDMA)");
  if (!m.empty()) throw SystemError("ibdisk serve", m + ", or lower --buffer-mib or --threads");
}

int run_serve(ServeArgs& a, const CLI::App& sub) {
  const auto ms = [](double s) { return std::chrono::milliseconds(static_cast<std::int64_t>(s * 1000)); };
  a.opts.handshake_timeout = ms(a.handshake_timeout_s);
  a.opts.stop_timeout = ms(a.stop_timeout_s);
  a.opts.session_timeout = ms(a.session_timeout_s);
  for (const auto& spec : a.exports) a.opts.exports.push_back(parse_export(spec));
  // A port or TLS for the NBD front end asks for it.
  if (sub.count("--nbd-port") > 0 || !a.nbd_tls.empty()) a.nbd = true;
  if (!a.listen.empty()) {
    std::uint16_t port = a.opts.port;
    initiator::parse_host_port(a.listen, &a.opts.listen_address, &port);
    if (sub.count("--port") > 0 && port != a.opts.port) {
      throw UsageError("--listen " + a.listen + " and --port " + std::to_string(a.opts.port) +
                       " both give the port: give one of them");
    }
    a.opts.port = port;
  }
  check_memlock(a.opts);
  // Signals go to a dedicated thread: SIGINT/SIGTERM finish in-flight I/O, then exit.
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGINT);
  sigaddset(&sigs, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);

  target::Server server(a.opts);
  std::unique_ptr<nbd::NbdServer> nbd_server = a.nbd ? start_nbd(a, server) : nullptr;
  if (server.rdma_port() != 0) {
    std::printf("ibdisk serve: listening on %s (tcp) and RDMA port %u\n", server.listen_description().c_str(),
                server.rdma_port());
  } else {
    std::printf("ibdisk serve: listening on %s (tcp; no RDMA: %s)\n", server.listen_description().c_str(),
                server.rdma_status().c_str());
  }
  if (nbd_server) {
    std::printf("ibdisk serve: NBD front end on port %u (%s)\n", nbd_server->port(),
                a.nbd_tls.empty() ? "plain NBD, no TLS" : "TLS required");
  }
  if (!a.opts.server_name.empty()) std::printf("ibdisk serve: name %s\n", a.opts.server_name.c_str());
  for (const auto& e : server.exports().list()) {
    std::printf("  export %-16s %10s  %s%s\n", e.name.c_str(), human_bytes(e.size).c_str(), e.read_only ? "read-only" : "read-write",
                e.shared ? ", shared" : ", exclusive writer");
  }
  std::fflush(stdout);
  // Type=notify: systemd starts what needs the target once it really listens.
  sd_notifyf(0, "READY=1\nSTATUS=listening on %s", server.listen_description().c_str());
  std::thread signals([&server, &nbd_server, sigs] {
    int sig = 0;
    sigwait(&sigs, &sig);
    if (sig == SIGUSR1) return;
    logger("target")->info("{} received: finishing in-flight I/O", sig == SIGINT ? "SIGINT" : "SIGTERM");
    sd_notify(0, "STOPPING=1\nSTATUS=finishing in-flight I/O");
    if (nbd_server) nbd_server->stop();
    server.stop();
  });
  server.run();
  pthread_kill(signals.native_handle(), SIGTERM);
  signals.join();
  std::printf("ibdisk serve: stopped\n");
  return 0;
}

}  // namespace

void add_serve(CLI::App& app, const std::function<void(CLI::App*, Runner)>& on_run) {
  auto a = std::make_shared<ServeArgs>();
  auto* sub = app.add_subcommand(
      "serve",
      "Export block devices and image files to initiators (ibdisk protocol over TCP).\n"
      "Without --key-file the target listens on loopback only, unless --insecure is given.\n"
      "Options may also come from a file: --config FILE, with a [serve] section, e.g.\n"
      "  [serve]\n  export = [\"vm1=/dev/nvme0n1\", \"iso=/srv/debian.iso,ro\"]\n  key-file = \"/etc/ibdisk/key\"");
  sub->add_option("-e,--export", a->exports, "NAME=PATH[,ro][,shared][,direct|,cached]: export PATH as NAME (repeatable).\n"
                  "ro: read-only; shared: several writers at once (default one); direct: O_DIRECT I/O\n"
                  "(default for block devices); cached: through the page cache (default for files)")
      ->required()
      ->type_name("NAME=PATH[,opts]");
  sub->add_option("-l,--listen", a->listen,
                  "ADDR[:PORT] to listen on (default 127.0.0.1 without a key, 0.0.0.0 with one; port 7420)");
  sub->add_option("--port", a->opts.port, "TCP port")->capture_default_str();
  auto* rdma_port =
      sub->add_option("--rdma-port", a->opts.rdma_port, "RDMA CM port (its own port space; default: the TCP port)");
  sub->add_flag("!--no-rdma", a->opts.rdma, "do not listen on RDMA even when an RDMA device exists")->excludes(rdma_port);
  sub->add_option("-k,--key-file", a->opts.key_file, "pre-shared key (mode 0600; make one with `ibdisk keygen`)");
  sub->add_option("--allow", a->opts.allow, "client network allowed to connect, CIDR (repeatable; default any)");
  sub->add_flag("--insecure", a->opts.insecure, "without a key, listen beyond loopback anyway");
  sub->add_option("--threads", a->opts.threads, "worker threads (each with its own io_uring)")->capture_default_str();
  sub->add_option("--buffer-mib", a->opts.buffer_mib, "data buffers per worker, MiB")->capture_default_str();
  sub->add_option("--name", a->opts.server_name, "a name for this target, shown by `ls`, `info` and `stats` on initiators");
  sub->add_option("--handshake-timeout", a->handshake_timeout_s,
                  "SECONDS a new connection may take to authenticate before it is closed")
      ->capture_default_str()
      ->check(CLI::Range(0.1, 3600.0));
  sub->add_option("--stop-timeout", a->stop_timeout_s,
                  "SECONDS SIGTERM waits for in-flight I/O and unsent replies before closing what is left")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 3600.0));
  sub->add_option("--session-timeout", a->session_timeout_s,
                  "SECONDS without a word from an initiator's queue before it is closed as lost; a session whose\n"
                  "queues are all lost ends " + std::to_string(target::kRejoinGrace.count()) +
                      " s later, releasing its exports (0: never; see docs/attach.md, TIMEOUTS)")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 3600.0));
  sub->add_flag("--nbd", a->nbd, "also serve the exports over plain NBD (nbd-client, qemu, nbdcopy; see docs/nbd.md)");
  sub->add_option("--nbd-port", a->nbd_port, "port of the NBD front end (implies --nbd)")->capture_default_str();
  sub->add_option("--nbd-tls", a->nbd_tls,
                  "the NBD front end requires TLS 1.3 (implies --nbd). psk:FILE: a key of FILE (GnuTLS psktool's\n"
                  "format, made by `ibdisk keygen --psktool`; clients: nbds://HOST/NAME?tls-psk-file=FILE).\n"
                  "x509:DIR: the certificates of DIR (ca-cert.pem, server-cert.pem, server-key.pem, as for nbdkit);\n"
                  "clients need a certificate signed by ca-cert.pem (nbd-client -certfile/-keyfile/-cacertfile)")
      ->type_name("psk:FILE|x509:DIR");
  on_run(sub, [a, sub] { return run_serve(*a, *sub); });
}

}  // namespace ibdisk::cli
