// Initiator-side commands: ls, info, stats, copy, keygen.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <memory>
#include <optional>
#include <vector>

#include <openssl/evp.h>

#include "cli/commands.h"
#include "cli/format.h"
#include "cli/liveness_options.h"
#include "cli/transport_choice.h"
#include "common/json.h"
#include "common/auth.h"
#include "common/checksum.h"
#include "common/error.h"
#include "initiator/client.h"
#include "initiator/copy.h"
#include "initiator/extents.h"
#include "target/nbd/tls.h"

namespace ibdisk::cli {
namespace {

using initiator::Client;
using initiator::ClientOptions;

struct Common {
  std::string key_file;
  double timeout_s = 10;
  bool json = false;
  std::string transport = "auto";
  LivenessArgs liveness;
};

void add_common(CLI::App* sub, Common& c, bool json) {
  sub->add_option("-k,--key-file", c.key_file, "the target's pre-shared key (a copy of its --key-file)");
  sub->add_option("--timeout", c.timeout_s, "seconds to wait for the target")->capture_default_str()->check(CLI::PositiveNumber);
  if (json) sub->add_flag("--json", c.json, "print JSON instead of a table");
  sub->add_option("--transport", c.transport, "auto tries RDMA (a few seconds), then TCP; rdma or tcp forces one")
      ->capture_default_str()
      ->check(CLI::IsMember({"auto", "rdma", "tcp"}));
  add_liveness_options(sub, c.liveness);
}

ClientOptions options_for(const std::string& host, std::uint16_t port, const Common& c) {
  // A missing key here needs a copy of the target's, not a new one: say so before connecting.
  if (!c.key_file.empty()) load_key_file(c.key_file, KeyUser::kInitiator);
  ClientOptions o;
  o.host = host;
  o.port = port;
  o.key_file = c.key_file;
  o.timeout = std::chrono::milliseconds(static_cast<long>(c.timeout_s * 1000));
  o.transport = choose_transport(c.transport);
  apply_liveness(c.liveness, &o);
  char name[256] = {};
  ::gethostname(name, sizeof name - 1);
  o.client_name = name;
  return o;
}

std::string flags_of(const proto::ExportInfo& e) {
  std::string f = e.read_only() ? "ro" : "rw";
  f += e.shared() ? ",shared" : ",exclusive";
  if (e.trim()) f += ",trim";
  return f;
}

Json export_json(const proto::ExportInfo& e) {
  return {{"name", e.name()},       {"size", e.size()},         {"block_size", e.block_size()},
          {"read_only", e.read_only()}, {"shared", e.shared()}, {"trim", e.trim()},
          {"readers", e.readers()}, {"writers", e.writers()}};
}

Json target_json(const std::string& host, std::uint16_t port, const Client& client) {
  return {{"host", host}, {"port", port}, {"address", host_port(host, port)}, {"name", client.server_name()}};
}

// "10.0.0.1:7420 (lab-store)": the address, and the target's name when it has one.
std::string target_text(const std::string& host, std::uint16_t port, const Client& client) {
  const std::string a = host_port(host, port);
  return client.server_name().empty() ? a : a + " (" + client.server_name() + ")";
}

// HOST[:PORT], with or without ibdisk:// and a trailing slash (as `info` takes them).
void parse_target(const std::string& text, std::string* host, std::uint16_t* port) {
  std::string t = text;
  if (t.rfind("ibdisk://", 0) == 0) t = t.substr(9);
  if (!t.empty() && t.back() == '/') t.pop_back();
  if (t.find('/') != std::string::npos) {
    throw UsageError("'" + text + "': expected HOST[:PORT] (the exports are listed by `ibdisk ls HOST`; one of them is "
                     "`ibdisk info HOST/EXPORT`)");
  }
  initiator::parse_host_port(t, host, port);
}

struct HostArgs {
  std::string target;
  Common c;
  bool map = false;  // info: the export's extents too
};

const char* extent_kind(const initiator::ExtentRun& r) { return !r.hole() ? (r.zero() ? "zero" : "data") : "hole"; }

int run_ls(HostArgs& a) {
  std::string host;
  std::uint16_t port = initiator::kDefaultPort;
  parse_target(a.target, &host, &port);
  auto client = Client::connect(options_for(host, port, a.c));
  const auto exports = client->list_exports();
  if (a.c.json) {
    Json list = Json::array();
    for (const auto& e : exports) list.push_back(export_json(e));
    std::cout << json_document({{"target", target_json(host, port, *client)}, {"transport", client->transport(0)}, {"exports", list}});
    return 0;
  }
  std::printf("target %s, transport %s\n", target_text(host, port, *client).c_str(), client->transport(0).c_str());
  std::printf("%-20s %12s %6s  %-22s %s\n", "EXPORT", "SIZE", "BLOCK", "FLAGS", "OPEN (readers/writers)");
  for (const auto& e : exports) {
    std::printf("%-20s %12s %6u  %-22s %u/%u\n", e.name().c_str(), human_bytes(e.size()).c_str(), e.block_size(),
                flags_of(e).c_str(), e.readers(), e.writers());
  }
  if (exports.empty()) std::printf("(no exports)\n");
  return 0;
}

int run_info(HostArgs& a) {
  initiator::RemoteName r;
  if (!initiator::parse_remote(a.target, &r)) {
    throw std::invalid_argument("'" + a.target + "': expected HOST[:PORT]/EXPORT");
  }
  auto client = Client::connect(options_for(r.host, r.port, a.c));
  for (const auto& e : client->list_exports()) {
    if (e.name() != r.export_name) continue;
    std::optional<initiator::ExtentMap> map;
    if (a.map) {
      const auto opened = client->open(e.name(), true);
      map = initiator::map_extents(*client, 0, opened.handle(), 0, e.size(), opened.extents());
    }
    if (a.c.json) {
      Json doc = {{"target", target_json(r.host, r.port, *client)}, {"transport", client->transport(0)}, {"export", export_json(e)}};
      if (map) {
        Json runs = Json::array();
        for (const auto& x : map->runs) {
          runs.push_back({{"offset", x.offset}, {"length", x.length}, {"type", extent_kind(x)}});
        }
        doc["extents"] = {{"exact", map->exact}, {"runs", runs}};
      }
      std::cout << json_document(doc);
      return 0;
    }
    std::printf("export:      %s\ntarget:      %s\ntransport:   %s\nsize:        %s (%llu bytes)\nblock size:  %u\n"
                "access:      %s\nwriters:     %s\ntrim:        %s\nopen now:    %u reader(s), %u writer(s)\n",
                e.name().c_str(), target_text(r.host, r.port, *client).c_str(), client->transport(0).c_str(), human_bytes(e.size()).c_str(),
                static_cast<unsigned long long>(e.size()), e.block_size(), e.read_only() ? "read-only" : "read-write",
                e.shared() ? "shared" : "exclusive (one at a time)", e.trim() ? "yes" : "no", e.readers(), e.writers());
    if (map) {
      std::uint64_t data = 0;
      for (const auto& x : map->runs) data += x.hole() ? 0 : x.length;
      std::printf("allocated:   %s of %s%s\n%20s %20s  type\n", human_bytes(data).c_str(), human_bytes(e.size()).c_str(),
                  map->exact ? "" : " (not exact: the target cannot tell holes here, all is data)", "offset", "length");
      for (const auto& x : map->runs) {
        std::printf("%20llu %20llu  %s\n", static_cast<unsigned long long>(x.offset),
                    static_cast<unsigned long long>(x.length), extent_kind(x));
      }
    }
    return 0;
  }
  std::string names;
  for (const auto& e : client->list_exports()) names += (names.empty() ? "" : ", ") + e.name();
  throw SystemError("info " + a.target, "no export named '" + r.export_name + "'",
                    "this target exports: " + (names.empty() ? std::string("nothing") : names));
}

int run_stats(HostArgs& a) {
  std::string host;
  std::uint16_t port = initiator::kDefaultPort;
  parse_target(a.target, &host, &port);
  auto client = Client::connect(options_for(host, port, a.c));
  const proto::Stats s = client->stats();
  if (a.c.json) {
    Json sessions = Json::array();
    for (const auto& x : s.sessions()) {
      Json exports = Json::array();
      // The target names each open export "NAME" or "NAME (ro)"; names have no spaces.
      for (const auto& e : x.exports()) {
        const auto sp = e.find(' ');
        exports.push_back({{"name", e.substr(0, sp)}, {"read_only", sp != std::string::npos}});
      }
      char id[17];
      std::snprintf(id, sizeof id, "%016llx", static_cast<unsigned long long>(x.session_id()));
      sessions.push_back({{"id", id},
                          {"client", x.client()},
                          {"name", x.client_name()},
                          {"transports", Json(std::vector<std::string>(x.transports().begin(), x.transports().end()))},
                          {"exports", exports},
                          {"reads", x.reads()},
                          {"writes", x.writes()},
                          {"bytes_read", x.bytes_read()},
                          {"bytes_written", x.bytes_written()},
                          {"errors", x.errors()},
                          // Per queue, as transports: ms since the target last heard from it.
                          {"idle_ms", Json(std::vector<std::uint64_t>(x.idle_ms().begin(), x.idle_ms().end()))},
                          {"heartbeats", x.heartbeats()}});
    }
    std::cout << json_document({{"target", target_json(host, port, *client)},
                                {"uptime_seconds", s.uptime_seconds()},
                                {"rejected_connections", s.rejected_connections()},
                                {"protocol_errors", s.protocol_errors()},
                                {"sessions", sessions}});
    return 0;
  }
  std::printf("target %s: up %llus, %d session(s), %llu rejected connection(s), %llu protocol error(s)\n",
              target_text(host, port, *client).c_str(), static_cast<unsigned long long>(s.uptime_seconds()), s.sessions_size(),
              static_cast<unsigned long long>(s.rejected_connections()), static_cast<unsigned long long>(s.protocol_errors()));
  std::printf("%-16s %-22s %-12s %-14s %-16s %10s %10s %6s %6s\n", "SESSION", "CLIENT", "NAME", "TRANSPORTS", "EXPORTS",
              "READ", "WRITTEN", "ERRORS", "QUIET");
  for (const auto& x : s.sessions()) {
    std::string transports, exports;
    for (const auto& t : x.transports()) transports += (transports.empty() ? "" : ",") + t;
    for (const auto& e : x.exports()) exports += (exports.empty() ? "" : ",") + e;
    // The target shows the id of the asker's own session only (the id is half of what joining needs).
    char id[24] = "(not yours)";
    if (x.session_id()) std::snprintf(id, sizeof id, "%016llx", static_cast<unsigned long long>(x.session_id()));
    // QUIET: the longest any of its queues has gone without a word to the target.
    std::uint64_t quiet_ms = 0;
    for (const auto ms : x.idle_ms()) quiet_ms = std::max<std::uint64_t>(quiet_ms, ms);
    char quiet[24];
    std::snprintf(quiet, sizeof quiet, "%.0fs", static_cast<double>(quiet_ms) / 1000);
    std::printf("%-16s %-22s %-12s %-14s %-16s %10s %10s %6llu %6s\n", id, x.client().c_str(), x.client_name().c_str(), transports.c_str(), exports.empty() ? "-" : exports.c_str(),
                human_bytes(x.bytes_read()).c_str(), human_bytes(x.bytes_written()).c_str(),
                static_cast<unsigned long long>(x.errors()), quiet);
  }
  return 0;
}

struct CopyArgs {
  std::string src, dst;
  Common c;
  // 4 MiB in flight in all: on loopback TCP, 64 MiB in 1 MiB requests measured at a third of
  // the speed (the data went cold in the CPU caches between its copies); docs/benchmarks.md.
  unsigned queues = 4;
  unsigned depth = 2;
  unsigned threads = 0;  // 0: one per queue
  std::uint32_t block = 512 << 10;
  bool verify = false;
  bool no_progress = false;
};

std::string local_sha256(int fd, std::uint64_t size) {
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr);
  std::vector<char> buf(1 << 20);
  std::uint64_t off = 0;
  while (off < size) {
    const ssize_t n = ::pread(fd, buf.data(), std::min<std::uint64_t>(buf.size(), size - off), static_cast<off_t>(off));
    if (n <= 0) {
      EVP_MD_CTX_free(ctx);
      throw SystemError("verify: reading the local file at offset " + std::to_string(off), n < 0 ? errno : EIO);
    }
    EVP_DigestUpdate(ctx, buf.data(), static_cast<std::size_t>(n));
    off += static_cast<std::uint64_t>(n);
  }
  Sha256 d{};
  unsigned len = 0;
  EVP_DigestFinal_ex(ctx, d.data(), &len);
  EVP_MD_CTX_free(ctx);
  return to_hex(d);
}

// Whether one side of a copy names an export: ibdisk://... always; HOST/EXPORT unless a local
// path of that name exists or its first folder does (backups/x.img); "-" is stdin/stdout.
bool names_export(const std::string& text, initiator::RemoteName* r) {
  if (text == "-" || !initiator::parse_remote(text, r)) return false;
  if (text.rfind("ibdisk://", 0) == 0) return true;
  if (::access(text.c_str(), F_OK) == 0) return false;
  struct stat st{};
  const std::string first = text.substr(0, text.find('/'));
  return !(::stat(first.c_str(), &st) == 0 && S_ISDIR(st.st_mode));
}

// A download into a pipe: reads in order, a window of requests at a time, written in order.
// The export's holes (with extents) are written as zeros without reading them.
initiator::CopyResult stream_download(Client& client, std::uint32_t handle, std::uint64_t size, int fd,
                                      std::uint32_t block, bool extents,
                                      const std::function<void(std::uint64_t, std::uint64_t)>& progress) {
  const auto start = std::chrono::steady_clock::now();
  const unsigned window = client.queue_count() * client.queue_depth(0);
  std::vector<std::byte> buf(static_cast<std::size_t>(window) * block);
  const auto put = [&](const std::byte* p, std::uint64_t n) {
    for (std::uint64_t w = 0; w < n;) {
      const ssize_t k = ::write(fd, p + w, n - w);
      if (k < 0 && errno == EINTR) continue;
      if (k <= 0) throw SystemError("writing to standard output", k < 0 ? errno : EIO);
      w += static_cast<std::uint64_t>(k);
    }
  };
  initiator::CopyResult r;
  for (const initiator::ExtentRun& run : initiator::map_extents(client, 0, handle, 0, size, extents).runs) {
    const std::uint64_t end = run.offset + run.length;
    if (run.hole() || run.zero()) {
      std::fill(buf.begin(), buf.end(), std::byte{0});
      for (std::uint64_t off = run.offset; off < end; off += std::min<std::uint64_t>(buf.size(), end - off)) {
        put(buf.data(), std::min<std::uint64_t>(buf.size(), end - off));
        if (progress) progress(std::min<std::uint64_t>(off + buf.size(), end), size);
      }
      r.skipped_zero_bytes += run.length;
      continue;
    }
    for (std::uint64_t off = run.offset; off < end;) {
      unsigned issued = 0, done = 0;
      int failed = 0;
      for (std::uint64_t o = off; issued < window && o < end; ++issued, o += block) {
        const auto len = static_cast<std::uint32_t>(std::min<std::uint64_t>(block, end - o));
        client.read(issued % client.queue_count(), handle, o, len, buf.data() + std::size_t{issued} * block,
                    [&](int st) {
                      if (st < 0 && !failed) failed = st;
                      ++done;
                    });
      }
      client.run_until([&] { return done == issued; });
      if (failed) throw SystemError("reading the export at offset " + std::to_string(off), -failed);
      const std::uint64_t n = std::min<std::uint64_t>(std::uint64_t{issued} * block, end - off);
      put(buf.data(), n);
      off += n;
      r.moved_bytes += n;
      if (progress) progress(off, size);
    }
  }
  r.bytes = size;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return r;
}

int run_copy(CopyArgs& a) {
  initiator::RemoteName src_remote, dst_remote;
  const bool src_is_remote = names_export(a.src, &src_remote);
  const bool dst_is_remote = names_export(a.dst, &dst_remote);
  if (src_is_remote == dst_is_remote) {
    throw UsageError("copy needs one side HOST[:PORT]/EXPORT and the other a local file, a device or - (got '" + a.src +
                     "' and '" + a.dst + "'); write ibdisk://HOST/EXPORT if a local path looks remote, ./PATH if a "
                     "remote name looks local");
  }
  if (a.src == "-") throw UsageError("copy - HOST/EXPORT: an upload needs a file or device it can size; give its path");
  const bool to_stdout = a.dst == "-";
  if (to_stdout && a.verify) throw UsageError("--verify cannot read standard output back: give a file or device");
  if (to_stdout && a.c.json) throw UsageError("--json and destination - both write standard output: choose one");
  // With data or JSON on stdout, the human lines go to stderr.
  FILE* const out = to_stdout || a.c.json ? stderr : stdout;
  const initiator::RemoteName& r = src_is_remote ? src_remote : dst_remote;
  ClientOptions o = options_for(r.host, r.port, a.c);
  o.queue_depth = a.depth;
  // One Client per thread, all in one session: the first opens the export, the others join
  // and share its handle. The queues are dealt out to them as evenly as they go.
  const unsigned lanes = to_stdout ? 1 : std::clamp(a.threads ? a.threads : a.queues, 1u, a.queues);
  std::vector<std::unique_ptr<Client>> clients;
  for (unsigned i = 0; i < lanes; ++i) {
    o.queues = a.queues / lanes + (i < a.queues % lanes ? 1 : 0);
    o.join_session = i ? clients[0]->session_id() : 0;
    o.join_secret = i ? clients[0]->session_secret() : std::string();
    clients.push_back(Client::connect(o));
    // The first fell back to TCP (and said why): the others go straight to it.
    if (i == 0 && o.transport == "auto" && clients[0]->transport(0) == "tcp") o.transport = "tcp";
  }
  std::vector<Client*> lane_clients;
  for (auto& c : clients) lane_clients.push_back(c.get());
  Client* const client = lane_clients[0];
  const proto::Opened opened = client->open(r.export_name, /*read_only=*/src_is_remote);
  const std::uint64_t export_size = opened.info().size();

  initiator::CopyOptions copts;
  copts.block_size = a.block;
  copts.extents = opened.extents();
  copts.zeroes_may_trim = opened.zeroes_may_trim();
  Progress progress(src_is_remote ? "download" : "upload", !a.no_progress && !a.c.json);
  copts.progress = [&progress](std::uint64_t done, std::uint64_t total) { progress.update(done, total); };

  initiator::CopyResult result;
  std::uint64_t size = export_size;
  int fd = -1;
  if (to_stdout) {
    fd = ::dup(STDOUT_FILENO);
    if (fd < 0) throw SystemError("dup(stdout)", errno);
    result = stream_download(*client, opened.handle(), size, fd, a.block, copts.extents, copts.progress);
  } else if (src_is_remote) {
    fd = ::open(a.dst.c_str(), (a.verify ? O_RDWR : O_WRONLY) | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) throw SystemError("opening destination " + a.dst, errno);
    struct stat st{};
    ::fstat(fd, &st);
    const bool regular = S_ISREG(st.st_mode);
    if (a.verify && !regular && !S_ISBLK(st.st_mode)) {
      ::close(fd);
      throw UsageError("--verify needs a destination that can be read back (" + a.dst + " is not a file or disk)");
    }
    result = initiator::download(lane_clients, opened.handle(), size, fd, regular, copts);
  } else {
    fd = ::open(a.src.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw SystemError("opening source " + a.src, errno);
    struct stat st{};
    ::fstat(fd, &st);
    size = static_cast<std::uint64_t>(st.st_size);
    if (S_ISBLK(st.st_mode)) {
      const off_t end = ::lseek(fd, 0, SEEK_END);
      size = end > 0 ? static_cast<std::uint64_t>(end) : 0;
    }
    if (size > export_size) {
      ::close(fd);
      throw SystemError("copy " + a.src + " to " + a.dst,
                        "the source has " + std::to_string(size) + " bytes, the export only " + std::to_string(export_size),
                        "use a larger export");
    }
    result = initiator::upload(lane_clients, opened.handle(), size, fd, copts);
  }
  progress.finish();
  const double mib_s = result.seconds > 0 ? static_cast<double>(result.bytes) / (1 << 20) / result.seconds : 0;
  if (!a.c.json) {
    std::fprintf(out, "copied %s (%s of it data) in %.2fs (%.1f MiB/s) over %s, %u queue(s) x depth %u, %u thread(s)\n",
                 human_bytes(result.bytes).c_str(), human_bytes(result.bytes - result.skipped_zero_bytes).c_str(),
                 result.seconds, mib_s, client->transport(0).c_str(), a.queues, client->queue_depth(0), lanes);
  }
  Json verify = nullptr;
  int rc = 0;
  if (a.verify) {
    const std::string remote = initiator::remote_sha256(lane_clients, opened.handle(), size, copts);
    const std::string local = local_sha256(fd, size);
    if (!a.c.json) {
      std::printf("verify: export sha256 %s\n        local  sha256 %s\n        %s\n", remote.c_str(), local.c_str(),
                  remote == local ? "match" : "MISMATCH");
    }
    verify = {{"export_sha256", remote}, {"local_sha256", local}, {"match", remote == local}};
    rc = remote == local ? 0 : 1;
  }
  ::close(fd);
  if (a.c.json) {
    std::cout << json_document({{"source", a.src},
                                {"destination", a.dst},
                                {"direction", src_is_remote ? "download" : "upload"},
                                {"target", target_json(r.host, r.port, *client)},
                                {"export", r.export_name},
                                {"bytes", result.bytes},
                                {"skipped_zero_bytes", result.skipped_zero_bytes},
                                {"moved_bytes", result.moved_bytes},
                                {"seconds", result.seconds},
                                {"mib_per_second", mib_s},
                                {"transport", client->transport(0)},
                                {"queues", a.queues},
                                {"queue_depth", client->queue_depth(0)},
                                {"threads", lanes},
                                {"verify", verify}});
  }
  return rc;
}

}  // namespace

void add_client_commands(CLI::App& app, const std::function<void(CLI::App*, Runner)>& on_run) {
  {
    auto a = std::make_shared<HostArgs>();
    auto* sub = app.add_subcommand("ls", "List a target's exports: size, block size, flags, who has them open.");
    sub->add_option("target", a->target, "HOST[:PORT] or ibdisk://HOST[:PORT] of an `ibdisk serve` (port 7420 by default; "
                    "[IPv6]:PORT)")->required();
    add_common(sub, a->c, true);
    on_run(sub, [a] { return run_ls(*a); });
  }
  {
    auto a = std::make_shared<HostArgs>();
    auto* sub = app.add_subcommand("info", "Show one export in detail.");
    sub->add_option("export", a->target, "HOST[:PORT]/EXPORT")->required();
    sub->add_flag("--map", a->map,
                  "also list the export's extents: runs of data and holes (opens it read-only; a target "
                  "that cannot tell holes, or an older one, shows all of it as data, not exact)");
    add_common(sub, a->c, true);
    on_run(sub, [a] { return run_info(*a); });
  }
  {
    auto a = std::make_shared<HostArgs>();
    auto* sub = app.add_subcommand("stats", "Show a target's sessions, their transports and I/O counters.");
    sub->add_option("target", a->target, "HOST[:PORT]")->required();
    add_common(sub, a->c, true);
    on_run(sub, [a] { return run_stats(*a); });
  }
  {
    auto a = std::make_shared<CopyArgs>();
    auto* sub = app.add_subcommand(
        "copy",
        "Copy an export to a local file or device, or a local file to an export.\n"
        "  ibdisk copy 10.30.0.1/vm1 vm1.img        download (holes are not read; the file stays sparse)\n"
        "  ibdisk copy vm1.img 10.30.0.1/vm1        upload (the file's holes are not sent), then flush\n"
        "  ibdisk copy 10.30.0.1/vm1 - | gzip > vm1.img.gz   to standard output\n"
        "A side is the export unless a local path of that name, or its first folder, exists; write\n"
        "ibdisk://HOST/EXPORT to force it.");
    sub->add_option("source", a->src, "HOST[:PORT]/EXPORT or a local path")->required();
    sub->add_option("destination", a->dst, "a local path, - for standard output, or HOST[:PORT]/EXPORT")->required();
    sub->add_option("--queues", a->queues, "connections to use")->capture_default_str()->check(CLI::Range(1u, 64u));
    sub->add_option("--queue-depth", a->depth, "requests in flight per queue")->capture_default_str()->check(CLI::Range(1u, 256u));
    sub->add_option("--threads", a->threads, "threads driving the queues (default: one per queue)")
        ->check(CLI::Range(1u, 64u));
    sub->add_option("--block-size", a->block, "bytes per request; K, M suffixes are powers of 1024 (64K, 1M)")
        ->capture_default_str()
        ->transform(size_transform(1))
        ->check(CLI::Range(std::uint32_t{4096}, wire::kMaxIoSize));
    sub->add_flag("--verify", a->verify, "afterwards, compare SHA-256 of both sides");
    sub->add_flag("--no-progress", a->no_progress, "no progress bar");
    add_common(sub, a->c, true);
    on_run(sub, [a] { return run_copy(*a); });
  }
  {
    struct KeygenArgs {
      std::string path;
      bool psktool = false;
      std::string identity = "ibdisk";
    };
    auto a = std::make_shared<KeygenArgs>();
    auto* sub = app.add_subcommand("keygen", "Write a new random pre-shared key to FILE (mode 0600); copy it to both sides.");
    sub->add_option("file", a->path, "where to write the key")->required();
    sub->add_flag("--psktool", a->psktool,
                  "write it as GnuTLS's psktool does (IDENTITY:HEXKEY): for `serve --nbd-tls psk:FILE` and the NBD\n"
                  "tools' tls-psk-file; --key-file takes the same file");
    sub->add_option("--identity", a->identity, "the key's identity (with --psktool; the NBD tools' tls-username)")
        ->capture_default_str();
    on_run(sub, [a, sub] {
      if (sub->count("--identity") > 0 && !a->psktool) throw UsageError("--identity is for --psktool key files");
      if (a->psktool) {
        nbd::write_new_psk_file(a->path, a->identity);
        std::printf("wrote a new key for identity '%s' to %s (mode 0600, psktool's format); give `serve --nbd-tls psk:%s`,\n"
                    "and to NBD clients nbds://HOST/EXPORT?tls-psk-file=%s&tls-username=%s (or --key-file %s for ibdisk's own port)\n",
                    a->identity.c_str(), a->path.c_str(), a->path.c_str(), a->path.c_str(), a->identity.c_str(), a->path.c_str());
        return 0;
      }
      write_new_key_file(a->path);
      std::printf("wrote a new key to %s (mode 0600); copy it to the initiators and give --key-file %s on both sides\n",
                  a->path.c_str(), a->path.c_str());
      return 0;
    });
  }
}

}  // namespace ibdisk::cli
