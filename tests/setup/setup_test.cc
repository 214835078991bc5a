// Parsers and arithmetic of the setup module: PCIe and InfiniBand data rates, mstconfig
// query output, sysfs reading details.
#include <gtest/gtest.h>

#include "setup/doctor.h"
#include "setup/inventory.h"
#include "setup/mstconfig.h"
#include "setup/rates.h"
#include "setup/root.h"
#include "tests/setup/setup_env.h"

namespace ibdisk::setup {
namespace {

using ibdisk::testing::fixture;
using ibdisk::testing::slurp;
using ibdisk::testing::source_path;

// Per lane and direction: 1.x 250 MB/s, 2.x 500 MB/s, 3.x 985 MB/s, 4.x 1.97 GB/s.
TEST(Rates, PcieLaneDataRates) {
  EXPECT_DOUBLE_EQ(pcie_lane_gbps(2.5), 2.0);
  EXPECT_DOUBLE_EQ(pcie_lane_gbps(5.0), 4.0);
  EXPECT_NEAR(pcie_lane_gbps(8.0) / 8 * 1000, 984.6, 0.1);
  EXPECT_NEAR(pcie_lane_gbps(16.0) / 8, 1.969, 0.001);
  EXPECT_EQ(pcie_lane_gbps(3.0), 0);
}

// The home-lab table's mistake: 2.0 x4 is 2 GB/s (16 Gb/s), not 1 GB/s; 2.0 x8 is 4 GB/s.
TEST(Rates, PcieSlotFigures) {
  EXPECT_DOUBLE_EQ(pcie_lane_gbps(5.0) * 4 / 8, 2.0);
  EXPECT_DOUBLE_EQ(pcie_lane_gbps(5.0) * 8 / 8, 4.0);
  EXPECT_NEAR(pcie_lane_gbps(8.0) * 8 / 8, 7.88, 0.005);
}

TEST(Rates, ParsesKernelLinkSpeedFormats) {
  EXPECT_DOUBLE_EQ(parse_pcie_speed("5.0 GT/s PCIe"), 5.0);
  EXPECT_DOUBLE_EQ(parse_pcie_speed("5 GT/s"), 5.0);
  EXPECT_DOUBLE_EQ(parse_pcie_speed("2.5 GT/s PCIe"), 2.5);
  EXPECT_DOUBLE_EQ(parse_pcie_speed("Unknown"), 0);
  EXPECT_DOUBLE_EQ(parse_pcie_speed(""), 0);
}

TEST(Rates, InfinibandDataRates) {
  EXPECT_DOUBLE_EQ(parse_ib_rate("10 Gb/sec (4X)").data_gbps, 8.0);
  EXPECT_EQ(parse_ib_rate("10 Gb/sec (4X)").speed, "SDR");
  EXPECT_DOUBLE_EQ(parse_ib_rate("20 Gb/sec (4X DDR)").data_gbps, 16.0);
  EXPECT_DOUBLE_EQ(parse_ib_rate("40 Gb/sec (4X QDR)").data_gbps, 32.0);
  EXPECT_DOUBLE_EQ(parse_ib_rate("40 Gb/sec (4X FDR10)").data_gbps, 40.0);
  EXPECT_NEAR(parse_ib_rate("56 Gb/sec (4X FDR)").data_gbps, 54.5, 0.1);
  EXPECT_DOUBLE_EQ(parse_ib_rate("100 Gb/sec (4X EDR)").data_gbps, 100.0);
  EXPECT_DOUBLE_EQ(parse_ib_rate("2.5 Gb/sec (1X)").data_gbps, 2.0);
  EXPECT_EQ(parse_ib_rate("2.5 Gb/sec (1X)").width, 1);
  EXPECT_EQ(parse_ib_rate("garbage").width, 0);
}

TEST(Rates, ModelNames) {
  EXPECT_NE(mellanox_model("0x15b3", "0x1003").find("ConnectX-3"), std::string::npos);
  EXPECT_NE(mellanox_model("0x15b3", "0x673c").find("ConnectX-2"), std::string::npos);
  EXPECT_EQ(mellanox_model("0x8086", "0x1003"), "");
}

// The exact output the ConnectX-3 guide shows (older mstflint: "PCI device:" path).
TEST(Mstconfig, ParsesConnectX3Query) {
  const auto devs = parse_mstconfig_query(slurp(source_path("tests/fixtures/mstconfig/connectx3-query.txt")));
  ASSERT_EQ(devs.size(), 1u);
  EXPECT_EQ(devs[0].index, 1);
  EXPECT_EQ(devs[0].type, "ConnectX3");
  EXPECT_EQ(devs[0].pci, "0000:05:00.0");
  EXPECT_EQ(devs[0].config.at("LINK_TYPE_P1"), "ETH(2)");
  EXPECT_EQ(devs[0].link_type(1), 2);
  EXPECT_EQ(devs[0].link_type(2), 3);
  EXPECT_EQ(devs[0].link_type(3), 0);
  EXPECT_EQ(devs[0].config.at("NUM_OF_VFS"), "16");
  EXPECT_EQ(devs[0].config.at("CQ_TIMESTAMP"), "True(1)");
  EXPECT_EQ(devs[0].config.size(), 20u);
}

// Newer mstflint prints "Device:" with the address; two cards in one output.
TEST(Mstconfig, ParsesTwoCards) {
  const auto devs = parse_mstconfig_query(slurp(source_path("tests/fixtures/mstconfig/connectx3-two-cards.txt")));
  ASSERT_EQ(devs.size(), 2u);
  EXPECT_EQ(devs[1].pci, "0000:82:00.0");
  EXPECT_EQ(devs[1].link_type(1), 1);
  EXPECT_EQ(devs[1].link_type(2), 1);
  EXPECT_EQ(devs[0].link_type(2), 3);
}

TEST(Mstconfig, EmptyAndErrorOutput) {
  EXPECT_TRUE(parse_mstconfig_query("").empty());
  EXPECT_TRUE(parse_mstconfig_query("-E- No devices found\n").empty());
  EXPECT_EQ(link_type_value("InfiniBand"), 1);
  EXPECT_EQ(link_type_value("eth"), 2);
  EXPECT_EQ(link_type_value("vpi"), 3);
  EXPECT_EQ(link_type_value("fddi"), 0);
}

// Class entries are symlinks into the device tree; resolving them finds the PCI function.
TEST(Root, ResolvesClassLinksInsideTheRoot) {
  const Root root(fixture("cx3-ib-active"));
  EXPECT_FALSE(root.is_live());
  EXPECT_EQ(root.resolve("/sys/class/infiniband/mlx4_0/device"), "/sys/devices/pci0000:00/0000:00:02.0/0000:05:00.0");
  EXPECT_EQ(root.resolve("/sys/class/net/ib0"), "/sys/devices/pci0000:00/0000:00:02.0/0000:05:00.0/net/ib0");
  EXPECT_EQ(root.attr("/sys/class/infiniband/mlx4_0/ports/1/state"), "4: ACTIVE");
  EXPECT_TRUE(Root("/").is_live());
}

TEST(Inventory, ConnectX3ActivePort) {
  const auto inv = read_inventory(Root(fixture("cx3-ib-active")));
  ASSERT_EQ(inv.devices.size(), 1u);
  const auto& d = inv.devices[0];
  ASSERT_TRUE(d.pci);
  EXPECT_EQ(d.pci->address, "0000:05:00.0");
  EXPECT_EQ(d.pci->driver, "mlx4_core");
  EXPECT_EQ(d.pci->cur_width, 8);
  ASSERT_EQ(d.ports.size(), 1u);
  EXPECT_EQ(d.ports[0].state, "ACTIVE");
  EXPECT_EQ(d.ports[0].netdev, "ib0");  // matched by the GUID in ib0's 20-byte address
  EXPECT_EQ(d.ports[0].port_guid(), "0x0002c903003f02f1");
  EXPECT_TRUE(d.ports[0].has_sm());
  EXPECT_FALSE(d.soft_roce);
  const auto* ib0 = inv.netdev("ib0");
  ASSERT_NE(ib0, nullptr);
  EXPECT_TRUE(ib0->is_ipoib());
  EXPECT_EQ(ib0->addresses.front(), "10.30.0.1/24");
  EXPECT_TRUE(inv.sm.opensm_running);
  EXPECT_TRUE(inv.sm.opensm_enabled);
  EXPECT_EQ(inv.network, NetworkSystem::kIfupdown);
  EXPECT_TRUE(inv.memlock_known);
  EXPECT_FALSE(inv.memlock_bytes);  // unlimited
}

TEST(Inventory, SoftRoceDevice) {
  const auto inv = read_inventory(Root(fixture("soft-roce")));
  ASSERT_EQ(inv.devices.size(), 1u);
  EXPECT_TRUE(inv.devices[0].soft_roce);
  EXPECT_EQ(inv.devices[0].parent, "eno1");
  EXPECT_FALSE(inv.devices[0].pci);
  EXPECT_EQ(inv.devices[0].ports[0].netdev, "eno1");
  EXPECT_EQ(inv.devices[0].ports[0].link_layer, "Ethernet");
  ASSERT_TRUE(inv.memlock_bytes);
  EXPECT_EQ(*inv.memlock_bytes, 8388608u);
}

TEST(Inventory, SysctlAtLeastSemantics) {
  SysctlValue v{"net.ipv4.tcp_rmem", "4096 131072 6291456", "4096 87380 33554432"};
  EXPECT_FALSE(v.matches());
  EXPECT_EQ(v.target(), "4096 131072 33554432");  // keeps the host's larger default
  v.value = "4096 87380 67108864";
  EXPECT_TRUE(v.matches());
  v.value = "";
  EXPECT_FALSE(v.matches());
}

TEST(Doctor, ExitStatusOrdersSeverities) {
  std::vector<Finding> f;
  EXPECT_EQ(exit_status(f), 0);
  f.push_back({Severity::kInfo, "x", "", "", "", {}});
  EXPECT_EQ(exit_status(f), 0);
  f.push_back({Severity::kWarning, "x", "", "", "", {}});
  EXPECT_EQ(exit_status(f), 1);
  f.push_back({Severity::kError, "x", "", "", "", {}});
  EXPECT_EQ(exit_status(f), 2);
}

TEST(Doctor, PcieCeilingOfTheX4Slot) {
  const auto inv = read_inventory(Root(fixture("cx3-pcie2-x4")));
  const auto cs = ceilings(inv);
  ASSERT_EQ(cs.size(), 1u);
  EXPECT_DOUBLE_EQ(cs[0].pcie_gbps, 16.0);
  EXPECT_NEAR(cs[0].link_gbps, 54.5, 0.1);
  EXPECT_DOUBLE_EQ(cs[0].ceiling_gbps, 16.0);
  EXPECT_EQ(cs[0].limit, "PCIe");
}

}  // namespace
}  // namespace ibdisk::setup
