// Host-side checks of the RDMA wrappers that need no device. The device tests run in the guest
// (tests/rdma).
#include <gtest/gtest.h>

#include <sys/resource.h>

#include "transport/rdma/verbs.h"

namespace ibdisk::rdma {
namespace {

// Probing never crashes: either devices are listed, or a reason says why there are none.
TEST(RdmaProbe, ReportsDevicesOrReason) {
  const DeviceProbe p = probe_devices();
  if (p.devices.empty()) {
    EXPECT_FALSE(p.unavailable_reason.empty());
  } else {
    EXPECT_TRUE(p.unavailable_reason.empty());
  }
}

// The memlock hint states the current limit and what to set.
TEST(RdmaMemlock, HintSaysWhatToSet) {
  const std::string hint = memlock_hint(64u << 20);
  EXPECT_NE(hint.find("RLIMIT_MEMLOCK"), std::string::npos) << hint;
  EXPECT_NE(hint.find("65536 KiB"), std::string::npos) << hint;
  EXPECT_NE(hint.find("ulimit -l"), std::string::npos) << hint;
}

// Moved-from owners hold nothing and destroy nothing.
TEST(RdmaRaii, MovedFromOwnersAreEmpty) {
  CmId a;
  CmId b(std::move(a));
  EXPECT_FALSE(a);
  EXPECT_FALSE(b);
  EXPECT_EQ(b.verbs(), nullptr);
}

}  // namespace
}  // namespace ibdisk::rdma
