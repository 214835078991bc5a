// Issue 21: `ibdisk copy` and --verify skip holes. A download reads only the export's data and
// the file it writes is as sparse as the export; an upload sends only the source's data and
// leaves the export as sparse as the source, whether the export was empty or full of data.
// Over a real target on loopback TCP, with real io_uring on real files.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

#include "common/checksum.h"
#include "tests/support/fixtures.h"
#include "tests/support/process.h"

namespace ibdisk {
namespace {

using testing::read_file;
using testing::run;

constexpr std::uint64_t kSize = 64ull << 20;
// Data at 0 (1 MiB), 20 MiB (256 KiB) and 60 MiB (2 MiB), holes between and after.
struct Piece {
  std::uint64_t offset, length;
};
constexpr Piece kData[] = {{0, 1 << 20}, {20ull << 20, 256 << 10}, {60ull << 20, 2 << 20}};
constexpr std::uint64_t kDataBytes = (1 << 20) + (256 << 10) + (2 << 20);

void write_sparse_image(const std::string& path) {
  testing::make_sparse_file(path, kSize);
  const int fd = ::open(path.c_str(), O_WRONLY);
  ASSERT_GE(fd, 0);
  for (const Piece& p : kData) {
    std::vector<std::byte> b(p.length);
    fill_pattern(b, p.offset + 7);
    ASSERT_EQ(::pwrite(fd, b.data(), b.size(), static_cast<off_t>(p.offset)), static_cast<ssize_t>(b.size()));
  }
  ::close(fd);
}

std::uint64_t allocated(const std::string& path) {
  struct stat st{};
  EXPECT_EQ(::stat(path.c_str(), &st), 0) << path;
  return static_cast<std::uint64_t>(st.st_blocks) * 512;
}

nlohmann::json copy_json(const std::vector<std::string>& args) {
  std::vector<std::string> argv{IBDISK_BINARY, "copy"};
  argv.insert(argv.end(), args.begin(), args.end());
  argv.insert(argv.end(), {"--no-progress", "--json"});
  const auto r = run(argv);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  const auto start = r.output.find('{');
  if (start == std::string::npos) {
    ADD_FAILURE() << "no JSON from copy: " << r.output;
    return nlohmann::json::object();
  }
  return nlohmann::json::parse(r.output.substr(start));
}

// Allocated sizes "within 10%" (the measure), with a block of slack for tiny files.
void expect_as_sparse(const std::string& got, const std::string& want) {
  const double a = static_cast<double>(allocated(got)), b = static_cast<double>(allocated(want));
  EXPECT_LE(a, b * 1.1 + 4096) << got << " holds " << a << " bytes, " << want << " " << b;
  EXPECT_GE(a, b * 0.9 - 4096) << got << " holds " << a << " bytes, " << want << " " << b;
}

TEST(SparseCopy, DownloadReadsOnlyTheDataAndStaysSparse) {
  testing::TempDir dir;
  const std::string img = dir.file("src.img");
  write_sparse_image(img);
  testing::ServerThread srv(testing::loopback_target(img, true));
  const std::string remote = "127.0.0.1:" + std::to_string(srv.port()) + "/disk";

  const std::string dest = dir.file("dest.img");
  const auto j = copy_json({remote, dest, "--verify"});
  EXPECT_EQ(j["bytes"].get<std::uint64_t>(), kSize) << j;
  EXPECT_EQ(j.value("moved_bytes", ~0ull), kDataBytes) << "only the data crosses the wire: " << j;
  EXPECT_TRUE(j["verify"]["match"].get<bool>()) << j;
  EXPECT_TRUE(read_file(dest) == read_file(img)) << "the download differs from the image";
  expect_as_sparse(dest, img);

  // To /dev/null (nothing to keep sparse): the holes are still not read.
  const auto null = copy_json({remote, "/dev/null"});
  EXPECT_EQ(null.value("moved_bytes", ~0ull), kDataBytes) << null;

  // To standard output (a pipe): the holes are zeros in the stream, not read either.
  const std::string piped = dir.file("piped.img");
  const auto r = run({"/bin/sh", "-c", std::string(IBDISK_BINARY) + " copy " + remote + " - --no-progress > " + piped});
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("(3.2 MiB of it data)"), std::string::npos) << r.output;
  EXPECT_TRUE(read_file(piped) == read_file(img)) << "the stream differs from the image";
}

TEST(SparseCopy, UploadSendsOnlyTheDataAndLeavesTheExportAsSparse) {
  testing::TempDir dir;
  const std::string src = dir.file("src.img");
  write_sparse_image(src);
  // An export that is all hole: the source's holes are left unwritten.
  const std::string empty = dir.file("empty.img");
  testing::make_sparse_file(empty, kSize);
  {
    testing::ServerThread srv(testing::loopback_target(empty));
    const auto j = copy_json({src, "127.0.0.1:" + std::to_string(srv.port()) + "/disk", "--verify"});
    EXPECT_EQ(j.value("moved_bytes", ~0ull), kDataBytes) << j;
    EXPECT_TRUE(j["verify"]["match"].get<bool>()) << j;
  }
  EXPECT_TRUE(read_file(empty) == read_file(src)) << "the export differs from the source";
  expect_as_sparse(empty, src);

  // An export full of data: the source's holes become holes there too (write-zeroes with
  // MAY_TRIM punches them), not zeros that take space.
  const std::string full = dir.file("full.img");
  std::ofstream(full, std::ios::binary) << std::string(kSize, '\xab');
  ASSERT_GE(allocated(full), kSize);
  {
    testing::ServerThread srv(testing::loopback_target(full));
    const auto j = copy_json({src, "127.0.0.1:" + std::to_string(srv.port()) + "/disk"});
    EXPECT_EQ(j.value("moved_bytes", ~0ull), kDataBytes) << j;
  }
  EXPECT_TRUE(read_file(full) == read_file(src)) << "the export differs from the source";
  expect_as_sparse(full, src);
}

}  // namespace
}  // namespace ibdisk
