// What an operator touches first: exit codes, global options anywhere, help and version, the
// TOML config, option conflicts, key file and locked-memory errors, and every --json output
// as one valid document with a schema number.
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdlib>
#include <regex>

#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "common/checksum.h"
#include "tests/support/fixtures.h"
#include "tests/support/process.h"

namespace ibdisk {
namespace {

using testing::Child;
using testing::run;

const std::string kBin = IBDISK_BINARY;

testing::ProcessResult sh(const std::string& cmd) { return run({"/bin/sh", "-c", cmd}); }

// stdout alone (stderr dropped), parsed as JSON; fails the test when it is not JSON.
nlohmann::json json_of(const std::string& args) {
  const auto r = sh(kBin + " " + args + " 2>/dev/null");
  EXPECT_EQ(r.exit_code, 0) << args << "\n" << r.output;
  nlohmann::json j = nlohmann::json::parse(r.output, nullptr, false);
  EXPECT_FALSE(j.is_discarded()) << args << " printed no valid JSON:\n" << r.output;
  if (!j.is_discarded()) {
    EXPECT_EQ(j.value("schema", 0), 1) << args << "\n" << r.output;
  }
  return j;
}

bool has(const testing::ProcessResult& r, const std::string& text) { return r.output.find(text) != std::string::npos; }

// Usage errors exit 2, runtime errors 1, help and version 0: in every subcommand.
TEST(CliConventions, ExitCodes) {
  EXPECT_EQ(run({kBin, "--help"}).exit_code, 0);
  EXPECT_EQ(run({kBin, "--version"}).exit_code, 0);
  EXPECT_EQ(run({kBin}).exit_code, 2);
  EXPECT_EQ(run({kBin, "frobnicate"}).exit_code, 2);
  EXPECT_EQ(run({kBin, "ls"}).exit_code, 2);                              // missing positional
  EXPECT_EQ(run({kBin, "ls", "h", "--no-such-option"}).exit_code, 2);     // unknown option
  EXPECT_EQ(run({kBin, "copy", "a", "b", "--queues", "0"}).exit_code, 2);  // out of range
  EXPECT_EQ(run({kBin, "setup"}).exit_code, 2);                           // missing subcommand
  EXPECT_EQ(run({kBin, "copy", "/etc/hostname", "/tmp/x"}).exit_code, 2);  // two local sides
  EXPECT_EQ(run({kBin, "detach", "/dev/sda"}).exit_code, 2);
  // Runtime: nothing listens there.
  const auto refused = run({kBin, "ls", "127.0.0.1:1", "--timeout", "2"});
  EXPECT_EQ(refused.exit_code, 1) << refused.output;
  EXPECT_EQ(run({kBin, "serve", "--export", "x=/nonexistent/disk.img"}).exit_code, 1);
  EXPECT_EQ(run({kBin, "setup", "status", "--root", "/nonexistent"}).exit_code, 1);
}

// --log-level and --config go before or after the subcommand, at any depth.
TEST(CliConventions, GlobalOptionsAnywhere) {
  const auto after = run({kBin, "ls", "127.0.0.1:1", "--timeout", "1", "--log-level", "debug"});
  EXPECT_EQ(after.exit_code, 1) << after.output;  // parsed; only the connect failed
  EXPECT_FALSE(has(after, "not expected")) << after.output;
  EXPECT_EQ(run({kBin, "--log-level", "warn", "version"}).exit_code, 0);
  EXPECT_EQ(run({kBin, "setup", "status", "--root", "/", "--log-level", "error"}).exit_code, 0);
  EXPECT_EQ(run({kBin, "version", "--log-level", "loud"}).exit_code, 2);
}

// `ibdisk help X` is `ibdisk X --help`; `ibdisk help` lists every subcommand.
TEST(CliConventions, HelpSubcommand) {
  const auto help = run({kBin, "help", "serve"});
  EXPECT_EQ(help.exit_code, 0);
  EXPECT_EQ(help.output, run({kBin, "serve", "--help"}).output);
  EXPECT_TRUE(has(help, "--export")) << help.output;
  EXPECT_TRUE(has(help, "Exit status: 0 success, 1 runtime error, 2 usage error")) << help.output;
  const auto nested = run({kBin, "help", "setup", "doctor"});
  EXPECT_EQ(nested.exit_code, 0);
  EXPECT_TRUE(has(nested, "0 healthy, 1 warnings, 2 errors, 3 could not run")) << nested.output;
  const auto top = run({kBin, "help"});
  EXPECT_EQ(top.exit_code, 0);
  for (const char* s : {"serve", "attach", "setup", "version", "help", "completion"}) EXPECT_TRUE(has(top, s)) << s;
}

// `ibdisk version` names the libraries; --json carries them as an object.
TEST(CliConventions, Version) {
  const auto v = run({kBin, "version"});
  EXPECT_EQ(v.exit_code, 0);
  for (const char* lib : {"libibverbs", "librdmacm", "liburing", "openssl", "protobuf", "tomlplusplus"}) {
    EXPECT_TRUE(has(v, lib)) << v.output;
  }
  const auto j = json_of("version --json");
  EXPECT_TRUE(j["libraries"].contains("liburing")) << j.dump();
  EXPECT_TRUE(j["version"].is_string());
}

// The bash completion script is valid bash and knows the subcommands and their options.
TEST(CliConventions, BashCompletion) {
  const auto c = run({kBin, "completion", "bash"});
  EXPECT_EQ(c.exit_code, 0);
  EXPECT_TRUE(has(c, "complete -F _ibdisk ibdisk")) << c.output;
  EXPECT_TRUE(has(c, "--nbd-port")) << c.output;
  EXPECT_TRUE(has(c, "subs[\"ibdisk setup\"]=\"status doctor plan apply undo\"")) << c.output;
  EXPECT_EQ(sh(kBin + " completion bash | bash -n").exit_code, 0);
}

// Conflicting and unknown options are refused with a message naming them.
TEST(CliConventions, ConflictsRefused) {
  const auto opt = run({kBin, "serve", "--export", "x=/etc/hostname,foo"});
  EXPECT_EQ(opt.exit_code, 2);
  EXPECT_TRUE(has(opt, "unknown option 'foo'")) << opt.output;
  const auto port = run({kBin, "serve", "--export", "x=/etc/hostname", "--listen", "127.0.0.1:7000", "--port", "7001"});
  EXPECT_EQ(port.exit_code, 2);
  EXPECT_TRUE(has(port, "both give the port")) << port.output;
  const auto rdma = run({kBin, "serve", "--export", "x=/etc/hostname", "--no-rdma", "--rdma-port", "7001"});
  EXPECT_EQ(rdma.exit_code, 2);
  EXPECT_TRUE(has(rdma, "excludes")) << rdma.output;
  const auto selftest = run({kBin, "selftest", "--listen", "127.0.0.1", "otherhost"});
  EXPECT_EQ(selftest.exit_code, 2) << selftest.output;
  const auto mode = run({kBin, "bench", "--local", "/etc/hostname", "--transports", "tcp"});
  EXPECT_EQ(mode.exit_code, 2);
  EXPECT_TRUE(has(mode, "--transports is for the network mode")) << mode.output;
  // bench --repeat: 1 to 100 repetitions, and only over the network.
  for (const char* n : {"0", "101"}) {
    const auto repeat = run({kBin, "bench", "127.0.0.1:1/x", "--repeat", n});
    EXPECT_EQ(repeat.exit_code, 2) << n << ": " << repeat.output;
    EXPECT_TRUE(has(repeat, "--repeat")) << repeat.output;
  }
  const auto local_repeat = run({kBin, "bench", "--local", "/etc/hostname", "--repeat", "3"});
  EXPECT_EQ(local_repeat.exit_code, 2);
  EXPECT_TRUE(has(local_repeat, "--repeat is for the network mode")) << local_repeat.output;
  const auto both = run({kBin, "copy", "127.0.0.1:1/x", "-", "--verify"});
  EXPECT_EQ(both.exit_code, 2);
  EXPECT_TRUE(has(both, "--verify cannot read standard output")) << both.output;
}

// A missing key file: a target may make one, an initiator needs the target's. An unreadable
// one says so instead of "the key has 0 bytes".
TEST(CliConventions, KeyFileErrors) {
  testing::TempDir dir;
  const std::string missing = dir.file("nokey");
  const auto init = run({kBin, "ls", "127.0.0.1:1", "--key-file", missing});
  EXPECT_EQ(init.exit_code, 1);
  EXPECT_TRUE(has(init, "copy the target's key file here")) << init.output;
  EXPECT_FALSE(has(init, "keygen")) << init.output;
  const auto attach = run({kBin, "attach", "127.0.0.1:1/x", "--key-file", missing});
  EXPECT_TRUE(has(attach, "copy the target's key file here")) << attach.output;
  const auto target = run({kBin, "serve", "--export", "x=/etc/hostname", "--key-file", missing});
  EXPECT_EQ(target.exit_code, 1);
  EXPECT_TRUE(has(target, "ibdisk keygen " + missing)) << target.output;
  if (::geteuid() != 0 || ::access("/usr/bin/setpriv", X_OK) != 0) GTEST_SKIP() << "needs root and setpriv";
  const std::string key = dir.file("key");
  ASSERT_EQ(run({kBin, "keygen", key}).exit_code, 0);
  ::chmod(dir.path().c_str(), 0755);
  const auto unreadable =
      run({"/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", kBin, "ls", "127.0.0.1:1", "--key-file", key});
  EXPECT_EQ(unreadable.exit_code, 1) << unreadable.output;
  EXPECT_TRUE(has(unreadable, "Permission denied")) << unreadable.output;
  EXPECT_FALSE(has(unreadable, "0 bytes")) << unreadable.output;
}

// A user without CAP_IPC_LOCK is told the limit, the amount needed and what to lower.
TEST(CliConventions, LockedMemoryNamed) {
  if (::geteuid() != 0 || ::access("/usr/bin/setpriv", X_OK) != 0 || ::access("/usr/bin/prlimit", X_OK) != 0) {
    GTEST_SKIP() << "needs root, setpriv and prlimit to run serve as an unprivileged user";
  }
  const auto r = run({"/usr/bin/prlimit", "--memlock=8388608", "/usr/bin/setpriv", "--reuid=65534", "--regid=65534",
                      "--clear-groups", "--inh-caps=-all", kBin, "serve", "--export", "x=/etc/hostname", "--port", "0",
                      "--threads", "2", "--buffer-mib", "64"});
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_TRUE(has(r, "RLIMIT_MEMLOCK is 8192 KiB")) << r.output;
  EXPECT_TRUE(has(r, "--threads 2 x --buffer-mib 64")) << r.output;
  EXPECT_TRUE(has(r, "need 128 MiB")) << r.output;
  EXPECT_TRUE(has(r, "lower --buffer-mib or --threads")) << r.output;
}

// Config errors name the file and line, and the closest valid table or key.
TEST(CliConventions, TomlConfigErrors) {
  testing::TempDir dir;
  const auto write = [&](const std::string& name, const std::string& text) {
    std::ofstream(dir.file(name)) << text;
    return dir.file(name);
  };
  const auto table = run({kBin, "serve", "--config", write("a.toml", "[sevre]\nexport = [\"x=/etc/hostname\"]\n")});
  EXPECT_EQ(table.exit_code, 2);
  EXPECT_TRUE(has(table, dir.file("a.toml") + ":1: unknown table [sevre]; did you mean [serve]?")) << table.output;
  const auto key = run({kBin, "--config", write("b.toml", "# c\n[serve]\nexport = [\"x=/etc/hostname\"]\nthreds = 1\n"), "serve"});
  EXPECT_EQ(key.exit_code, 2);
  EXPECT_TRUE(has(key, "b.toml:4: unknown key 'threds' in [serve]; did you mean 'threads'?")) << key.output;
  const auto syntax = run({kBin, "serve", "--config", write("c.toml", "[serve]\nexport=a=/x,ro\n")});
  EXPECT_EQ(syntax.exit_code, 2);
  EXPECT_TRUE(has(syntax, "c.toml:2:")) << syntax.output;
  const auto nested = run({kBin, "setup", "doctor", "--config", write("d.toml", "[setup.doctr]\n")});
  EXPECT_TRUE(has(nested, "did you mean [setup.doctor]?")) << nested.output;
  const auto missing = run({kBin, "serve", "--config", dir.file("none.toml")});
  EXPECT_EQ(missing.exit_code, 2);
  EXPECT_TRUE(has(missing, "none.toml")) << missing.output;
}

// One target for the tests that need one: started by `serve --config F` (config after the
// subcommand), a multi-line array with a trailing comma, --nbd-port alone, and --name.
class CliTarget : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new testing::TempDir;
    testing::make_sparse_file(dir_->file("vm1.img"), 8 << 20);
    std::vector<std::byte> data(1 << 20);
    fill_pattern(data, 3);
    std::ofstream(dir_->file("small.img"), std::ios::binary)
        .write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size()));
    port_ = std::to_string(testing::free_port());
    nbd_port_ = std::to_string(testing::free_port());
    std::ofstream(dir_->file("t.toml")) << "[serve]\nexport = [\n  \"vm1=" << dir_->file("vm1.img") << "\",\n  \"small="
                                        << dir_->file("small.img") << ",ro\",\n]\nlisten = \"127.0.0.1:" << port_
                                        << "\"\nthreads = 1\nbuffer-mib = 16\nnbd-port = " << nbd_port_
                                        << "\nname = \"lab-target\"\n";
    target_ = new Child({kBin, "serve", "--config", dir_->file("t.toml")});
    ASSERT_TRUE(target_->wait_for_output("name lab-target", 20000)) << target_->wait(1000).output;
  }
  static void TearDownTestSuite() {
    delete target_;
    delete dir_;
  }
  static std::string host() { return "127.0.0.1:" + port_; }

  static testing::TempDir* dir_;
  static std::string port_, nbd_port_;
  static Child* target_;
};
testing::TempDir* CliTarget::dir_ = nullptr;
std::string CliTarget::port_, CliTarget::nbd_port_;
Child* CliTarget::target_ = nullptr;

// --nbd-port without --nbd starts the NBD front end (docs/nbd.md's first example).
TEST_F(CliTarget, NbdPortImpliesNbd) {
  EXPECT_TRUE(target_->wait_for_output("NBD front end on port " + nbd_port_, 1000)) << target_->output();
}

// ls, info and stats --json: one document each, structured objects, the same export fields.
TEST_F(CliTarget, JsonOutputs) {
  const auto ls = json_of("ls " + host() + " --json");
  ASSERT_EQ(ls["exports"].size(), 2u) << ls.dump();
  EXPECT_EQ(ls["target"]["port"].get<int>(), std::stoi(port_));
  const auto info = json_of("info " + host() + "/small --json");
  nlohmann::json from_ls;
  for (const auto& e : ls["exports"]) {
    if (e["name"] == "small") from_ls = e;
  }
  for (const auto& [k, v] : from_ls.items()) EXPECT_TRUE(info["export"].contains(k)) << k;
  EXPECT_EQ(info["export"]["read_only"], true);
  EXPECT_EQ(info["transport"], "tcp");
  const auto stats = json_of("stats " + host() + " --json");
  ASSERT_TRUE(stats["sessions"].is_array());
  EXPECT_TRUE(stats.contains("uptime_seconds"));
}

// copy --json, to a name that is not UTF-8: still valid JSON; and to standard output.
TEST_F(CliTarget, CopyJsonStdoutAndPaths) {
  const std::string bad_name = dir_->file("caf\xe9.img");
  const auto j = json_of("copy " + host() + "/small '" + bad_name + "' --json");
  EXPECT_EQ(j["bytes"].get<std::uint64_t>(), 1u << 20);
  EXPECT_EQ(j["direction"], "download");
  EXPECT_EQ(j["verify"], nullptr);
  // Standard output carries the bytes, the summary goes to stderr.
  const auto out = sh(kBin + " copy " + host() + "/small - 2>/dev/null | sha256sum");
  const auto file = sh("sha256sum < " + dir_->file("small.img"));
  EXPECT_EQ(out.output, file.output);
  // A relative path whose first folder exists is local, even though it looks like HOST/NAME.
  ASSERT_EQ(::mkdir((dir_->path() / "backups").c_str(), 0755), 0);
  const auto rel = sh("cd " + dir_->path().string() + " && " + kBin + " copy " + host() +
                      "/small backups/small.img --verify --block-size 64K");
  EXPECT_EQ(rel.exit_code, 0) << rel.output;
  EXPECT_TRUE(has(rel, "match")) << rel.output;
  // No progress bar is drawn into a pipe.
  EXPECT_FALSE(has(rel, "[#")) << rel.output;
  const auto suffix = run({kBin, "copy", host() + "/small", "/dev/null", "--block-size", "3X"});
  EXPECT_EQ(suffix.exit_code, 2);
}

// On a host without RDMA the "RDMA not used" warning comes once, not on every command.
TEST_F(CliTarget, RdmaNotUsedSaidOnce) {
  if (std::filesystem::exists("/sys/class/infiniband")) GTEST_SKIP() << "this host has RDMA devices";
  testing::TempDir runtime;
  const std::string env = "XDG_RUNTIME_DIR=" + runtime.path().string() + " ";
  const auto first = sh(env + kBin + " ls " + host());
  EXPECT_EQ(first.exit_code, 0) << first.output;
  EXPECT_TRUE(has(first, "RDMA not used")) << first.output;
  const auto second = sh(env + kBin + " ls " + host());
  EXPECT_EQ(second.exit_code, 0) << second.output;
  EXPECT_FALSE(has(second, "RDMA not used")) << second.output;
}

// ibdisk://HOST works for ls and stats as it does for info.
TEST_F(CliTarget, SchemeForHosts) {
  const auto ls = run({kBin, "ls", "ibdisk://" + host()});
  EXPECT_EQ(ls.exit_code, 0) << ls.output;
  EXPECT_TRUE(has(ls, "small")) << ls.output;
  EXPECT_EQ(run({kBin, "stats", "ibdisk://" + host() + "/"}).exit_code, 0);
}

// An IPv6 target prints as [addr]:port, the form the commands take back.
TEST(CliConventions, Ipv6Brackets) {
  testing::TempDir dir;
  testing::make_sparse_file(dir.file("d.img"), 1 << 20);
  const std::string port = std::to_string(testing::free_port());
  Child target({kBin, "serve", "--export", "d=" + dir.file("d.img"), "--listen", "[::1]:" + port, "--threads", "1",
                "--buffer-mib", "16"});
  if (!target.wait_for_output("listening", 20000)) GTEST_SKIP() << "no IPv6 loopback here: " << target.wait(1000).output;
  const auto ls = run({kBin, "ls", "[::1]:" + port});
  EXPECT_EQ(ls.exit_code, 0) << ls.output;
  EXPECT_TRUE(has(ls, "target [::1]:" + port)) << ls.output;
}

// --json on setup plan, selftest and demo.
TEST(CliConventions, JsonOnEveryReport) {
  const auto plan = json_of("setup plan soft-roce --netdev enp3s0 --root " IBDISK_SOURCE_DIR "/tests/fixtures/sysfs/soft-roce --json");
  EXPECT_TRUE(plan["files"].is_array()) << plan.dump();
  const auto st = json_of("selftest --transport tcp --iterations 2 --size 65536 --json");
  EXPECT_EQ(st["result"], "pass") << st.dump();
  EXPECT_EQ(st["transport"], "tcp");
  const auto demo = json_of("demo --size 4M --no-progress --json");
  EXPECT_EQ(demo["result"], "pass") << demo.dump();
  EXPECT_EQ(demo["size"].get<std::uint64_t>(), 4u << 20);
  const auto doctor = sh(kBin + " setup doctor --root " IBDISK_SOURCE_DIR "/tests/fixtures/sysfs/cx3-eth --json 2>/dev/null");
  const auto dj = nlohmann::json::parse(doctor.output, nullptr, false);
  ASSERT_FALSE(dj.is_discarded()) << doctor.output;
  EXPECT_EQ(dj["exit_status"].get<int>(), doctor.exit_code);
}

// serve tells systemd (Type=notify) READY=1 once it listens, and STOPPING=1 on SIGTERM.
TEST(CliConventions, ServeNotifiesSystemd) {
  testing::TempDir dir;
  testing::make_sparse_file(dir.file("d.img"), 1 << 20);
  const int fd = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  ASSERT_GE(fd, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  const std::string path = dir.file("notify");
  std::snprintf(addr.sun_path, sizeof addr.sun_path, "%s", path.c_str());
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  const auto receive = [fd](int timeout_ms) {
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, timeout_ms) != 1) return std::string();
    char buf[512] = {};
    const ssize_t n = ::recv(fd, buf, sizeof buf - 1, 0);
    return n > 0 ? std::string(buf, static_cast<std::size_t>(n)) : std::string();
  };
  const std::string port = std::to_string(testing::free_port());
  ::setenv("NOTIFY_SOCKET", path.c_str(), 1);
  Child target({kBin, "serve", "--export", "d=" + dir.file("d.img"), "--listen", "127.0.0.1:" + port, "--threads", "1",
                "--buffer-mib", "16"});
  ::unsetenv("NOTIFY_SOCKET");
  const std::string ready = receive(20000);
  EXPECT_NE(ready.find("READY=1"), std::string::npos) << ready;
  EXPECT_NE(ready.find("STATUS=listening on 127.0.0.1:" + port), std::string::npos) << ready;
  // It really listens by then.
  EXPECT_EQ(run({kBin, "ls", "127.0.0.1:" + port}).exit_code, 0);
  ::kill(target.pid(), SIGTERM);
  EXPECT_NE(receive(20000).find("STOPPING=1"), std::string::npos);
  EXPECT_EQ(target.wait(20000).exit_code, 0);
  ::close(fd);
}

// The unit templates rate at most MEDIUM (6.9) in `systemd-analyze security`.
TEST(CliConventions, SystemdUnitsHardened) {
  if (::access("/usr/bin/systemd-analyze", X_OK) != 0) GTEST_SKIP() << "systemd-analyze is not installed";
  for (const char* unit : {"ibdisk-serve@.service", "ibdisk-attach@.service"}) {
    const std::string file = std::string(IBDISK_BUILD_DIR) + "/setup/systemd/" + unit;
    const auto r = run({"/usr/bin/systemd-analyze", "security", "--offline=true", "--no-pager", file});
    std::smatch m;
    ASSERT_TRUE(std::regex_search(r.output, m, std::regex("Overall exposure level for [^:]*: ([0-9.]+) ([A-Z]+)"))) << r.output;
    EXPECT_LE(std::stod(m[1]), 6.9) << unit << ": " << m[0];
  }
}

// A kernel without an RDMA core is named as such, not as a host without an RDMA device.
TEST(CliConventions, DoctorOnKernelWithoutRdma) {
  testing::TempDir dir;
  std::filesystem::create_directories(dir.path() / "proc/sys/kernel");
  std::filesystem::create_directories(dir.path() / "sys/class/net");
  std::ofstream(dir.file("proc/sys/kernel/osrelease")) << "6.1.0-test\n";
  std::ofstream(dir.file("proc/modules")) << "";
  const auto r = run({kBin, "setup", "doctor", "--root", dir.path().string()});
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(has(r, "this kernel has no RDMA support")) << r.output;
  // With the modules on disk it is only "no device".
  std::filesystem::create_directories(dir.path() / "lib/modules/6.1.0-test/kernel/drivers/infiniband");
  const auto mods = run({kBin, "setup", "doctor", "--root", dir.path().string()});
  EXPECT_FALSE(has(mods, "this kernel has no RDMA support")) << mods.output;
}

}  // namespace
}  // namespace ibdisk
