// The TCP data path end to end: a random workload checked against a reference model, data
// surviving SIGKILL after a flush, and the export access rules between two initiators.
#include <gtest/gtest.h>
#include <signal.h>

#include <algorithm>
#include <cstring>
#include <random>
#include <vector>

#include "common/checksum.h"
#include "common/error.h"
#include "initiator/client.h"
#include "tests/support/fixtures.h"
#include "tests/support/process.h"
#include "tests/support/workload.h"

namespace ibdisk {
namespace {

using initiator::Client;
using initiator::ClientOptions;
using testing::ServerThread;
using testing::TempDir;

constexpr std::uint64_t kGiB = 1ull << 30;

target::ServerOptions one_export(const std::string& path, bool read_only = false) {
  target::ServerOptions o = testing::loopback_target(path, read_only, 96);
  o.threads = 2;
  return o;
}

ClientOptions client_for(std::uint16_t port, unsigned queues = 1, unsigned depth = 16) {
  ClientOptions c;
  c.host = "127.0.0.1";
  c.port = port;
  c.queues = queues;
  c.queue_depth = depth;
  return c;
}

using testing::sync;

// Random reads and writes (512 B to 1 MiB, 4 queues x depth 16) on a 1 GiB sparse export:
// every byte read back matches a reference model. Requests in flight never overlap, so the
// model is exact.
TEST(TcpWorkload, RandomReadWriteMatchesModel) {
  TempDir dir;
  const std::string img = dir.file("disk.img");
  testing::make_sparse_file(img, kGiB);
  ServerThread srv(one_export(img));
  auto client = Client::connect(client_for(srv.port(), 4, 16));
  const auto opened = client->open("disk", false);
  ASSERT_EQ(opened.info().size(), kGiB);

  std::vector<std::byte> model(kGiB);  // zero pages until touched
  testing::RandomWorkload workload(*client, opened.handle(), model, {.seed = 42, .max_in_flight = 64});
  workload.run(2500);
  const auto& r = workload.result();
  EXPECT_EQ(r.errors, 0u);
  EXPECT_EQ(r.mismatches, 0u);
  EXPECT_GT(r.bytes, 500u << 20);
  // A full read-back of every region the workload touched, after a flush.
  EXPECT_EQ(sync(*client, [&](auto cb) { client->flush(0, opened.handle(), cb); }), 0);
  EXPECT_EQ(testing::read_back_mismatches(*client, opened.handle(), model), 0u);
}

// Writes acknowledged before a flush survive the target being killed with SIGKILL.
TEST(TcpWorkload, FlushedWritesSurviveSigkill) {
  TempDir dir;
  const std::string img = dir.file("disk.img");
  testing::make_sparse_file(img, kGiB);
  const std::uint16_t port = testing::free_port();
  const std::vector<std::string> serve = {IBDISK_BINARY, "serve", "--export", "disk=" + img, "--listen",
                                          "127.0.0.1:" + std::to_string(port)};
  std::mt19937_64 rng(7);
  std::vector<std::pair<std::uint64_t, std::vector<std::byte>>> written;
  {
    testing::Child target(serve);
    ASSERT_TRUE(target.wait_for_output("listening", 20000)) << target.wait(1000).output;
    auto client = Client::connect(client_for(port, 2, 16));
    const auto opened = client->open("disk", false);
    unsigned done = 0, errors = 0;
    for (int i = 0; i < 200; ++i) {
      std::vector<std::byte> buf(4096u * (1 + rng() % 64));
      fill_pattern(buf, rng());
      const std::uint64_t off = (rng() % (kGiB / 4096 - 64)) * 4096;
      written.emplace_back(off, std::move(buf));
    }
    // Later writes may overwrite earlier ones: keep only the last write per block in the check.
    for (std::size_t i = 0; i < written.size(); ++i) {
      client->write(static_cast<unsigned>(i), opened.handle(), written[i].first,
                    static_cast<std::uint32_t>(written[i].second.size()), written[i].second.data(), 0, [&](int st) {
                      if (st) ++errors;
                      ++done;
                    });
      client->run_until([&] { return done == i + 1; });  // in order, so overlaps resolve as the model says
    }
    EXPECT_EQ(errors, 0u);
    EXPECT_EQ(sync(*client, [&](auto cb) { client->flush(0, opened.handle(), cb); }), 0);
    ::kill(target.pid(), SIGKILL);
    EXPECT_EQ(target.wait(10000).exit_code, 128 + SIGKILL);
  }
  std::vector<std::byte> model(kGiB);
  for (const auto& [off, buf] : written) std::memcpy(model.data() + off, buf.data(), buf.size());
  testing::Child target(serve);
  ASSERT_TRUE(target.wait_for_output("listening", 20000));
  auto client = Client::connect(client_for(port));
  const auto opened = client->open("disk", true);
  unsigned bad = 0;
  for (const auto& [off, buf] : written) {
    std::vector<std::byte> got(buf.size());
    ASSERT_EQ(sync(*client, [&](auto cb) { client->read(0, opened.handle(), off, static_cast<std::uint32_t>(got.size()), got.data(), cb); }), 0);
    if (std::memcmp(got.data(), model.data() + off, got.size()) != 0) ++bad;
  }
  EXPECT_EQ(bad, 0u);
}

// An exclusive export refuses a second writer, naming the reason; readers still get in.
TEST(TcpAccess, SecondWriterRefusedOnExclusiveExport) {
  TempDir dir;
  testing::make_sparse_file(dir.file("a.img"), 16 << 20);
  ServerThread srv(one_export(dir.file("a.img")));
  auto first = Client::connect(client_for(srv.port()));
  first->open("disk", false);
  auto second = Client::connect(client_for(srv.port()));
  try {
    second->open("disk", false);
    FAIL() << "a second writer must be refused";
  } catch (const SystemError& e) {
    EXPECT_NE(std::string(e.what()).find("already has a writer"), std::string::npos) << e.what();
  }
  EXPECT_NO_THROW(second->open("disk", true));
  // Once the first writer goes away, a new writer is admitted.
  first.reset();
  auto third = Client::connect(client_for(srv.port()));
  for (int i = 0; i < 50; ++i) {
    try {
      third->open("disk", false);
      SUCCEED();
      return;
    } catch (const SystemError&) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));  // the target notices the close
    }
  }
  FAIL() << "the writer's lease was not released after it disconnected";
}

// Readers share a read-only export; a writer is refused with a clear reason; writes through a
// read-only open fail with EROFS and nothing changes.
TEST(TcpAccess, ReadOnlyExportSharedByReaders) {
  TempDir dir;
  const std::string img = dir.file("ro.img");
  testing::make_sparse_file(img, 16 << 20);
  ServerThread srv(one_export(img, /*read_only=*/true));
  auto a = Client::connect(client_for(srv.port()));
  auto b = Client::connect(client_for(srv.port()));
  const auto ha = a->open("disk", true);
  const auto hb = b->open("disk", true);
  EXPECT_TRUE(ha.info().read_only());
  std::vector<std::byte> buf(4096);
  EXPECT_EQ(sync(*a, [&](auto cb) { a->read(0, ha.handle(), 0, 4096, buf.data(), cb); }), 0);
  EXPECT_EQ(sync(*b, [&](auto cb) { b->read(0, hb.handle(), 4096, 4096, buf.data(), cb); }), 0);
  fill_pattern(buf, 1);
  EXPECT_EQ(sync(*a, [&](auto cb) { a->write(0, ha.handle(), 0, 4096, buf.data(), 0, cb); }), -EROFS);
  EXPECT_EQ(sync(*a, [&](auto cb) { a->trim(0, ha.handle(), 0, 4096, cb); }), -EROFS);
  std::vector<std::byte> back(4096);
  EXPECT_EQ(sync(*a, [&](auto cb) { a->read(0, ha.handle(), 0, 4096, back.data(), cb); }), 0);
  EXPECT_EQ(back, std::vector<std::byte>(4096));
  auto c = Client::connect(client_for(srv.port()));
  try {
    c->open("disk", false);
    FAIL() << "a writer on a read-only export must be refused";
  } catch (const SystemError& e) {
    EXPECT_NE(std::string(e.what()).find("read-only"), std::string::npos) << e.what();
  }
}

// Flush, FUA writes, trim and write-zeroes all complete and have their effect.
TEST(TcpWorkload, FlushFuaTrimWriteZeroes) {
  TempDir dir;
  const std::string img = dir.file("d.img");
  testing::make_sparse_file(img, 64 << 20);
  ServerThread srv(one_export(img));
  auto c = Client::connect(client_for(srv.port()));
  const auto h = c->open("disk", false);
  EXPECT_TRUE(h.trim());
  std::vector<std::byte> data(1 << 20), back(1 << 20);
  fill_pattern(data, 3);
  EXPECT_EQ(sync(*c, [&](auto cb) { c->write(0, h.handle(), 0, 1 << 20, data.data(), wire::kFlagFua, cb); }), 0);
  EXPECT_EQ(sync(*c, [&](auto cb) { c->read(0, h.handle(), 0, 1 << 20, back.data(), cb); }), 0);
  EXPECT_EQ(back, data);
  EXPECT_EQ(sync(*c, [&](auto cb) { c->trim(0, h.handle(), 0, 512 << 10, cb); }), 0);
  EXPECT_EQ(sync(*c, [&](auto cb) { c->write_zeroes(0, h.handle(), 512 << 10, 256 << 10, 0, cb); }), 0);
  EXPECT_EQ(sync(*c, [&](auto cb) { c->flush(0, h.handle(), cb); }), 0);
  EXPECT_EQ(sync(*c, [&](auto cb) { c->read(0, h.handle(), 0, 1 << 20, back.data(), cb); }), 0);
  EXPECT_EQ(std::vector<std::byte>(back.begin(), back.begin() + (768 << 10)), std::vector<std::byte>(768 << 10));
  EXPECT_TRUE(std::equal(back.begin() + (768 << 10), back.end(), data.begin() + (768 << 10)));
}

}  // namespace
}  // namespace ibdisk
