// The data-plane wire format: sizes, byte order, the docs/protocol.md example byte for byte,
// and every rejection the decoders make.
#include <gtest/gtest.h>

#include <vector>

#include "initiator/client.h"
#include "proto/wire.h"
#include "target/exports.h"

namespace ibdisk::wire {
namespace {

std::vector<std::uint8_t> bytes(const std::byte* p, std::size_t n) {
  return {reinterpret_cast<const std::uint8_t*>(p), reinterpret_cast<const std::uint8_t*>(p) + n};
}

// The read command and completion of docs/protocol.md's example, byte for byte.
TEST(Wire, ProtocolDocExample) {
  std::byte buf[kFrameHeaderSize + kCommandSize];
  encode(FrameHeader{FrameType::kCommand, 40}, buf);
  Command c;
  c.opcode = Opcode::kRead;
  c.length = 4096;
  c.tag = 7;
  c.offset = 8192;
  c.handle = 1;
  encode(c, buf + kFrameHeaderSize);
  const std::vector<std::uint8_t> want = {0x49, 0x42, 0x02, 0x00, 0x28, 0x00, 0x00, 0x00,  // header
                                          0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00,  // op, len
                                          0x07, 0, 0, 0, 0, 0, 0, 0,                      // tag
                                          0x00, 0x20, 0, 0, 0, 0, 0, 0,                   // offset
                                          0x01, 0, 0, 0, 0, 0, 0, 0,                      // handle, rkey
                                          0, 0, 0, 0, 0, 0, 0, 0};                        // addr
  EXPECT_EQ(bytes(buf, sizeof buf), want);
  std::byte comp[kFrameHeaderSize + kCompletionSize];
  encode(FrameHeader{FrameType::kCompletion, 16 + 4096}, comp);
  encode(Completion{7, 0, 4096}, comp + kFrameHeaderSize);
  const std::vector<std::uint8_t> want_comp = {0x49, 0x42, 0x03, 0x00, 0x10, 0x10, 0x00, 0x00, 0x07, 0, 0, 0,
                                               0,    0,    0,    0,    0,    0,    0,    0,    0x00, 0x10, 0, 0};
  EXPECT_EQ(bytes(comp, sizeof comp), want_comp);
}

// What encodes decodes to the same values.
TEST(Wire, RoundTrip) {
  Command c;
  c.opcode = Opcode::kWrite;
  c.flags = kFlagFua;
  c.length = kMaxIoSize;
  c.tag = 0x1122334455667788ull;
  c.offset = 0x0102030405060708ull;
  c.handle = 9;
  c.rkey = 0xdeadbeef;
  c.addr = 0xffff800012345678ull;
  std::byte buf[kCommandSize];
  encode(c, buf);
  Command d;
  ASSERT_EQ(decode(buf, &d), DecodeError::kNone);
  EXPECT_EQ(d.opcode, c.opcode);
  EXPECT_EQ(d.flags, c.flags);
  EXPECT_EQ(d.length, c.length);
  EXPECT_EQ(d.tag, c.tag);
  EXPECT_EQ(d.offset, c.offset);
  EXPECT_EQ(d.rkey, c.rkey);
  EXPECT_EQ(d.addr, c.addr);
  Completion p{42, -28, 0}, q;
  std::byte cb[kCompletionSize];
  encode(p, cb);
  ASSERT_EQ(decode(cb, &q), DecodeError::kNone);
  EXPECT_EQ(q.status, -28);
}

// Every malformed capsule or header is named, never accepted.
TEST(Wire, Rejections) {
  std::byte buf[kCommandSize];
  Command c;
  c.length = 4096;
  encode(c, buf);
  Command out;
  EXPECT_EQ(decode(std::span<const std::byte>(buf, 39), &out), DecodeError::kTruncated);
  buf[0] = std::byte{wire::kMaxOpcode + 1};
  EXPECT_EQ(decode(buf, &out), DecodeError::kBadOpcode);
  buf[0] = std::byte{0};
  buf[1] = std::byte{0x80};
  EXPECT_EQ(decode(buf, &out), DecodeError::kBadFlags);
  buf[1] = std::byte{0};
  buf[2] = std::byte{1};
  EXPECT_EQ(decode(buf, &out), DecodeError::kReserved);
  c.length = kMaxIoSize + 1;
  encode(c, buf);
  EXPECT_EQ(decode(buf, &out), DecodeError::kTooLong);
  c.length = 0;
  encode(c, buf);
  EXPECT_EQ(decode(buf, &out), DecodeError::kBadLength);
  c.opcode = Opcode::kFlush;
  c.length = 512;
  encode(c, buf);
  EXPECT_EQ(decode(buf, &out), DecodeError::kBadLength);
  std::byte h[kFrameHeaderSize];
  encode(FrameHeader{FrameType::kControl, kMaxControlSize + 1}, h);
  FrameHeader fh;
  EXPECT_EQ(decode(h, &fh), DecodeError::kTooLong);
  encode(FrameHeader{FrameType::kCommand, kMaxFramePayload}, h);
  EXPECT_EQ(decode(h, &fh), DecodeError::kNone);
  h[0] = std::byte{0};
  EXPECT_EQ(decode(h, &fh), DecodeError::kBadMagic);
  Completion cp;
  std::byte cb[kCompletionSize];
  encode(Completion{1, 5, 0}, cb);  // a positive status is not a valid completion
  EXPECT_EQ(decode(cb, &cp), DecodeError::kBadLength);
}

// A heartbeat (version 3) carries nothing: any length, offset, flag or handle is refused.
TEST(Wire, HeartbeatCarriesNothing) {
  std::byte buf[kCommandSize];
  Command c;
  c.opcode = Opcode::kHeartbeat;
  c.tag = 9;
  encode(c, buf);
  Command out;
  ASSERT_EQ(decode(buf, &out), DecodeError::kNone);
  EXPECT_EQ(out.opcode, Opcode::kHeartbeat);
  EXPECT_EQ(out.tag, 9u);
  for (auto bad : {Command{Opcode::kHeartbeat, 0, 1}, Command{Opcode::kHeartbeat, kFlagFua},
                   Command{Opcode::kHeartbeat, 0, 0, 1, 3}}) {
    encode(bad, buf);
    EXPECT_NE(decode(buf, &out), DecodeError::kNone);
  }
  c.offset = 4096;
  encode(c, buf);
  EXPECT_EQ(decode(buf, &out), DecodeError::kBadLength);
}

// The range check never overflows.
TEST(Wire, InRangeWithoutOverflow) {
  EXPECT_TRUE(in_range(0, 4096, 4096));
  EXPECT_FALSE(in_range(1, 4096, 4096));
  EXPECT_FALSE(in_range(~0ull - 10, 4096, 1ull << 30));
  EXPECT_FALSE(in_range(4097, 0, 4096));
  EXPECT_TRUE(in_range(4096, 0, 4096));
}

// --export NAME=PATH[,ro][,shared][,direct|,cached]
TEST(ExportSpec, Parses) {
  auto c = target::parse_export_spec("vm1=/dev/nvme0n1");
  EXPECT_EQ(c.name, "vm1");
  EXPECT_EQ(c.path, "/dev/nvme0n1");
  EXPECT_FALSE(c.read_only);
  EXPECT_FALSE(c.direct.has_value());
  c = target::parse_export_spec("iso=/srv/a,b.iso,ro,shared,cached");
  EXPECT_EQ(c.path, "/srv/a,b.iso");
  EXPECT_TRUE(c.read_only);
  EXPECT_TRUE(c.shared);
  EXPECT_EQ(c.direct, false);
  EXPECT_THROW(target::parse_export_spec("novalue"), std::invalid_argument);
  EXPECT_THROW(target::parse_export_spec("=/x"), std::invalid_argument);
  EXPECT_THROW(target::parse_export_spec("a b=/x"), std::invalid_argument);
  EXPECT_THROW(target::parse_export_spec("a=,ro"), std::invalid_argument);
}

// HOST[:PORT] and HOST[:PORT]/EXPORT, IPv6 included; local paths are not remote names.
TEST(RemoteName, Parses) {
  std::string host;
  std::uint16_t port = 7420;
  initiator::parse_host_port("[fe80::1]:9000", &host, &port);
  EXPECT_EQ(host, "fe80::1");
  EXPECT_EQ(port, 9000);
  EXPECT_THROW(initiator::parse_host_port("h:99999", &host, &port), std::invalid_argument);
  initiator::RemoteName r;
  ASSERT_TRUE(initiator::parse_remote("10.30.0.1/vm1", &r));
  EXPECT_EQ(r.host, "10.30.0.1");
  EXPECT_EQ(r.port, 7420);
  EXPECT_EQ(r.export_name, "vm1");
  ASSERT_TRUE(initiator::parse_remote("ibdisk://h:7000/x", &r));
  EXPECT_EQ(r.port, 7000);
  EXPECT_FALSE(initiator::parse_remote("/tmp/vm1.img", &r));
  EXPECT_FALSE(initiator::parse_remote("./a/b", &r));
  EXPECT_FALSE(initiator::parse_remote("a/b/c", &r));
}

// An extent list round-trips, and a decoder refuses counts, lengths and fields out of the rules.
TEST(Wire, ExtentListRoundTripAndChecks) {
  ExtentList l;
  l.flags = kExtentsExact;
  l.count = 3;
  l.runs[0] = {4096, 0};
  l.runs[1] = {1 << 20, kExtentHole | kExtentZero};
  l.runs[2] = {512, 0};
  std::vector<std::byte> buf(extents_size(3));
  encode(l, buf.data());
  ExtentList out;
  ASSERT_EQ(decode(buf, 4096 + (1 << 20) + 512, &out), DecodeError::kNone);
  EXPECT_EQ(out.count, 3u);
  EXPECT_EQ(out.flags, kExtentsExact);
  EXPECT_EQ(out.runs[1].length, 1u << 20);
  EXPECT_EQ(out.runs[1].type, kExtentHole | kExtentZero);
  EXPECT_EQ(decode(buf, 4096, &out), DecodeError::kBadLength);  // covers more than asked
  EXPECT_EQ(decode(std::span<const std::byte>(buf).first(buf.size() - 1), ~0ull, &out), DecodeError::kTruncated);
  EXPECT_EQ(decode(std::span<const std::byte>(buf).first(4), ~0ull, &out), DecodeError::kTruncated);
  buf[8 + 16 + 12] = std::byte{1};
  EXPECT_EQ(decode(buf, ~0ull, &out), DecodeError::kReserved);
  buf[8 + 16 + 12] = std::byte{0};
  buf[8 + 16 + 8] = std::byte{4};
  EXPECT_EQ(decode(buf, ~0ull, &out), DecodeError::kBadFlags);
  l.count = 0;
  encode(l, buf.data());
  EXPECT_EQ(decode(std::span<const std::byte>(buf).first(8), ~0ull, &out), DecodeError::kBadLength);
  // An extents command needs a length, and may ask for more than the largest I/O.
  Command c;
  c.opcode = Opcode::kExtents;
  c.length = 0xffffffffu;
  std::byte cap[kCommandSize];
  encode(c, cap);
  Command dc;
  EXPECT_EQ(decode(cap, &dc), DecodeError::kNone);
  EXPECT_EQ(buffer_size(dc), kExtentsReplySize);
  c.length = 0;
  encode(c, cap);
  EXPECT_EQ(decode(cap, &dc), DecodeError::kBadLength);
}

}  // namespace
}  // namespace ibdisk::wire
