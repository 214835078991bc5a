// What `ibdisk attach` does without a kernel NBD device: device names, state files for
// `ibdisk list` and `detach`, and the errors the CLI gives on a host without the nbd module.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include "initiator/attach.h"
#include "initiator/nbd_netlink.h"

namespace ibdisk::initiator {
namespace {

struct Run {
  int status = -1;
  std::string out;
};

Run run(const std::string& args) {
  Run r;
  FILE* p = ::popen((std::string(IBDISK_BINARY) + " " + args + " 2>&1").c_str(), "r");
  if (!p) return r;
  std::array<char, 4096> buf{};
  while (std::fgets(buf.data(), buf.size(), p)) r.out += buf.data();
  const int st = ::pclose(p);
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return r;
}

std::filesystem::path temp_dir() {
  auto d = std::filesystem::temp_directory_path() / ("ibdisk-attach-test-" + std::to_string(::getpid()));
  std::filesystem::remove_all(d);
  std::filesystem::create_directories(d);
  return d;
}

void write_state(const std::filesystem::path& dir, int index, int pid, const std::string& state) {
  std::ofstream(dir / ("nbd" + std::to_string(index) + ".json"))
      << "{\"device\": \"/dev/nbd" << index << "\", \"index\": " << index
      << ", \"target\": \"10.30.0.1:7420\", \"export\": \"vm1\", \"transport\": \"rdma\", \"kernel\": \"netlink\", "
         "\"queues\": 2, \"size\": 1048576, \"read_only\": false, \"pid\": "
      << pid << ", \"state\": \"" << state
      << "\", \"since\": \"2026-11-23T14:00:00Z\", \"reconnects\": 3, \"takeovers\": 1, \"sockets_renewed\": 4, "
         "\"last_error\": \"the target closed the connection\"}\n";
}

// Device names: /dev/nbdN, nbdN and N; anything else is refused.
TEST(AttachNames, ParsesNbdDeviceNames) {
  EXPECT_EQ(parse_nbd_device("/dev/nbd0"), 0);
  EXPECT_EQ(parse_nbd_device("nbd12"), 12);
  EXPECT_EQ(parse_nbd_device("3"), 3);
  EXPECT_EQ(parse_nbd_device("/dev/sda"), -1);
  EXPECT_EQ(parse_nbd_device("/dev/nbd"), -1);
  EXPECT_EQ(parse_nbd_device("nbd1p1"), -1);
  EXPECT_EQ(parse_nbd_device(""), -1);
}

// State files: read back field by field; a live pid is alive, a gone one is not; junk is skipped.
TEST(AttachState, ListsStateFilesAndTellsLiveFromDead) {
  const auto dir = temp_dir();
  write_state(dir, 1, ::getpid(), "reconnecting");
  write_state(dir, 0, 999999999, "connected");
  std::ofstream(dir / "nbd5.json") << "not json";
  std::ofstream(dir / "other.txt") << "{}";
  const auto all = list_attachments(dir.string());
  ASSERT_EQ(all.size(), 2u);
  EXPECT_EQ(all[0].device, "/dev/nbd0");
  EXPECT_FALSE(all[0].alive);
  EXPECT_EQ(all[1].device, "/dev/nbd1");
  EXPECT_TRUE(all[1].alive);
  EXPECT_EQ(all[1].state, "reconnecting");
  EXPECT_EQ(all[1].target, "10.30.0.1:7420");
  EXPECT_EQ(all[1].export_name, "vm1");
  EXPECT_EQ(all[1].transport, "rdma");
  EXPECT_EQ(all[1].queues, 2u);
  EXPECT_EQ(all[1].size, 1048576u);
  EXPECT_EQ(all[1].reconnects, 3u);
  EXPECT_EQ(all[1].takeovers, 1u);
  EXPECT_EQ(all[1].sockets_renewed, 4u);
  EXPECT_EQ(all[1].last_error, "the target closed the connection");
  // Not connected in the kernel (no such device here): a dead process's device is dead, not
  // recovering (that needs /sys/block/nbdN/pid, which vm.attach checks).
  EXPECT_EQ(all[0].state, "connected");
  EXPECT_EQ(state_file_for(dir.string(), 1), (dir / "nbd1.json").string());
  std::filesystem::remove_all(dir);
}

// `ibdisk list` prints the table and JSON from the state files; a dead process shows as such.
TEST(AttachCli, ListShowsStateFiles) {
  const auto dir = temp_dir();
  auto r = run("list --state-dir " + dir.string());
  EXPECT_EQ(r.status, 0) << r.out;
  EXPECT_NE(r.out.find("no attached devices"), std::string::npos) << r.out;
  write_state(dir, 2, 999999999, "connected");
  r = run("list --state-dir " + dir.string());
  EXPECT_EQ(r.status, 0) << r.out;
  EXPECT_NE(r.out.find("/dev/nbd2"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("dead (process gone)"), std::string::npos) << r.out;
  r = run("list --json --state-dir " + dir.string());
  EXPECT_NE(r.out.find("\"device\": \"/dev/nbd2\""), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("\"state\": \"dead\""), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("\"takeovers\": 1"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("\"sockets_renewed\": 4"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("\"last_error\": \"the target closed the connection\""), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("\"alive\": false"), std::string::npos) << r.out;
  // detach of a device whose process is gone removes the stale file.
  r = run("detach /dev/nbd2 --state-dir " + dir.string());
  EXPECT_EQ(r.status, 0) << r.out;
  EXPECT_FALSE(std::filesystem::exists(dir / "nbd2.json"));
  std::filesystem::remove_all(dir);
}

// Errors name the thing and the fix.
TEST(AttachCli, ErrorsNameTheFix) {
  auto r = run("detach /dev/sda");
  EXPECT_EQ(r.status, 2);
  EXPECT_NE(r.out.find("is not an NBD device"), std::string::npos) << r.out;
  r = run("attach no-export-here");
  EXPECT_EQ(r.status, 2);
  EXPECT_NE(r.out.find("expected HOST[:PORT]/EXPORT"), std::string::npos) << r.out;
  r = run("attach 127.0.0.1/x --reconnect-timeout soon");
  EXPECT_EQ(r.status, 2);
  EXPECT_NE(r.out.find("'forever'"), std::string::npos) << r.out;
}

// Without the nbd module attach says so (and how to load it) before touching the network.
TEST(AttachCli, MissingNbdModuleIsExplained) {
  if (nbd_module_loaded()) GTEST_SKIP() << "this kernel has the nbd module loaded; the guest test (vm.attach) covers attach";
  const auto r = run("attach 127.0.0.1:1/disk --state-dir /nonexistent");
  EXPECT_EQ(r.status, 1);  // a runtime error, not a usage error
  EXPECT_NE(r.out.find("the nbd module is not loaded"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("modprobe nbd"), std::string::npos) << r.out;
}

}  // namespace
}  // namespace ibdisk::initiator
