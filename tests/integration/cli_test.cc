// The user commands end to end: `ibdisk serve` from a config file, then ls, info, stats, copy
// both ways with --verify, and SIGTERM.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>

#include "common/checksum.h"
#include "tests/support/fixtures.h"
#include "tests/support/process.h"

namespace ibdisk {
namespace {

using testing::Child;
using testing::run;

class Cli : public ::testing::Test {
 protected:
  void SetUp() override {
    img_ = dir_.file("vm1.img");
    testing::make_sparse_file(img_, 64 << 20);
    iso_ = dir_.file("iso.img");
    {
      std::vector<std::byte> data(3 << 20);
      fill_pattern(data, 11);
      std::ofstream(iso_, std::ios::binary).write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size()));
    }
    port_ = std::to_string(testing::free_port());
    config_ = dir_.file("ibdisk.toml");
    std::ofstream(config_) << "[serve]\nexport = [\"vm1=" << img_ << "\", \"iso=" << iso_ << ",ro\"]\nlisten = \"127.0.0.1:"
                           << port_ << "\"\nthreads = 1\nbuffer-mib = 128\nname = \"lab-store\"\n";
    target_ = std::make_unique<Child>(std::vector<std::string>{IBDISK_BINARY, "--config", config_, "serve"});
    ASSERT_TRUE(target_->wait_for_output("listening", 20000)) << target_->wait(1000).output;
  }
  std::string remote(const std::string& name) { return "127.0.0.1:" + port_ + "/" + name; }

  testing::TempDir dir_;
  std::string img_, iso_, port_, config_;
  std::unique_ptr<Child> target_;
};

// ls shows both exports with sizes and flags, the transport, and the name `serve --name` gave.
TEST_F(Cli, LsAndInfo) {
  const auto ls = run({IBDISK_BINARY, "ls", "127.0.0.1:" + port_});
  EXPECT_EQ(ls.exit_code, 0) << ls.output;
  EXPECT_NE(ls.output.find("(lab-store)"), std::string::npos) << ls.output;
  EXPECT_NE(ls.output.find("transport tcp"), std::string::npos) << ls.output;
  EXPECT_NE(ls.output.find("vm1"), std::string::npos) << ls.output;
  EXPECT_NE(ls.output.find("64.0 MiB"), std::string::npos) << ls.output;
  EXPECT_NE(ls.output.find("ro,exclusive"), std::string::npos) << ls.output;
  const auto json = run({IBDISK_BINARY, "ls", "127.0.0.1:" + port_, "--json"});
  EXPECT_NE(json.output.find("\"name\": \"iso\""), std::string::npos) << json.output;
  EXPECT_NE(json.output.find("\"read_only\": true"), std::string::npos) << json.output;
  EXPECT_NE(json.output.find("\"name\": \"lab-store\""), std::string::npos) << json.output;
  const auto info = run({IBDISK_BINARY, "info", remote("iso")});
  EXPECT_EQ(info.exit_code, 0) << info.output;
  EXPECT_NE(info.output.find("lab-store"), std::string::npos) << info.output;
  EXPECT_NE(info.output.find("read-only"), std::string::npos) << info.output;
  EXPECT_NE(info.output.find("3145728 bytes"), std::string::npos) << info.output;
  const auto missing = run({IBDISK_BINARY, "info", remote("nosuch")});
  EXPECT_NE(missing.exit_code, 0);
  EXPECT_NE(missing.output.find("this target exports: iso, vm1"), std::string::npos) << missing.output;
}

// info --map lists the export's runs of data and holes, as SEEK_DATA / SEEK_HOLE see the
// image, in text and in --json.
TEST_F(Cli, InfoMapListsTheExtents) {
  {
    std::fstream f(img_, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(5 << 20);
    const std::string data(128 << 10, 'x');
    f.write(data.data(), static_cast<std::streamsize>(data.size()));
  }
  const auto want = testing::seek_map(img_);
  ASSERT_GE(want.size(), 2u);
  const auto text = run({IBDISK_BINARY, "info", remote("vm1"), "--map"});
  ASSERT_EQ(text.exit_code, 0) << text.output;
  EXPECT_NE(text.output.find("allocated:"), std::string::npos) << text.output;
  EXPECT_NE(text.output.find(std::to_string(want[1].offset) + " "), std::string::npos) << text.output;
  const auto out = run({IBDISK_BINARY, "info", remote("vm1"), "--map", "--json"});
  ASSERT_EQ(out.exit_code, 0) << out.output;
  const auto j = nlohmann::json::parse(out.output.substr(out.output.find('{')));
  EXPECT_TRUE(j["extents"]["exact"].get<bool>()) << out.output;
  const auto& runs = j["extents"]["runs"];
  ASSERT_EQ(runs.size(), want.size()) << out.output;
  for (std::size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ(runs[i]["offset"].get<std::uint64_t>(), want[i].offset) << out.output;
    EXPECT_EQ(runs[i]["length"].get<std::uint64_t>(), want[i].length) << out.output;
    EXPECT_EQ(runs[i]["type"].get<std::string>(), want[i].hole() ? "hole" : "data") << out.output;
  }
}

// Upload a file to an export and download it back; --verify compares SHA-256 of both sides.
TEST_F(Cli, CopyBothWaysVerified) {
  const auto down = run({IBDISK_BINARY, "copy", remote("iso"), dir_.file("iso.copy"), "--verify", "--no-progress"});
  EXPECT_EQ(down.exit_code, 0) << down.output;
  EXPECT_NE(down.output.find("match"), std::string::npos) << down.output;
  const auto up = run({IBDISK_BINARY, "copy", dir_.file("iso.copy"), remote("vm1"), "--verify", "--no-progress",
                       "--queues", "2", "--queue-depth", "4", "--block-size", "65536"});
  EXPECT_EQ(up.exit_code, 0) << up.output;
  EXPECT_NE(up.output.find("verify"), std::string::npos) << up.output;
  // The bytes really landed in the exported file.
  std::ifstream a(iso_, std::ios::binary), b(img_, std::ios::binary);
  std::vector<char> da(3 << 20), db(3 << 20);
  a.read(da.data(), static_cast<std::streamsize>(da.size()));
  b.read(db.data(), static_cast<std::streamsize>(db.size()));
  EXPECT_EQ(da, db);
  // Writing to the read-only export is refused with the reason.
  const auto refused = run({IBDISK_BINARY, "copy", dir_.file("iso.copy"), remote("iso"), "--no-progress"});
  EXPECT_NE(refused.exit_code, 0);
  EXPECT_NE(refused.output.find("read-only"), std::string::npos) << refused.output;
  // Copy to /dev/null works (no verify possible there).
  const auto null = run({IBDISK_BINARY, "copy", remote("vm1"), "/dev/null", "--no-progress"});
  EXPECT_EQ(null.exit_code, 0) << null.output;
}

// stats lists the sessions of other initiators with their transport and counters.
TEST_F(Cli, StatsAndSigterm) {
  ASSERT_EQ(run({IBDISK_BINARY, "copy", remote("vm1"), "/dev/null", "--no-progress"}).exit_code, 0);
  const auto stats = run({IBDISK_BINARY, "stats", "127.0.0.1:" + port_});
  EXPECT_EQ(stats.exit_code, 0) << stats.output;
  EXPECT_NE(stats.output.find("1 session(s)"), std::string::npos) << stats.output;  // the stats session itself
  EXPECT_NE(stats.output.find("tcp"), std::string::npos) << stats.output;
  ::kill(target_->pid(), SIGTERM);
  const auto r = target_->wait(20000);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("SIGTERM received"), std::string::npos) << r.output;
}

// Usage errors name the problem.
TEST(CliUsage, ErrorsAreClear) {
  const auto none = run({IBDISK_BINARY, "serve"});
  EXPECT_NE(none.exit_code, 0);
  EXPECT_NE(none.output.find("--export"), std::string::npos) << none.output;
  const auto bad = run({IBDISK_BINARY, "serve", "--export", "novalue"});
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_NE(bad.output.find("NAME=PATH"), std::string::npos) << bad.output;
  const auto missing = run({IBDISK_BINARY, "serve", "--export", "x=/nonexistent/disk.img"});
  EXPECT_NE(missing.exit_code, 0);
  EXPECT_NE(missing.output.find("/nonexistent/disk.img"), std::string::npos) << missing.output;
  const auto refused = run({IBDISK_BINARY, "ls", "127.0.0.1:1", "--timeout", "2"});
  EXPECT_NE(refused.exit_code, 0);
  EXPECT_NE(refused.output.find("ibdisk serve"), std::string::npos) << refused.output;
  const auto both_local = run({IBDISK_BINARY, "copy", "/etc/hostname", "/tmp/x"});
  EXPECT_NE(both_local.exit_code, 0);
  EXPECT_NE(both_local.output.find("HOST[:PORT]/EXPORT"), std::string::npos) << both_local.output;
}

}  // namespace
}  // namespace ibdisk

namespace ibdisk {
namespace {

// `ibdisk serve --nbd`: plain NBD clients (nbdinfo, nbdcopy) use the same exports, and what
// nbdcopy writes is what `ibdisk copy` reads back over the ibdisk protocol.
TEST(CliNbd, ServeWithNbdFrontEnd) {
  testing::TempDir dir;
  testing::make_sparse_file(dir.file("d.img"), 16 << 20);
  {
    std::vector<std::byte> data(4 << 20);
    fill_pattern(data, 5);
    std::ofstream(dir.file("src"), std::ios::binary).write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size()));
  }
  const std::string port = std::to_string(testing::free_port()), nbd_port = std::to_string(testing::free_port());
  Child target({IBDISK_BINARY, "serve", "--export", "d=" + dir.file("d.img"), "--listen", "127.0.0.1:" + port, "--nbd",
                "--nbd-port", nbd_port, "--buffer-mib", "64", "--threads", "1"});
  ASSERT_TRUE(target.wait_for_output("NBD front end on port", 20000)) << target.wait(1000).output;
  const std::string uri = "nbd://127.0.0.1:" + nbd_port + "/d";
  const auto info = run({"/usr/bin/nbdinfo", uri});
  EXPECT_EQ(info.exit_code, 0) << info.output;
  EXPECT_NE(info.output.find("16777216"), std::string::npos) << info.output;
  const auto up = run({"/usr/bin/nbdcopy", dir.file("src"), uri});
  EXPECT_EQ(up.exit_code, 0) << up.output;
  const auto down = run({IBDISK_BINARY, "copy", "127.0.0.1:" + port + "/d", dir.file("back"), "--no-progress"});
  EXPECT_EQ(down.exit_code, 0) << down.output;
  std::ifstream a(dir.file("src"), std::ios::binary), b(dir.file("back"), std::ios::binary);
  std::vector<char> da(4 << 20), db(4 << 20);
  a.read(da.data(), static_cast<std::streamsize>(da.size()));
  b.read(db.data(), static_cast<std::streamsize>(db.size()));
  EXPECT_EQ(da, db);
  // Beyond loopback, NBD without an allow-list is refused: NBD clients do not authenticate.
  ASSERT_EQ(run({IBDISK_BINARY, "keygen", dir.file("key")}).exit_code, 0);
  const auto open_nbd = run({IBDISK_BINARY, "serve", "--export", "d=" + dir.file("d.img"), "--listen",
                             "0.0.0.0:" + std::to_string(testing::free_port()), "--key-file", dir.file("key"), "--nbd",
                             "--nbd-port", std::to_string(testing::free_port())});
  EXPECT_NE(open_nbd.exit_code, 0);
  EXPECT_NE(open_nbd.output.find("NBD clients do not authenticate"), std::string::npos) << open_nbd.output;
  EXPECT_NE(open_nbd.output.find("--allow"), std::string::npos) << open_nbd.output;
}

}  // namespace
}  // namespace ibdisk

namespace ibdisk {
namespace {

// `ibdisk demo` (the README's first command) exports, writes, reads back and checks, and says
// which transport it used and why.
TEST(CliDemo, EndToEndOnThisHost) {
  testing::TempDir dir;
  const auto r = run({IBDISK_BINARY, "demo", "--size", "32", "--dir", dir.path().string(), "--no-progress"});
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("demo: PASS, every byte matches"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("initiator session"), std::string::npos) << r.output;
  EXPECT_TRUE(std::filesystem::is_empty(dir.path())) << "the demo leaves nothing behind";
}

}  // namespace
}  // namespace ibdisk

namespace ibdisk {
namespace {

using testing::read_file;

// Issue 14, finding 2: a download into an existing file leaves it byte-equal to the export:
// same size (the file was longer), and the export's zero blocks zero there too (the old bytes
// stayed where the download skipped zero blocks). With and without --verify.
TEST(CliCopy, DownloadIntoAnExistingLongerFileIsByteEqual) {
  testing::TempDir dir;
  // 8 MiB + 12345 bytes: data in 1 MiB blocks 0, 3 and 5 and in the middle of block 6, zeros
  // elsewhere (the tail too).
  const std::size_t size = (8u << 20) + 12345;
  std::string image(size, '\0');
  for (const std::size_t b : {0u, 3u, 5u}) {
    std::vector<std::byte> block(1 << 20);
    fill_pattern(block, b + 1);
    std::memcpy(image.data() + (b << 20), block.data(), block.size());
  }
  std::memset(image.data() + (6u << 20) + 5000, 0x5c, 70000);
  std::ofstream(dir.file("d.img"), std::ios::binary).write(image.data(), static_cast<std::streamsize>(image.size()));
  testing::ServerThread srv(testing::loopback_target(dir.file("d.img"), true, 16));
  const std::string remote = "127.0.0.1:" + std::to_string(srv.port()) + "/disk";
  for (const bool verify : {false, true}) {
    SCOPED_TRACE(verify ? "with --verify" : "without --verify");
    const std::string dest = dir.file(verify ? "dest-verified" : "dest");
    std::ofstream(dest, std::ios::binary) << std::string(size + (3u << 20), '\xab');
    std::vector<std::string> argv{IBDISK_BINARY, "copy", remote, dest, "--no-progress"};
    if (verify) argv.push_back("--verify");
    const auto r = run(argv);
    EXPECT_EQ(r.exit_code, 0) << r.output;
    const std::string got = read_file(dest);
    EXPECT_EQ(got.size(), size) << "the destination keeps its old length";
    std::size_t differ = 0, first = std::string::npos;
    for (std::size_t i = 0; i < std::min(got.size(), size); ++i) {
      if (got[i] != image[i]) {
        if (differ++ == 0) first = i;
      }
    }
    struct stat st{};
    ASSERT_EQ(::stat(dest.c_str(), &st), 0);
    EXPECT_LT(static_cast<std::uint64_t>(st.st_blocks) * 512, 6u << 20) << "the destination stays sparse (3.1 MiB of data)";
    EXPECT_EQ(differ, 0u) << "bytes that differ from the export, the first at offset " << first << " (0x" << std::hex
                          << (first < got.size() ? static_cast<unsigned>(static_cast<unsigned char>(got[first])) : 0u)
                          << ")";
  }
}

// bench --repeat 3 against a real `ibdisk serve`: every measurement carries its three
// repetitions, the headline is their median, and the range holds it.
TEST_F(Cli, BenchRepeat) {
  const auto r = run({IBDISK_BINARY, "bench", remote("vm1"), "--transports", "tcp", "--workloads", "randread",
                      "--qd-sweep", "1", "--runtime", "0.1", "--repeat", "3", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto start = r.output.find('{');
  ASSERT_NE(start, std::string::npos) << r.output;
  const auto j = nlohmann::json::parse(r.output.substr(start));
  EXPECT_EQ(j["options"]["repeat"].get<int>(), 3);
  const auto& t = j["transports"].at(0);
  ASSERT_FALSE(t.contains("skipped")) << t;
  std::vector<nlohmann::json> measurements{t["workloads"].at(0), t["qd_sweep"].at(0)};
  ASSERT_EQ(measurements[0]["name"], "randread");
  for (const auto& w : measurements) {
    const auto& reps = w["repetitions"];
    EXPECT_EQ(reps["count"].get<int>(), 3) << w;
    for (const char* figure : {"mb_s", "iops"}) {
      SCOPED_TRACE(figure);
      auto values = reps[figure]["values"].get<std::vector<double>>();
      ASSERT_EQ(values.size(), 3u) << w;
      std::sort(values.begin(), values.end());
      EXPECT_DOUBLE_EQ(w[figure].get<double>(), values[1]) << w;
      EXPECT_DOUBLE_EQ(reps[figure]["median"].get<double>(), values[1]) << w;
      EXPECT_LE(reps[figure]["min"].get<double>(), reps[figure]["median"].get<double>()) << w;
      EXPECT_LE(reps[figure]["median"].get<double>(), reps[figure]["max"].get<double>()) << w;
      EXPECT_DOUBLE_EQ(reps[figure]["min"].get<double>(), values[0]) << w;
      EXPECT_DOUBLE_EQ(reps[figure]["max"].get<double>(), values[2]) << w;
    }
    // The ratio to the link: the median of the three per-repetition ratios.
    auto ratios = reps["link_fraction"]["values"].get<std::vector<double>>();
    ASSERT_EQ(ratios.size(), 3u) << w;
    std::sort(ratios.begin(), ratios.end());
    EXPECT_DOUBLE_EQ(w["link_fraction"].get<double>(), ratios[1]) << w;
  }
  EXPECT_EQ(j["baselines"].at(0)["repetitions"]["read_mb_s"]["values"].size(), 3u) << j["baselines"];
}

}  // namespace
}  // namespace ibdisk
