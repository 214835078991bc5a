#include <gtest/gtest.h>

#include <cerrno>
#include <vector>

#include "common/checksum.h"
#include "common/error.h"
#include "common/log.h"

namespace ibdisk {
namespace {

// SHA-256 of known input matches the published test vector.
TEST(Checksum, Sha256KnownVector) {
  const std::string abc = "abc";
  EXPECT_EQ(sha256_hex(std::as_bytes(std::span(abc))),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

// The pattern is deterministic per seed, differs between seeds, and fills odd tails.
TEST(Checksum, PatternDeterministicPerSeed) {
  std::vector<std::byte> a(4099), b(4099), c(4099);
  fill_pattern(a, 1);
  fill_pattern(b, 1);
  fill_pattern(c, 2);
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  EXPECT_NE(sha256(a), sha256(c));
}

// A SystemError names the call, errno's text and the hint.
TEST(SystemError, MessageNamesCallReasonAndHint) {
  const SystemError e("rdma_bind_addr(10.0.0.1:7471)", EADDRNOTAVAIL, "assign the address to ib0");
  const std::string what = e.what();
  EXPECT_NE(what.find("rdma_bind_addr(10.0.0.1:7471) failed"), std::string::npos) << what;
  EXPECT_NE(what.find(errno_text(EADDRNOTAVAIL)), std::string::npos) << what;
  EXPECT_NE(what.find("assign the address to ib0"), std::string::npos) << what;
  EXPECT_EQ(e.error_code(), EADDRNOTAVAIL);
}

// Unknown log levels are refused with the list of valid ones.
TEST(Log, UnknownLevelRefused) {
  EXPECT_THROW(set_log_level("chatty"), std::invalid_argument);
  EXPECT_NO_THROW(set_log_level("warn"));
  EXPECT_EQ(logger("test")->level(), spdlog::level::warn);
  set_log_level("info");
}

}  // namespace
}  // namespace ibdisk
