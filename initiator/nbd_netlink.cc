#include "initiator/nbd_netlink.h"

#include <fcntl.h>
#include <linux/nbd-netlink.h>
#include <linux/nbd.h>
#include <netlink/genl/ctrl.h>
#include <netlink/genl/genl.h>
#include <netlink/netlink.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <fstream>
#include <functional>
#include <memory>

#include "common/error.h"
#include "common/log.h"

namespace ibdisk::initiator {
namespace {

auto log() {
  static auto l = ibdisk::logger("attach");
  return l;
}

const char* kModuleHint = "load the nbd module: modprobe nbd (add nbds_max=N for more devices)";

bool exists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0;
}

// The kernel's answer to one generic netlink request: its errno (0 when acknowledged) and
// NBD_ATTR_INDEX when the reply carried one.
struct NlResult {
  int err = 0;
  int index = -1;
};

int on_valid(nl_msg* msg, void* arg) {
  auto* r = static_cast<NlResult*>(arg);
  nlattr* attrs[NBD_ATTR_MAX + 1] = {};
  if (genlmsg_parse(nlmsg_hdr(msg), 0, attrs, NBD_ATTR_MAX, nullptr) == 0 && attrs[NBD_ATTR_INDEX]) {
    r->index = static_cast<int>(nla_get_u32(attrs[NBD_ATTR_INDEX]));
  }
  return NL_OK;
}

int on_error(sockaddr_nl*, nlmsgerr* e, void* arg) {
  static_cast<NlResult*>(arg)->err = -e->error;
  return NL_STOP;
}

NlResult nl_call(nl_sock* sock, int family, std::uint8_t cmd, const std::function<void(nl_msg*)>& fill) {
  nl_msg* msg = nlmsg_alloc();
  if (!msg) return {ENOMEM, -1};
  genlmsg_put(msg, NL_AUTO_PORT, NL_AUTO_SEQ, family, 0, 0, cmd, NBD_GENL_VERSION);
  fill(msg);
  NlResult r;
  nl_socket_modify_cb(sock, NL_CB_VALID, NL_CB_CUSTOM, on_valid, &r);
  nl_socket_modify_err_cb(sock, NL_CB_CUSTOM, on_error, &r);
  const int rc = nl_send_sync(sock, msg);  // frees msg
  if (rc < 0 && r.err == 0) r.err = rc == -NLE_PERM ? EPERM : EIO;
  return r;
}

// A generic netlink socket resolved to the "nbd" family, or throws with the reason.
nl_sock* open_nbd_netlink(int* family) {
  nl_sock* sock = nl_socket_alloc();
  if (!sock) throw SystemError("nl_socket_alloc", ENOMEM);
  if (const int rc = genl_connect(sock); rc < 0) {
    nl_socket_free(sock);
    throw SystemError("connecting to generic netlink", std::string(nl_geterror(rc)));
  }
  *family = genl_ctrl_resolve(sock, NBD_GENL_FAMILY_NAME);
  if (*family < 0) {
    nl_socket_free(sock);
    throw SystemError("resolving the generic netlink family \"nbd\"",
                      nbd_module_loaded() ? std::string("this kernel's nbd driver has no netlink interface")
                                          : std::string("the nbd module is not loaded"),
                      nbd_module_loaded() ? "use --kernel-interface ioctl" : kModuleHint, ENOENT);
  }
  return sock;
}

std::string busy_hint(int index) {
  return "/dev/nbd" + std::to_string(index) +
         " is in use: pick another with --device, or leave --device out to take a free one (`ibdisk list`)";
}

void put_sockets(nl_msg* m, const std::vector<int>& sockets) {
  nlattr* socks = nla_nest_start(m, NBD_ATTR_SOCKETS);
  for (const int fd : sockets) {
    nlattr* item = nla_nest_start(m, NBD_SOCK_ITEM);
    nla_put_u32(m, NBD_SOCK_FD, static_cast<std::uint32_t>(fd));
    nla_nest_end(m, item);
  }
  nla_nest_end(m, socks);
}

}  // namespace

const char* to_string(KernelInterface k) {
  switch (k) {
    case KernelInterface::kAuto: return "auto";
    case KernelInterface::kNetlink: return "netlink";
    case KernelInterface::kIoctl: return "ioctl";
  }
  return "unknown";
}

bool nbd_module_loaded() { return exists("/sys/module/nbd"); }

int parse_nbd_device(const std::string& text) {
  std::string t = text;
  if (t.rfind("/dev/", 0) == 0) t = t.substr(5);
  if (t.rfind("nbd", 0) == 0) t = t.substr(3);
  if (t.empty() || t.size() > 6 || t.find_first_not_of("0123456789") != std::string::npos) return -1;
  return std::stoi(t);
}

bool nbd_device_connected(int index) { return exists("/sys/block/nbd" + std::to_string(index) + "/pid"); }

std::string nbd_device_backend(int index) {
  std::string b;
  std::ifstream f("/sys/block/nbd" + std::to_string(index) + "/backend");
  std::getline(f, b);
  return b;
}

std::unique_ptr<NbdDevice> NbdDevice::connect(const NbdConfig& config, KernelInterface kernel) {
  if (!nbd_module_loaded()) {
    throw SystemError("attaching an NBD device", std::string("the nbd module is not loaded"), kModuleHint, ENOENT);
  }
  std::unique_ptr<NbdDevice> d(new NbdDevice());
  if (kernel == KernelInterface::kIoctl) {
    d->connect_ioctl(config);
    return d;
  }
  try {
    d->connect_netlink(config);
  } catch (const SystemError& e) {
    if (kernel == KernelInterface::kNetlink || e.error_code() != ENOENT) throw;
    log()->info("netlink interface unavailable ({}); using the ioctl interface", e.what());
    d->connect_ioctl(config);
  }
  return d;
}

void NbdDevice::connect_netlink(const NbdConfig& c) {
  interface_ = KernelInterface::kNetlink;
  nl_ = open_nbd_netlink(&family_);
  const NlResult r = nl_call(nl_, family_, NBD_CMD_CONNECT, [&](nl_msg* m) {
    if (c.index >= 0) nla_put_u32(m, NBD_ATTR_INDEX, static_cast<std::uint32_t>(c.index));
    nla_put_u64(m, NBD_ATTR_SIZE_BYTES, c.size_bytes);
    nla_put_u64(m, NBD_ATTR_BLOCK_SIZE_BYTES, c.block_size);
    nla_put_u64(m, NBD_ATTR_SERVER_FLAGS, c.server_flags);
    nla_put_u64(m, NBD_ATTR_TIMEOUT, c.timeout_s);
    if (c.dead_conn_timeout_s) nla_put_u64(m, NBD_ATTR_DEAD_CONN_TIMEOUT, c.dead_conn_timeout_s);
    if (!c.backend.empty()) nla_put_string(m, NBD_ATTR_BACKEND_IDENTIFIER, c.backend.c_str());
    put_sockets(m, c.sockets);
  });
  const std::string what = c.index >= 0 ? "connecting /dev/nbd" + std::to_string(c.index) : std::string("connecting an NBD device");
  if (r.err == EBUSY) throw SystemError(what, std::string("the device is in use"), busy_hint(c.index), EBUSY);
  if (r.err == EPERM) throw SystemError(what + " (netlink NBD_CMD_CONNECT)", EPERM, "run as root (CAP_SYS_ADMIN)");
  if (r.err != 0) throw SystemError(what + " (netlink NBD_CMD_CONNECT)", r.err, "see `dmesg` for the nbd driver's reason");
  index_ = r.index >= 0 ? r.index : c.index;
  if (index_ < 0) throw SystemError(what, std::string("the kernel did not say which device it used"));
  backend_ = c.backend;
}

std::unique_ptr<NbdDevice> NbdDevice::take_over(int index, const NbdConfig& c) {
  const std::string path = "/dev/nbd" + std::to_string(index);
  if (!nbd_device_connected(index)) throw SystemError("taking over " + path, std::string("it is not connected"), "", ENOENT);
  std::unique_ptr<NbdDevice> d(new NbdDevice());
  d->interface_ = KernelInterface::kNetlink;
  d->nl_ = open_nbd_netlink(&d->family_);
  d->index_ = index;
  d->backend_ = c.backend;
  const NlResult r = nl_call(d->nl_, d->family_, NBD_CMD_RECONFIGURE, [&](nl_msg* m) {
    nla_put_u32(m, NBD_ATTR_INDEX, static_cast<std::uint32_t>(index));
    nla_put_u64(m, NBD_ATTR_TIMEOUT, c.timeout_s);
    if (c.dead_conn_timeout_s) nla_put_u64(m, NBD_ATTR_DEAD_CONN_TIMEOUT, c.dead_conn_timeout_s);
    // A device with a backend identifier is reconfigured only by who names the same one.
    if (!c.backend.empty()) nla_put_string(m, NBD_ATTR_BACKEND_IDENTIFIER, c.backend.c_str());
    put_sockets(m, c.sockets);
  });
  if (r.err == EPERM) throw SystemError("taking over " + path + " (netlink NBD_CMD_RECONFIGURE)", EPERM, "run as root (CAP_SYS_ADMIN)");
  if (r.err != 0) {
    d->index_ = -1;  // not ours: the destructor must not disconnect it
    throw SystemError("taking over " + path + " (netlink NBD_CMD_RECONFIGURE)", r.err,
                      "see `dmesg` for the nbd driver's reason; `ibdisk detach --force " + path + "` frees the device");
  }
  return d;
}

int NbdDevice::replace_sockets(const std::vector<int>& sockets) {
  if (interface_ != KernelInterface::kNetlink || index_ < 0) return EOPNOTSUPP;
  const NlResult r = nl_call(nl_, family_, NBD_CMD_RECONFIGURE, [&](nl_msg* m) {
    nla_put_u32(m, NBD_ATTR_INDEX, static_cast<std::uint32_t>(index_));
    if (!backend_.empty()) nla_put_string(m, NBD_ATTR_BACKEND_IDENTIFIER, backend_.c_str());  // else EINVAL
    put_sockets(m, sockets);
  });
  return r.err;
}

void NbdDevice::connect_ioctl(const NbdConfig& c) {
  interface_ = KernelInterface::kIoctl;
  int index = c.index;
  if (index < 0) {
    for (int i = 0; exists("/sys/block/nbd" + std::to_string(i)); ++i) {
      if (!nbd_device_connected(i)) {
        index = i;
        break;
      }
    }
    if (index < 0) {
      throw SystemError("finding a free NBD device", std::string("every /dev/nbdN is in use"),
                        "detach one, or reload the module with more: modprobe -r nbd && modprobe nbd nbds_max=16", EBUSY);
    }
  }
  const std::string path = "/dev/nbd" + std::to_string(index);
  dev_fd_ = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (dev_fd_ < 0) {
    const int err = errno;
    throw SystemError("open(" + path + ")", err,
                      err == ENOENT ? "no such device: check nbds_max (modprobe nbd nbds_max=N)" : "run as root");
  }
  const auto set = [&](unsigned long req, unsigned long arg, const char* name) {
    if (::ioctl(dev_fd_, req, arg) != 0) {
      const int err = errno;
      ::close(dev_fd_);
      dev_fd_ = -1;
      if (err == EBUSY) throw SystemError(path, std::string("the device is in use"), busy_hint(index), EBUSY);
      throw SystemError(std::string("ioctl(") + path + ", " + name + ")", err, "see `dmesg` for the nbd driver's reason");
    }
  };
  set(NBD_SET_BLKSIZE, c.block_size, "NBD_SET_BLKSIZE");
  set(NBD_SET_SIZE, c.size_bytes, "NBD_SET_SIZE");
  set(NBD_SET_TIMEOUT, c.timeout_s, "NBD_SET_TIMEOUT");
  set(NBD_SET_FLAGS, c.server_flags, "NBD_SET_FLAGS");
  for (const int fd : c.sockets) set(NBD_SET_SOCK, static_cast<unsigned long>(fd), "NBD_SET_SOCK");
  index_ = index;
  // NBD_DO_IT runs the device and returns when it is disconnected.
  const int fd = dev_fd_;
  auto ended = std::make_shared<std::atomic<int>>(-1);  // NBD_DO_IT's errno once it returned
  do_it_ = std::thread([fd, path, ended] {
    const int err = ::ioctl(fd, NBD_DO_IT) == 0 ? 0 : errno;
    if (err != 0 && err != EINTR) log()->debug("ioctl({}, NBD_DO_IT) ended: {}", path, errno_text(err));
    ::ioctl(fd, NBD_CLEAR_QUE);
    ::ioctl(fd, NBD_CLEAR_SOCK);
    ended->store(err);
  });
  // NBD_DO_IT makes the pid file before it starts the receive threads and sets the size, so the
  // device is usable once it has a size; on a loaded host that can take seconds. Announced
  // earlier, it is empty to whoever opens it first.
  const std::string size_file = "/sys/block/nbd" + std::to_string(index) + "/size";
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  for (;;) {
    std::uint64_t sectors = 0;
    std::ifstream(size_file) >> sectors;
    if (nbd_device_connected(index) && (sectors > 0 || c.size_bytes < 512)) return;
    const int err = ended->load();
    const bool late = std::chrono::steady_clock::now() >= give_up;
    if (err < 0 && !late) {
      ::usleep(10000);
      continue;
    }
    // Failed: the kernel's ends closed make the device's receive threads, and so NBD_DO_IT, end.
    for (const int k : c.sockets) ::shutdown(k, SHUT_RDWR);
    if (err >= 0) throw SystemError("ioctl(" + path + ", NBD_DO_IT)", err == 0 ? EIO : err, "see `dmesg` for the nbd driver's reason");
    throw SystemError("starting " + path + " (ioctl NBD_DO_IT)", std::string("the device did not come up within 30 s"),
                      "see `dmesg` for the nbd driver's reason");
  }
}

void NbdDevice::disconnect() {
  if (disconnected_ || index_ < 0) return;
  disconnected_ = true;
  if (interface_ == KernelInterface::kNetlink) {
    const NlResult r = nl_call(nl_, family_, NBD_CMD_DISCONNECT,
                               [&](nl_msg* m) { nla_put_u32(m, NBD_ATTR_INDEX, static_cast<std::uint32_t>(index_)); });
    if (r.err != 0) log()->warn("disconnecting {} (netlink NBD_CMD_DISCONNECT): {}", path(), errno_text(r.err));
    return;
  }
  if (::ioctl(dev_fd_, NBD_DISCONNECT) != 0) log()->warn("ioctl({}, NBD_DISCONNECT): {}", path(), errno_text(errno));
}

NbdDevice::~NbdDevice() {
  if (do_it_.joinable()) {
    disconnect();
    do_it_.join();
  }
  if (dev_fd_ >= 0) ::close(dev_fd_);
  if (nl_) nl_socket_free(nl_);
}

void nbd_disconnect_index(int index) {
  if (!nbd_module_loaded()) throw SystemError("disconnecting /dev/nbd" + std::to_string(index), std::string("the nbd module is not loaded"), kModuleHint);
  int family = -1;
  nl_sock* sock = nullptr;
  try {
    sock = open_nbd_netlink(&family);
  } catch (const SystemError&) {
    const std::string path = "/dev/nbd" + std::to_string(index);
    const int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
    if (fd < 0) throw SystemError("open(" + path + ")", errno, "run as root");
    const int rc = ::ioctl(fd, NBD_DISCONNECT);
    const int err = errno;
    ::ioctl(fd, NBD_CLEAR_SOCK);
    ::close(fd);
    if (rc != 0) throw SystemError("ioctl(" + path + ", NBD_DISCONNECT)", err);
    return;
  }
  const NlResult r = nl_call(sock, family, NBD_CMD_DISCONNECT,
                             [&](nl_msg* m) { nla_put_u32(m, NBD_ATTR_INDEX, static_cast<std::uint32_t>(index)); });
  nl_socket_free(sock);
  if (r.err != 0) throw SystemError("disconnecting /dev/nbd" + std::to_string(index) + " (netlink NBD_CMD_DISCONNECT)", r.err);
}

}  // namespace ibdisk::initiator
