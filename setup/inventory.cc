#include "setup/inventory.h"

#include <arpa/inet.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netinet/in.h>
#include <sys/resource.h>

#include <algorithm>
#include <cstdlib>
#include <regex>
#include <set>

namespace ibdisk::setup {
namespace {

const std::regex kPciAddress(R"(^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$)");

// "4: ACTIVE" -> "ACTIVE"; text without a number is returned as is.
std::string after_colon(const std::string& s) {
  const auto c = s.find(": ");
  return c == std::string::npos ? s : s.substr(c + 2);
}

int to_int(const std::string& s, int fallback) {
  if (s.empty()) return fallback;
  char* end = nullptr;
  const long v = std::strtol(s.c_str(), &end, 0);
  return end == s.c_str() ? fallback : static_cast<int>(v);
}

std::string hex_only(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (std::isxdigit(static_cast<unsigned char>(c))) out += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  }
  return out;
}

std::set<std::string> process_names(const Root& root) {
  std::set<std::string> names;
  for (const auto& pid : root.list("/proc")) {
    if (pid.empty() || !std::all_of(pid.begin(), pid.end(), ::isdigit)) continue;
    const auto comm = root.attr("/proc/" + pid + "/comm");
    if (!comm.empty()) names.insert(comm);
  }
  return names;
}

std::optional<PciFunction> read_pci(const Root& root, const std::string& device_link) {
  if (!root.exists(device_link)) return std::nullopt;
  const std::string dir = root.resolve(device_link);
  const std::string addr = std::filesystem::path(dir).filename().string();
  if (!std::regex_match(addr, kPciAddress)) return std::nullopt;
  PciFunction pci;
  pci.address = addr;
  pci.vendor = root.attr(dir + "/vendor");
  pci.device = root.attr(dir + "/device");
  pci.model = mellanox_model(pci.vendor, pci.device);
  pci.driver = root.link_name(dir + "/driver");
  pci.cur_speed_gts = parse_pcie_speed(root.attr(dir + "/current_link_speed"));
  pci.max_speed_gts = parse_pcie_speed(root.attr(dir + "/max_link_speed"));
  pci.cur_width = to_int(root.attr(dir + "/current_link_width"), 0);
  pci.max_width = to_int(root.attr(dir + "/max_link_width"), 0);
  pci.numa_node = to_int(root.attr(dir + "/numa_node"), -1);
  return pci;
}

RdmaDevice read_device(const Root& root, const std::string& name) {
  RdmaDevice d;
  d.name = name;
  const std::string dir = "/sys/class/infiniband/" + name;
  d.node_guid = root.attr(dir + "/node_guid");
  d.node_type = after_colon(root.attr(dir + "/node_type"));
  d.fw_ver = root.attr(dir + "/fw_ver");
  d.hca_type = root.attr(dir + "/hca_type");
  d.board_id = root.attr(dir + "/board_id");
  d.parent = root.attr(dir + "/parent");
  d.pci = read_pci(root, dir + "/device");
  d.soft_roce = !d.parent.empty() || name.rfind("rxe", 0) == 0 ||
                root.resolve(dir).find("/devices/virtual/") != std::string::npos;
  std::vector<std::string> port_names = root.list(dir + "/ports");
  std::sort(port_names.begin(), port_names.end(),
            [](const std::string& a, const std::string& b) { return to_int(a, 0) < to_int(b, 0); });
  for (const auto& pn : port_names) {
    const std::string pdir = dir + "/ports/" + pn;
    RdmaPort p;
    p.number = to_int(pn, 0);
    p.state = after_colon(root.attr(pdir + "/state"));
    p.phys_state = after_colon(root.attr(pdir + "/phys_state"));
    p.rate = root.attr(pdir + "/rate");
    p.ib_rate = parse_ib_rate(p.rate);
    p.link_layer = root.attr(pdir + "/link_layer");
    p.lid = root.attr(pdir + "/lid");
    p.sm_lid = root.attr(pdir + "/sm_lid");
    std::vector<std::string> gid_idx = root.list(pdir + "/gids");
    std::sort(gid_idx.begin(), gid_idx.end(),
              [](const std::string& a, const std::string& b) { return to_int(a, 0) < to_int(b, 0); });
    for (const auto& g : gid_idx) {
      const auto gid = root.attr(pdir + "/gids/" + g);
      if (!gid.empty() && hex_only(gid).find_first_not_of('0') != std::string::npos) p.gids.push_back(gid);
    }
    p.netdev = root.attr(pdir + "/gid_attrs/ndevs/0");
    if (p.netdev.empty() && p.number == 1) p.netdev = d.parent;
    if (d.pci) {
      const auto t = root.attr("/sys/bus/pci/devices/" + d.pci->address + "/mlx4_port" + pn);
      p.port_type = t;
    }
    d.ports.push_back(std::move(p));
  }
  return d;
}

void read_bonding(const Root& root, NetDevice& n) {
  const std::string dir = "/sys/class/net/" + n.name + "/bonding";
  if (!root.is_dir(dir)) return;
  n.kind = "bond";
  n.bond_mode = root.attr(dir + "/mode");
  n.bond_slaves = split_ws(root.attr(dir + "/slaves"));
}

NetDevice read_netdev(const Root& root, const std::string& name) {
  NetDevice n;
  n.name = name;
  const std::string dir = "/sys/class/net/" + name;
  n.type = to_int(root.attr(dir + "/type"), 0);
  n.mode = root.attr(dir + "/mode");
  n.mtu = to_int(root.attr(dir + "/mtu"), 0);
  n.carrier = to_int(root.attr(dir + "/carrier"), -1);
  n.operstate = root.attr(dir + "/operstate");
  n.address = root.attr(dir + "/address");
  n.speed_mbps = to_int(root.attr(dir + "/speed"), -1);
  if (n.speed_mbps <= 0) n.speed_mbps = -1;
  if (auto pci = read_pci(root, dir + "/device")) n.pci_address = pci->address;
  n.master = root.link_name(dir + "/master");
  if (!n.pci_address.empty()) {
    n.kind = "physical";
  } else if (root.is_dir(dir + "/bridge")) {
    n.kind = "bridge";
  } else if (n.type == 772) {
    n.kind = "loopback";
  } else if (name.rfind("veth", 0) == 0 || root.attr(dir + "/iflink") != root.attr(dir + "/ifindex")) {
    n.kind = "veth";
  } else {
    n.kind = "virtual";
  }
  read_bonding(root, n);
  return n;
}

// IPv4 addresses of a tree that is not the live system: local addresses from
// /proc/net/fib_trie, assigned to the interface whose connected route holds them.
void read_ipv4_from_proc(const Root& root, std::vector<NetDevice>& nets) {
  struct Route { std::string iface; std::uint32_t dest, mask; };
  std::vector<Route> routes;
  if (const auto text = root.read("/proc/net/route")) {
    for (const auto& line : split_lines(*text)) {
      const auto f = split_ws(line);
      if (f.size() < 8 || f[0] == "Iface") continue;
      const auto gw = std::strtoul(f[2].c_str(), nullptr, 16);
      if (gw != 0) continue;  // connected routes only
      routes.push_back({f[0], static_cast<std::uint32_t>(std::strtoul(f[1].c_str(), nullptr, 16)),
                        static_cast<std::uint32_t>(std::strtoul(f[7].c_str(), nullptr, 16))});
    }
  }
  const auto text = root.read("/proc/net/fib_trie");
  if (!text) return;
  std::set<std::string> seen;
  std::string last_ip;
  for (const auto& line : split_lines(*text)) {
    const auto leaf = line.find("|-- ");
    if (leaf != std::string::npos) {
      last_ip = trim(line.substr(leaf + 4));
      continue;
    }
    if (line.find("/32 host LOCAL") == std::string::npos || last_ip.empty() || !seen.insert(last_ip).second) continue;
    in_addr a{};
    if (inet_pton(AF_INET, last_ip.c_str(), &a) != 1) continue;
    std::string iface;
    int prefix = 32;
    for (const auto& r : routes) {
      if ((a.s_addr & r.mask) == r.dest && r.mask != 0) {
        iface = r.iface;
        prefix = __builtin_popcount(r.mask);
        break;
      }
    }
    if (iface.empty() && last_ip.rfind("127.", 0) == 0) iface = "lo", prefix = 8;
    for (auto& n : nets) {
      if (n.name == iface) n.addresses.push_back(last_ip + "/" + std::to_string(prefix));
    }
  }
}

void read_ipv6_from_proc(const Root& root, std::vector<NetDevice>& nets) {
  const auto text = root.read("/proc/net/if_inet6");
  if (!text) return;
  for (const auto& line : split_lines(*text)) {
    const auto f = split_ws(line);
    if (f.size() < 6 || f[0].size() != 32) continue;
    std::string addr;
    for (int i = 0; i < 32; i += 4) addr += (i ? ":" : "") + f[0].substr(i, 4);
    in6_addr a{};
    char buf[INET6_ADDRSTRLEN];
    if (inet_pton(AF_INET6, addr.c_str(), &a) != 1 || !inet_ntop(AF_INET6, &a, buf, sizeof buf)) continue;
    const int prefix = static_cast<int>(std::strtol(f[2].c_str(), nullptr, 16));
    for (auto& n : nets) {
      if (n.name == f[5]) n.addresses.push_back(std::string(buf) + "/" + std::to_string(prefix));
    }
  }
}

int prefix_len(const sockaddr* mask) {
  if (!mask) return 0;
  int bits = 0;
  const auto* p = mask->sa_family == AF_INET
                      ? reinterpret_cast<const unsigned char*>(&reinterpret_cast<const sockaddr_in*>(mask)->sin_addr)
                      : reinterpret_cast<const unsigned char*>(&reinterpret_cast<const sockaddr_in6*>(mask)->sin6_addr);
  const int n = mask->sa_family == AF_INET ? 4 : 16;
  for (int i = 0; i < n; ++i) bits += __builtin_popcount(p[i]);
  return bits;
}

// The live system: the kernel's own view through getifaddrs (netlink).
void read_addresses_live(std::vector<NetDevice>& nets) {
  ifaddrs* list = nullptr;
  if (getifaddrs(&list) != 0) return;
  for (auto* i = list; i; i = i->ifa_next) {
    if (!i->ifa_addr || (i->ifa_addr->sa_family != AF_INET && i->ifa_addr->sa_family != AF_INET6)) continue;
    char buf[INET6_ADDRSTRLEN] = {};
    const void* src = i->ifa_addr->sa_family == AF_INET
                          ? static_cast<const void*>(&reinterpret_cast<const sockaddr_in*>(i->ifa_addr)->sin_addr)
                          : static_cast<const void*>(&reinterpret_cast<const sockaddr_in6*>(i->ifa_addr)->sin6_addr);
    if (!inet_ntop(i->ifa_addr->sa_family, src, buf, sizeof buf)) continue;
    for (auto& n : nets) {
      if (n.name == i->ifa_name) n.addresses.push_back(std::string(buf) + "/" + std::to_string(prefix_len(i->ifa_netmask)));
    }
  }
  freeifaddrs(list);
}

void read_memlock(const Root& root, Inventory& inv) {
  if (root.is_live()) {
    rlimit rl{};
    if (getrlimit(RLIMIT_MEMLOCK, &rl) == 0) {
      inv.memlock_known = true;
      inv.memlock_source = "getrlimit(RLIMIT_MEMLOCK)";
      if (rl.rlim_cur != RLIM_INFINITY) inv.memlock_bytes = rl.rlim_cur;
    }
    return;
  }
  const auto text = root.read("/proc/self/limits");
  if (!text) return;
  for (const auto& line : split_lines(*text)) {
    if (line.rfind("Max locked memory", 0) != 0) continue;
    const auto f = split_ws(line.substr(17));
    if (f.empty()) return;
    inv.memlock_known = true;
    inv.memlock_source = "/proc/self/limits";
    if (f[0] != "unlimited") inv.memlock_bytes = std::strtoull(f[0].c_str(), nullptr, 10);
  }
}

void read_sm(const Root& root, const std::set<std::string>& procs, Inventory& inv) {
  auto& sm = inv.sm;
  sm.opensm_installed = root.exists("/usr/sbin/opensm");
  sm.opensm_running = procs.count("opensm") > 0;
  sm.opensm_enabled = root.is_symlink("/etc/systemd/system/multi-user.target.wants/opensm.service");
  for (const char* rc : {"/etc/rc2.d", "/etc/rc3.d"}) {
    for (const auto& f : root.list(rc)) {
      if (f.size() > 3 && f[0] == 'S' && f.substr(3) == "opensm") sm.opensm_enabled = true;
    }
  }
  if (const auto text = root.read("/etc/default/opensm")) {
    for (const auto& line : split_lines(*text)) {
      const auto t = trim(line);
      if (t.rfind("PORTS=", 0) != 0) continue;
      std::string v = t.substr(6);
      v.erase(std::remove(v.begin(), v.end(), '"'), v.end());
      sm.opensm_ports = v;
    }
  }
}

void detect_network(const Root& root, const std::set<std::string>& procs, Inventory& inv) {
  if (procs.count("NetworkManager") || root.exists("/run/NetworkManager/NetworkManager.pid")) {
    inv.network = NetworkSystem::kNetworkManager;
    inv.network_reason = "NetworkManager is running";
  } else if (procs.count("systemd-network") || procs.count("systemd-networkd") ||
             root.is_symlink("/etc/systemd/system/multi-user.target.wants/systemd-networkd.service")) {
    inv.network = NetworkSystem::kNetworkd;
    inv.network_reason = "systemd-networkd is running or enabled";
  } else if (root.exists("/etc/network/interfaces")) {
    inv.network = NetworkSystem::kIfupdown;
    inv.network_reason = "/etc/network/interfaces exists";
  } else {
    inv.network = NetworkSystem::kNone;
    inv.network_reason = "no NetworkManager, systemd-networkd or /etc/network/interfaces found";
  }
}

}  // namespace

const char* to_string(NetworkSystem s) {
  switch (s) {
    case NetworkSystem::kIfupdown: return "ifupdown";
    case NetworkSystem::kNetworkd: return "systemd-networkd";
    case NetworkSystem::kNetworkManager: return "NetworkManager";
    case NetworkSystem::kNone: return "none";
  }
  return "none";
}

bool RdmaPort::has_sm() const {
  const int v = to_int(sm_lid, 0);
  return v != 0;
}

std::string RdmaPort::port_guid() const {
  if (gids.empty()) return {};
  const auto hex = hex_only(gids.front());
  if (hex.size() != 32) return {};
  return "0x" + hex.substr(16);
}

bool Inventory::module_loaded(const std::string& name) const {
  return std::find(modules.begin(), modules.end(), name) != modules.end();
}

const NetDevice* Inventory::netdev(const std::string& name) const {
  for (const auto& n : netdevs) {
    if (n.name == name) return &n;
  }
  return nullptr;
}

const RdmaDevice* Inventory::device(const std::string& name) const {
  for (const auto& d : devices) {
    if (d.name == name) return &d;
  }
  return nullptr;
}

std::pair<const RdmaDevice*, const RdmaPort*> Inventory::port_of(const std::string& nd) const {
  for (const auto& d : devices) {
    for (const auto& p : d.ports) {
      if (p.netdev == nd) return {&d, &p};
    }
  }
  return {nullptr, nullptr};
}

bool SysctlValue::matches() const {
  const auto have = split_ws(value), want = split_ws(tuned);
  if (have.size() != want.size()) return false;
  for (std::size_t i = 0; i < have.size(); ++i) {
    if (std::strtoll(have[i].c_str(), nullptr, 10) < std::strtoll(want[i].c_str(), nullptr, 10)) return false;
  }
  return true;
}

std::string SysctlValue::target() const {
  const auto have = split_ws(value), want = split_ws(tuned);
  if (have.size() != want.size()) return tuned;
  std::string out;
  for (std::size_t i = 0; i < have.size(); ++i) {
    const bool keep = std::strtoll(have[i].c_str(), nullptr, 10) > std::strtoll(want[i].c_str(), nullptr, 10);
    out += (i ? " " : "") + (keep ? have[i] : want[i]);
  }
  return out;
}

const std::vector<std::pair<std::string, std::string>>& tuned_sysctls() {
  static const std::vector<std::pair<std::string, std::string>> kTuned = {
      {"net.ipv4.tcp_sack", "1"},
      {"net.core.netdev_max_backlog", "250000"},
      {"net.core.rmem_max", "67108864"},
      {"net.core.wmem_max", "67108864"},
      {"net.core.rmem_default", "4194304"},
      {"net.core.wmem_default", "4194304"},
      {"net.core.optmem_max", "4194304"},
      {"net.ipv4.tcp_adv_win_scale", "1"},
      {"net.ipv4.tcp_rmem", "4096 87380 33554432"},
      {"net.ipv4.tcp_wmem", "4096 65536 33554432"},
  };
  return kTuned;
}

const std::vector<std::string>& ib_modules() {
  static const std::vector<std::string> kModules = {"ib_ipoib", "ib_uverbs", "rdma_ucm"};
  return kModules;
}

Inventory read_inventory(const Root& root) {
  Inventory inv;
  inv.root = root.dir().string();
  const auto procs = process_names(root);
  for (const auto& name : root.list("/sys/class/infiniband")) inv.devices.push_back(read_device(root, name));
  for (const auto& name : root.list("/sys/class/net")) inv.netdevs.push_back(read_netdev(root, name));
  if (root.is_live()) {
    read_addresses_live(inv.netdevs);
  } else {
    read_ipv4_from_proc(root, inv.netdevs);
    read_ipv6_from_proc(root, inv.netdevs);
  }
  // IPoIB interfaces carry the port GUID in the last 8 bytes of their 20-byte address.
  for (auto& d : inv.devices) {
    for (auto& p : d.ports) {
      if (!p.netdev.empty() || !p.is_ib() || p.gids.empty()) continue;
      const auto guid = hex_only(p.gids.front()).substr(16);
      for (const auto& n : inv.netdevs) {
        const auto hw = hex_only(n.address);
        if (n.is_ipoib() && hw.size() == 40 && hw.substr(24) == guid) {
          p.netdev = n.name;
          break;
        }
      }
    }
  }
  if (const auto text = root.read("/proc/modules")) {
    for (const auto& line : split_lines(*text)) {
      const auto f = split_ws(line);
      if (!f.empty()) inv.modules.push_back(f[0]);
    }
    std::sort(inv.modules.begin(), inv.modules.end());
  }
  if (const auto release = root.read("/proc/sys/kernel/osrelease")) {
    const auto r = split_ws(*release);
    inv.kernel_has_rdma = root.exists("/sys/class/infiniband") || root.exists("/sys/module/ib_core") ||
                          inv.module_loaded("ib_core") ||
                          (!r.empty() && root.exists("/lib/modules/" + r[0] + "/kernel/drivers/infiniband"));
  }
  read_memlock(root, inv);
  for (const auto& [key, tuned] : tuned_sysctls()) {
    std::string path = "/proc/sys/" + key;
    std::replace(path.begin() + 10, path.end(), '.', '/');
    const auto value = root.read(path);
    std::string collapsed;
    if (value) {
      for (const auto& w : split_ws(*value)) collapsed += (collapsed.empty() ? "" : " ") + w;
    }
    inv.sysctls.push_back({key, collapsed, tuned});
  }
  read_sm(root, procs, inv);
  detect_network(root, procs, inv);
  return inv;
}

}  // namespace ibdisk::setup
