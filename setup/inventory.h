#pragma once
// What this host has for RDMA and IPoIB, read from sysfs and procfs under a Root.
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "setup/rates.h"
#include "setup/root.h"

namespace ibdisk::setup {

struct PciFunction {
  std::string address;  // "0000:05:00.0"
  std::string vendor;   // "0x15b3"
  std::string device;   // "0x1003"
  std::string model;    // "ConnectX-3 (MT27500, ...)", "" when unknown
  std::string driver;   // "mlx4_core"
  double cur_speed_gts = 0, max_speed_gts = 0;
  int cur_width = 0, max_width = 0;
  int numa_node = -1;
  // Data rate, one direction, of the link as negotiated and as the card could do.
  double cur_gbps() const { return pcie_lane_gbps(cur_speed_gts) * cur_width; }
  double max_gbps() const { return pcie_lane_gbps(max_speed_gts) * max_width; }
};

struct RdmaPort {
  int number = 0;
  std::string state;       // "ACTIVE", "INIT", "DOWN", ... (the kernel's "4: ACTIVE" without the number)
  std::string phys_state;  // "LinkUp", "Polling", "Disabled", ...
  std::string rate;        // as printed: "40 Gb/sec (4X QDR)"
  IbRate ib_rate;
  std::string link_layer;  // "InfiniBand" or "Ethernet"
  std::string lid, sm_lid; // "0x1"
  std::vector<std::string> gids;  // non-zero GIDs, index order
  std::string netdev;      // the IPoIB or Ethernet interface on this port, "" if none found
  std::string port_type;   // mlx4 only, from mlx4_portN: "ib", "eth", "auto (ib)", "auto (eth)"
  bool is_ib() const { return link_layer == "InfiniBand"; }
  bool has_sm() const;
  std::string port_guid() const;  // "0x0002c903003f02f1" from GID 0, "" if none
};

struct RdmaDevice {
  std::string name;        // "mlx4_0", "rxe0"
  std::string node_guid;   // "0002:c903:003f:02f0" as the kernel prints it
  std::string node_type;   // "CA"
  std::string fw_ver, hca_type, board_id;
  std::string parent;      // Soft-RoCE: the Ethernet interface it runs on
  bool soft_roce = false;
  std::optional<PciFunction> pci;
  std::vector<RdmaPort> ports;
};

struct NetDevice {
  std::string name;
  int type = 0;            // ARPHRD: 1 Ethernet, 32 InfiniBand (IPoIB), 772 loopback
  std::string mode;        // IPoIB: "datagram" or "connected"
  int mtu = 0;
  int carrier = -1;        // -1: unknown (interface down)
  std::string operstate;
  std::string address;     // hardware address
  int speed_mbps = -1;     // Ethernet speed, -1 unknown
  std::string pci_address; // "" for virtual devices
  std::string kind;        // "physical", "veth", "bridge", "bond", "virtual"
  std::string master;      // bond or bridge it is enslaved to
  std::vector<std::string> bond_slaves;
  std::string bond_mode;   // "active-backup 1"
  std::vector<std::string> addresses;  // "10.30.0.1/24", "fe80::.../64"
  bool is_ipoib() const { return type == 32; }
};

struct SysctlValue {
  std::string key;     // "net.core.rmem_max"
  std::string value;   // whitespace collapsed, "" when the key does not exist
  std::string tuned;   // the minimum the IPoIB tuning wants
  // Every number at least the tuned one: a host already above the guide is left alone.
  bool matches() const;
  // What the tuning file sets: per field the larger of the current and the tuned value.
  std::string target() const;
};

struct SubnetManager {
  bool opensm_installed = false;  // /usr/sbin/opensm
  bool opensm_running = false;    // a process named opensm
  bool opensm_enabled = false;    // systemd wants link or SysV rc link
  std::string opensm_ports;       // PORTS= from /etc/default/opensm, "" when unset
};

enum class NetworkSystem { kIfupdown, kNetworkd, kNetworkManager, kNone };
const char* to_string(NetworkSystem s);

struct Inventory {
  std::string root;
  std::vector<RdmaDevice> devices;
  std::vector<NetDevice> netdevs;
  std::vector<std::string> modules;  // loaded, from /proc/modules
  // false only when the running kernel (proc/sys/kernel/osrelease) has no RDMA core at all:
  // none loaded, none built in (sys/module/ib_core), none among its modules on disk.
  bool kernel_has_rdma = true;
  std::optional<std::uint64_t> memlock_bytes;  // nullopt: unlimited
  std::string memlock_source;        // "getrlimit" or the file it came from
  bool memlock_known = false;
  std::vector<SysctlValue> sysctls;
  SubnetManager sm;
  NetworkSystem network = NetworkSystem::kNone;
  std::string network_reason;        // why that one was chosen

  bool module_loaded(const std::string& name) const;
  const NetDevice* netdev(const std::string& name) const;
  const RdmaDevice* device(const std::string& name) const;
  // The RDMA device and port whose netdev is `name`, or nulls.
  std::pair<const RdmaDevice*, const RdmaPort*> port_of(const std::string& netdev) const;
};

// The sysctl values IPoIB tuning guides set (Mellanox's linux-sysctl-tuning), minus the
// two ibdisk leaves alone and with ESnet's larger TCP maxima; docs/setup.md says why.
const std::vector<std::pair<std::string, std::string>>& tuned_sysctls();

// The RDMA modules an InfiniBand host needs loaded at boot.
const std::vector<std::string>& ib_modules();

Inventory read_inventory(const Root& root);

}  // namespace ibdisk::setup
