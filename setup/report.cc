#include "setup/report.h"

#include <algorithm>
#include <cstdio>
#include <sstream>

namespace ibdisk::setup {
namespace {

std::string or_dash(const std::string& s) { return s.empty() ? "-" : s; }

std::string join(const std::vector<std::string>& v, const char* sep) {
  std::string out;
  for (const auto& s : v) out += (out.empty() ? "" : sep) + s;
  return out;
}

std::string pcie_link(double gts, int width, double gbps) {
  if (pcie_generation(gts) == 0 || width == 0) return "-";
  char buf[80];
  std::snprintf(buf, sizeof buf, "PCIe %d.0 x%d = %.1f Gb/s", pcie_generation(gts), width, gbps);
  return buf;
}

std::string type_name(int type) {
  switch (type) {
    case 1: return "ether";
    case 32: return "ipoib";
    case 772: return "loopback";
    default: return std::to_string(type);
  }
}

std::string memlock_text(const Inventory& inv) {
  if (!inv.memlock_known) return "unknown (no /proc/self/limits under the root)";
  if (!inv.memlock_bytes) return "unlimited (" + inv.memlock_source + ")";
  return std::to_string(*inv.memlock_bytes / 1024) + " KiB (" + inv.memlock_source + ")";
}

}  // namespace

std::string format_table(const std::vector<std::vector<std::string>>& rows, const std::string& indent) {
  std::vector<std::size_t> width;
  for (const auto& r : rows) {
    if (width.size() < r.size()) width.resize(r.size(), 0);
    for (std::size_t i = 0; i < r.size(); ++i) width[i] = std::max(width[i], r[i].size());
  }
  std::string out;
  for (const auto& r : rows) {
    std::string line = indent;
    for (std::size_t i = 0; i < r.size(); ++i) {
      line += r[i];
      if (i + 1 < r.size()) line += std::string(width[i] - r[i].size() + 2, ' ');
    }
    while (!line.empty() && line.back() == ' ') line.pop_back();
    out += line + "\n";
  }
  return out;
}

std::string format_status(const Inventory& inv) {
  std::ostringstream o;
  o << "RDMA ports\n";
  if (inv.devices.empty()) {
    o << "  none (no /sys/class/infiniband entries)\n";
  } else {
    std::vector<std::vector<std::string>> rows = {
        {"DEVICE", "PORT", "STATE", "PHYS", "LINK", "RATE", "LID", "SM_LID", "NETDEV", "PORT_GUID"}};
    for (const auto& d : inv.devices) {
      for (const auto& p : d.ports) {
        rows.push_back({d.name, std::to_string(p.number), or_dash(p.state), or_dash(p.phys_state), or_dash(p.link_layer),
                        or_dash(p.rate), or_dash(p.lid), or_dash(p.sm_lid), or_dash(p.netdev), or_dash(p.port_guid())});
      }
    }
    o << format_table(rows);
    o << "\nRDMA devices\n";
    rows = {{"DEVICE", "KIND", "NODE_GUID", "FW", "PCI", "MODEL", "DRIVER", "NUMA", "PCIE_NOW", "PCIE_CARD", "CEILING"}};
    const auto cs = ceilings(inv);
    for (const auto& d : inv.devices) {
      std::string ceiling = "-";
      for (const auto& c : cs) {
        if (c.device == d.name) ceiling = format_gbps(c.ceiling_gbps) + " (" + c.limit + ")";
      }
      if (d.pci) {
        const auto& p = *d.pci;
        rows.push_back({d.name, "hardware", or_dash(d.node_guid), or_dash(d.fw_ver), p.address,
                        p.model.empty() ? p.vendor + ":" + p.device : p.model, or_dash(p.driver),
                        std::to_string(p.numa_node), pcie_link(p.cur_speed_gts, p.cur_width, p.cur_gbps()),
                        pcie_link(p.max_speed_gts, p.max_width, p.max_gbps()), ceiling});
      } else {
        rows.push_back({d.name, d.soft_roce ? "soft-roce on " + or_dash(d.parent) : "virtual", or_dash(d.node_guid),
                        or_dash(d.fw_ver), "-", "-", "-", "-", "-", "-", ceiling});
      }
    }
    o << format_table(rows);
  }
  o << "\nNet devices\n";
  std::vector<std::vector<std::string>> rows = {
      {"NAME", "TYPE", "KIND", "MODE", "MTU", "STATE", "CARRIER", "SPEED", "PCI", "MASTER", "ADDRESSES"}};
  for (const auto& n : inv.netdevs) {
    rows.push_back({n.name, type_name(n.type), n.kind, or_dash(n.mode), std::to_string(n.mtu), or_dash(n.operstate),
                    n.carrier < 0 ? "-" : std::to_string(n.carrier),
                    n.speed_mbps > 0 ? std::to_string(n.speed_mbps) + "Mb/s" : "-", or_dash(n.pci_address),
                    or_dash(n.master), or_dash(join(n.addresses, " "))});
  }
  o << format_table(rows);
  o << "\nSubnet manager\n";
  bool any_ib = false;
  for (const auto& d : inv.devices) {
    for (const auto& p : d.ports) {
      if (!p.is_ib()) continue;
      any_ib = true;
      o << "  " << d.name << " port " << p.number << ": "
        << (p.has_sm() ? "managed by the subnet manager at LID " + p.sm_lid : std::string("no subnet manager (sm_lid 0)")) << "\n";
    }
  }
  if (!any_ib) o << "  no InfiniBand ports\n";
  o << "  opensm: " << (inv.sm.opensm_installed ? "installed" : "not installed") << ", "
    << (inv.sm.opensm_running ? "running" : "not running") << ", " << (inv.sm.opensm_enabled ? "enabled" : "not enabled")
    << " at boot" << (inv.sm.opensm_ports.empty() ? "" : ", PORTS=" + inv.sm.opensm_ports) << "\n";
  o << "\nHost\n";
  o << "  modules: " << (inv.modules.empty() ? "-" : join(inv.modules, " ")) << "\n";
  o << "  memlock: " << memlock_text(inv) << "\n";
  o << "  network configuration: " << to_string(inv.network) << " (" << inv.network_reason << ")\n";
  o << "\nSysctl (IPoIB tuning)\n";
  rows = {{"KEY", "VALUE", "TUNED", ""}};
  for (const auto& s : inv.sysctls) {
    rows.push_back({s.key, s.value.empty() ? "(absent)" : s.value, s.tuned, s.matches() ? "ok" : "differs"});
  }
  o << format_table(rows);
  return o.str();
}

nlohmann::ordered_json status_json(const Inventory& inv) {
  using J = nlohmann::ordered_json;
  J j;
  j["root"] = inv.root;
  j["rdma_devices"] = J::array();
  const auto cs = ceilings(inv);
  for (const auto& d : inv.devices) {
    J dj;
    dj["name"] = d.name;
    dj["node_guid"] = d.node_guid;
    dj["node_type"] = d.node_type;
    dj["fw_ver"] = d.fw_ver;
    dj["hca_type"] = d.hca_type;
    dj["soft_roce"] = d.soft_roce;
    dj["parent"] = d.parent.empty() ? J() : J(d.parent);
    if (d.pci) {
      const auto& p = *d.pci;
      dj["pci"] = {{"address", p.address},
                   {"vendor", p.vendor},
                   {"device", p.device},
                   {"model", p.model},
                   {"driver", p.driver},
                   {"numa_node", p.numa_node},
                   {"current_link_speed_gts", p.cur_speed_gts},
                   {"current_link_width", p.cur_width},
                   {"max_link_speed_gts", p.max_speed_gts},
                   {"max_link_width", p.max_width},
                   {"current_gbps", p.cur_gbps()},
                   {"max_gbps", p.max_gbps()}};
    } else {
      dj["pci"] = nullptr;
    }
    dj["ceiling"] = nullptr;
    for (const auto& c : cs) {
      if (c.device == d.name) {
        dj["ceiling"] = {{"link_gbps", c.link_gbps}, {"pcie_gbps", c.pcie_gbps}, {"ceiling_gbps", c.ceiling_gbps},
                         {"limited_by", c.limit}};
      }
    }
    dj["ports"] = J::array();
    for (const auto& p : d.ports) {
      dj["ports"].push_back({{"port", p.number},
                             {"state", p.state},
                             {"phys_state", p.phys_state},
                             {"rate", p.rate},
                             {"data_gbps", p.ib_rate.data_gbps},
                             {"link_layer", p.link_layer},
                             {"lid", p.lid},
                             {"sm_lid", p.sm_lid},
                             {"port_guid", p.port_guid()},
                             {"gids", p.gids},
                             {"netdev", p.netdev.empty() ? J() : J(p.netdev)},
                             {"port_type", p.port_type.empty() ? J() : J(p.port_type)}});
    }
    j["rdma_devices"].push_back(dj);
  }
  j["net_devices"] = J::array();
  for (const auto& n : inv.netdevs) {
    j["net_devices"].push_back({{"name", n.name},
                                {"type", n.type},
                                {"ipoib", n.is_ipoib()},
                                {"kind", n.kind},
                                {"mode", n.mode.empty() ? J() : J(n.mode)},
                                {"mtu", n.mtu},
                                {"operstate", n.operstate},
                                {"carrier", n.carrier < 0 ? J() : J(n.carrier)},
                                {"speed_mbps", n.speed_mbps < 0 ? J() : J(n.speed_mbps)},
                                {"address", n.address},
                                {"pci", n.pci_address.empty() ? J() : J(n.pci_address)},
                                {"master", n.master.empty() ? J() : J(n.master)},
                                {"addresses", n.addresses}});
  }
  j["modules"] = inv.modules;
  j["memlock"] = {{"known", inv.memlock_known},
                  {"bytes", inv.memlock_bytes ? J(*inv.memlock_bytes) : J()},
                  {"unlimited", inv.memlock_known && !inv.memlock_bytes},
                  {"source", inv.memlock_source}};
  j["sysctl"] = J::array();
  for (const auto& s : inv.sysctls) {
    j["sysctl"].push_back({{"key", s.key}, {"value", s.value.empty() ? J() : J(s.value)}, {"tuned", s.tuned}, {"ok", s.matches()}});
  }
  j["subnet_manager"] = {{"opensm_installed", inv.sm.opensm_installed},
                         {"opensm_running", inv.sm.opensm_running},
                         {"opensm_enabled", inv.sm.opensm_enabled},
                         {"opensm_ports", inv.sm.opensm_ports.empty() ? J() : J(inv.sm.opensm_ports)}};
  j["network_system"] = {{"name", to_string(inv.network)}, {"reason", inv.network_reason}};
  return j;
}

std::string format_findings(const std::vector<Finding>& findings) {
  std::ostringstream o;
  if (findings.empty()) o << "No problems found.\n";
  int errors = 0, warnings = 0, infos = 0;
  for (const auto& f : findings) {
    (f.severity == Severity::kError ? errors : f.severity == Severity::kWarning ? warnings : infos)++;
    o << "[" << to_string(f.severity) << "] " << f.id << ": " << f.subject << "\n";
    o << "  problem: " << f.problem << "\n";
    o << "  why:     " << f.reason << "\n";
    for (std::size_t i = 0; i < f.fix.size(); ++i) o << (i == 0 ? "  fix:     " : "           ") << f.fix[i] << "\n";
    o << "\n";
  }
  o << "doctor: " << errors << " error(s), " << warnings << " warning(s), " << infos << " note(s)\n";
  return o.str();
}

nlohmann::ordered_json findings_json(const std::vector<Finding>& findings) {
  nlohmann::ordered_json j;
  j["status"] = exit_status(findings) == 2 ? "errors" : exit_status(findings) == 1 ? "warnings" : "healthy";
  j["findings"] = nlohmann::ordered_json::array();
  for (const auto& f : findings) {
    j["findings"].push_back({{"severity", to_string(f.severity)},
                             {"id", f.id},
                             {"subject", f.subject},
                             {"problem", f.problem},
                             {"reason", f.reason},
                             {"fix", f.fix}});
  }
  return j;
}

}  // namespace ibdisk::setup
