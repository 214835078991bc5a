#pragma once
// Reads `mstconfig query` output (mstflint), the tool that sets a ConnectX card's port
// types in its firmware configuration.
#include <map>
#include <string>
#include <vector>

namespace ibdisk::setup {

struct MstDevice {
  int index = 0;               // "Device #1"
  std::string type;            // "ConnectX3"
  std::string pci;             // "0000:05:00.0"
  // Next-boot values by name: "LINK_TYPE_P1" -> "ETH(2)".
  std::map<std::string, std::string> config;
  // LINK_TYPE_Pn as a number: 1 IB, 2 ETH, 3 VPI; 0 when absent.
  int link_type(int port) const;
};

// Parses the whole output; devices in the order printed. Lines it does not know are skipped.
std::vector<MstDevice> parse_mstconfig_query(const std::string& text);

// 1 -> "ib", 2 -> "eth", 3 -> "vpi"; and back ("ib"/"infiniband" -> 1 ...; 0 for unknown).
const char* link_type_name(int value);
int link_type_value(const std::string& name);

}  // namespace ibdisk::setup
