#include "setup/mstconfig.h"

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <regex>

#include "setup/root.h"

namespace ibdisk::setup {

int MstDevice::link_type(int port) const {
  const auto it = config.find("LINK_TYPE_P" + std::to_string(port));
  if (it == config.end()) return 0;
  // "ETH(2)": the number in parentheses is what `mstconfig set` takes.
  const auto open = it->second.find('(');
  if (open != std::string::npos) return std::atoi(it->second.c_str() + open + 1);
  return std::atoi(it->second.c_str());
}

std::vector<MstDevice> parse_mstconfig_query(const std::string& text) {
  static const std::regex kDevice(R"(^Device #(\d+):)");
  static const std::regex kType(R"(^Device type:\s*(\S+))");
  static const std::regex kPciPath(R"(^PCI device:\s*\S*?([0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]))");
  static const std::regex kPci(R"(^Device:\s*([0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]))");
  static const std::regex kConfig(R"(^\s+([A-Z][A-Z0-9_]+)\s+(\S+))");
  std::vector<MstDevice> out;
  bool in_config = false;
  for (const auto& raw : split_lines(text)) {
    const std::string line = trim(raw).empty() ? std::string() : raw;
    std::smatch m;
    if (std::regex_search(line, m, kDevice)) {
      out.push_back({});
      out.back().index = std::atoi(m[1].str().c_str());
      in_config = false;
    } else if (out.empty()) {
      continue;
    } else if (std::regex_search(line, m, kType)) {
      out.back().type = m[1].str();
    } else if (std::regex_search(line, m, kPciPath) || std::regex_search(line, m, kPci)) {
      std::string pci = m[1].str();
      std::transform(pci.begin(), pci.end(), pci.begin(), [](unsigned char c) { return std::tolower(c); });
      out.back().pci = pci;
    } else if (line.rfind("Configurations:", 0) == 0) {
      in_config = true;
    } else if (in_config && std::regex_search(line, m, kConfig)) {
      out.back().config[m[1].str()] = m[2].str();
    }
  }
  return out;
}

const char* link_type_name(int value) {
  switch (value) {
    case 1: return "ib";
    case 2: return "eth";
    case 3: return "vpi";
    default: return "unknown";
  }
}

int link_type_value(const std::string& name) {
  std::string n = name;
  std::transform(n.begin(), n.end(), n.begin(), [](unsigned char c) { return std::tolower(c); });
  if (n == "ib" || n == "infiniband" || n == "1") return 1;
  if (n == "eth" || n == "ethernet" || n == "2") return 2;
  if (n == "vpi" || n == "auto" || n == "3") return 3;
  return 0;
}

}  // namespace ibdisk::setup
