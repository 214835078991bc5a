#pragma once
// The kernel side of `ibdisk attach`: hands stream sockets to the kernel's NBD driver, which
// then sends NBD requests on them and turns the answers into the block device /dev/nbdN.
// Generic netlink (family "nbd", <linux/nbd-netlink.h>) first; the older ioctl interface
// (<linux/nbd.h>) where netlink is missing.
//
// Netlink devices outlive the process serving their sockets: when it dies, the kernel marks
// the sockets dead and holds the device's I/O for the dead-connection timeout; the next
// `ibdisk attach` of the same export hands it new sockets (NBD_CMD_RECONFIGURE, take_over())
// and the held and timed-out requests are sent on them. The kernel replaces only sockets it
// has marked dead, and never changes their number. With the ioctl interface the device fails
// its I/O when the process dies and is reclaimed by disconnecting it.
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

struct nl_sock;

namespace ibdisk::initiator {

enum class KernelInterface { kAuto, kNetlink, kIoctl };
const char* to_string(KernelInterface k);

struct NbdConfig {
  int index = -1;                  // -1: the kernel (netlink) or a scan (ioctl) picks a free device
  std::uint64_t size_bytes = 0;
  std::uint64_t block_size = 4096;
  std::uint64_t server_flags = 0;  // NBD transmission flags (nbd::kFlag*)
  std::uint64_t timeout_s = 0;     // the kernel's per-request timeout: then the request is requeued
                                   // and its socket marked dead (netlink), or it fails (ioctl)
  std::uint64_t dead_conn_timeout_s = 0;  // netlink: how long I/O waits while every socket is dead
  std::string backend;             // netlink: NBD_ATTR_BACKEND_IDENTIFIER, /sys/block/nbdN/backend
  std::vector<int> sockets;        // the kernel's ends; the kernel takes its own reference
};

// True when the nbd module is loaded (/sys/module/nbd).
bool nbd_module_loaded();
// "/dev/nbd0" or "nbd0" or "0" into 0; -1 when it is not an NBD device name.
int parse_nbd_device(const std::string& text);
// True when the kernel has sockets on /dev/nbdINDEX (/sys/block/nbdINDEX/pid exists).
bool nbd_device_connected(int index);
// The backend identifier a netlink attach gave /dev/nbdINDEX ("" when none, or not connected).
std::string nbd_device_backend(int index);

class NbdDevice {
 public:
  // Configures the device and starts it. Throws SystemError naming the device and the reason
  // (module not loaded, device busy, no permission) with the fix.
  static std::unique_ptr<NbdDevice> connect(const NbdConfig& config, KernelInterface kernel);
  // Takes over /dev/nbdINDEX, connected through netlink by a process that is gone: its sockets
  // are replaced by config.sockets (as many as it had) and its timeouts set again. Throws
  // SystemError (not connected, not through netlink, sockets still alive).
  static std::unique_ptr<NbdDevice> take_over(int index, const NbdConfig& config);
  ~NbdDevice();
  NbdDevice(const NbdDevice&) = delete;
  NbdDevice& operator=(const NbdDevice&) = delete;

  int index() const { return index_; }
  std::string path() const { return "/dev/nbd" + std::to_string(index_); }
  KernelInterface interface() const { return interface_; }
  // Asks the kernel to disconnect: it sends NBD_CMD_DISC on every socket and shuts them down.
  // Requests the kernel still had fail. Idempotent; logs rather than throws.
  void disconnect();
  // Netlink: hands the kernel new sockets for ones it marked dead (a request timed out, or
  // the previous process died). Returns the kernel's errno (0: accepted, or ignored because
  // no socket was dead).
  int replace_sockets(const std::vector<int>& sockets);

 private:
  NbdDevice() = default;
  void connect_netlink(const NbdConfig& config);
  void connect_ioctl(const NbdConfig& config);

  int index_ = -1;
  KernelInterface interface_ = KernelInterface::kNetlink;
  nl_sock* nl_ = nullptr;  // netlink: for the disconnect
  int family_ = -1;
  std::string backend_;    // netlink: the backend identifier, which every RECONFIGURE must repeat
  int dev_fd_ = -1;        // ioctl: the open device, NBD_DO_IT runs on it in do_it_
  std::thread do_it_;
  bool disconnected_ = false;
};

// Disconnects a device this process did not attach (detach --force). Throws SystemError.
void nbd_disconnect_index(int index);

}  // namespace ibdisk::initiator
