#pragma once
// `ibdisk setup doctor`: what is wrong with this host's fabric setup, why it matters, and
// the exact commands that fix it.
#include <string>
#include <vector>

#include "setup/inventory.h"
#include "setup/mstconfig.h"

namespace ibdisk::setup {

enum class Severity { kInfo, kWarning, kError };
const char* to_string(Severity s);

struct Finding {
  Severity severity = Severity::kInfo;
  std::string id;       // stable name: "no-subnet-manager", "ipoib-datagram", ... (docs/setup.md)
  std::string subject;  // what it is about: "mlx4_0 port 1", "ib0", "0000:05:00.0"
  std::string problem;  // what is wrong, with the values seen
  std::string reason;   // why it matters
  std::vector<std::string> fix;  // commands, in order
};

// The bandwidth a device can move per direction: min(link data rate, PCIe data rate).
struct Ceiling {
  std::string device;   // RDMA device
  double link_gbps = 0, pcie_gbps = 0, ceiling_gbps = 0;
  std::string limit;    // "PCIe" or "link"
};
std::vector<Ceiling> ceilings(const Inventory& inv);

// Unprivileged RDMA users need this much locked memory (a few registered buffer pools).
inline constexpr std::uint64_t kMemlockMinBytes = 64ull << 20;
inline constexpr int kIpoibConnectedMtu = 65520;

// mst: parsed `mstconfig query` output, empty when unavailable.
std::vector<Finding> diagnose(const Inventory& inv, const std::vector<MstDevice>& mst);

// 0 no warnings or errors, 1 warnings, 2 errors.
int exit_status(const std::vector<Finding>& findings);

}  // namespace ibdisk::setup
