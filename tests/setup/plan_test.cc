// plan, apply and undo over copies of the fixture trees in temporary roots: golden plans,
// idempotence (apply, then plan shows nothing), byte-for-byte undo, and input errors.
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>

#include <gtest/gtest.h>

#include "common/error.h"
#include "setup/diff.h"
#include "setup/doctor.h"
#include "setup/inventory.h"
#include "setup/mstconfig.h"
#include "setup/plan.h"
#include "tests/setup/setup_env.h"

namespace ibdisk::setup {
namespace {

namespace fs = std::filesystem;
using ibdisk::testing::expect_golden;
using ibdisk::testing::fixture;
using ibdisk::testing::run_command;
using ibdisk::testing::slurp;
using ibdisk::testing::source_path;

// A copy of a fixture tree in a fresh temporary directory, removed at the end.
class TempRoot {
 public:
  explicit TempRoot(const std::string& fixture_name) {
    char tmpl[] = "/tmp/ibdisk-setup-test.XXXXXX";
    dir_ = ::mkdtemp(tmpl);
    fs::copy(fixture(fixture_name), dir_, fs::copy_options::recursive | fs::copy_options::copy_symlinks);
  }
  ~TempRoot() {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  const std::string& dir() const { return dir_; }

 private:
  std::string dir_;
};

// Every entry of a tree: type, mode, and content or link target.
std::map<std::string, std::string> snapshot(const std::string& dir) {
  std::map<std::string, std::string> out;
  for (auto it = fs::recursive_directory_iterator(dir); it != fs::recursive_directory_iterator(); ++it) {
    const auto rel = fs::relative(it->path(), dir).string();
    struct stat st{};
    ::lstat(it->path().c_str(), &st);
    std::string v = std::to_string(st.st_mode) + ":";
    if (it->is_symlink()) {
      v += "->" + fs::read_symlink(it->path()).string();
      it.disable_recursion_pending();
    } else if (it->is_regular_file()) {
      v += slurp(it->path().string());
    }
    out[rel] = v;
  }
  return out;
}

Plan plan_for(const std::string& root_dir, PlanOptions opts) {
  const Root root(root_dir);
  return make_plan(root, read_inventory(root), opts);
}

PlanOptions opts(std::vector<std::string> components) {
  PlanOptions o;
  o.components = std::move(components);
  return o;
}

struct GoldenCase {
  const char* name;
  const char* fixture;
  std::function<PlanOptions()> options;
};

const GoldenCase kCases[] = {
    {"ipoib-datagram.plan-ifupdown", "ipoib-datagram",
     [] { auto o = opts({"ipoib", "sysctl", "modules"}); o.iface = "ib0"; return o; }},
    {"ipoib-datagram.plan-networkd", "ipoib-datagram",
     [] { auto o = opts({"ipoib"}); o.iface = "ib0"; o.network = NetworkSystem::kNetworkd; return o; }},
    {"ipoib-datagram.plan-networkmanager", "ipoib-datagram",
     [] { auto o = opts({"ipoib"}); o.iface = "ib0"; o.address = "10.30.0.5/24"; o.network = NetworkSystem::kNetworkManager; return o; }},
    {"cx3-ib-init-nosm.plan-sm", "cx3-ib-init-nosm", [] { return opts({"sm", "modules", "memlock"}); }},
    {"cx3-ib-active.plan-all", "cx3-ib-active",
     [] { auto o = opts({"modules", "sm", "ipoib", "sysctl", "memlock"}); o.iface = "ib0"; return o; }},
    {"soft-roce.plan-soft-roce", "soft-roce", [] { auto o = opts({"soft-roce"}); o.netdev = "enp3s0"; return o; }},
    {"cx3-eth.plan-port-type", "cx3-eth",
     [] {
       auto o = opts({"port-type"});
       o.device = "0000:05:00.0";
       o.port = 2;
       o.link_type = "eth";
       o.mst = parse_mstconfig_query(slurp(source_path("tests/fixtures/mstconfig/connectx3-query.txt")));
       return o;
     }},
    {"cx3-eth.plan-names-bond", "cx3-eth",
     [] {
       auto o = opts({"names", "bond"});
       o.renames = {"ens5=eth40a", "ens5d1=eth40b"};
       o.bond_mode = "active-backup";
       o.slaves = {"ens5", "ens5d1"};
       o.address = "10.30.0.2/24";
       return o;
     }},
    {"cx3-eth.plan-bond-networkd", "cx3-eth",
     [] {
       auto o = opts({"bond"});
       o.bond_mode = "balance-rr";
       o.slaves = {"ens5", "ens5d1"};
       o.address = "10.30.0.2/24";
       o.network = NetworkSystem::kNetworkd;
       return o;
     }},
};

class PlanGolden : public ::testing::TestWithParam<GoldenCase> {};

TEST_P(PlanGolden, MatchesAndChangesNothing) {
  const auto& c = GetParam();
  const auto before = snapshot(fixture(c.fixture));
  const Root root(fixture(c.fixture));
  const auto plan = plan_for(fixture(c.fixture), c.options());
  EXPECT_FALSE(plan.empty());
  expect_golden(std::string(c.name) + ".txt", format_plan(root, plan));
  EXPECT_EQ(snapshot(fixture(c.fixture)), before) << "plan must not change the tree";
}

// Apply, plan again (nothing but what only commands can do), apply again (no new journal),
// undo: the tree is back byte for byte, modes and symlinks included.
TEST_P(PlanGolden, ApplyIsIdempotentAndUndoRestores) {
  const auto& c = GetParam();
  TempRoot tmp(c.fixture);
  const auto before = snapshot(tmp.dir());
  const Root root(tmp.dir());
  const auto plan = plan_for(tmp.dir(), c.options());
  const auto r = apply_plan(root, plan, /*run_commands=*/false);
  ASSERT_TRUE(r.ok);
  if (!plan.files.empty() || !plan.writes.empty()) {
    EXPECT_NE(snapshot(tmp.dir()), before);
  }
  const auto again = plan_for(tmp.dir(), c.options());
  EXPECT_TRUE(again.files.empty()) << format_plan(root, again);
  EXPECT_TRUE(again.writes.empty()) << format_plan(root, again);
  // Commands a temporary root cannot carry out (package installs, rdma link add, mstconfig)
  // stay planned; nothing else does.
  for (const auto& cmd : again.commands) {
    EXPECT_TRUE(std::find_if(plan.commands.begin(), plan.commands.end(),
                             [&](const Command& x) { return x.argv == cmd.argv; }) != plan.commands.end())
        << shell_join(cmd.argv);
  }
  if (again.commands.empty()) {
    EXPECT_TRUE(again.empty());
    const auto second = apply_plan(root, again, false);
    EXPECT_TRUE(second.journal.empty()) << "a second apply with nothing to do must not write a journal";
  }
  const auto u = undo_last(root, false, false);
  EXPECT_TRUE(u.ok);
  EXPECT_EQ(snapshot(tmp.dir()), before);
}

INSTANTIATE_TEST_SUITE_P(Cases, PlanGolden, ::testing::ValuesIn(kCases), [](const auto& info) {
  std::string n = info.param.name;
  for (auto& ch : n) ch = std::isalnum(static_cast<unsigned char>(ch)) ? ch : '_';
  return n;
});

// The acceptance case through the CLI: apply, plan shows "Nothing to do", undo restores.
TEST(ApplyCli, ApplyThenPlanShowsNothingThenUndo) {
  TempRoot tmp("ipoib-datagram");
  const auto before = snapshot(tmp.dir());
  const std::string bin = IBDISK_BINARY;
  const std::string args = " ipoib sysctl modules memlock names --iface ib0 --rename eno1=lan0 --root " + tmp.dir();
  ASSERT_EQ(run_command(bin + " setup apply" + args).status, 0);
  EXPECT_EQ(slurp(tmp.dir() + "/sys/class/net/ib0/mode"), "connected\n");
  EXPECT_EQ(slurp(tmp.dir() + "/sys/class/net/ib0/mtu"), "65520\n");
  const auto plan = run_command(bin + " setup plan" + args);
  EXPECT_EQ(plan.status, 0);
  EXPECT_NE(plan.output.find("Nothing to do"), std::string::npos) << plan.output;
  const auto second = run_command(bin + " setup apply" + args);
  EXPECT_NE(second.output.find("nothing to do"), std::string::npos) << second.output;
  EXPECT_EQ(run_command(bin + " setup undo --root " + tmp.dir()).status, 0);
  EXPECT_EQ(snapshot(tmp.dir()), before);
  const auto none = run_command(bin + " setup undo --root " + tmp.dir());
  EXPECT_NE(none.output.find("nothing to undo"), std::string::npos);
}

// Two applies, undone newest first; --all empties the journal.
TEST(ApplyUndo, StackedAppliesUndoInOrder) {
  TempRoot tmp("ipoib-datagram");
  const Root root(tmp.dir());
  const auto s0 = snapshot(tmp.dir());
  ASSERT_TRUE(apply_plan(root, plan_for(tmp.dir(), opts({"sysctl"})), false).ok);
  const auto s1 = snapshot(tmp.dir());
  auto o = opts({"ipoib", "modules"});
  o.iface = "ib0";
  o.address = "10.30.0.9/24";
  ASSERT_TRUE(apply_plan(root, plan_for(tmp.dir(), o), false).ok);
  EXPECT_NE(slurp(tmp.dir() + "/etc/network/interfaces.d/ibdisk-ib0").find("10.30.0.9/24"), std::string::npos);
  undo_last(root, false, false);
  EXPECT_EQ(snapshot(tmp.dir()), s1);
  ASSERT_TRUE(apply_plan(root, plan_for(tmp.dir(), o), false).ok);
  undo_last(root, false, /*all=*/true);
  EXPECT_EQ(snapshot(tmp.dir()), s0);
}

// An existing modules-load file keeps its entries; apply adds to it.
TEST(ApplyUndo, ModulesFileIsMerged) {
  TempRoot tmp("soft-roce");
  fs::create_directories(tmp.dir() + "/etc/modules-load.d");
  { std::ofstream(tmp.dir() + "/etc/modules-load.d/ibdisk.conf") << "bonding\n"; }
  const Root root(tmp.dir());
  auto o = opts({"soft-roce"});
  o.netdev = "enp3s0";
  ASSERT_TRUE(apply_plan(root, plan_for(tmp.dir(), o), false).ok);
  const auto text = slurp(tmp.dir() + "/etc/modules-load.d/ibdisk.conf");
  EXPECT_NE(text.find("bonding\n"), std::string::npos);
  EXPECT_NE(text.find("rdma_rxe\n"), std::string::npos);
  undo_last(root, false, false);
  EXPECT_EQ(slurp(tmp.dir() + "/etc/modules-load.d/ibdisk.conf"), "bonding\n");
}

TEST(PlanErrors, NameTheThingAndTheFix) {
  const auto expect_error = [](const std::string& fx, PlanOptions o, const std::string& needle) {
    try {
      plan_for(fixture(fx), o);
      ADD_FAILURE() << "no error for " << needle;
    } catch (const SystemError& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
      EXPECT_FALSE(e.hint().empty()) << e.what();
    }
  };
  auto o = opts({"ipoib"});
  o.iface = "eno1";
  expect_error("ipoib-datagram", o, "not an IPoIB interface");
  o.iface = "ib0";
  o.address = "10.30.0.300/24";
  expect_error("ipoib-datagram", o, "not an IPv4 address");
  o = opts({"ipoib"});
  o.iface = "ib0";
  expect_error("cx3-ib-init-nosm", o, "no IPv4 address");
  o = opts({"soft-roce"});
  o.netdev = "ens5";
  expect_error("cx3-eth", o, "already has RDMA");
  o = opts({"port-type"});
  o.device = "0000:05:00.0";
  o.port = 1;
  o.link_type = "ib";
  expect_error("cx3-eth", o, "mstconfig query");
  o.mst = parse_mstconfig_query(slurp(source_path("tests/fixtures/mstconfig/connectx3-query.txt")));
  o.device = "0000:06:00.0";
  expect_error("cx3-eth", o, "0000:05:00.0");
  o = opts({"bond"});
  o.bond_mode = "balance-rr";
  o.slaves = {"ib0", "eno1"};
  o.address = "10.30.0.1/24";
  expect_error("cx3-ib-active", o, "active-backup");
  expect_error("cx3-eth", opts({"sm"}), "no InfiniBand port");
  expect_error("cx3-eth", opts({"frobnicate"}), "unknown");
}

// The port type already matches: nothing to do, no reboot note.
TEST(PlanPortType, NothingWhenFirmwareMatches) {
  auto o = opts({"port-type"});
  o.device = "0000:05:00.0";
  o.port = 1;
  o.link_type = "eth";
  o.mst = parse_mstconfig_query(slurp(source_path("tests/fixtures/mstconfig/connectx3-query.txt")));
  const auto plan = plan_for(fixture("cx3-eth"), o);
  EXPECT_TRUE(plan.empty());
  o.link_type = "ib";
  const auto p2 = plan_for(fixture("cx3-eth"), o);
  ASSERT_EQ(p2.commands.size(), 1u);
  EXPECT_EQ(shell_join(p2.commands[0].argv), "mstconfig -y -d 0000:05:00.0 set LINK_TYPE_P1=1");
  EXPECT_EQ(shell_join(p2.commands[0].undo), "mstconfig -y -d 0000:05:00.0 set LINK_TYPE_P1=2");
}

TEST(Diff, UnifiedFormat) {
  EXPECT_EQ(unified_diff("a\n", "a\n", "x", "y"), "");
  EXPECT_EQ(unified_diff("", "a\nb\n", "/dev/null", "b/f"), "--- /dev/null\n+++ b/f\n@@ -0,0 +1,2 @@\n+a\n+b\n");
  EXPECT_EQ(unified_diff("1\n2\n3\n4\n5\n6\n7\n8\n9\n", "1\n2\n3\n4\nX\n6\n7\n8\n9\n", "a/f", "b/f"),
            "--- a/f\n+++ b/f\n@@ -2,7 +2,7 @@\n 2\n 3\n 4\n-5\n+X\n 6\n 7\n 8\n");
  EXPECT_EQ(unified_diff("a", "a\n", "a/f", "b/f"), "--- a/f\n+++ b/f\n@@ -1 +1 @@\n-a\n\\ No newline at end of file\n+a\n");
}

TEST(ShellJoin, QuotesWhatTheShellWouldSplit) {
  EXPECT_EQ(shell_join({"ip", "address", "add", "10.0.0.1/24"}), "ip address add 10.0.0.1/24");
  EXPECT_EQ(shell_join({"sh", "-c", "a b'c"}), "sh -c 'a b'\\''c'");
}

}  // namespace
}  // namespace ibdisk::setup

namespace ibdisk::setup {
namespace {

// A narrow slot is reported even before any port is ACTIVE (no ceiling to compute yet).
TEST(DoctorPcie, SlotLimitedWithoutAnActivePort) {
  TempRoot tmp("cx3-pcie2-x4");
  { std::ofstream(tmp.dir() + "/sys/class/infiniband/mlx4_0/ports/1/state") << "1: DOWN\n"; }
  { std::ofstream(tmp.dir() + "/sys/class/infiniband/mlx4_0/ports/1/phys_state") << "2: Polling\n"; }
  const auto inv = read_inventory(Root(tmp.dir()));
  EXPECT_TRUE(ceilings(inv).empty());
  const auto findings = diagnose(inv, {});
  const auto it = std::find_if(findings.begin(), findings.end(), [](const Finding& f) { return f.id == "pcie-slot-limited"; });
  ASSERT_NE(it, findings.end());
  EXPECT_EQ(it->severity, Severity::kWarning);
  EXPECT_NE(it->problem.find("PCIe 2.0 x4"), std::string::npos) << it->problem;
  EXPECT_NE(it->problem.find("16.0 Gb/s"), std::string::npos) << it->problem;
}

}  // namespace
}  // namespace ibdisk::setup
