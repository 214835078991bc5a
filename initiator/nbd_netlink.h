#pragma once
// The kernel side of `ibdisk attach`: hands stream sockets to the kernel's NBD driver, which
// then sends NBD requests on them and turns the answers into the block device /dev/nbdN.
// Generic netlink (family "nbd", <linux/nbd-netlink.h>) first; the older ioctl interface
// (<linux/nbd.h>) where netlink is missing.
//
// When the process serving the sockets dies, the kernel fails the device's I/O and keeps the
// device until it is disconnected (`ibdisk detach --force`, or the next `ibdisk attach` of the
// same device, which reclaims it).
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
  std::uint64_t timeout_s = 0;     // the kernel's per-request timeout
  std::vector<int> sockets;        // the kernel's ends; the kernel takes its own reference
};

// True when the nbd module is loaded (/sys/module/nbd).
bool nbd_module_loaded();
// "/dev/nbd0" or "nbd0" or "0" into 0; -1 when it is not an NBD device name.
int parse_nbd_device(const std::string& text);
// True when the kernel has sockets on /dev/nbdINDEX (/sys/block/nbdINDEX/pid exists).
bool nbd_device_connected(int index);

class NbdDevice {
 public:
  // Configures the device and starts it. Throws SystemError naming the device and the reason
  // (module not loaded, device busy, no permission) with the fix.
  static std::unique_ptr<NbdDevice> connect(const NbdConfig& config, KernelInterface kernel);
  ~NbdDevice();
  NbdDevice(const NbdDevice&) = delete;
  NbdDevice& operator=(const NbdDevice&) = delete;

  int index() const { return index_; }
  std::string path() const { return "/dev/nbd" + std::to_string(index_); }
  KernelInterface interface() const { return interface_; }
  // Asks the kernel to disconnect: it sends NBD_CMD_DISC on every socket and shuts them down.
  // Requests the kernel still had fail. Idempotent; logs rather than throws.
  void disconnect();

 private:
  NbdDevice() = default;
  void connect_netlink(const NbdConfig& config);
  void connect_ioctl(const NbdConfig& config);

  int index_ = -1;
  KernelInterface interface_ = KernelInterface::kNetlink;
  nl_sock* nl_ = nullptr;  // netlink: for the disconnect
  int family_ = -1;
  int dev_fd_ = -1;        // ioctl: the open device, NBD_DO_IT runs on it in do_it_
  std::thread do_it_;
  bool disconnected_ = false;
};

// Disconnects a device this process did not attach (detach --force). Throws SystemError.
void nbd_disconnect_index(int index);

}  // namespace ibdisk::initiator
