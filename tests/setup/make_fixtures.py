#!/usr/bin/env python3
"""Writes the fixture roots under tests/fixtures/sysfs/ the way the kernel lays them out:
class entries are relative symlinks into /sys/devices, attribute files hold what the kernel
prints (one line, newline-terminated). Run it again after changing a fixture; the trees
are committed, so tests never need it.

    tests/setup/make_fixtures.py [OUT_DIR]   (default: tests/fixtures/sysfs)
"""
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "fixtures", "sysfs")

DEFAULT_SYSCTL = {
    "net/ipv4/tcp_sack": "1",
    "net/core/netdev_max_backlog": "1000",
    "net/core/rmem_max": "212992",
    "net/core/wmem_max": "212992",
    "net/core/rmem_default": "212992",
    "net/core/wmem_default": "212992",
    "net/core/optmem_max": "20480",
    "net/ipv4/tcp_adv_win_scale": "1",
    "net/ipv4/tcp_rmem": "4096\t131072\t6291456",
    "net/ipv4/tcp_wmem": "4096\t16384\t4194304",
}
TUNED_SYSCTL = {
    "net/ipv4/tcp_sack": "1",
    "net/core/netdev_max_backlog": "250000",
    "net/core/rmem_max": "67108864",
    "net/core/wmem_max": "67108864",
    "net/core/rmem_default": "4194304",
    "net/core/wmem_default": "4194304",
    "net/core/optmem_max": "4194304",
    "net/ipv4/tcp_adv_win_scale": "1",
    "net/ipv4/tcp_rmem": "4096\t87380\t33554432",
    "net/ipv4/tcp_wmem": "4096\t65536\t33554432",
}
IB_MODULES = ["mlx4_ib", "mlx4_en", "mlx4_core", "ib_ipoib", "ib_uverbs", "rdma_ucm", "rdma_cm", "ib_cm", "iw_cm",
              "ib_umad", "ib_core"]


class Tree:
    def __init__(self, name):
        self.root = os.path.join(OUT, name)
        shutil.rmtree(self.root, ignore_errors=True)
        os.makedirs(self.root)

    def p(self, path):
        return os.path.join(self.root, path.lstrip("/"))

    def write(self, path, text, nl=True):
        full = self.p(path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "w") as f:
            f.write(text + ("\n" if nl and not text.endswith("\n") else ""))

    def attrs(self, dir, values):
        for k, v in values.items():
            self.write(dir + "/" + k, v)

    def link(self, path, target):
        full = self.p(path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        os.symlink(target, full)

    def rel_link(self, path, target_abs):
        self.link(path, os.path.relpath(target_abs, os.path.dirname(path)))

    def device_link(self, dev, parent):
        # The kernel writes class devices' "device" links as ../../../<parent name>.
        self.link(dev + "/device", "../../../" + os.path.basename(parent))

    # --- kernel objects -----------------------------------------------------------------
    def pci(self, addr, bridge, vendor, device, driver, cur, curw, mx, mxw, numa="0", extra=None):
        dev = "/sys/devices/pci0000:00/" + (bridge + "/" if bridge else "") + addr
        self.attrs(dev, {"vendor": vendor, "device": device, "subsystem_vendor": vendor,
                         "subsystem_device": "0x0050", "class": "0x028000" if vendor == "0x15b3" else "0x020000",
                         "current_link_speed": cur, "current_link_width": curw, "max_link_speed": mx,
                         "max_link_width": mxw, "numa_node": numa, "enable": "1", "irq": "16"})
        for k, v in (extra or {}).items():
            self.write(dev + "/" + k, v)
        self.rel_link(dev + "/driver", "/sys/bus/pci/drivers/" + driver)
        os.makedirs(self.p("/sys/bus/pci/drivers/" + driver), exist_ok=True)
        self.rel_link("/sys/bus/pci/devices/" + addr, dev)
        return dev

    def ib_device(self, name, pci_dev, node_guid, ports, fw="2.42.5000", hca="MT4099", board="MT_1090120019"):
        dev = (pci_dev + "/infiniband/" + name) if pci_dev else ("/sys/devices/virtual/infiniband/" + name)
        values = {"node_guid": node_guid, "node_type": "1: CA", "sys_image_guid": node_guid, "fw_ver": fw,
                  "node_desc": "host %s" % name}
        if pci_dev:  # Soft-RoCE has fw_ver (empty) but no hca_type or board_id
            values.update({"hca_type": hca, "board_id": board})
        self.attrs(dev, values)
        if pci_dev:
            self.device_link(dev, pci_dev)
        for num, p in ports.items():
            pd = "%s/ports/%d" % (dev, num)
            self.attrs(pd, {"state": p["state"], "phys_state": p["phys"], "rate": p["rate"],
                            "link_layer": p["ll"], "lid": p.get("lid", "0x0"), "sm_lid": p.get("sm_lid", "0x0"),
                            "lid_mask_count": "0", "sm_sl": "0", "cap_mask": p.get("cap", "0x02514868")})
            gids = p["gids"] + ["0000:0000:0000:0000:0000:0000:0000:0000"] * (4 - len(p["gids"]))
            for i, g in enumerate(gids):
                self.write("%s/gids/%d" % (pd, i), g)
            self.write(pd + "/pkeys/0", "0xffff")
            if "ndev" in p:
                self.write(pd + "/gid_attrs/ndevs/0", p["ndev"])
                self.write(pd + "/gid_attrs/types/0", "IB/RoCE v1")
        self.rel_link("/sys/class/infiniband/" + name, dev)
        return dev

    def netdev(self, name, parent, ifindex, values, iflink=None):
        dev = (parent + "/net/" + name) if parent else ("/sys/devices/virtual/net/" + name)
        base = {"ifindex": str(ifindex), "iflink": str(iflink or ifindex), "dev_id": "0x0", "dev_port": "0",
                "addr_len": "6", "tx_queue_len": "1000", "flags": "0x1003"}
        base.update(values)
        self.attrs(dev, base)
        if parent:
            self.device_link(dev, parent)
        self.rel_link("/sys/class/net/" + name, dev)
        return dev

    def lo(self):
        self.netdev("lo", None, 1, {"type": "772", "mtu": "65536", "carrier": "1", "operstate": "unknown",
                                    "address": "00:00:00:00:00:00", "flags": "0x9"})

    def proc(self, modules, memlock="unlimited", sysctl=None, comms=(), fib=(), routes=(), inet6=()):
        lines = []
        for m in modules:
            lines.append("%s 65536 0 - Live 0x0000000000000000" % m)
        self.write("/proc/modules", "\n".join(lines))
        ml = memlock.ljust(21)
        self.write("/proc/self/limits", "\n".join([
            "Limit                     Soft Limit           Hard Limit           Units     ",
            "Max cpu time              unlimited            unlimited            seconds   ",
            "Max open files            1024                 524288               files     ",
            "Max locked memory         %s%s bytes     " % (ml, ml),
            "Max address space         unlimited            unlimited            bytes     "]))
        for k, v in (sysctl or DEFAULT_SYSCTL).items():
            self.write("/proc/sys/" + k, v)
        for pid, comm in comms:
            self.write("/proc/%d/comm" % pid, comm)
        # fib_trie: Main and Local tables as the kernel prints them; enough for local addresses.
        out = ["Main:", "  +-- 0.0.0.0/0 3 0 4"]
        for ip, net, plen in fib:
            out += ["     +-- %s/%d 2 0 2" % (net, plen), "        |-- %s" % net,
                    "           /%d link UNICAST" % plen, "        |-- %s" % ip, "           /32 host LOCAL"]
        out += ["Local:", "  +-- 0.0.0.0/0 3 0 4", "     |-- 127.0.0.1", "        /32 host LOCAL"]
        for ip, net, plen in fib:
            out += ["     |-- %s" % ip, "        /32 host LOCAL"]
        self.write("/proc/net/fib_trie", "\n".join(out))
        rl = ["Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT"]
        for iface, dest_hex, mask_hex in routes:
            rl.append("%s\t%s\t00000000\t0001\t0\t0\t0\t%s\t0\t0\t0" % (iface, dest_hex, mask_hex))
        self.write("/proc/net/route", "\n".join(rl))
        self.write("/proc/net/if_inet6", "\n".join(inet6) if inet6 else "", nl=bool(inet6))


def le_hex(ip):
    return "".join("%02X" % int(x) for x in reversed(ip.split(".")))


def ipoib_hw(qpn, gid_guid):
    b = ["80", qpn[0:2], qpn[2:4], qpn[4:6], "fe", "80"] + ["00"] * 6
    g = gid_guid.replace(":", "")
    return ":".join(b + [g[i:i + 2] for i in range(0, 16, 2)])


CX3_GID = "fe80:0000:0000:0000:0002:c903:003f:02f1"
IB_RATE_QDR = "40 Gb/sec (4X QDR)"
IB_RATE_FDR = "56 Gb/sec (4X FDR)"


def cx3_ib(t, state, phys, rate, sm, ib0, cur=("8.0 GT/s PCIe", "8"), port_type="ib"):
    pci = t.pci("0000:05:00.0", "0000:00:02.0", "0x15b3", "0x1003", "mlx4_core", cur[0], cur[1], "8.0 GT/s PCIe",
                "8", extra={"mlx4_port1": port_type})
    t.ib_device("mlx4_0", pci, "0002:c903:003f:02f0", {
        1: {"state": state, "phys": phys, "rate": rate, "ll": "InfiniBand", "lid": "0x1" if sm else "0x0",
            "sm_lid": "0x1" if sm else "0x0", "gids": [CX3_GID]}})
    t.netdev("ib0", pci, 3, dict({"type": "32", "addr_len": "20", "tx_queue_len": "256",
                                  "address": ipoib_hw("000208", "0002:c903:003f:02f1"),
                                  "broadcast": "00:ff:ff:ff:ff:12:40:1b:ff:ff:00:00:00:00:00:00:ff:ff:ff:ff"},
                                 **ib0))
    return pci


def onboard_eth(t, name="eno1", ifindex=2, addr="00:25:90:5a:11:f0", up=True):
    pci = t.pci("0000:00:19.0", "", "0x8086", "0x1502", "e1000e", "Unknown", "0", "Unknown", "0")
    t.netdev(name, pci, ifindex, {"type": "1", "mtu": "1500", "carrier": "1" if up else "0",
                                  "operstate": "up" if up else "down", "address": addr, "speed": "1000"})


def etc_common(t, interfaces):
    t.write("/etc/network/interfaces", interfaces)
    t.write("/etc/hostname", "fili")


IFACES_BASE = """# This file describes the network interfaces available on your system
# and how to activate them. For more information, see interfaces(5).

source /etc/network/interfaces.d/*

# The loopback network interface
auto lo
iface lo inet loopback

# The primary network interface
allow-hotplug eno1
iface eno1 inet dhcp
"""


def main():
    os.makedirs(OUT, exist_ok=True)

    # 1. ConnectX-3 IB port ACTIVE, a subnet manager (opensm here), everything tuned.
    t = Tree("cx3-ib-active")
    t.lo()
    onboard_eth(t)
    cx3_ib(t, "4: ACTIVE", "5: LinkUp", IB_RATE_QDR, True,
           {"mtu": "65520", "mode": "connected", "carrier": "1", "operstate": "up", "speed": "40000"})
    t.proc(IB_MODULES + ["e1000e"], sysctl=TUNED_SYSCTL, comms=[(1, "systemd"), (812, "opensm")],
           fib=[("10.30.0.1", "10.30.0.0", 24), ("192.168.1.20", "192.168.1.0", 24)],
           routes=[("ib0", le_hex("10.30.0.0"), le_hex("255.255.255.0")),
                   ("eno1", le_hex("192.168.1.0"), le_hex("255.255.255.0"))],
           inet6=["fe800000000000000002c903003f02f1 03 40 20 80      ib0"])
    etc_common(t, IFACES_BASE)
    t.write("/etc/network/interfaces.d/ib0", "auto ib0\niface ib0 inet static\n    address 10.30.0.1/24\n"
            "    pre-up echo connected > /sys/class/net/ib0/mode\n    mtu 65520\n")
    t.write("/etc/default/opensm", "# Default settings for opensm\nPORTS=\"0x0002c903003f02f1\"\n")
    t.write("/usr/sbin/opensm", "")
    t.link("/etc/systemd/system/multi-user.target.wants/opensm.service", "/lib/systemd/system/opensm.service")
    t.write("/etc/modules-load.d/rdma.conf", "ib_ipoib\nib_uverbs\nrdma_ucm\n")

    # 2. The same card, port stuck in INIT: no subnet manager anywhere, opensm not installed.
    t = Tree("cx3-ib-init-nosm")
    t.lo()
    onboard_eth(t)
    cx3_ib(t, "2: INIT", "5: LinkUp", IB_RATE_QDR, False,
           {"mtu": "2044", "mode": "datagram", "carrier": "0", "operstate": "down", "flags": "0x1003"})
    t.proc([m for m in IB_MODULES if m != "rdma_ucm"] + ["e1000e"], memlock="65536",
           comms=[(1, "systemd")],
           fib=[("192.168.1.21", "192.168.1.0", 24)],
           routes=[("eno1", le_hex("192.168.1.0"), le_hex("255.255.255.0"))])
    etc_common(t, IFACES_BASE)

    # 3. ConnectX-3 (PCIe 3.0 x8, FDR) in a PCIe 2.0 x4 slot: 16 Gb/s, not 54.5.
    t = Tree("cx3-pcie2-x4")
    t.lo()
    onboard_eth(t)
    cx3_ib(t, "4: ACTIVE", "5: LinkUp", IB_RATE_FDR, True,
           {"mtu": "65520", "mode": "connected", "carrier": "1", "operstate": "up", "speed": "56000"},
           cur=("5.0 GT/s PCIe", "4"))
    t.proc(IB_MODULES + ["e1000e"], sysctl=TUNED_SYSCTL, comms=[(1, "systemd"), (640, "opensm")],
           fib=[("10.30.0.2", "10.30.0.0", 24)], routes=[("ib0", le_hex("10.30.0.0"), le_hex("255.255.255.0"))])
    etc_common(t, IFACES_BASE)
    t.write("/usr/sbin/opensm", "")
    t.link("/etc/systemd/system/multi-user.target.wants/opensm.service", "/lib/systemd/system/opensm.service")

    # 4. IPoIB in datagram mode at MTU 2044 (the kernel's default), configured the common
    #    way in /etc/network/interfaces; the SM runs on the switch, sysctls untouched.
    t = Tree("ipoib-datagram")
    t.lo()
    onboard_eth(t)
    cx3_ib(t, "4: ACTIVE", "5: LinkUp", IB_RATE_QDR, True,
           {"mtu": "2044", "mode": "datagram", "carrier": "1", "operstate": "up", "speed": "40000"})
    t.proc(IB_MODULES + ["e1000e"], memlock="8388608", comms=[(1, "systemd")],
           fib=[("10.30.0.1", "10.30.0.0", 24)], routes=[("ib0", le_hex("10.30.0.0"), le_hex("255.255.255.0"))])
    etc_common(t, IFACES_BASE + "\nallow-hotplug ib0\niface ib0 inet static\n    address 10.30.0.1\n"
               "    netmask 255.255.255.0\n    broadcast 10.30.0.255\n")

    # 5. ConnectX-3 VPI with port 1 in Ethernet mode (RoCE on ens5) and port 2 on auto (VPI).
    t = Tree("cx3-eth")
    t.lo()
    onboard_eth(t)
    pci = t.pci("0000:05:00.0", "0000:00:02.0", "0x15b3", "0x1003", "mlx4_core", "8.0 GT/s PCIe", "8",
                "8.0 GT/s PCIe", "8", extra={"mlx4_port1": "eth", "mlx4_port2": "auto (eth)"})
    t.netdev("ens5", pci, 4, {"type": "1", "mtu": "1500", "carrier": "1", "operstate": "up",
                              "address": "00:02:c9:3e:ca:b0", "speed": "40000", "tx_queue_len": "10000"})
    t.netdev("ens5d1", pci, 5, {"type": "1", "mtu": "1500", "carrier": "0", "operstate": "down",
                                "address": "00:02:c9:3e:ca:b1", "dev_id": "0x1", "dev_port": "1",
                                "tx_queue_len": "10000"})
    t.ib_device("mlx4_0", pci, "0002:c903:003e:cab0", {
        1: {"state": "4: ACTIVE", "phys": "5: LinkUp", "rate": "40 Gb/sec (4X QDR)", "ll": "Ethernet",
            "gids": ["fe80:0000:0000:0000:0202:c9ff:fe3e:cab0", "0000:0000:0000:0000:0000:ffff:0a1e:0002"],
            "ndev": "ens5"},
        2: {"state": "1: DOWN", "phys": "3: Disabled", "rate": "10 Gb/sec (4X)", "ll": "Ethernet",
            "gids": ["fe80:0000:0000:0000:0202:c9ff:fe3e:cab1"], "ndev": "ens5d1"}})
    t.proc(["mlx4_ib", "mlx4_en", "mlx4_core", "ib_uverbs", "rdma_ucm", "rdma_cm", "ib_core", "e1000e"],
           memlock="8388608", sysctl=TUNED_SYSCTL, comms=[(1, "systemd")],
           fib=[("10.30.0.2", "10.30.0.0", 24)], routes=[("ens5", le_hex("10.30.0.0"), le_hex("255.255.255.0"))])
    etc_common(t, IFACES_BASE)

    # 6. Soft-RoCE: rxe0 on a plain gigabit NIC, a second NIC with no RDMA device.
    t = Tree("soft-roce")
    t.lo()
    e0 = t.pci("0000:00:19.0", "", "0x8086", "0x1502", "e1000e", "2.5 GT/s PCIe", "1", "2.5 GT/s PCIe", "1")
    t.netdev("eno1", e0, 2, {"type": "1", "mtu": "1500", "carrier": "1", "operstate": "up",
                             "address": "00:25:90:5a:11:f0", "speed": "1000"})
    e1 = t.pci("0000:03:00.0", "0000:00:1c.0", "0x8086", "0x10d3", "e1000e", "2.5 GT/s PCIe", "1",
               "2.5 GT/s PCIe", "1")
    t.netdev("enp3s0", e1, 3, {"type": "1", "mtu": "1500", "carrier": "1", "operstate": "up",
                               "address": "00:25:90:5a:11:f1", "speed": "1000"})
    dev = t.ib_device("rxe0", None, "0225:90ff:fe5a:11f0", {
        1: {"state": "4: ACTIVE", "phys": "5: LinkUp", "rate": "2.5 Gb/sec (1X)", "ll": "Ethernet",
            "cap": "0x00890000",
            "gids": ["fe80:0000:0000:0000:0225:90ff:fe5a:11f0", "0000:0000:0000:0000:0000:ffff:0a4d:0001"],
            "ndev": "eno1"}}, fw="")
    t.write(dev + "/parent", "eno1")
    t.proc(["rdma_rxe", "ib_uverbs", "rdma_ucm", "rdma_cm", "ib_core", "e1000e", "crc32_generic"],
           memlock="8388608", comms=[(1, "systemd")],
           fib=[("10.77.0.1", "10.77.0.0", 24), ("192.168.5.1", "192.168.5.0", 24)],
           routes=[("eno1", le_hex("10.77.0.0"), le_hex("255.255.255.0")),
                   ("enp3s0", le_hex("192.168.5.0"), le_hex("255.255.255.0"))])
    etc_common(t, IFACES_BASE)


if __name__ == "__main__":
    main()
