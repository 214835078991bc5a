#include "setup/plan.h"

#include <arpa/inet.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <map>
#include <regex>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/log.h"
#include "setup/diff.h"

namespace ibdisk::setup {
namespace fs = std::filesystem;
namespace {

constexpr const char* kModulesFile = "/etc/modules-load.d/ibdisk.conf";
constexpr const char* kSysctlFile = "/etc/sysctl.d/60-ibdisk-ipoib.conf";
constexpr const char* kUdevNamesFile = "/etc/udev/rules.d/70-ibdisk-names.rules";
constexpr const char* kOpensmDefaults = "/etc/default/opensm";
constexpr const char* kOpensmDropIn = "/etc/systemd/system/opensm.service.d/ibdisk.conf";
constexpr const char* kLimitsFile = "/etc/security/limits.d/90-ibdisk-memlock.conf";
constexpr const char* kSystemdMemlockFile = "/etc/systemd/system.conf.d/90-ibdisk-memlock.conf";

std::string header(const std::string& component) {
  return "# Written by `ibdisk setup apply " + component + "` (see docs/setup.md); `ibdisk setup undo` reverts it.\n";
}

std::string collapse(const std::string& s) {
  std::string out;
  for (const auto& w : split_ws(s)) out += (out.empty() ? "" : " ") + w;
  return out;
}

bool valid_ifname(const std::string& n) {
  static const std::regex re(R"(^[A-Za-z0-9_.-]{1,15}$)");
  return std::regex_match(n, re);
}

// "10.30.0.1/24" -> ok; throws naming the option otherwise.
void check_cidr(const std::string& what, const std::string& cidr) {
  const auto slash = cidr.find('/');
  in_addr a{};
  const std::string ip = cidr.substr(0, slash);
  const int prefix = slash == std::string::npos ? -1 : std::atoi(cidr.c_str() + slash + 1);
  if (slash == std::string::npos || inet_pton(AF_INET, ip.c_str(), &a) != 1 || prefix < 1 || prefix > 32) {
    throw SystemError(what + " " + cidr, "not an IPv4 address with a prefix length", "write it as 10.30.0.1/24");
  }
}

std::string first_ipv4(const NetDevice* n) {
  if (!n) return {};
  for (const auto& a : n->addresses) {
    if (a.find(':') == std::string::npos) return a;
  }
  return {};
}

class Builder {
 public:
  Builder(const Root& root, const Inventory& inv, const PlanOptions& opts) : root_(root), inv_(inv), opts_(opts) {}

  Plan build() {
    plan_.components = opts_.components;
    for (const auto& c : plan_components()) {
      if (std::find(opts_.components.begin(), opts_.components.end(), c) == opts_.components.end()) continue;
      if (c == "port-type") port_type();
      if (c == "modules") want_modules(ib_modules(), "modules");
      if (c == "sm") sm();
      if (c == "ipoib") ipoib();
      if (c == "sysctl") sysctl();
      if (c == "names") names();
      if (c == "soft-roce") soft_roce();
      if (c == "bond") bond();
      if (c == "memlock") memlock();
    }
    finish_modules();
    return std::move(plan_);
  }

 private:
  // --- primitives: each records only what differs from the tree under the root --------
  bool want_file(const std::string& path, const std::string& content, unsigned mode, const std::string& why) {
    const auto current = root_.is_symlink(path) ? std::nullopt : root_.read(path);
    struct stat st{};
    const bool mode_ok = ::stat(root_.at(path).c_str(), &st) == 0 && (st.st_mode & 07777) == mode;
    if (current && *current == content && mode_ok) return false;
    plan_.files.push_back({path, content, "", mode, why});
    return true;
  }

  bool want_link(const std::string& path, const std::string& target, const std::string& why) {
    if (root_.link_target(path) == target) return false;
    plan_.files.push_back({path, std::nullopt, target, 0777, why});
    return true;
  }

  bool want_write(const std::string& path, const std::string& value) {
    const auto current = root_.attr(path);
    if (collapse(current) == collapse(value)) return false;
    plan_.writes.push_back({path, value, current});
    return true;
  }

  void command(std::vector<std::string> argv, std::string why, std::vector<std::string> undo = {},
               bool needs_systemd = false) {
    plan_.commands.push_back({std::move(argv), std::move(why), std::move(undo), needs_systemd});
  }

  void want_modules(const std::vector<std::string>& mods, const std::string& why) {
    for (const auto& m : mods) modules_[m] = why;
  }

  // One modules-load.d file for every component: what it lists already, plus what is asked.
  void finish_modules() {
    if (modules_.empty()) return;
    std::set<std::string> all;
    if (const auto text = root_.read(kModulesFile)) {
      for (const auto& line : split_lines(*text)) {
        const auto t = trim(line);
        if (!t.empty() && t[0] != '#') all.insert(t);
      }
    }
    std::vector<std::string> missing;
    for (const auto& [m, why] : modules_) {
      all.insert(m);
      if (!inv_.module_loaded(m)) missing.push_back(m);
    }
    std::string content = "# Written by `ibdisk setup apply` (see docs/setup.md); `ibdisk setup undo` reverts it.\n"
                          "# Kernel modules for RDMA, IPoIB and bonding, loaded at every boot.\n";
    for (const auto& m : all) content += m + "\n";
    want_file(kModulesFile, content, 0644, "load the RDMA modules at boot");
    if (!missing.empty()) {
      std::vector<std::string> argv = {"modprobe", "-a"};
      argv.insert(argv.end(), missing.begin(), missing.end());
      // First: the commands of every component need their modules.
      plan_.commands.insert(plan_.commands.begin(), Command{argv, "load them now", {}, false});
    }
  }

  bool systemd_running() const { return root_.exists("/run/systemd/system"); }

  // --- components -------------------------------------------------------------------
  void port_type() {
    if (opts_.device.empty() || opts_.port < 1 || opts_.link_type.empty()) {
      throw SystemError("setup plan port-type", "needs --device, --port and --link-type",
                        "e.g. --device 0000:05:00.0 --port 1 --link-type ib (ib, eth or vpi)");
    }
    const int want = link_type_value(opts_.link_type);
    if (want == 0) {
      throw SystemError("--link-type " + opts_.link_type, "unknown port type", "use ib, eth or vpi");
    }
    if (opts_.mst.empty()) {
      throw SystemError("setup plan port-type", "no `mstconfig query` output to read the card's port types from",
                        "install mstflint (apt-get install mstflint) and run on the host, or pass --mstconfig FILE");
    }
    const MstDevice* dev = nullptr;
    for (const auto& m : opts_.mst) {
      if (m.pci == opts_.device) dev = &m;
    }
    if (!dev) {
      std::string seen;
      for (const auto& m : opts_.mst) seen += (seen.empty() ? "" : ", ") + m.pci;
      throw SystemError("--device " + opts_.device, "not in the `mstconfig query` output (devices: " + seen + ")",
                        "give one of the listed PCI addresses");
    }
    const std::string key = "LINK_TYPE_P" + std::to_string(opts_.port);
    const int have = dev->link_type(opts_.port);
    if (have == 0) {
      throw SystemError("--port " + std::to_string(opts_.port), dev->pci + " has no " + key,
                        "the card has fewer ports, or it is not a VPI card (no port type to set)");
    }
    if (have == want) return;
    command({"mstconfig", "-y", "-d", dev->pci, "set", key + "=" + std::to_string(want)},
            "port " + std::to_string(opts_.port) + ": " + link_type_name(have) + " -> " + link_type_name(want) +
                " in the card's firmware configuration",
            {"mstconfig", "-y", "-d", dev->pci, "set", key + "=" + std::to_string(have)});
    plan_.notes.push_back("the port type changes at the next reboot (the firmware reads it at power-up)");
  }

  void sm() {
    std::string guid = opts_.guid;
    if (guid.empty()) {
      // The first InfiniBand port that has a link but no subnet manager, else the first one.
      for (int pass = 0; pass < 2 && guid.empty(); ++pass) {
        for (const auto& d : inv_.devices) {
          for (const auto& p : d.ports) {
            if (!p.is_ib() || !guid.empty()) continue;
            if (pass == 0 && (p.has_sm() || p.phys_state != "LinkUp")) continue;
            guid = p.port_guid();
          }
        }
      }
    }
    if (guid.empty()) {
      throw SystemError("setup plan sm", "no InfiniBand port found to run the subnet manager on",
                        "pass --guid with the port GUID (`ibstat -p`), or check `ibdisk setup status`");
    }
    static const std::regex kGuid(R"(^0x[0-9a-fA-F]{16}$)");
    if (!std::regex_match(guid, kGuid)) {
      throw SystemError("--guid " + guid, "not a port GUID", "write it as 0x0002c903003f02f1 (`ibstat -p` lists them)");
    }
    // Debian's opensm init script reads PORTS; the drop-in pins systemd's unit to the same port.
    std::string defaults;
    bool replaced = false;
    if (const auto text = root_.read(kOpensmDefaults)) {
      for (const auto& line : split_lines(*text)) {
        if (trim(line).rfind("PORTS=", 0) == 0) {
          defaults += "PORTS=\"" + guid + "\"\n";
          replaced = true;
        } else {
          defaults += line + "\n";
        }
      }
    } else {
      defaults = header("sm") + "# Port GUIDs opensm manages (Debian's opensm init script reads this).\n";
    }
    if (!replaced) defaults += "PORTS=\"" + guid + "\"\n";
    const bool c1 = want_file(kOpensmDefaults, defaults, 0644, "opensm manages port " + guid);
    const bool c2 = want_file(kOpensmDropIn,
                              header("sm") + "[Service]\nType=simple\nExecStart=\nExecStart=/usr/sbin/opensm --guid " +
                                  guid + "\n",
                              0644, "run opensm on port " + guid + " under systemd");
    if (!inv_.sm.opensm_installed) command({"apt-get", "install", "-y", "-o", "Dpkg::Options::=--force-confold", "opensm"},
                                             "opensm is not installed (keeping the /etc/default/opensm written above)");
    if (c2) command({"systemctl", "daemon-reload"}, "systemd reads the drop-in", {}, true);
    if (!inv_.sm.opensm_enabled) {
      command({"systemctl", "enable", "opensm"}, "start the subnet manager at boot", {"systemctl", "disable", "opensm"}, true);
    }
    if (!inv_.sm.opensm_running || c1 || c2) {
      command({"systemctl", "restart", "opensm"}, "run it now on " + guid,
              inv_.sm.opensm_running ? std::vector<std::string>{} : std::vector<std::string>{"systemctl", "stop", "opensm"},
              true);
    }
    plan_.notes.push_back("one subnet manager per fabric is enough: with two hosts and a cable, run it on one of them");
  }

  NetworkSystem network() const {
    const auto n = opts_.network.value_or(inv_.network);
    if (n == NetworkSystem::kNone) {
      throw SystemError("network configuration", inv_.network_reason,
                        "pass --network ifupdown, networkd or networkmanager");
    }
    return n;
  }

  // ifupdown: two definitions of one interface make ifup fail, so an existing stanza for
  // iface in /etc/network/interfaces or interfaces.d is commented out; and interfaces.d
  // must be sourced for ours to count.
  std::string comment_out_stanza(const std::string& text, const std::string& iface, bool* sourced) {
    std::string out;
    bool in_stanza = false;
    for (const auto& line : split_lines(text)) {
      const auto w = split_ws(line);
      const bool indented = !line.empty() && (line[0] == ' ' || line[0] == '\t');
      if (in_stanza && indented && !w.empty()) {
        out += "#ibdisk# " + line + "\n";
        continue;
      }
      in_stanza = false;
      if (w.size() >= 2 && w[0] == "iface" && w[1] == iface) {
        in_stanza = true;
        out += "# ibdisk: " + iface + " is configured in /etc/network/interfaces.d/ibdisk-" + iface + "\n";
        out += "#ibdisk# " + line + "\n";
        continue;
      }
      if (w.size() == 2 && (w[0] == "auto" || w[0] == "allow-hotplug" || w[0] == "allow-auto") && w[1] == iface) {
        out += "#ibdisk# " + line + "\n";
        continue;
      }
      if (sourced && w.size() >= 2 &&
          ((w[0] == "source" && w[1].rfind("/etc/network/interfaces.d/", 0) == 0) ||
           (w[0] == "source-directory" && w[1].find("interfaces.d") != std::string::npos))) {
        *sourced = true;
      }
      out += line + "\n";
    }
    return out;
  }

  void ifupdown_existing(const std::string& iface) {
    const std::string ours = "ibdisk-" + iface;
    for (const auto& f : root_.list("/etc/network/interfaces.d")) {
      const std::string path = "/etc/network/interfaces.d/" + f;
      if (f == ours || root_.is_dir(path)) continue;
      if (const auto text = root_.read(path)) {
        const auto out = comment_out_stanza(*text, iface, nullptr);
        if (out != *text) want_file(path, out, 0644, "hand " + iface + " to interfaces.d/" + ours);
      }
    }
    const auto text = root_.read("/etc/network/interfaces");
    if (!text) {
      want_file("/etc/network/interfaces", header("ipoib") + "source /etc/network/interfaces.d/*\n", 0644,
                "ifupdown reads interfaces.d");
      return;
    }
    bool sourced = false;
    std::string out = comment_out_stanza(*text, iface, &sourced);
    if (!sourced) out += "\nsource /etc/network/interfaces.d/*\n";
    want_file("/etc/network/interfaces", out, 0644, "hand " + iface + " to interfaces.d/" + ours);
  }

  void ipoib() {
    const std::string& iface = opts_.iface;
    if (iface.empty() || !valid_ifname(iface)) {
      throw SystemError("setup plan ipoib", "needs --iface with the IPoIB interface name", "e.g. --iface ib0");
    }
    const auto* n = inv_.netdev(iface);
    if (n && !n->is_ipoib()) {
      throw SystemError("--iface " + iface, "is not an IPoIB interface (ARP type " + std::to_string(n->type) + ", not 32)",
                        "pick one of the ibN interfaces `ibdisk setup status` lists");
    }
    std::string address = opts_.address.empty() ? first_ipv4(n) : opts_.address;
    if (address.empty()) {
      throw SystemError("setup plan ipoib", iface + " has no IPv4 address to keep", "pass --address, e.g. 10.30.0.1/24");
    }
    check_cidr("--address", address);
    const std::string mtu = std::to_string(opts_.mtu);
    const std::string why = "IPoIB " + iface + ": connected mode, MTU " + mtu + ", " + address;
    switch (network()) {
      case NetworkSystem::kIfupdown: {
        ifupdown_existing(iface);
        want_file("/etc/network/interfaces.d/ibdisk-" + iface,
                  header("ipoib") + "auto " + iface + "\niface " + iface + " inet static\n    address " + address +
                      "\n    pre-up echo connected > /sys/class/net/" + iface + "/mode\n    mtu " + mtu + "\n",
                  0644, why);
        break;
      }
      case NetworkSystem::kNetworkd: {
        if (want_file("/etc/systemd/network/60-ibdisk-" + iface + ".network",
                      header("ipoib") + "[Match]\nName=" + iface + "\n\n[Link]\nMTUBytes=" + mtu +
                          "\n\n[Network]\nAddress=" + address + "\n\n[IPoIB]\nMode=connected\n",
                      0644, why)) {
          command({"networkctl", "reload"}, "systemd-networkd reads the new file", {}, true);
        }
        break;
      }
      case NetworkSystem::kNetworkManager: {
        // NetworkManager ignores keyfiles that others can read.
        if (want_file("/etc/NetworkManager/system-connections/ibdisk-" + iface + ".nmconnection",
                      header("ipoib") + "[connection]\nid=ibdisk-" + iface + "\ntype=infiniband\ninterface-name=" + iface +
                          "\nautoconnect=true\n\n[infiniband]\ntransport-mode=connected\nmtu=" + mtu +
                          "\n\n[ipv4]\nmethod=manual\naddress1=" + address + "\n\n[ipv6]\nmethod=ignore\n",
                      0600, why)) {
          command({"nmcli", "connection", "reload"}, "NetworkManager reads the new keyfile");
          command({"nmcli", "connection", "up", "ibdisk-" + iface}, "activate it now", {"nmcli", "connection", "down", "ibdisk-" + iface});
        }
        break;
      }
      case NetworkSystem::kNone: break;
    }
    if (!n) {
      plan_.notes.push_back(iface + " does not exist now (is ib_ipoib loaded? `ibdisk setup apply modules`); the "
                                    "configuration applies when it appears");
      return;
    }
    // The same settings now, without waiting for a reboot: mode before MTU (datagram caps it).
    want_write("/sys/class/net/" + iface + "/mode", "connected");
    want_write("/sys/class/net/" + iface + "/mtu", mtu);
    if (std::find(n->addresses.begin(), n->addresses.end(), address) == n->addresses.end()) {
      command({"ip", "address", "add", address, "dev", iface}, "the address now", {"ip", "address", "del", address, "dev", iface});
    }
    if (n->operstate == "down") command({"ip", "link", "set", iface, "up"}, "bring it up now");
  }

  void sysctl() {
    std::string content = header("sysctl") +
                          "# TCP buffer tuning for IPoIB (Mellanox's linux-sysctl-tuning, ESnet's maxima); each value is\n"
                          "# at least the tuned one and keeps this host's own value where that was larger.\n";
    for (const auto& s : inv_.sysctls) {
      if (s.value.empty()) continue;  // the running kernel does not have it
      content += s.key + " = " + s.target() + "\n";
      if (!s.matches()) {
        std::string path = "/proc/sys/" + s.key;
        std::replace(path.begin() + 10, path.end(), '.', '/');
        want_write(path, s.target());
      }
    }
    want_file(kSysctlFile, content, 0644, "IPoIB TCP tuning at every boot");
  }

  void names() {
    if (opts_.renames.empty()) {
      throw SystemError("setup plan names", "needs at least one --rename OLD=NEW", "e.g. --rename ens5=eth40a");
    }
    std::map<std::string, std::string> rules;  // NEW -> rule line, kept sorted
    if (const auto text = root_.read(kUdevNamesFile)) {
      static const std::regex kName(R"re(NAME="([^"]+)")re");
      for (const auto& line : split_lines(*text)) {
        std::smatch m;
        if (line.empty() || line[0] == '#' || !std::regex_search(line, m, kName)) continue;
        rules[m[1].str()] = line;
      }
    }
    for (const auto& r : opts_.renames) {
      const auto eq = r.find('=');
      const std::string from = r.substr(0, eq), to = eq == std::string::npos ? "" : r.substr(eq + 1);
      if (eq == std::string::npos || !valid_ifname(from) || !valid_ifname(to)) {
        throw SystemError("--rename " + r, "not OLD=NEW with interface names of at most 15 characters",
                          "e.g. --rename ens5=eth40a");
      }
      const NetDevice* n = inv_.netdev(from);
      if (!n) n = inv_.netdev(to);  // already renamed: keep its rule
      if (!n) {
        throw SystemError("--rename " + r, "no interface " + from + " (or " + to + ") on this host",
                          "`ibdisk setup status` lists the interfaces");
      }
      const std::string dev_id = root_.attr("/sys/class/net/" + n->name + "/dev_id");
      std::string addr_match = n->address;
      if (n->is_ipoib() && n->address.size() == 59) {
        // The first 4 bytes of an IPoIB address are a queue pair number that changes; match the GUID.
        addr_match = "?*" + n->address.substr(35);
      }
      for (auto it = rules.begin(); it != rules.end();) {
        it = (it->first != to && it->second.find("ATTR{address}==\"" + addr_match + "\"") != std::string::npos)
                 ? rules.erase(it)
                 : std::next(it);
      }
      rules[to] = "SUBSYSTEM==\"net\", ACTION==\"add\", DRIVERS==\"?*\", ATTR{address}==\"" + addr_match +
                  "\", ATTR{dev_id}==\"" + (dev_id.empty() ? "0x0" : dev_id) + "\", ATTR{type}==\"" +
                  std::to_string(n->type) + "\", NAME=\"" + to + "\"";
      if (n->name != to) {
        plan_.notes.push_back(n->name + " becomes " + to + " when it is next added (reboot); configuration that names " +
                              n->name + " must use " + to);
      }
    }
    std::string content = header("names") + "# Persistent interface names by hardware address.\n";
    for (const auto& [name, line] : rules) content += line + "\n";
    want_file(kUdevNamesFile, content, 0644, "persistent interface names");
  }

  void soft_roce() {
    const std::string& nd = opts_.netdev;
    if (nd.empty() || !valid_ifname(nd)) {
      throw SystemError("setup plan soft-roce", "needs --netdev with an Ethernet interface", "e.g. --netdev eth0");
    }
    const auto* n = inv_.netdev(nd);
    if (!n) throw SystemError("--netdev " + nd, "no such interface", "`ibdisk setup status` lists the interfaces");
    if (n->type != 1) {
      throw SystemError("--netdev " + nd, "is not Ethernet (ARP type " + std::to_string(n->type) + ")",
                        "Soft-RoCE runs on an Ethernet interface");
    }
    const auto [dev, port] = inv_.port_of(nd);
    if (dev && !dev->soft_roce) {
      throw SystemError("--netdev " + nd, "already has RDMA: " + dev->name + " port " + std::to_string(port->number),
                        "use the hardware device; Soft-RoCE is for NICs without one");
    }
    const std::string name = opts_.rxe_name.empty() ? "rxe_" + nd : opts_.rxe_name;
    const std::string unit = "ibdisk-rxe-" + nd + ".service";
    const bool c = want_file("/etc/systemd/system/" + unit,
                             header("soft-roce") + "[Unit]\nDescription=Soft-RoCE device " + name + " on " + nd +
                                 "\nAfter=sys-subsystem-net-devices-" + nd + ".device network.target\nBindsTo=sys-subsystem-net-devices-" +
                                 nd + ".device\n\n[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStartPre=/sbin/modprobe rdma_rxe\n"
                                 "ExecStart=/bin/sh -c 'rdma link show " + name + "/1 >/dev/null 2>&1 || rdma link add " +
                                 name + " type rxe netdev " + nd + "'\nExecStop=/bin/sh -c 'rdma link delete " + name +
                                 " 2>/dev/null || true'\n\n[Install]\nWantedBy=multi-user.target\n",
                             0644, "create " + name + " on " + nd + " at every boot");
    want_link("/etc/systemd/system/multi-user.target.wants/" + unit, "/etc/systemd/system/" + unit,
              "enable " + unit);
    if (c) command({"systemctl", "daemon-reload"}, "systemd reads the unit", {}, true);
    want_modules({"rdma_rxe", "ib_uverbs", "rdma_ucm"}, "soft-roce");
    if (!dev) {
      command({"rdma", "link", "add", name, "type", "rxe", "netdev", nd}, "the Soft-RoCE device now",
              {"rdma", "link", "delete", name});
    }
  }

  void bond() {
    const std::string& b = opts_.bond_name;
    if (opts_.bond_mode != "active-backup" && opts_.bond_mode != "balance-rr") {
      throw SystemError("--bond-mode " + opts_.bond_mode, "not a supported bonding mode", "use active-backup or balance-rr");
    }
    if (opts_.slaves.size() < 2) {
      throw SystemError("setup plan bond", "needs --slaves with two or more interfaces", "e.g. --slaves eth40a,eth40b");
    }
    if (opts_.address.empty()) throw SystemError("setup plan bond", "needs --address", "e.g. --address 10.30.0.1/24");
    check_cidr("--address", opts_.address);
    if (!valid_ifname(b)) throw SystemError("--bond-name " + b, "not an interface name", "e.g. bond0");
    for (const auto& s : opts_.slaves) {
      const auto* n = inv_.netdev(s);
      if (!n) throw SystemError("--slaves " + s, "no such interface", "`ibdisk setup status` lists the interfaces");
      if (n->is_ipoib() && opts_.bond_mode != "active-backup") {
        throw SystemError("--slaves " + s, "is IPoIB, which bonds only in active-backup mode", "use --bond-mode active-backup");
      }
    }
    const std::string mode = opts_.bond_mode;
    const std::string why = "bond " + b + " (" + mode + ") over " + [&] {
      std::string s;
      for (const auto& x : opts_.slaves) s += (s.empty() ? "" : ",") + x;
      return s;
    }();
    want_modules({"bonding"}, "bond");
    switch (network()) {
      case NetworkSystem::kIfupdown: {
        std::string t = header("bond");
        std::string slaves;
        for (const auto& s : opts_.slaves) {
          slaves += (slaves.empty() ? "" : " ") + s;
          t += "allow-hotplug " + s + "\niface " + s + " inet manual\n    bond-master " + b + "\n\n";
        }
        t += "auto " + b + "\niface " + b + " inet static\n    address " + opts_.address + "\n    bond-slaves " + slaves +
             "\n    bond-mode " + mode + "\n    bond-miimon 100\n    bond-downdelay 200\n    bond-updelay 200\n";
        if (want_file("/etc/network/interfaces.d/ibdisk-" + b, t, 0644, why)) {
          command({"ifup", b}, "bring the bond up now", {"ifdown", b});
        }
        ifupdown_sourced();
        break;
      }
      case NetworkSystem::kNetworkd: {
        bool c = want_file("/etc/systemd/network/60-ibdisk-" + b + ".netdev",
                           header("bond") + "[NetDev]\nName=" + b + "\nKind=bond\n\n[Bond]\nMode=" + mode +
                               "\nMIIMonitorSec=100ms\nUpDelaySec=200ms\nDownDelaySec=200ms\n",
                           0644, why);
        c |= want_file("/etc/systemd/network/60-ibdisk-" + b + ".network",
                       header("bond") + "[Match]\nName=" + b + "\n\n[Network]\nAddress=" + opts_.address + "\n", 0644, why);
        for (const auto& s : opts_.slaves) {
          c |= want_file("/etc/systemd/network/60-ibdisk-" + b + "-" + s + ".network",
                         header("bond") + "[Match]\nName=" + s + "\n\n[Network]\nBond=" + b + "\n", 0644, why);
        }
        if (c) command({"networkctl", "reload"}, "systemd-networkd reads the new files", {}, true);
        break;
      }
      case NetworkSystem::kNetworkManager: {
        bool c = want_file("/etc/NetworkManager/system-connections/ibdisk-" + b + ".nmconnection",
                           header("bond") + "[connection]\nid=ibdisk-" + b + "\ntype=bond\ninterface-name=" + b +
                               "\n\n[bond]\nmode=" + mode + "\nmiimon=100\nupdelay=200\ndowndelay=200\n\n[ipv4]\nmethod=manual\naddress1=" +
                               opts_.address + "\n\n[ipv6]\nmethod=ignore\n",
                           0600, why);
        for (const auto& s : opts_.slaves) {
          c |= want_file("/etc/NetworkManager/system-connections/ibdisk-" + b + "-" + s + ".nmconnection",
                         header("bond") + "[connection]\nid=ibdisk-" + b + "-" + s + "\ntype=ethernet\ninterface-name=" + s +
                             "\ncontroller=" + b + "\nport-type=bond\n",
                         0600, why);
        }
        if (c) {
          command({"nmcli", "connection", "reload"}, "NetworkManager reads the new keyfiles");
          command({"nmcli", "connection", "up", "ibdisk-" + b}, "activate the bond now", {"nmcli", "connection", "down", "ibdisk-" + b});
        }
        break;
      }
      case NetworkSystem::kNone: break;
    }
    if (mode == "balance-rr") {
      plan_.notes.push_back("balance-rr with one cable per port pair gives resilience, not double bandwidth for one "
                            "TCP stream (reordering); both hosts need the same bond");
    }
  }

  // The bond file lives in interfaces.d: make sure /etc/network/interfaces sources it.
  void ifupdown_sourced() {
    const auto text = root_.read("/etc/network/interfaces");
    if (text && (text->find("source /etc/network/interfaces.d/") != std::string::npos ||
                 text->find("source-directory") != std::string::npos)) {
      return;
    }
    want_file("/etc/network/interfaces", (text ? *text + "\n" : header("bond")) + "source /etc/network/interfaces.d/*\n",
              0644, "ifupdown reads interfaces.d");
  }

  void memlock() {
    want_file(kLimitsFile,
              header("memlock") + "# RDMA pins memory: no locked-memory limit for logins (pam_limits; root needs\n"
                                  "# its own lines, * does not cover it).\n"
                                  "*    soft memlock unlimited\n*    hard memlock unlimited\n"
                                  "root soft memlock unlimited\nroot hard memlock unlimited\n",
              0644, "locked-memory limit for logins");
    want_file(kSystemdMemlockFile, header("memlock") + "[Manager]\nDefaultLimitMEMLOCK=infinity\n", 0644,
              "locked-memory limit for systemd services");
    if (!plan_.files.empty()) {
      plan_.notes.push_back("new limits apply to new logins, and to services after `systemctl daemon-reexec` or a reboot");
    }
  }

  const Root& root_;
  const Inventory& inv_;
  const PlanOptions& opts_;
  Plan plan_;
  std::map<std::string, std::string> modules_;
};

}  // namespace

const std::vector<std::string>& plan_components() {
  static const std::vector<std::string> kComponents = {"port-type", "modules", "sm",        "ipoib", "sysctl",
                                                       "names",     "soft-roce", "bond",    "memlock"};
  return kComponents;
}

Plan make_plan(const Root& root, const Inventory& inv, const PlanOptions& opts) {
  for (const auto& c : opts.components) {
    if (std::find(plan_components().begin(), plan_components().end(), c) == plan_components().end()) {
      std::string all;
      for (const auto& k : plan_components()) all += (all.empty() ? "" : ", ") + k;
      throw SystemError("component '" + c + "'", "unknown", "use one or more of: " + all);
    }
  }
  return Builder(root, inv, opts).build();
}

std::string shell_join(const std::vector<std::string>& argv) {
  std::string out;
  for (const auto& a : argv) {
    if (!out.empty()) out += ' ';
    const bool plain = !a.empty() && a.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                                                         "_-.,/:=+@%") == std::string::npos;
    if (plain) {
      out += a;
    } else {
      out += '\'';
      for (char c : a) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
      out += '\'';
    }
  }
  return out;
}

std::string format_plan(const Root& root, const Plan& plan) {
  std::ostringstream o;
  std::string comps;
  for (const auto& c : plan.components) comps += (comps.empty() ? "" : " ") + c;
  o << "Plan for: " << comps << "\n";
  if (plan.empty()) {
    o << "Nothing to do: the system already matches.\n";
    for (const auto& n : plan.notes) o << "note: " << n << "\n";
    return o.str();
  }
  if (!plan.files.empty()) o << "\nFiles (" << plan.files.size() << "):\n";
  for (const auto& f : plan.files) {
    o << "\n# " << f.path << ": " << f.why << "\n";
    const auto old_link = root.link_target(f.path);
    if (!f.link_target.empty()) {
      o << "symlink " << f.path << " -> " << f.link_target
        << (old_link ? " (was -> " + *old_link + ")" : std::string(" (new)")) << "\n";
      continue;
    }
    const auto old = old_link ? std::nullopt : root.read(f.path);
    const std::string a = old ? "a" + f.path : "/dev/null";
    const std::string b = f.content ? "b" + f.path : "/dev/null";
    const std::string d = unified_diff(old.value_or(""), f.content.value_or(""), a, b);
    if (d.empty()) {
      char m[8];
      std::snprintf(m, sizeof m, "%04o", f.mode);
      o << "mode of " << f.path << " -> " << m << "\n";
    } else {
      o << d;
    }
  }
  if (!plan.writes.empty()) {
    o << "\nKernel settings, now (the files above make them persistent):\n";
    for (const auto& w : plan.writes) {
      o << "  " << w.path << ": " << (w.old_value.empty() ? "(absent)" : collapse(w.old_value)) << " -> " << w.value << "\n";
    }
  }
  if (!plan.commands.empty()) {
    o << "\nCommands (run by apply when --root is /):\n";
    for (const auto& c : plan.commands) o << "  " << shell_join(c.argv) << "   # " << c.why << "\n";
  }
  for (const auto& n : plan.notes) o << (&n == &plan.notes.front() ? "\n" : "") << "note: " << n << "\n";
  return o.str();
}

}  // namespace ibdisk::setup
