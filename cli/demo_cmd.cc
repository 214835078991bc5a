// `ibdisk demo`: ibdisk's main job on a built-in default, with no hardware or setup: export a
// temporary image, attach a session to it over RDMA when this host can (TCP otherwise, saying
// why), write it through the session, read it back, and check every byte.
#include <fcntl.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <iostream>
#include <thread>
#include <vector>

#include "cli/commands.h"
#include "cli/format.h"
#include "common/checksum.h"
#include "common/error.h"
#include "common/json.h"
#include "common/log.h"
#include "initiator/client.h"
#include "initiator/copy.h"
#include "target/server.h"
#include "transport/selftest.h"

namespace ibdisk::cli {
namespace {

struct DemoArgs {
  std::uint64_t size = 256 << 20;
  bool json = false;
  std::string dir;
  bool no_progress = false;
};

std::string file_sha256(const std::string& path, std::uint64_t size) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw SystemError("opening " + path, errno);
  std::vector<std::byte> all(size);
  std::uint64_t got = 0;
  while (got < size) {
    const ssize_t n = ::pread(fd, all.data() + got, size - got, static_cast<off_t>(got));
    if (n <= 0) {
      ::close(fd);
      throw SystemError("reading " + path, n < 0 ? errno : EIO);
    }
    got += static_cast<std::uint64_t>(n);
  }
  ::close(fd);
  return sha256_hex(all);
}

int run_demo(const DemoArgs& a) {
  namespace fs = std::filesystem;
  const std::uint64_t size = a.size;
  // With --json the narrative goes to stderr and stdout carries one JSON document.
  FILE* const out = a.json ? stderr : stdout;
  std::string base = a.dir.empty() ? (std::getenv("TMPDIR") ? std::getenv("TMPDIR") : "/tmp") : a.dir;
  std::string templ = base + "/ibdisk-demo.XXXXXX";
  if (!::mkdtemp(templ.data())) throw SystemError("creating a work folder in " + base, errno, "give --dir DIR");
  const fs::path work = templ;
  struct Cleanup {
    fs::path p;
    ~Cleanup() {
      std::error_code ec;
      fs::remove_all(p, ec);
    }
  } cleanup{work};

  const std::string image = (work / "export.img").string(), source = (work / "source.img").string(),
                    back = (work / "readback.img").string();
  std::fprintf(out, "1. an export: %s sparse image at %s\n", human_bytes(size).c_str(), image.c_str());
  {
    const int fd = ::open(image.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0 || ::ftruncate(fd, static_cast<off_t>(size)) != 0) throw SystemError("creating " + image, errno);
    ::close(fd);
    std::vector<std::byte> data(size);
    fill_pattern(data, 0xd15c);
    const int sfd = ::open(source.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (sfd < 0 || ::write(sfd, data.data(), data.size()) != static_cast<ssize_t>(data.size())) {
      throw SystemError("writing " + source, errno, "is there " + human_bytes(size) + " free in " + base + "?");
    }
    ::close(sfd);
  }

  // Listen where RDMA can reach us when this host has an RDMA device with an address.
  const auto probe = rdma::probe_devices();
  std::string address = probe.devices.empty() ? std::string() : find_rdma_address();
  target::ServerOptions sopts;
  sopts.exports.push_back({"demo", image, false, false});
  sopts.listen_address = address.empty() ? "127.0.0.1" : address;
  sopts.insecure = !address.empty();  // a private address of this host, for this run only
  sopts.port = 0;
  sopts.threads = 2;
  sopts.buffer_mib = 64;
  target::Server server(sopts);
  std::thread serving([&server] { server.run(); });
  struct Stop {
    target::Server& s;
    std::thread& t;
    ~Stop() {
      s.stop();
      t.join();
    }
  } stop{server, serving};
  std::fprintf(out, "2. a target: `ibdisk serve --export demo=%s` listening on %s\n", image.c_str(),
              server.listen_description().c_str());
  if (probe.devices.empty()) {
    std::fprintf(out, "   RDMA: not available here (%s)\n", probe.unavailable_reason.c_str());
  } else if (address.empty()) {
    std::fprintf(out, "   RDMA: device %s found, but no IPv4 address on an RDMA interface\n", probe.devices.front().c_str());
  }

  initiator::ClientOptions copts;
  copts.host = sopts.listen_address;
  copts.port = server.port();
  copts.queues = 2;
  copts.queue_depth = 16;
  copts.client_name = "demo";
  auto client = initiator::Client::connect(copts);
  std::fprintf(out, "3. an initiator session: %u queues x depth %u over %s\n", client->queue_count(), client->queue_depth(0),
              client->transport(0).c_str());
  const proto::Opened opened = client->open("demo", false);

  initiator::CopyOptions o;
  Progress up_bar("   upload  ", !a.no_progress), down_bar("   download", !a.no_progress);
  o.progress = [&](std::uint64_t d, std::uint64_t t) { up_bar.update(d, t); };
  const int sfd = ::open(source.c_str(), O_RDONLY | O_CLOEXEC);
  const auto up = initiator::upload(*client, opened.handle(), size, sfd, o);
  ::close(sfd);
  up_bar.finish();
  o.progress = [&](std::uint64_t d, std::uint64_t t) { down_bar.update(d, t); };
  const int bfd = ::open(back.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  const auto down = initiator::download(*client, opened.handle(), size, bfd, true, o);
  ::close(bfd);
  down_bar.finish();
  std::fprintf(out, "4. wrote %s through the session in %.2fs (%.0f MiB/s), read it back in %.2fs (%.0f MiB/s)\n",
              human_bytes(up.bytes).c_str(), up.seconds, static_cast<double>(up.bytes) / (1 << 20) / up.seconds,
              down.seconds, static_cast<double>(down.bytes) / (1 << 20) / down.seconds);
  const std::string want = file_sha256(source, size), on_disk = file_sha256(image, size), got = file_sha256(back, size);
  const bool ok = want == on_disk && want == got;
  std::fprintf(out, "5. sha256 written   %s\n   sha256 on export %s\n   sha256 read back %s\n", want.c_str(), on_disk.c_str(),
              got.c_str());
  std::fprintf(out, "demo: %s over %s\n", ok ? "PASS, every byte matches" : "FAIL, the data differs", client->transport(0).c_str());
  if (a.json) {
    const auto leg = [](const initiator::CopyResult& r) {
      return Json{{"bytes", r.bytes}, {"seconds", r.seconds},
                  {"mib_per_second", r.seconds > 0 ? static_cast<double>(r.bytes) / (1 << 20) / r.seconds : 0.0}};
    };
    std::string rdma_not_used;
    if (probe.devices.empty()) rdma_not_used = probe.unavailable_reason;
    else if (address.empty()) rdma_not_used = "no IPv4 address on an RDMA interface";
    std::cout << json_document({{"result", ok ? "pass" : "fail"},
                                {"transport", client->transport(0)},
                                {"rdma_not_used", rdma_not_used.empty() ? Json(nullptr) : Json(rdma_not_used)},
                                {"size", size},
                                {"queues", client->queue_count()},
                                {"queue_depth", client->queue_depth(0)},
                                {"upload", leg(up)},
                                {"download", leg(down)},
                                {"sha256", {{"written", want}, {"export", on_disk}, {"read_back", got}}}});
  }
  return ok ? 0 : 1;
}

}  // namespace

void add_demo(CLI::App& app, const std::function<void(CLI::App*, Runner)>& on_run) {
  auto a = std::make_shared<DemoArgs>();
  auto* sub = app.add_subcommand(
      "demo",
      "Export a temporary image and use it from this host, end to end: serve it, connect a session\n"
      "(RDMA when this host has an RDMA device with an address, TCP otherwise, and it says why), write\n"
      "it through the session, read it back and compare SHA-256. Needs no hardware and no setup.");
  sub->add_option("--size", a->size, "image size: 256M, 1G (a plain number is MiB)")
      ->default_str("256M")
      ->transform(size_transform(1 << 20))
      ->check(CLI::Range(std::uint64_t{1} << 20, std::uint64_t{64} << 30));
  sub->add_flag("--json", a->json, "print the result as JSON (the steps go to stderr)");
  sub->add_option("--dir", a->dir, "where the temporary files go (default $TMPDIR or /tmp)");
  sub->add_flag("--no-progress", a->no_progress, "no progress bars (they are drawn only on a terminal)");
  on_run(sub, [a] { return run_demo(*a); });
}

}  // namespace ibdisk::cli
