// Runs in the Soft-RoCE guest (vm.setup): status and doctor on the real rxe0/rxe1 over
// veth0/veth1, and `setup apply soft-roce` creating a working rxe device on a new veth.
// Elsewhere each test skips with the reason.
#include <sys/mount.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "setup/doctor.h"
#include "setup/inventory.h"
#include "tests/setup/setup_env.h"

namespace ibdisk::setup {
namespace {

namespace fs = std::filesystem;
// Every command under a time limit, and logged, so a hang in the guest names its step.
testing::CommandResult run_command(const std::string& cmd) {
  std::fprintf(stderr, "guest_test: %s\n", cmd.c_str());
  return testing::run_command("timeout 120 bash -c " + [&] {
    std::string q = "'";
    for (char c : cmd) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
    return q + "'";
  }());
}

// Skips (never passes) where the guest's Soft-RoCE devices are not there.
#define REQUIRE_GUEST_RXE()                                                                           \
  do {                                                                                                \
    std::error_code ec_;                                                                              \
    if (!fs::exists("/sys/class/infiniband/rxe0", ec_) || ::getuid() != 0) {                          \
      GTEST_SKIP() << "no Soft-RoCE rxe0 (or not root): run inside tests/vm/run (ctest -R vm.setup)"; \
    }                                                                                                 \
  } while (0)

TEST(GuestStatus, SeesTheSoftRoceDevicesOnTheirVeths) {
  REQUIRE_GUEST_RXE();
  const auto inv = read_inventory(Root("/"));
  for (const auto& [dev, nd, addr] : {std::tuple{"rxe0", "veth0", "10.77.0.1/24"}, std::tuple{"rxe1", "veth1", "10.77.0.2/24"}}) {
    const auto* d = inv.device(dev);
    ASSERT_NE(d, nullptr) << dev;
    EXPECT_TRUE(d->soft_roce);
    EXPECT_EQ(d->parent, nd);
    EXPECT_FALSE(d->pci);
    ASSERT_EQ(d->ports.size(), 1u);
    EXPECT_EQ(d->ports[0].state, "ACTIVE");
    EXPECT_EQ(d->ports[0].phys_state, "LinkUp");
    EXPECT_EQ(d->ports[0].link_layer, "Ethernet");
    EXPECT_EQ(d->ports[0].netdev, nd);
    EXPECT_FALSE(d->ports[0].gids.empty());
    const auto* n = inv.netdev(nd);
    ASSERT_NE(n, nullptr);
    EXPECT_EQ(n->type, 1);
    EXPECT_EQ(n->kind, "veth");
    EXPECT_NE(std::find(n->addresses.begin(), n->addresses.end(), addr), n->addresses.end()) << nd;
  }
  EXPECT_TRUE(inv.module_loaded("rdma_rxe"));
  EXPECT_TRUE(inv.memlock_known);
  EXPECT_FALSE(inv.memlock_bytes) << "guest-setup raises memlock to unlimited";
  const auto r = run_command(std::string(IBDISK_BINARY) + " setup status --json");
  ASSERT_EQ(r.status, 0);
  const auto j = nlohmann::json::parse(r.output);
  EXPECT_EQ(j["rdma_devices"].size(), inv.devices.size());
}

// Both veths already carry RDMA, modules and memlock are right: nothing above a note.
TEST(GuestDoctor, HealthyExceptNotes) {
  REQUIRE_GUEST_RXE();
  const auto findings = diagnose(read_inventory(Root("/")), {});
  for (const auto& f : findings) {
    EXPECT_EQ(f.severity, Severity::kInfo) << f.id << ": " << f.subject << ": " << f.problem;
    EXPECT_NE(f.id, "soft-roce-available") << f.subject;
  }
  EXPECT_EQ(run_command(std::string(IBDISK_BINARY) + " setup doctor").status, 0);
}

// A root whose sys/ and proc/ are the live ones and whose etc/ is scratch: apply runs the
// real `rdma link add` but writes its unit files into the scratch tree.
class ScratchRoot {
 public:
  ScratchRoot() {
    char tmpl[] = "/run/ibdisk-setup-root.XXXXXX";
    dir_ = ::mkdtemp(tmpl);
    for (const char* d : {"sys", "proc", "etc"}) fs::create_directories(dir_ + "/" + d);
    ok_ = ::mount("/sys", (dir_ + "/sys").c_str(), nullptr, MS_BIND, nullptr) == 0 &&
          ::mount("/proc", (dir_ + "/proc").c_str(), nullptr, MS_BIND, nullptr) == 0;
  }
  ~ScratchRoot() {
    ::umount2((dir_ + "/proc").c_str(), MNT_DETACH);
    ::umount2((dir_ + "/sys").c_str(), MNT_DETACH);
    std::error_code ec;
    fs::remove_all(dir_ + "/etc", ec);
    fs::remove(dir_ + "/sys", ec);
    fs::remove(dir_ + "/proc", ec);
    fs::remove_all(dir_, ec);
  }
  bool ok() const { return ok_; }
  const std::string& dir() const { return dir_; }

 private:
  std::string dir_;
  bool ok_ = false;
};

TEST(GuestApply, SoftRoceCreatesAWorkingRxeDevice) {
  REQUIRE_GUEST_RXE();
  ScratchRoot root;
  ASSERT_TRUE(root.ok()) << "bind-mounting /sys and /proc into " << root.dir();
  ASSERT_EQ(run_command("ip link add veth8 type veth peer name veth9 && ip addr add 10.78.0.1/24 dev veth8 && "
                        "ip addr add 10.78.0.2/24 dev veth9 && ip link set veth8 up && ip link set veth9 up")
                .status,
            0);
  const std::string bin = IBDISK_BINARY;
  const std::string r = " --root " + root.dir();

  const auto before = run_command(bin + " setup doctor --json" + r);
  EXPECT_NE(before.output.find("\"soft-roce-available\""), std::string::npos) << before.output;
  EXPECT_NE(before.output.find("apply soft-roce --netdev veth8"), std::string::npos) << before.output;

  const auto apply = run_command(bin + " setup apply soft-roce --netdev veth8 --run-commands" + r);
  EXPECT_EQ(apply.status, 0) << apply.output;
  EXPECT_NE(apply.output.find("ran: rdma link add rxe_veth8 type rxe netdev veth8"), std::string::npos) << apply.output;
  EXPECT_TRUE(fs::exists(root.dir() + "/etc/systemd/system/ibdisk-rxe-veth8.service"));
  EXPECT_TRUE(fs::is_symlink(root.dir() + "/etc/systemd/system/multi-user.target.wants/ibdisk-rxe-veth8.service"));

  // The kernel's view: the device exists, is ACTIVE on veth8, and verbs lists it.
  bool active = false;
  for (int i = 0; i < 50 && !active; ++i) {
    active = run_command("rdma link show rxe_veth8/1").output.find("state ACTIVE") != std::string::npos;
    if (!active) ::usleep(100000);
  }
  const auto link = run_command("rdma link show rxe_veth8/1");
  EXPECT_TRUE(active) << link.output;
  EXPECT_NE(link.output.find("netdev veth8"), std::string::npos) << link.output;
  EXPECT_NE(run_command("ibv_devices").output.find("rxe_veth8"), std::string::npos);
  const auto inv = read_inventory(Root("/"));
  const auto [dev, port] = inv.port_of("veth8");
  ASSERT_NE(dev, nullptr);
  EXPECT_EQ(dev->name, "rxe_veth8");
  EXPECT_TRUE(dev->soft_roce);

  // Applied: plan has nothing left, doctor no longer offers Soft-RoCE for veth8.
  const auto plan = run_command(bin + " setup plan soft-roce --netdev veth8" + r);
  EXPECT_NE(plan.output.find("Nothing to do"), std::string::npos) << plan.output;
  EXPECT_EQ(run_command(bin + " setup doctor --json" + r).output.find("--netdev veth8"), std::string::npos);

  // Verbs and RDMA CM work on it: the self-test over the new device's address.
  // The server logs "listening" once its RDMA CM id is bound; the client starts after that.
  const auto st = run_command("L=$(mktemp); timeout 50 " + bin + " selftest --listen 10.78.0.1 --transport rdma "
                              "--port 7480 --clients 1 >$L 2>&1 & for i in $(seq 300); do grep -q listening $L && break; "
                              "sleep 0.1; done; timeout 40 " + bin + " selftest 10.78.0.1 --source 10.78.0.1 "
                              "--transport rdma --port 7480 --iterations 4 2>&1; rc=$?; wait; exit $rc");
  EXPECT_EQ(st.status, 0) << st.output;
  EXPECT_NE(st.output.find("rxe_veth8"), std::string::npos) << st.output;
  EXPECT_NE(st.output.find("selftest: PASS"), std::string::npos) << st.output;

  // Undo deletes the device and the files.
  const auto undo = run_command(bin + " setup undo --run-commands" + r);
  EXPECT_EQ(undo.status, 0) << undo.output;
  EXPECT_EQ(run_command("ibv_devices").output.find("rxe_veth8"), std::string::npos);
  EXPECT_FALSE(fs::exists(root.dir() + "/etc/systemd/system/ibdisk-rxe-veth8.service"));
  run_command("ip link del veth8");
}

}  // namespace
}  // namespace ibdisk::setup
