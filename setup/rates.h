#pragma once
// Link arithmetic: what a PCIe link and an InfiniBand/Ethernet link can carry, in data
// (after line encoding) per direction, and the names of common Mellanox parts.
#include <string>

namespace ibdisk::setup {

// PCIe generation from a transfer rate in GT/s (2.5 -> 1, 5 -> 2, 8 -> 3, 16 -> 4, 32 -> 5); 0 if unknown.
int pcie_generation(double gt_s);
// Data rate of one PCIe lane, one direction, in Gb/s, after 8b/10b (1.x, 2.x) or 128b/130b
// (3.x and later) encoding: 2.5 GT/s -> 2, 5 -> 4, 8 -> 7.877, 16 -> 15.754. 0 if unknown.
double pcie_lane_gbps(double gt_s);
// Parses a sysfs link speed as the kernel prints it: "5.0 GT/s PCIe" (5.5 and later),
// "5 GT/s" (older kernels), "8.0 GT/s PCIe"; "Unknown" or garbage gives 0.
double parse_pcie_speed(const std::string& text);

// An InfiniBand rate as the kernel prints it in ports/N/rate: "40 Gb/sec (4X QDR)".
struct IbRate {
  double signal_gbps = 0;  // the figure before "Gb/sec" (signalling rate, all lanes)
  int width = 0;           // lanes: 1, 2, 4, 8, 12
  std::string speed;       // SDR, DDR, QDR, FDR10, FDR, EDR, HDR, NDR ("" in the kernel text means SDR)
  double data_gbps = 0;    // after line encoding: 4X SDR 8, DDR 16, QDR 32, FDR10 40, FDR 54.5, EDR 100
};
IbRate parse_ib_rate(const std::string& text);

// "ConnectX-3 (MT27500)" for 15b3:1003, etc.; "" for parts it does not know.
std::string mellanox_model(const std::string& vendor, const std::string& device);

// "16 Gb/s (2.0 GB/s)": one figure people can compare with iperf3 and with disk speeds.
std::string format_gbps(double gbps);

}  // namespace ibdisk::setup
