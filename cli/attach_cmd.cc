// `ibdisk attach`, `detach`, `list`: exports as /dev/nbdN through the kernel's NBD driver.
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <thread>

#include <systemd/sd-daemon.h>

#include "cli/commands.h"
#include "cli/format.h"
#include "cli/liveness_options.h"
#include "common/json.h"
#include "common/auth.h"
#include "common/error.h"
#include "initiator/attach.h"

namespace ibdisk::cli {
namespace {

using initiator::AttachOptions;

struct AttachArgs {
  std::string remote;
  std::string device;
  unsigned queues = 2;
  bool read_only = false;
  std::string key_file;
  double timeout_s = 10;
  std::string reconnect_timeout = "600";
  unsigned kernel_timeout_s = static_cast<unsigned>(initiator::kDefaultKernelTimeout.count());
  std::string transport = "auto";
  std::string kernel = "auto";
  bool daemon = false;
  std::string state_dir = initiator::kDefaultStateDir;
  LivenessArgs liveness;
};

AttachOptions to_options(const AttachArgs& a) {
  AttachOptions o;
  initiator::RemoteName r;
  if (!initiator::parse_remote(a.remote, &r)) {
    throw UsageError("'" + a.remote + "': expected HOST[:PORT]/EXPORT, e.g. 10.30.0.1/vm1");
  }
  o.client.host = r.host;
  o.client.port = r.port;
  o.client.key_file = a.key_file;
  // A missing key here needs a copy of the target's, not a new one: say so before connecting.
  if (!a.key_file.empty()) load_key_file(a.key_file, KeyUser::kInitiator);
  o.client.queues = a.queues;
  o.client.timeout = std::chrono::milliseconds(static_cast<long>(a.timeout_s * 1000));
  apply_liveness(a.liveness, &o.client);
  char name[256] = {};
  ::gethostname(name, sizeof name - 1);
  o.client.client_name = name;
  o.export_name = r.export_name;
  o.read_only = a.read_only;
  o.client.transport = a.transport;  // long-lived: it may move to RDMA later, so "auto" stays
  if (!a.device.empty()) {
    o.device_index = initiator::parse_nbd_device(a.device);
    if (o.device_index < 0) throw std::invalid_argument("--device '" + a.device + "': expected /dev/nbdN");
  }
  o.kernel = a.kernel == "netlink" ? initiator::KernelInterface::kNetlink
             : a.kernel == "ioctl" ? initiator::KernelInterface::kIoctl
                                   : initiator::KernelInterface::kAuto;
  if (a.reconnect_timeout == "forever") {
    o.reconnect_forever = true;
  } else {
    std::size_t used = 0;
    double s = -1;
    try {
      s = std::stod(a.reconnect_timeout, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != a.reconnect_timeout.size() || s < 0) {
      throw std::invalid_argument("--reconnect-timeout '" + a.reconnect_timeout + "': give seconds (e.g. 600) or 'forever'");
    }
    o.reconnect_timeout = std::chrono::milliseconds(static_cast<long long>(s * 1000));
  }
  o.kernel_timeout = std::chrono::seconds(a.kernel_timeout_s);
  o.state_dir = a.state_dir;
  return o;
}

int run_attach_cmd(AttachArgs& a) {
  AttachOptions o = to_options(a);
  if (!a.daemon) {
    o.on_ready = [](const std::string& dev) {
      std::printf("%s\n", dev.c_str());
      std::fflush(stdout);
      // Type=notify: mounts that require this unit wait until the device exists.
      sd_notifyf(0, "READY=1\nSTATUS=serving %s", dev.c_str());
    };
    return initiator::run_attach(o);
  }
  // --daemon: the parent waits until the device exists (or attaching failed), so a script
  // can use the device as soon as the command returns.
  int pipefd[2];
  if (::pipe2(pipefd, O_CLOEXEC) != 0) throw SystemError("pipe", errno);
  const pid_t pid = ::fork();
  if (pid < 0) throw SystemError("fork", errno);
  if (pid > 0) {
    ::close(pipefd[1]);
    char buf[256] = {};
    const ssize_t n = ::read(pipefd[0], buf, sizeof buf - 1);
    ::close(pipefd[0]);
    if (n <= 0) return 1;  // the child printed why
    std::printf("%s\n", buf);
    return 0;
  }
  ::close(pipefd[0]);
  ::setsid();
  const int devnull = ::open("/dev/null", O_RDWR);
  if (devnull >= 0) {
    ::dup2(devnull, STDIN_FILENO);
    ::dup2(devnull, STDOUT_FILENO);
    ::close(devnull);
  }
  const int ready_fd = pipefd[1];
  o.on_ready = [ready_fd](const std::string& dev) {
    if (::write(ready_fd, dev.data(), dev.size()) < 0) return;
    ::close(ready_fd);
  };
  try {
    ::_exit(initiator::run_attach(o));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ibdisk attach: %s\n", e.what());
    ::_exit(kExitFailure);
  }
}

// The mount point of a device or one of its partitions, or "" when nothing is mounted.
std::string mounted_on(const std::string& dev) {
  std::ifstream f("/proc/self/mounts");
  std::string line;
  while (std::getline(f, line)) {
    std::istringstream ls(line);
    std::string src, dst;
    ls >> src >> dst;
    if (src == dev || (src.rfind(dev + "p", 0) == 0 && src.size() > dev.size() + 1)) return dst;
  }
  return {};
}

bool process_gone(int pid) {
  if (::kill(pid, 0) != 0 && errno == ESRCH) return true;
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string s;
  std::getline(stat, s);
  const auto close = s.rfind(')');
  return close != std::string::npos && close + 2 < s.size() && s[close + 2] == 'Z';
}

struct DetachArgs {
  std::string device;
  bool force = false;
  double timeout_s = 30;
  std::string state_dir = initiator::kDefaultStateDir;
};

int run_detach(DetachArgs& a) {
  const int index = initiator::parse_nbd_device(a.device);
  if (index < 0) throw std::invalid_argument("'" + a.device + "' is not an NBD device: expected /dev/nbdN (see `ibdisk list`)");
  const std::string dev = "/dev/nbd" + std::to_string(index);
  if (const std::string mnt = mounted_on(dev); !mnt.empty() && !a.force) {
    throw SystemError("detach " + dev, "it is mounted on " + mnt, "umount it first (or --force, and its I/O fails)");
  }
  for (const auto& s : initiator::list_attachments(a.state_dir)) {
    if (s.index != index) continue;
    if (!s.alive) {
      // A netlink device outlives its process (the kernel holds its I/O for the next attach):
      // detaching it now means disconnecting it.
      if (s.state == "recovering") initiator::nbd_disconnect_index(index);
      ::unlink(s.file.c_str());
      std::printf("%s: its attach process (pid %d) had already exited; %sremoved %s\n", dev.c_str(), s.pid,
                  s.state == "recovering" ? "disconnected the device, " : "", s.file.c_str());
      return 0;
    }
    if (::kill(s.pid, SIGTERM) != 0) throw SystemError("kill(" + std::to_string(s.pid) + ", SIGTERM)", errno, "run as root");
    const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(static_cast<long>(a.timeout_s * 1000));
    while (std::chrono::steady_clock::now() < until) {
      struct stat st {};
      if (process_gone(s.pid) || ::stat(s.file.c_str(), &st) != 0) {
        std::printf("%s detached (was %s/%s)\n", dev.c_str(), s.target.c_str(), s.export_name.c_str());
        return 0;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    throw SystemError("detach " + dev, "its attach process (pid " + std::to_string(s.pid) + ") did not exit within " +
                                           std::to_string(static_cast<int>(a.timeout_s)) + " s",
                      "kill -9 " + std::to_string(s.pid) + ", then `ibdisk detach --force " + dev + "` releases the device");
  }
  if (!initiator::nbd_device_connected(index)) {
    throw SystemError("detach " + dev, std::string("it is not attached"), "`ibdisk list` shows the attached devices");
  }
  if (!a.force) {
    throw SystemError("detach " + dev, "it was not attached by ibdisk (no " + initiator::state_file_for(a.state_dir, index) + ")",
                      "use `nbd-client -d " + dev + "`, or --force to disconnect it anyway");
  }
  initiator::nbd_disconnect_index(index);
  std::printf("%s disconnected\n", dev.c_str());
  return 0;
}

struct ListArgs {
  bool json = false;
  std::string state_dir = initiator::kDefaultStateDir;
};

int run_list(ListArgs& a) {
  const auto all = initiator::list_attachments(a.state_dir);
  if (a.json) {
    Json devices = Json::array();
    for (const auto& s : all) {
      devices.push_back({{"device", s.device},
                         {"target", s.target},
                         {"export", s.export_name},
                         {"transport", s.transport},
                         {"kernel", s.kernel},
                         {"queues", s.queues},
                         {"size", s.size},
                         {"read_only", s.read_only},
                         {"state", s.alive || s.state == "recovering" ? s.state : "dead"},
                         {"alive", s.alive},
                         {"since", s.since},
                         {"reconnects", s.reconnects},
                         {"takeovers", s.takeovers},
                         {"sockets_renewed", s.sockets_renewed},
                         {"last_error", s.last_error},
                         {"pid", s.pid}});
    }
    std::cout << json_document({{"devices", devices}});
    return 0;
  }
  if (all.empty()) {
    std::printf("no attached devices (state files in %s)\n", a.state_dir.c_str());
    return 0;
  }
  std::printf("%-11s %-22s %-14s %-9s %6s %10s  %-12s %-20s %7s\n", "DEVICE", "TARGET", "EXPORT", "TRANSPORT", "QUEUES", "SIZE",
              "STATE", "SINCE", "PID");
  for (const auto& s : all) {
    std::string state = s.alive                    ? s.state
                        : s.state == "recovering" ? "recovering (process gone: run the same attach again)"
                                                  : "dead (process gone)";
    if (s.read_only) state += ",ro";
    std::printf("%-11s %-22s %-14s %-9s %6u %10s  %-12s %-20s %7d\n", s.device.c_str(), s.target.c_str(), s.export_name.c_str(),
                s.transport.c_str(), s.queues, human_bytes(s.size).c_str(), state.c_str(), s.since.c_str(), s.pid);
  }
  return 0;
}

}  // namespace

void add_attach_commands(CLI::App& app, const std::function<void(CLI::App*, Runner)>& on_run) {
  {
    auto a = std::make_shared<AttachArgs>();
    auto* sub = app.add_subcommand(
        "attach",
        "Attach an export as /dev/nbdN through the kernel's NBD driver and serve it (foreground, or --daemon).\n"
        "Prints the device. Survives target restarts and link outages (--reconnect-timeout), and its own death:\n"
        "the kernel holds the device's I/O, and the same attach command run again takes the device over\n"
        "(netlink interface only; the ioctl interface fails the device's I/O when this process dies).\n"
        "See docs/attach.md.");
    sub->add_option("remote", a->remote, "HOST[:PORT]/EXPORT")->required();
    sub->add_option("-d,--device", a->device, "the NBD device to use (default: a free one)")->type_name("/dev/nbdN");
    sub->add_option("-q,--queues", a->queues, "queues: one kernel socket and one session connection each")
        ->capture_default_str()
        ->check(CLI::Range(1, 16));
    sub->add_flag("--read-only", a->read_only, "open the export read-only; the device is read-only");
    sub->add_option("-k,--key-file", a->key_file, "the target's pre-shared key (a copy of its --key-file)");
    sub->add_option("--timeout", a->timeout_s, "seconds to wait for the target on each connect")
        ->capture_default_str()
        ->check(CLI::PositiveNumber);
    sub->add_option("--reconnect-timeout", a->reconnect_timeout,
                    "seconds to hold I/O while the target is unreachable before it fails, or 'forever'")
        ->capture_default_str();
    sub->add_option("--kernel-timeout", a->kernel_timeout_s,
                    "seconds before the kernel sends a request again on another socket (it bounds the stall after "
                    "this process died)")
        ->capture_default_str()
        ->check(CLI::Range(5, 3600));
    sub->add_option("--transport", a->transport, "auto, rdma or tcp")
        ->capture_default_str()
        ->check(CLI::IsMember({"auto", "rdma", "tcp"}));
    sub->add_option("--kernel-interface", a->kernel,
                    "auto (netlink, else ioctl), netlink or ioctl (ioctl: the device dies with this process)")
        ->capture_default_str()
        ->check(CLI::IsMember({"auto", "netlink", "ioctl"}));
    sub->add_flag("--daemon", a->daemon, "return once the device exists and keep serving it in the background");
    sub->add_option("--state-dir", a->state_dir, "where attach keeps one state file per device")->capture_default_str();
    add_liveness_options(sub, a->liveness);
    on_run(sub, [a] { return run_attach_cmd(*a); });
  }
  {
    auto a = std::make_shared<DetachArgs>();
    auto* sub = app.add_subcommand("detach", "Detach a device attached with `ibdisk attach` (it must not be mounted).");
    sub->add_option("device", a->device, "/dev/nbdN")->required();
    sub->add_flag("-f,--force", a->force, "detach even when mounted, or attached by another tool");
    sub->add_option("--timeout", a->timeout_s, "seconds to wait for the attach process to finish")->capture_default_str();
    sub->add_option("--state-dir", a->state_dir, "attach's state files")->capture_default_str();
    on_run(sub, [a] { return run_detach(*a); });
  }
  {
    auto a = std::make_shared<ListArgs>();
    auto* sub = app.add_subcommand("list", "List devices attached with `ibdisk attach`: target, export, transport, state.");
    sub->add_flag("--json", a->json, "print JSON instead of a table");
    sub->add_option("--state-dir", a->state_dir, "attach's state files")->capture_default_str();
    on_run(sub, [a] { return run_list(*a); });
  }
}

}  // namespace ibdisk::cli
