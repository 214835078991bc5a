#pragma once
// `ibdisk attach`: an export as /dev/nbdN. The kernel's NBD driver gets one end of a
// socketpair per queue (initiator/nbd_netlink.h); this process answers the NBD requests it
// reads on the other ends by forwarding them over one ibdisk Client session, kernel socket i
// on Client queue i, and writes simple NBD replies back.
//
// Death of this process (SIGKILL, a crash, the OOM killer): with the netlink interface the
// kernel keeps the device and holds its I/O for the reconnect timeout; running the same attach
// again takes the device over (a state file names it) and the held requests go on, with no
// error seen by the device's users. A socket the kernel marks dead while this process runs
// (a request older than kernel_timeout) is replaced the same way.
//
// Outages: when the session is lost (target killed or restarted, link down), the kernel's
// requests are held, the session is re-established with exponential backoff and every
// request not yet answered is sent again. Only after reconnect_timeout do held and new
// requests fail (EIO), with an error log line; reconnecting goes on, and I/O works again
// once it succeeds.
//
// Threads: everything runs on the thread that calls run_attach().
#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "initiator/client.h"
#include "initiator/nbd_netlink.h"

namespace ibdisk::initiator {

inline constexpr const char* kDefaultStateDir = "/run/ibdisk";
inline constexpr std::chrono::seconds kDefaultReconnectTimeout{600};
inline constexpr std::chrono::seconds kDefaultKernelTimeout{30};

struct AttachOptions {
  ClientOptions client;  // host, port, key, queues (one kernel socket each), connect timeout
  std::string export_name;
  bool read_only = false;
  int device_index = -1;  // -1: a free device
  KernelInterface kernel = KernelInterface::kAuto;
  std::chrono::milliseconds reconnect_timeout = kDefaultReconnectTimeout;
  bool reconnect_forever = false;
  // The kernel's per-request timeout: a request unanswered this long is sent again on another
  // (or a renewed) socket. It bounds how long I/O stalls after this process died.
  std::chrono::seconds kernel_timeout = kDefaultKernelTimeout;
  std::string state_dir = kDefaultStateDir;
  // Called once the device exists, with its path (the CLI prints it; --daemon releases its
  // parent here).
  std::function<void(const std::string& device)> on_ready;
};

// Attaches and serves until the device is detached (SIGTERM/SIGINT to this process, `ibdisk
// detach`, or a disconnect by any other tool). Throws SystemError when attaching fails.
// Returns the exit status: 0 after a clean detach.
int run_attach(const AttachOptions& opts);

// What `ibdisk list` shows: one state file per device under the state directory.
struct AttachState {
  std::string device;     // /dev/nbd0
  int index = -1;
  std::string target;     // host:port
  std::string export_name;
  std::string transport;
  std::string kernel;     // netlink or ioctl
  std::string state;      // connected, reconnecting, failing, detaching, recovering
  unsigned queues = 0;
  std::uint64_t size = 0;
  bool read_only = false;
  int pid = 0;
  bool alive = false;     // the attach process still runs
  std::string since;      // when the state last changed (UTC, ISO 8601)
  std::uint64_t reconnects = 0;
  std::uint64_t takeovers = 0;       // times a new process took the device over
  std::uint64_t sockets_renewed = 0; // kernel sockets replaced after the kernel marked them dead
  std::string last_error;            // why the session was last lost, or a reconnect failed
  std::string file;       // the state file
};
std::vector<AttachState> list_attachments(const std::string& state_dir);
std::string state_file_for(const std::string& state_dir, int index);

}  // namespace ibdisk::initiator
