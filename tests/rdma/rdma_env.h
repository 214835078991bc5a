#pragma once
// Where the guest's Soft-RoCE devices are (tests/vm/guest-setup), and the skip rule.
#include <cstdlib>
#include <string>

#include <gtest/gtest.h>

#include "transport/rdma/verbs.h"

namespace ibdisk::testing {

inline std::string env_or(const char* name, const char* fallback) {
  const char* v = std::getenv(name);
  return v && *v ? v : fallback;
}
// rxe0 sits on this address (veth0), rxe1 on the peer address (veth1).
inline std::string rdma_addr() { return env_or("IBDISK_VM_ADDR", "10.77.0.1"); }
inline std::string rdma_peer_addr() { return env_or("IBDISK_VM_PEER", "10.77.0.2"); }

}  // namespace ibdisk::testing

// Skips (never passes) when this host has no RDMA device, saying why.
#define IBDISK_REQUIRE_RDMA()                                                     \
  do {                                                                            \
    const auto probe_ = ::ibdisk::rdma::probe_devices();                          \
    if (probe_.devices.empty()) GTEST_SKIP() << probe_.unavailable_reason         \
                                             << " (run inside tests/vm/run)";    \
  } while (0)
