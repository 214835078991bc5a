#pragma once
// `--transport auto` on a host with no RDMA device means TCP: say why once per boot (a
// marker under the runtime directory), not on every command of a TCP-only host.
#include <string>

namespace ibdisk::cli {

// requested unless it is "auto" and this host has no RDMA device; then "tcp", with the
// warning the first time this reason is seen since boot.
std::string choose_transport(const std::string& requested);

}  // namespace ibdisk::cli
