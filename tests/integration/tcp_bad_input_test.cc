// Bad input fails alone: every malformed or hostile thing an initiator can send gets a clear
// error, and the target keeps serving a well-behaved initiator throughout.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <fstream>
#include <map>
#include <set>
#include <random>

#include "common/auth.h"
#include "common/error.h"
#include "initiator/client.h"
#include "tests/support/fixtures.h"
#include "tests/support/raw_peer.h"
#include "transport/tcp/asio.h"

namespace ibdisk {
namespace {

namespace asio = boost::asio;
using asio::ip::tcp;
using initiator::Client;
using initiator::ClientOptions;

using testing::RawPeer;

class BadInput : public ::testing::Test {
 protected:
  void SetUp() override {
    testing::make_sparse_file(dir_.file("d.img"), 8 << 20);
    testing::make_sparse_file(dir_.file("ro.img"), 8 << 20);
    testing::make_sparse_file(dir_.file("shared.img"), 8 << 20);
    target::ServerOptions o;
    o.exports.push_back({"disk", dir_.file("d.img"), false, false});
    o.exports.push_back({"ro", dir_.file("ro.img"), true, false});
    o.exports.push_back({"shared", dir_.file("shared.img"), false, true});
    o.listen_address = "127.0.0.1";
    o.port = 0;
    o.threads = 1;
    o.buffer_mib = 64;
    srv_ = std::make_unique<testing::ServerThread>(o);
    ClientOptions c;
    c.host = "127.0.0.1";
    c.port = srv_->port();
    good_ = Client::connect(c);
    handle_ = good_->open("disk", false).handle();
  }
  // The well-behaved initiator still reads and writes.
  void expect_target_still_serves() {
    std::vector<std::byte> buf(4096, std::byte{0x5a}), back(4096);
    int st = 1;
    bool done = false;
    good_->write(0, handle_, 8192, 4096, buf.data(), 0, [&](int s) { st = s; done = true; });
    good_->run_until([&] { return done; });
    EXPECT_EQ(st, 0);
    done = false;
    good_->read(0, handle_, 8192, 4096, back.data(), [&](int s) { st = s; done = true; });
    good_->run_until([&] { return done; });
    EXPECT_EQ(st, 0);
    EXPECT_EQ(back, buf);
  }
  std::string send_command_raw(const wire::Command& cmd, std::uint32_t frame_len) {
    RawPeer p(srv_->port());
    const auto w = p.handshake();
    EXPECT_TRUE(w.has_welcome());
    std::byte buf[wire::kFrameHeaderSize + wire::kCommandSize];
    wire::encode(wire::FrameHeader{wire::FrameType::kCommand, frame_len}, buf);
    wire::encode(cmd, buf + wire::kFrameHeaderSize);
    p.send_bytes(buf, sizeof buf);
    proto::Control reply;
    if (!p.read_control(&reply)) return "(closed without a message)";
    EXPECT_TRUE(p.closed_by_peer());
    return reply.has_error() ? reply.error().message() : reply.DebugString();
  }
  testing::TempDir dir_;
  std::unique_ptr<testing::ServerThread> srv_;
  std::unique_ptr<Client> good_;
  std::uint32_t handle_ = 0;
};

// Not bad input, but only a raw peer chooses where its bytes are cut: frames cut at every
// byte, frames packed many to one send, and payloads below, at and above the size the target
// reads straight into a slot all come back intact.
TEST_F(BadInput, FramesCutAnywhereOrPackedTogetherAreServed) {
  RawPeer p(srv_->port());
  const auto w = p.handshake();
  ASSERT_TRUE(w.has_welcome());
  proto::Control open;
  open.mutable_open()->set_name("shared");
  p.send_control(open);
  proto::Control opened;
  ASSERT_TRUE(p.read_control(&opened));
  ASSERT_TRUE(opened.has_opened()) << opened.DebugString();
  const std::uint32_t handle = opened.opened().handle();
  const std::vector<std::uint32_t> sizes{1, 4096, 70000, std::min<std::uint32_t>(w.welcome().max_io_size(), 1u << 20)};
  ASSERT_LE(sizes.size(), w.welcome().queue_depth());
  std::mt19937 rng(7);
  std::vector<std::vector<std::byte>> data;
  auto frame = [&](wire::Opcode op, std::size_t i, std::string* out) {
    wire::Command c;
    c.opcode = op;
    c.length = sizes[i];
    c.tag = (op == wire::Opcode::kWrite ? 100 : 200) + i;
    c.handle = handle;
    c.offset = i << 20;
    const bool write = op == wire::Opcode::kWrite;
    std::byte h[wire::kFrameHeaderSize + wire::kCommandSize];
    wire::encode(wire::FrameHeader{wire::FrameType::kCommand,
                                   static_cast<std::uint32_t>(wire::kCommandSize + (write ? c.length : 0))},
                 h);
    wire::encode(c, h + wire::kFrameHeaderSize);
    out->append(reinterpret_cast<const char*>(h), sizeof h);
    if (write) out->append(reinterpret_cast<const char*>(data[i].data()), data[i].size());
  };
  std::string writes, reads;
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    data.emplace_back(sizes[i]);
    for (auto& b : data.back()) b = static_cast<std::byte>(rng());
    frame(wire::Opcode::kWrite, i, &writes);
    frame(wire::Opcode::kRead, i, &reads);
  }
  // Writes: the first 300 bytes one to thirteen at a time, the rest in pieces up to 100 KiB.
  for (std::size_t at = 0; at < writes.size();) {
    const std::size_t n = std::min(writes.size() - at, at < 300 ? 1 + rng() % 13 : 1 + rng() % 100000);
    p.send_bytes(writes.data() + at, n);
    at += n;
  }
  std::set<std::uint64_t> tags;
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    wire::Completion c;
    ASSERT_TRUE(p.read_completion(&c));
    EXPECT_EQ(c.status, 0) << "tag " << c.tag;
    EXPECT_EQ(c.length, 0u);
    tags.insert(c.tag);
  }
  EXPECT_EQ(tags, (std::set<std::uint64_t>{100, 101, 102, 103}));
  // Reads: all four commands in one send.
  p.send_bytes(reads.data(), reads.size());
  std::map<std::uint64_t, std::vector<std::byte>> got;
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    wire::Completion c;
    ASSERT_TRUE(p.read_completion(&c));
    ASSERT_EQ(c.status, 0) << "tag " << c.tag;
    ASSERT_GE(c.tag, 200u);
    ASSERT_LT(c.tag - 200, sizes.size());
    ASSERT_EQ(c.length, sizes[c.tag - 200]);
    std::vector<std::byte> buf(c.length);
    ASSERT_TRUE(p.recv_exact(buf.data(), buf.size()));
    got[c.tag - 200] = std::move(buf);
  }
  for (std::size_t i = 0; i < sizes.size(); ++i) EXPECT_EQ(got[i], data[i]) << sizes[i] << "-byte payload";
  expect_target_still_serves();
}

// Half a frame header, then the peer vanishes: nothing else is affected.
TEST_F(BadInput, TruncatedFrame) {
  {
    RawPeer p(srv_->port());
    const char half[3] = {0x49, 0x42, 0x01};
    p.send_bytes(half, sizeof half);
  }
  expect_target_still_serves();
}

// A frame header that claims more than the protocol allows is refused before any allocation.
TEST_F(BadInput, OversizedLength) {
  RawPeer p(srv_->port());
  std::byte h[wire::kFrameHeaderSize];
  wire::encode(wire::FrameHeader{wire::FrameType::kControl, 0xfffffff0u}, h);
  p.send_bytes(h, sizeof h);
  proto::Control reply;
  ASSERT_TRUE(p.read_control(&reply));
  EXPECT_EQ(reply.error().code(), proto::ERROR_PROTOCOL);
  EXPECT_NE(reply.error().message().find("length above the protocol limit"), std::string::npos);
  EXPECT_TRUE(p.closed_by_peer());
  expect_target_still_serves();
}

// Garbage instead of a frame (an HTTP request, say) is a bad magic.
TEST_F(BadInput, NotOurProtocol) {
  RawPeer p(srv_->port());
  const std::string http = "GET / HTTP/1.0\r\n\r\n";
  p.send_bytes(http.data(), http.size());
  proto::Control reply;
  ASSERT_TRUE(p.read_control(&reply));
  EXPECT_NE(reply.error().message().find("bad frame magic"), std::string::npos) << reply.DebugString();
  expect_target_still_serves();
}

// Control bytes that are not a protobuf message.
TEST_F(BadInput, MalformedProtobuf) {
  RawPeer p(srv_->port());
  p.send_frame(wire::FrameType::kControl, std::string("\xff\xff\xff\xff\x0f", 5));
  proto::Control reply;
  ASSERT_TRUE(p.read_control(&reply));
  EXPECT_EQ(reply.error().code(), proto::ERROR_PROTOCOL);
  EXPECT_NE(reply.error().message().find("malformed control message"), std::string::npos);
  expect_target_still_serves();
}

// An opcode the protocol does not define.
TEST_F(BadInput, UnknownOpcode) {
  wire::Command cmd;
  cmd.length = 4096;
  cmd.handle = 1;
  std::byte buf[wire::kFrameHeaderSize + wire::kCommandSize];
  wire::encode(cmd, buf + wire::kFrameHeaderSize);
  RawPeer p(srv_->port());
  ASSERT_TRUE(p.handshake().has_welcome());
  wire::encode(wire::FrameHeader{wire::FrameType::kCommand, wire::kCommandSize}, buf);
  buf[wire::kFrameHeaderSize] = std::byte{0x7f};
  p.send_bytes(buf, sizeof buf);
  proto::Control reply;
  ASSERT_TRUE(p.read_control(&reply));
  EXPECT_NE(reply.error().message().find("unknown opcode"), std::string::npos) << reply.DebugString();
  expect_target_still_serves();
}

// A write whose frame carries less data than the command says.
TEST_F(BadInput, WriteLengthMismatch) {
  wire::Command cmd;
  cmd.opcode = wire::Opcode::kWrite;
  cmd.length = 4096;
  cmd.handle = 1;
  const std::string why = send_command_raw(cmd, wire::kCommandSize + 100);
  EXPECT_NE(why.find("frame length does not match"), std::string::npos) << why;
  expect_target_still_serves();
}

// A data command before Hello/Auth.
TEST_F(BadInput, CommandBeforeHandshake) {
  RawPeer p(srv_->port());
  std::byte buf[wire::kFrameHeaderSize + wire::kCommandSize];
  wire::encode(wire::FrameHeader{wire::FrameType::kCommand, wire::kCommandSize}, buf);
  wire::Command cmd;
  cmd.length = 512;
  wire::encode(cmd, buf + wire::kFrameHeaderSize);
  p.send_bytes(buf, sizeof buf);
  proto::Control reply;
  ASSERT_TRUE(p.read_control(&reply));
  EXPECT_TRUE(reply.has_error());
  expect_target_still_serves();
}

// Out-of-range and overflowing offset+length complete with EINVAL; the queue stays usable.
TEST_F(BadInput, OutOfRangeAndOverflowingIo) {
  std::vector<std::byte> buf(4096);
  const std::uint64_t offsets[] = {8ull << 20, (8ull << 20) - 100, ~0ull - 10, ~0ull - 4095};
  for (const auto off : offsets) {
    int st = 1;
    bool done = false;
    good_->read(0, handle_, off, 4096, buf.data(), [&](int s) { st = s; done = true; });
    good_->run_until([&] { return done; });
    EXPECT_EQ(st, -EINVAL) << "offset " << off;
    done = false;
    good_->write(0, handle_, off, 4096, buf.data(), 0, [&](int s) { st = s; done = true; });
    good_->run_until([&] { return done; });
    EXPECT_EQ(st, -EINVAL) << "offset " << off;
  }
  expect_target_still_serves();
}

// A handle nobody opened.
TEST_F(BadInput, UnknownHandle) {
  std::vector<std::byte> buf(4096);
  int st = 1;
  bool done = false;
  good_->read(0, handle_ + 100, 0, 4096, buf.data(), [&](int s) { st = s; done = true; });
  good_->run_until([&] { return done; });
  EXPECT_EQ(st, -EBADF);
  expect_target_still_serves();
}

// Unknown export names are refused, naming what the target does export.
TEST_F(BadInput, UnknownExport) {
  ClientOptions c;
  c.host = "127.0.0.1";
  c.port = srv_->port();
  auto other = Client::connect(c);
  try {
    other->open("nosuch", true);
    FAIL();
  } catch (const SystemError& e) {
    EXPECT_NE(std::string(e.what()).find("no export named 'nosuch'"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("disk, ro"), std::string::npos) << e.what();
  }
  expect_target_still_serves();
}

// A protocol version the target does not speak.
TEST_F(BadInput, VersionMismatch) {
  RawPeer p(srv_->port());
  proto::Control hello;
  hello.mutable_hello()->set_min_version(7);
  hello.mutable_hello()->set_max_version(9);
  p.send_control(hello);
  proto::Control reply;
  ASSERT_TRUE(p.read_control(&reply));
  EXPECT_EQ(reply.error().code(), proto::ERROR_VERSION);
  expect_target_still_serves();
}

// Keys: a key file others can read is refused with the chmod to run; the wrong key and no key
// are refused by the target; the right key gets in and the target proves it has the key too.
TEST(Auth, KeysAndRefusals) {
  testing::TempDir dir;
  const std::string key = dir.file("key"), other = dir.file("other"), loose = dir.file("loose");
  write_new_key_file(key);
  write_new_key_file(other);
  { std::ofstream(loose) << "0123456789abcdef0123456789abcdef\n"; }
  ::chmod(loose.c_str(), 0644);
  try {
    load_key_file(loose);
    FAIL();
  } catch (const SystemError& e) {
    EXPECT_NE(std::string(e.what()).find("chmod 600 " + loose), std::string::npos) << e.what();
  }
  EXPECT_THROW(write_new_key_file(key), SystemError);  // never overwrites

  testing::make_sparse_file(dir.file("d.img"), 1 << 20);
  target::ServerOptions o = testing::loopback_target(dir.file("d.img"), false, 8);
  o.key_file = key;
  testing::ServerThread srv(o);
  ClientOptions c;
  c.host = "127.0.0.1";
  c.port = srv.port();
  try {
    Client::connect(c);
    FAIL() << "no key must be refused";
  } catch (const SystemError& e) {
    EXPECT_NE(std::string(e.what()).find("requires a key"), std::string::npos) << e.what();
  }
  c.key_file = other;
  try {
    Client::connect(c);
    FAIL() << "a wrong key must be refused";
  } catch (const SystemError& e) {
    EXPECT_NE(std::string(e.what()).find("wrong key"), std::string::npos) << e.what();
  }
  c.key_file = key;
  auto ok = Client::connect(c);
  EXPECT_EQ(ok->list_exports().size(), 1u);
}

// Without a key the target refuses to listen beyond loopback unless --insecure.
TEST(Auth, NoKeyMeansLoopbackOnly) {
  testing::TempDir dir;
  testing::make_sparse_file(dir.file("d.img"), 1 << 20);
  target::ServerOptions o;
  o.exports.push_back({"disk", dir.file("d.img"), false, false});
  o.listen_address = "0.0.0.0";
  o.port = 0;
  o.threads = 1;
  o.buffer_mib = 8;
  try {
    target::Server s(o);
    FAIL() << "listening on 0.0.0.0 without a key must be refused";
  } catch (const SystemError& e) {
    EXPECT_NE(std::string(e.what()).find("--key-file"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("--insecure"), std::string::npos) << e.what();
  }
  o.insecure = true;
  EXPECT_NO_THROW(target::Server s(o));
  o.insecure = false;
  o.listen_address.clear();
  target::Server s(o);
  EXPECT_NE(s.listen_description().find("127.0.0.1"), std::string::npos);
}

// A client outside the allowed networks is refused with the reason.
TEST(Auth, AllowList) {
  testing::TempDir dir;
  testing::make_sparse_file(dir.file("d.img"), 1 << 20);
  target::ServerOptions o = testing::loopback_target(dir.file("d.img"), false, 8);
  o.allow = {"10.30.0.0/24"};
  testing::ServerThread srv(o);
  ClientOptions c;
  c.host = "127.0.0.1";
  c.port = srv.port();
  try {
    Client::connect(c);
    FAIL() << "127.0.0.1 is not in 10.30.0.0/24";
  } catch (const SystemError& e) {
    EXPECT_NE(std::string(e.what()).find("allowed networks"), std::string::npos) << e.what();
  }
  EXPECT_THROW(target::NetworkAllowList({"10.0.0.0/33"}), std::invalid_argument);
  const target::NetworkAllowList l({"10.30.0.0/24", "fd00::/8"});
  EXPECT_TRUE(l.allows(asio::ip::make_address("10.30.0.9")));
  EXPECT_TRUE(l.allows(asio::ip::make_address("::ffff:10.30.0.9")));
  EXPECT_FALSE(l.allows(asio::ip::make_address("10.30.1.9")));
  EXPECT_TRUE(l.allows(asio::ip::make_address("fd12::1")));
}

}  // namespace
}  // namespace ibdisk
