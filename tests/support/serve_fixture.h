#pragma once
// The fixture of tests that run the real program: `ibdisk serve` of one exclusive export "d"
// (d.img in a temporary folder, made sparse when missing) on 127.0.0.1, TCP only, without a
// key. Header-only: IBDISK_BINARY is the including test program's definition.
#include <gtest/gtest.h>

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "initiator/client.h"
#include "tests/support/fixtures.h"
#include "tests/support/process.h"

namespace ibdisk::testing {

class ServeFixture : public ::testing::Test {
 protected:
  explicit ServeFixture(std::uint64_t image_size) : image_size_(image_size) {}

  // Starts the target and waits until it serves "d": `prefix` runs it (prlimit, setpriv...),
  // `extra` are more serve options.
  void start(const std::vector<std::string>& extra = {}, const std::vector<std::string>& prefix = {}) {
    if (!std::filesystem::exists(dir_.file("d.img"))) make_sparse_file(dir_.file("d.img"), image_size_);
    port_ = free_port();
    std::vector<std::string> argv = prefix;
    argv.insert(argv.end(), {IBDISK_BINARY, "serve", "--export", "d=" + dir_.file("d.img"), "--listen",
                             "127.0.0.1:" + std::to_string(port_), "--no-rdma"});
    argv.insert(argv.end(), extra.begin(), extra.end());
    serve_ = std::make_unique<Child>(argv);
    ASSERT_TRUE(serve_->wait_for_output("export d", 20000)) << serve_->wait(1000).output;
  }
  initiator::ClientOptions client() const {
    initiator::ClientOptions c;
    c.host = "127.0.0.1";
    c.port = port_;
    c.transport = "tcp";
    return c;
  }
  // Reads what the serve process wrote, for up to ms (so its log pipe never fills).
  void pump_output(int ms) { serve_->wait_for_output("\x01never printed\x01", ms); }

  TempDir dir_;
  std::uint16_t port_ = 0;
  std::unique_ptr<Child> serve_;

 private:
  std::uint64_t image_size_;
};

}  // namespace ibdisk::testing
