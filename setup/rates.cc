#include "setup/rates.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <regex>

namespace ibdisk::setup {

int pcie_generation(double gt_s) {
  if (std::fabs(gt_s - 2.5) < 0.01) return 1;
  if (std::fabs(gt_s - 5.0) < 0.01) return 2;
  if (std::fabs(gt_s - 8.0) < 0.01) return 3;
  if (std::fabs(gt_s - 16.0) < 0.01) return 4;
  if (std::fabs(gt_s - 32.0) < 0.01) return 5;
  if (std::fabs(gt_s - 64.0) < 0.01) return 6;
  return 0;
}

double pcie_lane_gbps(double gt_s) {
  const int gen = pcie_generation(gt_s);
  if (gen == 0) return 0;
  if (gen <= 2) return gt_s * 8.0 / 10.0;       // 8b/10b: 1.x 250 MB/s, 2.x 500 MB/s per lane
  if (gen <= 5) return gt_s * 128.0 / 130.0;    // 128b/130b: 3.x 985 MB/s per lane
  return gt_s * 242.0 / 256.0;                  // 6.0 FLIT mode
}

double parse_pcie_speed(const std::string& text) {
  char* end = nullptr;
  const double v = std::strtod(text.c_str(), &end);
  if (end == text.c_str() || text.find("GT/s") == std::string::npos) return 0;
  return v;
}

IbRate parse_ib_rate(const std::string& text) {
  IbRate r;
  static const std::regex re(R"(^\s*([0-9]+(?:\.[0-9]+)?)\s*Gb/sec\s*\((\d+)X\s*([A-Z0-9]*)\))");
  std::smatch m;
  if (!std::regex_search(text, m, re)) return r;
  r.signal_gbps = std::atof(m[1].str().c_str());
  r.width = std::atoi(m[2].str().c_str());
  r.speed = m[3].str().empty() ? "SDR" : m[3].str();
  // Data rate per lane after encoding: 8b/10b up to QDR, 64b/66b from FDR10 on.
  static const std::map<std::string, double> kLaneData = {
      {"SDR", 2.0},     {"DDR", 4.0},  {"QDR", 8.0},  {"FDR10", 10.0}, {"FDR", 14.0625 * 64.0 / 66.0},
      {"EDR", 25.0},    {"HDR", 50.0}, {"NDR", 100.0}, {"XDR", 200.0}};
  if (auto it = kLaneData.find(r.speed); it != kLaneData.end()) {
    r.data_gbps = it->second * r.width;
  } else {
    r.data_gbps = r.signal_gbps;
  }
  return r;
}

std::string mellanox_model(const std::string& vendor, const std::string& device) {
  if (vendor != "0x15b3") return {};
  static const std::map<std::string, std::string> kModels = {
      {"0x6340", "ConnectX (MT25408, IB SDR)"},
      {"0x634a", "ConnectX VPI (MT25418, IB DDR)"},
      {"0x6354", "ConnectX (MT25428, IB QDR)"},
      {"0x6732", "ConnectX VPI (MT26418, IB DDR, PCIe 2.0)"},
      {"0x673c", "ConnectX-2 VPI (MT26428, IB QDR / 10GbE, PCIe 2.0)"},
      {"0x6746", "ConnectX-2 VPI (MT26438, IB QDR / 10GbE, PCIe 2.0)"},
      {"0x6750", "ConnectX-2 EN (MT26448, 10GbE, PCIe 2.0)"},
      {"0x676e", "ConnectX-2 EN (MT26478, 40GbE, PCIe 2.0)"},
      {"0x1003", "ConnectX-3 (MT27500, IB FDR / 40GbE, PCIe 3.0)"},
      {"0x1004", "ConnectX-3 Virtual Function (MT27500)"},
      {"0x1007", "ConnectX-3 Pro (MT27520, IB FDR / 40GbE, PCIe 3.0)"},
      {"0x1011", "Connect-IB (MT27600, IB FDR, PCIe 3.0)"},
      {"0x1013", "ConnectX-4 (MT27700, IB EDR / 100GbE, PCIe 3.0)"},
      {"0x1015", "ConnectX-4 Lx (MT27710, 25/50GbE, PCIe 3.0)"},
      {"0x1017", "ConnectX-5 (MT27800, IB EDR / 100GbE, PCIe 3.0)"},
      {"0x1019", "ConnectX-5 Ex (MT28800, IB EDR / 100GbE, PCIe 4.0)"},
      {"0x101b", "ConnectX-6 (MT28908, IB HDR / 200GbE, PCIe 4.0)"},
      {"0x101d", "ConnectX-6 Dx (MT2892, 100/200GbE, PCIe 4.0)"},
      {"0x101f", "ConnectX-6 Lx (MT2894, 25/50GbE, PCIe 4.0)"},
      {"0x1021", "ConnectX-7 (MT2910, IB NDR / 400GbE, PCIe 5.0)"},
  };
  const auto it = kModels.find(device);
  return it == kModels.end() ? std::string() : it->second;
}

std::string format_gbps(double gbps) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.1f Gb/s (%.2f GB/s)", gbps, gbps / 8.0);
  return buf;
}

}  // namespace ibdisk::setup
