#include "cli/transport_choice.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <sstream>

#include "common/log.h"
#include "transport/rdma/verbs.h"

namespace ibdisk::cli {
namespace {

// $XDG_RUNTIME_DIR, else /run/ibdisk for root and /tmp for others: all emptied at boot.
std::string marker_path() {
  if (const char* xdg = std::getenv("XDG_RUNTIME_DIR"); xdg && *xdg) return std::string(xdg) + "/ibdisk-rdma-not-used";
  if (::geteuid() == 0) return "/run/ibdisk/rdma-not-used";
  return "/tmp/ibdisk-rdma-not-used-" + std::to_string(::geteuid());
}

}  // namespace

std::string choose_transport(const std::string& requested) {
  if (requested != "auto") return requested;
  const auto probe = rdma::probe_devices();
  if (!probe.devices.empty()) return requested;
  const std::string path = marker_path();
  std::ifstream in(path);
  std::stringstream seen;
  seen << in.rdbuf();
  if (seen.str() == probe.unavailable_reason) {
    logger("initiator")->debug("RDMA not used: {}; using TCP", probe.unavailable_reason);
    return "tcp";
  }
  logger("initiator")->warn("RDMA not used: {}; using TCP (said once until reboot; `ibdisk setup doctor` explains)",
                            probe.unavailable_reason);
  ::mkdir(path.substr(0, path.rfind('/')).c_str(), 0755);
  std::ofstream(path) << probe.unavailable_reason;
  return "tcp";
}

}  // namespace ibdisk::cli
