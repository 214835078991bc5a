#include "setup/doctor.h"

#include <algorithm>
#include <cstdio>

namespace ibdisk::setup {
namespace {

std::string fmt_gb(double gbps) { return format_gbps(gbps); }

std::string pcie_text(double gts, int width) {
  char buf[64];
  const int gen = pcie_generation(gts);
  std::snprintf(buf, sizeof buf, "PCIe %d.0 x%d (%.1f GT/s)", gen, width, gts);
  return buf;
}

// Data rate of a port: the Ethernet speed for RoCE ports when the driver reports it,
// otherwise what the InfiniBand rate encodes.
double port_gbps(const Inventory& inv, const RdmaPort& p) {
  if (!p.is_ib() && !p.netdev.empty()) {
    if (const auto* n = inv.netdev(p.netdev); n && n->speed_mbps > 0) return n->speed_mbps / 1000.0;
  }
  return p.ib_rate.data_gbps;
}

std::string ipoib_address_arg(const NetDevice& n) {
  for (const auto& a : n.addresses) {
    if (a.find(':') == std::string::npos) return " --address " + a;
  }
  return " --address ADDRESS/PREFIX";
}

void check_ports(const Inventory& inv, std::vector<Finding>& out) {
  for (const auto& d : inv.devices) {
    for (const auto& p : d.ports) {
      const std::string subject = d.name + " port " + std::to_string(p.number);
      if (p.state == "ACTIVE") continue;
      Finding f;
      f.subject = subject;
      const bool link_up = p.phys_state == "LinkUp";
      if (p.is_ib() && link_up && !p.has_sm()) {
        f.severity = Severity::kError;
        f.id = "no-subnet-manager";
        f.problem = "port is " + p.state + " with the physical link up, and no subnet manager has configured it (sm_lid " +
                    (p.sm_lid.empty() ? "absent" : p.sm_lid) + ")";
        f.reason = "an InfiniBand port becomes ACTIVE only after a subnet manager assigns it a LID; with two cards "
                   "and no managed switch, one of the hosts must run opensm";
        if (!inv.sm.opensm_installed) f.fix.push_back("apt-get install opensm");
        const auto guid = p.port_guid();
        f.fix.push_back("ibdisk setup apply sm" + (guid.empty() ? std::string() : " --guid " + guid));
      } else if (p.is_ib() && link_up) {
        f.severity = Severity::kWarning;
        f.id = "port-not-active";
        f.problem = "port is " + p.state + " although a subnet manager is known (sm_lid " + p.sm_lid + ")";
        f.reason = "the subnet manager has not finished bringing the port up; it may be sweeping or may have "
                   "failed to configure it";
        f.fix.push_back("ibstat " + d.name + " " + std::to_string(p.number) + "   # look again in a few seconds");
        f.fix.push_back("journalctl -u opensm   # on the host that runs the subnet manager");
      } else {
        f.severity = Severity::kWarning;
        f.id = "port-not-active";
        f.problem = "port is " + (p.state.empty() ? std::string("in an unknown state") : p.state) +
                    ", physical state " + (p.phys_state.empty() ? std::string("unknown") : p.phys_state);
        if (d.soft_roce) {
          f.reason = "a Soft-RoCE port follows its Ethernet interface (" + d.parent + "), which is down";
          f.fix.push_back("ip link set " + (d.parent.empty() ? p.netdev : d.parent) + " up");
        } else if (p.phys_state == "Disabled" && !p.netdev.empty()) {
          f.reason = "the port is administratively down";
          f.fix.push_back("ip link set " + p.netdev + " up");
        } else {
          f.reason = "no physical link: no cable, a bad cable or transceiver, or the other end is down or in the "
                     "other port type (InfiniBand against Ethernet)";
          f.fix.push_back("check the cable, then run `ibdisk setup doctor` on the peer");
        }
      }
      out.push_back(std::move(f));
    }
  }
}

void check_port_types(const Inventory& inv, const std::vector<MstDevice>& mst, std::vector<Finding>& out) {
  for (const auto& m : mst) {
    for (int port = 1; port <= 2; ++port) {
      if (m.link_type(port) != 3) continue;
      Finding f;
      f.severity = Severity::kWarning;
      f.id = "port-type-vpi";
      f.subject = m.pci + " port " + std::to_string(port);
      f.problem = "firmware LINK_TYPE_P" + std::to_string(port) + " is " + m.config.at("LINK_TYPE_P" + std::to_string(port)) +
                  " (auto-sense)";
      f.reason = "an auto-sensing port picks its type from the cable and the peer at every boot; two auto ports "
                 "facing each other can settle on either type, so pin the type you use";
      f.fix.push_back("ibdisk setup apply port-type --device " + m.pci + " --port " + std::to_string(port) +
                      " --link-type ib   # or eth; takes effect after a reboot");
      out.push_back(std::move(f));
    }
  }
  if (!mst.empty()) return;
  for (const auto& d : inv.devices) {
    if (!d.pci) continue;
    for (const auto& p : d.ports) {
      if (p.port_type.rfind("auto", 0) != 0) continue;
      Finding f;
      f.severity = Severity::kWarning;
      f.id = "port-type-vpi";
      f.subject = d.name + " port " + std::to_string(p.number) + " (" + d.pci->address + ")";
      f.problem = "the driver runs the port in auto-sense mode: mlx4_port" + std::to_string(p.number) + " reads \"" +
                  p.port_type + "\"";
      f.reason = "an auto-sensing port picks its type from the cable and the peer at every boot; two auto ports "
                 "facing each other can settle on either type, so pin the type you use";
      f.fix.push_back("ibdisk setup apply port-type --device " + d.pci->address + " --port " + std::to_string(p.number) +
                      " --link-type " + (p.port_type.find("eth") != std::string::npos ? "eth" : "ib") +
                      "   # needs mstconfig (apt-get install mstflint); takes effect after a reboot");
      out.push_back(std::move(f));
    }
  }
}

void check_pcie(const Inventory& inv, std::vector<Finding>& out) {
  for (const auto& c : ceilings(inv)) {
    const auto* d = inv.device(c.device);
    const auto& pci = *d->pci;
    const bool degraded = pci.cur_gbps() + 0.01 < pci.max_gbps();
    if (!degraded && c.limit != "PCIe") continue;
    Finding f;
    f.subject = pci.address + " (" + (pci.model.empty() ? d->name : pci.model) + ")";
    const std::string ceiling = "ceiling per direction = min(link " + fmt_gb(c.link_gbps) + ", PCIe " + fmt_gb(c.pcie_gbps) +
                                ") = " + fmt_gb(c.ceiling_gbps) + ", limited by the " + c.limit +
                                " (before PCIe protocol overhead)";
    if (degraded) {
      f.id = "pcie-slot-limited";
      f.severity = c.limit == "PCIe" ? Severity::kWarning : Severity::kInfo;
      f.problem = "the card runs at " + pcie_text(pci.cur_speed_gts, pci.cur_width) + " = " + fmt_gb(pci.cur_gbps()) +
                  " but can do " + pcie_text(pci.max_speed_gts, pci.max_width) + " = " + fmt_gb(pci.max_gbps()) +
                  "; " + ceiling;
      f.reason = pci.cur_width < pci.max_width
                     ? "the slot is narrower than the card (often an x16-sized slot wired x4, or lanes shared with "
                       "M.2 or another slot)"
                     : "the slot or the BIOS runs the link at a lower PCIe generation than the card supports";
      f.fix.push_back("move the card to a slot wired for " + pcie_text(pci.max_speed_gts, pci.max_width) +
                      " (board manual), or raise the slot's link speed/width in the BIOS");
      f.fix.push_back("lspci -vv -s " + pci.address + " | grep -E 'LnkCap|LnkSta'   # confirm after the change");
    } else {
      f.id = "pcie-card-limited";
      f.severity = Severity::kInfo;
      f.problem = "the card's own PCIe link " + pcie_text(pci.cur_speed_gts, pci.cur_width) + " carries less than its port; " +
                  ceiling;
      f.reason = "this card cannot fill its link; a newer card generation can";
      f.fix.push_back("nothing to change on this host");
    }
    out.push_back(std::move(f));
  }
}

// A slot running below the card, on a card with no ACTIVE port (so no ceiling yet).
void check_pcie_idle(const Inventory& inv, std::vector<Finding>& out) {
  const auto cs = ceilings(inv);
  for (const auto& d : inv.devices) {
    if (!d.pci || d.soft_roce || pcie_generation(d.pci->cur_speed_gts) == 0) continue;
    if (std::any_of(cs.begin(), cs.end(), [&](const Ceiling& c) { return c.device == d.name; })) continue;
    const auto& pci = *d.pci;
    if (pci.cur_gbps() + 0.01 >= pci.max_gbps()) continue;
    Finding f;
    f.severity = Severity::kWarning;
    f.id = "pcie-slot-limited";
    f.subject = pci.address + " (" + (pci.model.empty() ? d.name : pci.model) + ")";
    f.problem = "the card runs at " + pcie_text(pci.cur_speed_gts, pci.cur_width) + " = " + fmt_gb(pci.cur_gbps()) +
                " but can do " + pcie_text(pci.max_speed_gts, pci.max_width) + " = " + fmt_gb(pci.max_gbps()) +
                "; no port is ACTIVE, so the link rate it will have to carry is not known yet";
    f.reason = pci.cur_width < pci.max_width ? "the slot is narrower than the card"
                                             : "the slot or the BIOS runs the link at a lower PCIe generation than the card supports";
    f.fix.push_back("move the card to a slot wired for " + pcie_text(pci.max_speed_gts, pci.max_width) +
                    " (board manual), or raise the slot's link speed/width in the BIOS");
    out.push_back(std::move(f));
  }
}

void check_ipoib(const Inventory& inv, std::vector<Finding>& out) {
  for (const auto& n : inv.netdevs) {
    if (!n.is_ipoib()) continue;
    const std::string apply = "ibdisk setup apply ipoib --iface " + n.name + ipoib_address_arg(n);
    if (n.mode == "datagram") {
      Finding f;
      f.severity = Severity::kWarning;
      f.id = "ipoib-datagram";
      f.subject = n.name;
      f.problem = "IPoIB runs in datagram mode with MTU " + std::to_string(n.mtu);
      f.reason = "datagram mode caps the MTU at the InfiniBand MTU (2044 or 4092) and gives well under "
                 "1 Gbit/s of TCP on many hosts; connected mode with MTU 65520 is several times faster";
      f.fix.push_back("echo connected > /sys/class/net/" + n.name + "/mode && ip link set " + n.name + " mtu 65520   # now");
      f.fix.push_back(apply + "   # persistent");
      out.push_back(std::move(f));
    } else if (n.mtu < kIpoibConnectedMtu) {
      Finding f;
      f.severity = Severity::kWarning;
      f.id = "ipoib-mtu";
      f.subject = n.name;
      f.problem = "IPoIB MTU is " + std::to_string(n.mtu) + ", below 65520";
      f.reason = "in connected mode an MTU of 65520 cuts per-packet overhead; it was worth about 30% in "
                 "home-lab measurements";
      f.fix.push_back("ip link set " + n.name + " mtu 65520   # now");
      f.fix.push_back(apply + "   # persistent");
      out.push_back(std::move(f));
    }
    const bool has_v4 = std::any_of(n.addresses.begin(), n.addresses.end(),
                                    [](const std::string& a) { return a.find(':') == std::string::npos; });
    if (!has_v4) {
      Finding f;
      f.severity = Severity::kInfo;
      f.id = "ipoib-no-address";
      f.subject = n.name;
      f.problem = "no IPv4 address on the IPoIB interface";
      f.reason = "RDMA CM and the TCP fallback both find the peer by an IP address on the InfiniBand link";
      f.fix.push_back("ibdisk setup apply ipoib --iface " + n.name + " --address 10.30.0.1/24   # pick this host's address");
      out.push_back(std::move(f));
    }
  }
}

void check_modules(const Inventory& inv, std::vector<Finding>& out) {
  bool any_ib = false, any_rdma = !inv.devices.empty();
  for (const auto& d : inv.devices) {
    for (const auto& p : d.ports) any_ib = any_ib || p.is_ib();
  }
  if (!any_rdma) return;
  std::vector<std::string> want = {"ib_uverbs", "rdma_ucm"};
  if (any_ib) want.insert(want.begin(), "ib_ipoib");
  std::vector<std::string> missing;
  for (const auto& m : want) {
    if (!inv.module_loaded(m)) missing.push_back(m);
  }
  if (missing.empty()) return;
  std::string list;
  for (const auto& m : missing) list += (list.empty() ? "" : " ") + m;
  Finding f;
  f.severity = Severity::kWarning;
  f.id = "module-missing";
  f.subject = "kernel modules";
  f.problem = "not loaded: " + list;
  f.reason = "ib_uverbs gives user space (ibdisk) the verbs device, rdma_ucm the RDMA connection manager, "
             "ib_ipoib the ibN interfaces";
  f.fix.push_back("modprobe -a " + list + "   # now");
  f.fix.push_back("ibdisk setup apply modules   # at every boot");
  out.push_back(std::move(f));
}

void check_memlock(const Inventory& inv, std::vector<Finding>& out) {
  if (inv.devices.empty() || !inv.memlock_known || !inv.memlock_bytes) return;
  if (*inv.memlock_bytes >= kMemlockMinBytes) return;
  Finding f;
  f.severity = Severity::kWarning;
  f.id = "memlock-low";
  f.subject = "RLIMIT_MEMLOCK";
  f.problem = "locked-memory limit is " + std::to_string(*inv.memlock_bytes / 1024) + " KiB (" + inv.memlock_source +
              "), below " + std::to_string(kMemlockMinBytes >> 20) + " MiB";
  f.reason = "RDMA pins its buffers; a process without CAP_IPC_LOCK fails ibv_reg_mr once it passes the limit";
  f.fix.push_back("ulimit -l unlimited   # this shell, as root");
  f.fix.push_back("ibdisk setup apply memlock   # every login and service, after logging in again");
  out.push_back(std::move(f));
}

void check_sysctl(const Inventory& inv, std::vector<Finding>& out) {
  std::string off;
  for (const auto& s : inv.sysctls) {
    if (s.matches()) continue;
    off += (off.empty() ? "" : "; ") + s.key + " = " + (s.value.empty() ? std::string("(absent)") : s.value) +
           " (tuned: at least " + s.tuned + ")";
  }
  if (off.empty()) return;
  const bool ipoib = std::any_of(inv.netdevs.begin(), inv.netdevs.end(), [](const NetDevice& n) { return n.is_ipoib(); });
  Finding f;
  f.severity = ipoib ? Severity::kWarning : Severity::kInfo;
  f.id = "sysctl-untuned";
  f.subject = "sysctl";
  f.problem = off;
  f.reason = "default socket buffers are sized for gigabit Ethernet; TCP over IPoIB (and ibdisk's TCP fallback) "
             "needs larger ones to fill a 10-56 Gbit/s link";
  f.fix.push_back("ibdisk setup apply sysctl");
  out.push_back(std::move(f));
}

void check_sm(const Inventory& inv, std::vector<Finding>& out) {
  if (!inv.sm.opensm_running || inv.sm.opensm_enabled) return;
  Finding f;
  f.severity = Severity::kWarning;
  f.id = "sm-not-enabled";
  f.subject = "opensm";
  f.problem = "opensm runs now but is not enabled at boot";
  f.reason = "after a reboot of this host no subnet manager runs and the ports stay INIT";
  f.fix.push_back("ibdisk setup apply sm");
  out.push_back(std::move(f));
}

void check_soft_roce(const Inventory& inv, std::vector<Finding>& out) {
  const bool hardware = std::any_of(inv.devices.begin(), inv.devices.end(), [](const RdmaDevice& d) { return !d.soft_roce; });
  if (hardware) return;
  if (inv.devices.empty() && !inv.kernel_has_rdma) {
    Finding f;
    f.severity = Severity::kInfo;
    f.id = "no-rdma-kernel";
    f.subject = "RDMA";
    f.problem = "this kernel has no RDMA support (no ib_core: not loaded, not built in, not among its modules)";
    f.reason = "no RDMA device can exist, Soft-RoCE included; ibdisk will use TCP";
    f.fix.push_back("boot a kernel built with CONFIG_INFINIBAND (Debian's linux-image-amd64 is), then `ibdisk setup doctor` again");
    out.push_back(std::move(f));
    return;
  }
  bool offered = false;
  for (const auto& n : inv.netdevs) {
    if (n.type != 1 || (n.kind != "physical" && n.kind != "veth") || !n.master.empty() || n.operstate != "up") continue;
    if (inv.port_of(n.name).second) continue;
    const bool has_v4 = std::any_of(n.addresses.begin(), n.addresses.end(),
                                    [](const std::string& a) { return a.find(':') == std::string::npos; });
    if (!has_v4) continue;
    Finding f;
    f.severity = Severity::kInfo;
    f.id = "soft-roce-available";
    f.subject = n.name;
    f.problem = "Ethernet interface without an RDMA device";
    f.reason = "Soft-RoCE (rdma_rxe) gives it RDMA in software: ibdisk's RDMA path works against a RoCE peer, "
               "at CPU cost; without it ibdisk uses TCP here";
    f.fix.push_back("ibdisk setup apply soft-roce --netdev " + n.name);
    out.push_back(std::move(f));
    offered = true;
  }
  if (inv.devices.empty() && !offered) {
    Finding f;
    f.severity = Severity::kInfo;
    f.id = "no-rdma";
    f.subject = "RDMA";
    f.problem = "no RDMA device and no Ethernet interface with an address to run Soft-RoCE on";
    f.reason = "ibdisk will use TCP";
    f.fix.push_back("install an InfiniBand/RoCE card, or give an Ethernet interface an address and run "
                    "`ibdisk setup apply soft-roce --netdev IFACE`");
    out.push_back(std::move(f));
  }
}

}  // namespace

const char* to_string(Severity s) {
  switch (s) {
    case Severity::kInfo: return "info";
    case Severity::kWarning: return "warning";
    case Severity::kError: return "error";
  }
  return "info";
}

std::vector<Ceiling> ceilings(const Inventory& inv) {
  std::vector<Ceiling> out;
  for (const auto& d : inv.devices) {
    if (!d.pci || d.soft_roce || d.pci->cur_width == 0 || pcie_generation(d.pci->cur_speed_gts) == 0) continue;
    double link = 0;
    for (const auto& p : d.ports) {
      if (p.state == "ACTIVE") link = std::max(link, port_gbps(inv, p));
    }
    if (link <= 0) continue;
    Ceiling c;
    c.device = d.name;
    c.link_gbps = link;
    c.pcie_gbps = d.pci->cur_gbps();
    c.ceiling_gbps = std::min(link, c.pcie_gbps);
    c.limit = c.pcie_gbps < link ? "PCIe" : "link";
    out.push_back(c);
  }
  return out;
}

std::vector<Finding> diagnose(const Inventory& inv, const std::vector<MstDevice>& mst) {
  std::vector<Finding> out;
  check_ports(inv, out);
  check_port_types(inv, mst, out);
  check_pcie(inv, out);
  check_pcie_idle(inv, out);
  check_ipoib(inv, out);
  check_sm(inv, out);
  check_modules(inv, out);
  check_memlock(inv, out);
  check_sysctl(inv, out);
  check_soft_roce(inv, out);
  std::stable_sort(out.begin(), out.end(),
                   [](const Finding& a, const Finding& b) { return static_cast<int>(a.severity) > static_cast<int>(b.severity); });
  return out;
}

int exit_status(const std::vector<Finding>& findings) {
  int status = 0;
  for (const auto& f : findings) {
    if (f.severity == Severity::kError) status = 2;
    if (f.severity == Severity::kWarning && status == 0) status = 1;
  }
  return status;
}

}  // namespace ibdisk::setup
