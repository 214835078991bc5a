// Golden output of `ibdisk setup status` and `doctor` for every fixture tree, and the CLI's
// exit statuses (0 healthy, 1 warnings, 2 errors).
#include <gtest/gtest.h>

#include "setup/doctor.h"
#include "setup/inventory.h"
#include "setup/mstconfig.h"
#include "setup/report.h"
#include "tests/setup/setup_env.h"

namespace ibdisk::setup {
namespace {

using ibdisk::testing::expect_golden;
using ibdisk::testing::fixture;
using ibdisk::testing::run_command;
using ibdisk::testing::slurp;
using ibdisk::testing::source_path;

const char* const kFixtures[] = {"cx3-ib-active", "cx3-ib-init-nosm", "cx3-pcie2-x4",
                                 "ipoib-datagram", "cx3-eth", "soft-roce"};

class FixtureGolden : public ::testing::TestWithParam<const char*> {};

TEST_P(FixtureGolden, Status) {
  const auto inv = read_inventory(Root(fixture(GetParam())));
  expect_golden(std::string(GetParam()) + ".status.txt", format_status(inv));
  auto j = status_json(inv);
  j["root"] = GetParam();  // the checkout's path is not part of the answer
  expect_golden(std::string(GetParam()) + ".status.json", j.dump(2) + "\n");
}

TEST_P(FixtureGolden, Doctor) {
  const auto findings = diagnose(read_inventory(Root(fixture(GetParam()))), {});
  expect_golden(std::string(GetParam()) + ".doctor.txt", format_findings(findings));
}

INSTANTIATE_TEST_SUITE_P(Fixtures, FixtureGolden, ::testing::ValuesIn(kFixtures),
                         [](const auto& info) {
                           std::string n = info.param;
                           for (auto& c : n) c = (c == '-') ? '_' : c;
                           return n;
                         });

// With the card's `mstconfig query`, port 2 in VPI(3) is reported from the firmware.
TEST(DoctorGolden, EthernetPortsWithMstconfig) {
  const auto mst = parse_mstconfig_query(slurp(source_path("tests/fixtures/mstconfig/connectx3-query.txt")));
  const auto findings = diagnose(read_inventory(Root(fixture("cx3-eth"))), mst);
  expect_golden("cx3-eth.doctor-mstconfig.txt", format_findings(findings));
  int vpi = 0;
  for (const auto& f : findings) vpi += f.id == "port-type-vpi";
  EXPECT_EQ(vpi, 1);
}

TEST(DoctorCli, ExitStatusTellsHealthWarningsErrors) {
  const std::string bin = IBDISK_BINARY;
  EXPECT_EQ(run_command(bin + " setup doctor --root " + fixture("cx3-ib-active")).status, 0);
  EXPECT_EQ(run_command(bin + " setup doctor --root " + fixture("ipoib-datagram")).status, 1);
  EXPECT_EQ(run_command(bin + " setup doctor --root " + fixture("cx3-ib-init-nosm")).status, 2);
  EXPECT_EQ(run_command(bin + " setup doctor --root /nonexistent-root 2>/dev/null").status, 3);
}

TEST(DoctorCli, JsonIsValidAndCarriesTheFindings) {
  const auto r = run_command(std::string(IBDISK_BINARY) + " setup doctor --json --root " + fixture("cx3-ib-init-nosm"));
  EXPECT_EQ(r.status, 2);
  const auto j = nlohmann::json::parse(r.output);
  EXPECT_EQ(j["status"], "errors");
  ASSERT_FALSE(j["findings"].empty());
  EXPECT_EQ(j["findings"][0]["id"], "no-subnet-manager");
  EXPECT_EQ(j["findings"][0]["severity"], "error");
}

TEST(StatusCli, JsonParsesAndMatchesTheTree) {
  const auto r = run_command(std::string(IBDISK_BINARY) + " setup status --json --root " + fixture("soft-roce"));
  ASSERT_EQ(r.status, 0);
  const auto j = nlohmann::json::parse(r.output);
  EXPECT_EQ(j["rdma_devices"][0]["name"], "rxe0");
  EXPECT_EQ(j["rdma_devices"][0]["soft_roce"], true);
  EXPECT_EQ(j["rdma_devices"][0]["ports"][0]["netdev"], "eno1");
}

}  // namespace
}  // namespace ibdisk::setup
