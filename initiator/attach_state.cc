// `ibdisk list`: the state files `ibdisk attach` keeps under its state directory, one per device.
#include <dirent.h>
#include <signal.h>

#include <algorithm>
#include <cerrno>
#include <fstream>

#include <nlohmann/json.hpp>

#include "initiator/attach.h"

namespace ibdisk::initiator {

std::string state_file_for(const std::string& state_dir, int index) {
  return state_dir + "/nbd" + std::to_string(index) + ".json";
}

std::vector<AttachState> list_attachments(const std::string& state_dir) {
  std::vector<AttachState> out;
  DIR* d = ::opendir(state_dir.c_str());
  if (!d) return out;
  while (const dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    if (name.rfind("nbd", 0) != 0 || name.size() < 8 || name.substr(name.size() - 5) != ".json") continue;
    const std::string path = state_dir + "/" + name;
    std::ifstream f(path);
    nlohmann::json j = nlohmann::json::parse(f, nullptr, false);
    if (j.is_discarded() || !j.is_object()) continue;
    AttachState s;
    s.file = path;
    s.device = j.value("device", "");
    s.index = j.value("index", -1);
    s.target = j.value("target", "");
    s.export_name = j.value("export", "");
    s.transport = j.value("transport", "");
    s.kernel = j.value("kernel", "");
    s.state = j.value("state", "");
    s.queues = j.value("queues", 0u);
    s.size = j.value("size", std::uint64_t{0});
    s.read_only = j.value("read_only", false);
    s.pid = j.value("pid", 0);
    s.since = j.value("since", "");
    s.reconnects = j.value("reconnects", std::uint64_t{0});
    s.takeovers = j.value("takeovers", std::uint64_t{0});
    s.sockets_renewed = j.value("sockets_renewed", std::uint64_t{0});
    s.last_error = j.value("last_error", "");
    s.alive = s.pid > 0 && (::kill(s.pid, 0) == 0 || errno == EPERM);
    // Its process is gone but the kernel keeps the device and holds its I/O for the next
    // `ibdisk attach` of the same export (netlink only).
    if (!s.alive && s.kernel == "netlink" && s.index >= 0 && nbd_device_connected(s.index)) s.state = "recovering";
    out.push_back(s);
  }
  ::closedir(d);
  std::sort(out.begin(), out.end(), [](const AttachState& a, const AttachState& b) { return a.index < b.index; });
  return out;
}

}  // namespace ibdisk::initiator
