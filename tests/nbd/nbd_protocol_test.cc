// The NBD protocol layer without sockets: wire structs, parsers, request checks, and every
// option path of the handshake against an in-memory export catalog.
#include <gtest/gtest.h>

#include <cerrno>
#include <map>

#include "target/nbd/handshake.h"
#include "target/nbd/protocol.h"
#include "target/nbd/tls.h"
#include "common/error.h"

namespace ibdisk::nbd {
namespace {

std::vector<std::byte> be(std::initializer_list<std::pair<std::uint64_t, int>> fields) {
  std::vector<std::byte> out;
  for (const auto& [value, width] : fields) {
    for (int i = width - 1; i >= 0; --i) out.push_back(static_cast<std::byte>((value >> (8 * i)) & 0xff));
  }
  return out;
}

std::vector<std::byte> text(std::string_view s) {
  return {reinterpret_cast<const std::byte*>(s.data()), reinterpret_cast<const std::byte*>(s.data()) + s.size()};
}

std::vector<std::byte> cat(std::vector<std::byte> a, const std::vector<std::byte>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// The data of NBD_OPT_GO / NBD_OPT_INFO.
std::vector<std::byte> query(std::string_view name, std::vector<std::uint16_t> infos = {}) {
  auto out = cat(be({{name.size(), 4}}), text(name));
  out = cat(out, be({{infos.size(), 2}}));
  for (auto i : infos) out = cat(out, be({{i, 2}}));
  return out;
}

struct Reply {
  std::uint32_t option, type;
  std::vector<std::byte> data;
  std::string data_text() const { return {reinterpret_cast<const char*>(data.data()), data.size()}; }
};

// Splits option replies; fails the test on a bad magic or a short buffer.
std::vector<Reply> replies(const std::vector<std::byte>& out) {
  std::vector<Reply> r;
  std::size_t pos = 0;
  while (pos < out.size()) {
    EXPECT_GE(out.size() - pos, sizeof(OptionReplyHeaderWire));
    if (out.size() - pos < sizeof(OptionReplyHeaderWire)) break;
    const auto h = load<OptionReplyHeaderWire>(std::span(out).subspan(pos));
    EXPECT_EQ(h.magic.get(), kOptionReplyMagic);
    pos += sizeof(h);
    const std::size_t len = h.length.get();
    EXPECT_LE(len, out.size() - pos);
    if (len > out.size() - pos) break;
    r.push_back({h.option.get(), h.type.get(), {out.begin() + pos, out.begin() + pos + len}});
    pos += len;
  }
  return r;
}

class FakeCatalog : public ExportCatalog {
 public:
  std::map<std::string, ExportFacts> exports;
  std::map<std::string, bool> busy;
  int opens = 0;

  std::vector<std::string> names() const override {
    std::vector<std::string> n;
    for (const auto& [k, v] : exports) n.push_back(k);
    return n;
  }
  CatalogAnswer probe(std::string_view name) override {
    CatalogAnswer a;
    const auto it = exports.find(std::string(name));
    if (it == exports.end()) {
      a.refusal = Refusal::kUnknown;
      a.message = "no export named '" + std::string(name) + "'";
    } else if (busy[it->first]) {
      a.refusal = Refusal::kPolicy;
      a.message = "export '" + it->first + "' already has a writer";
    } else {
      a.facts = it->second;
    }
    return a;
  }
  CatalogAnswer open(std::string_view name) override {
    auto a = probe(name);
    if (a.refusal == Refusal::kNone) ++opens;
    return a;
  }
};

FakeCatalog two_exports() {
  FakeCatalog c;
  c.exports["disk"] = {"disk", 1 << 20, 512, false, false, true};
  c.exports["iso"] = {"iso", 4096, 4096, true, false, false};
  return c;
}

// --- wire basics ----------------------------------------------------------------------------

TEST(NbdWire, BigEndianRoundTripsAndIsByteOrdered) {
  Be32 v;
  v.set(0x01020304);
  EXPECT_EQ(v.get(), 0x01020304u);
  EXPECT_EQ(bytes_of(v)[0], std::byte{0x01});
  EXPECT_EQ(bytes_of(v)[3], std::byte{0x04});
  Be64 w;
  w.set(0xfedcba9876543210ull);
  EXPECT_EQ(w.get(), 0xfedcba9876543210ull);
}

TEST(NbdWire, GreetingIsMagicMagicFlags) {
  const auto g = make_greeting();
  const auto b = bytes_of(g);
  const auto want = cat(cat(text("NBDMAGIC"), text("IHAVEOPT")), be({{kFlagFixedNewstyle | kFlagNoZeroes, 2}}));
  EXPECT_EQ(std::vector<std::byte>(b.begin(), b.end()), want);
}

TEST(NbdWire, SimpleAndStructuredRepliesEncodeFieldsInOrder) {
  const auto s = make_simple_reply(0x1122334455667788ull, kEnospc);
  const auto sb = bytes_of(s);
  EXPECT_EQ(std::vector<std::byte>(sb.begin(), sb.end()),
            be({{kSimpleReplyMagic, 4}, {28, 4}, {0x1122334455667788ull, 8}}));
  const auto r = make_read_chunk(7, 4096, 512);
  const auto rb = bytes_of(r);
  EXPECT_EQ(std::vector<std::byte>(rb.begin(), rb.end()),
            be({{kStructuredReplyMagic, 4}, {kReplyFlagDone, 2}, {kReplyOffsetData, 2}, {7, 8}, {520, 4}, {4096, 8}}));
  const auto e = make_error_chunk(9, kEinval, 5);
  const auto eb = bytes_of(e);
  EXPECT_EQ(std::vector<std::byte>(eb.begin(), eb.end()),
            be({{kStructuredReplyMagic, 4}, {kReplyFlagDone, 2}, {kReplyError, 2}, {9, 8}, {11, 4}, {kEinval, 4}, {5, 2}}));
}

// --- parsers --------------------------------------------------------------------------------

TEST(NbdParse, ClientFlagsAcceptKnownRejectUnknownAndShort) {
  std::uint32_t f = 0;
  EXPECT_EQ(parse_client_flags(be({{3, 4}}), &f), Parse::kOk);
  EXPECT_EQ(f, 3u);
  EXPECT_EQ(parse_client_flags(be({{4, 4}}), &f), Parse::kInvalid);
  EXPECT_EQ(parse_client_flags(be({{1, 2}}), &f), Parse::kTruncated);
}

TEST(NbdParse, OptionHeaderChecksMagicLengthAndSize) {
  OptionHeader h;
  EXPECT_EQ(parse_option_header(be({{kOptionMagic, 8}, {kOptGo, 4}, {12, 4}}), &h), Parse::kOk);
  EXPECT_EQ(h.option, kOptGo);
  EXPECT_EQ(h.length, 12u);
  EXPECT_EQ(parse_option_header(be({{kNbdMagic, 8}, {kOptGo, 4}, {12, 4}}), &h), Parse::kBadMagic);
  EXPECT_EQ(parse_option_header(be({{kOptionMagic, 8}, {kOptGo, 4}, {kMaxOptionLength + 1, 4}}), &h), Parse::kTooLarge);
  EXPECT_EQ(parse_option_header(be({{kOptionMagic, 8}, {kOptGo, 4}, {0xffffffff, 4}}), &h), Parse::kTooLarge);
  EXPECT_EQ(parse_option_header(be({{kOptionMagic, 8}, {kOptGo, 4}}), &h), Parse::kTruncated);
}

TEST(NbdParse, ExportQueryReadsNameAndInfoList) {
  const auto d = query("disk", {kInfoBlockSize, kInfoName});
  ExportQuery q;
  ASSERT_EQ(parse_export_query(d, &q), Parse::kOk);
  EXPECT_EQ(q.name, "disk");
  EXPECT_EQ(q.info_count(), 2u);
  EXPECT_TRUE(q.requests(kInfoBlockSize));
  EXPECT_TRUE(q.requests(kInfoName));
  EXPECT_FALSE(q.requests(kInfoDescription));
}

TEST(NbdParse, ExportQueryRejectsInconsistentLengths) {
  ExportQuery q;
  // Name length beyond the data.
  EXPECT_EQ(parse_export_query(cat(be({{100, 4}}), cat(text("disk"), be({{0, 2}}))), &q), Parse::kInvalid);
  // Name length near 2^32 (no wrap-around).
  EXPECT_EQ(parse_export_query(cat(be({{0xfffffffe, 4}}), be({{0, 2}})), &q), Parse::kInvalid);
  // Info count says 3, one given.
  EXPECT_EQ(parse_export_query(cat(cat(be({{4, 4}}), text("disk")), be({{3, 2}, {kInfoName, 2}})), &q), Parse::kInvalid);
  // Trailing byte.
  EXPECT_EQ(parse_export_query(cat(query("disk"), be({{0, 1}})), &q), Parse::kInvalid);
  // Too short to hold the fields.
  EXPECT_EQ(parse_export_query(be({{0, 4}, {0, 1}}), &q), Parse::kInvalid);
  // NUL inside the name.
  EXPECT_EQ(parse_export_query(query(std::string_view("di\0sk", 5)), &q), Parse::kInvalid);
  // Longer than the protocol's string limit.
  EXPECT_EQ(parse_export_query(query(std::string(kMaxStringLength + 1, 'a')), &q), Parse::kInvalid);
}

TEST(NbdParse, RequestFieldsAndBadMagic) {
  Request r;
  const auto b = be({{kRequestMagic, 4}, {kCmdFlagFua, 2}, {kCmdWrite, 2}, {0xabcdef, 8}, {1 << 20, 8}, {4096, 4}});
  ASSERT_EQ(parse_request(b, &r), Parse::kOk);
  EXPECT_EQ(r.flags, kCmdFlagFua);
  EXPECT_EQ(r.type, kCmdWrite);
  EXPECT_EQ(r.cookie, 0xabcdefu);
  EXPECT_EQ(r.offset, 1u << 20);
  EXPECT_EQ(r.length, 4096u);
  EXPECT_EQ(request_payload(r), 4096u);
  auto bad = b;
  bad[0] = std::byte{0};
  EXPECT_EQ(parse_request(bad, &r), Parse::kBadMagic);
  EXPECT_EQ(parse_request(std::span(b).first(27), &r), Parse::kTruncated);
}

// --- request checks -------------------------------------------------------------------------

ExportLimits rw_limits() {
  ExportFacts f{"disk", 1 << 20, 512, false, false, true};
  return {f.size, transmission_flags(f, false), kMaxPayload};
}

Request req(std::uint16_t type, std::uint64_t offset, std::uint32_t length, std::uint16_t flags = 0) {
  Request r;
  r.type = type;
  r.offset = offset;
  r.length = length;
  r.flags = flags;
  return r;
}

TEST(NbdCheck, InRangeRequestsPass) {
  const auto x = rw_limits();
  EXPECT_EQ(check_request(req(kCmdRead, 0, 4096), x).error, 0u);
  EXPECT_EQ(check_request(req(kCmdRead, (1 << 20) - 1, 1), x).error, 0u);
  EXPECT_EQ(check_request(req(kCmdWrite, 512, 4096, kCmdFlagFua), x).error, 0u);
  EXPECT_EQ(check_request(req(kCmdFlush, 0, 0), x).error, 0u);
  EXPECT_EQ(check_request(req(kCmdTrim, 0, 1 << 20), x).error, 0u);
  EXPECT_EQ(check_request(req(kCmdWriteZeroes, 0, 1 << 20, kCmdFlagNoHole | kCmdFlagFua), x).error, 0u);
  EXPECT_EQ(check_request(req(kCmdDisc, 0, 0), x).error, 0u);
}

TEST(NbdCheck, OutOfRangeReadIsEinvalWriteIsEnospc) {
  const auto x = rw_limits();
  EXPECT_EQ(check_request(req(kCmdRead, 1 << 20, 1), x).error, kEinval);
  EXPECT_EQ(check_request(req(kCmdWrite, (1 << 20) - 512, 1024), x).error, kEnospc);
  EXPECT_EQ(check_request(req(kCmdWriteZeroes, 1 << 20, 512), x).error, kEnospc);
  EXPECT_EQ(check_request(req(kCmdTrim, 1 << 20, 512), x).error, kEinval);
  // offset + length wraps around 2^64: still out of range.
  EXPECT_EQ(check_request(req(kCmdRead, ~0ull - 100, 4096), x).error, kEinval);
  EXPECT_EQ(check_request(req(kCmdWrite, ~0ull, 1), x).error, kEnospc);
}

TEST(NbdCheck, MalformedRequestsAreEinval) {
  const auto x = rw_limits();
  EXPECT_EQ(check_request(req(kCmdRead, 0, 0), x).error, kEinval);                   // zero length
  EXPECT_EQ(check_request(req(kCmdRead, 0, kMaxPayload + 1), x).error, kEinval);     // oversized
  EXPECT_EQ(check_request(req(kCmdWrite, 0, kMaxPayload + 1), x).error, kEinval);
  EXPECT_EQ(check_request(req(kCmdFlush, 4096, 0), x).error, kEinval);               // flush with a range
  EXPECT_EQ(check_request(req(kCmdCache, 0, 512), x).error, 0u);                     // a hint, offered
  EXPECT_EQ(check_request(req(kCmdCache, 0, 0), x).error, kEinval);
  EXPECT_EQ(check_request(req(kCmdCache, x.size, 512), x).error, kEinval);          // beyond the end
  ExportLimits no_cache = x;
  no_cache.transmission_flags &= static_cast<std::uint16_t>(~kFlagSendCache);
  EXPECT_EQ(check_request(req(kCmdCache, 0, 512), no_cache).error, kEinval);         // not offered
  EXPECT_EQ(check_request(req(kCmdBlockStatus, 0, 512), x).error, kEinval);
  EXPECT_EQ(check_request(req(99, 0, 512), x).error, kEinval);                       // unknown
  EXPECT_EQ(check_request(req(kCmdRead, 0, 512, kCmdFlagDf), x).error, kEinval);     // DF needs structured
  EXPECT_EQ(check_request(req(kCmdWriteZeroes, 0, 512, kCmdFlagFastZero), x).error, kEinval);
  EXPECT_EQ(check_request(req(kCmdWrite, 0, 512, kCmdFlagNoHole), x).error, kEinval);
  EXPECT_EQ(check_request(req(kCmdRead, 0, 512, 1u << 15), x).error, kEinval);
  EXPECT_NE(check_request(req(kCmdRead, 0, 0), x).message, nullptr);
}

TEST(NbdCheck, WritesToReadOnlyExportAreEperm) {
  ExportFacts f{"iso", 1 << 20, 512, true, false, false};
  const ExportLimits x{f.size, transmission_flags(f, true), kMaxPayload};
  EXPECT_EQ(check_request(req(kCmdWrite, 0, 512), x).error, kEperm);
  EXPECT_EQ(check_request(req(kCmdRead, 0, 512, kCmdFlagDf), x).error, 0u);
  // Neither trim nor write-zeroes is offered on a read-only export.
  EXPECT_EQ(check_request(req(kCmdTrim, 0, 512), x).error, kEinval);
  EXPECT_EQ(check_request(req(kCmdWriteZeroes, 0, 512), x).error, kEinval);
  EXPECT_EQ(check_request(req(kCmdFlush, 0, 0), x).error, 0u);
}

TEST(NbdCheck, TrimOnlyWhenTheBackingSupportsIt) {
  ExportFacts f{"disk", 1 << 20, 512, false, false, false};
  const ExportLimits x{f.size, transmission_flags(f, false), kMaxPayload};
  EXPECT_EQ(check_request(req(kCmdTrim, 0, 512), x).error, kEinval);
  EXPECT_EQ(check_request(req(kCmdWriteZeroes, 0, 512), x).error, 0u);
}

TEST(NbdWire, NamesForLogs) {
  EXPECT_STREQ(option_name(kOptGo), "NBD_OPT_GO");
  EXPECT_STREQ(option_name(12345), "unknown");
  EXPECT_STREQ(command_name(kCmdWriteZeroes), "NBD_CMD_WRITE_ZEROES");
  EXPECT_STREQ(command_name(99), "unknown");
}

TEST(NbdCheck, ErrnoMapsToProtocolErrors) {
  EXPECT_EQ(wire_error_from_errno(-EROFS), kEperm);
  EXPECT_EQ(wire_error_from_errno(-EIO), kEio);
  EXPECT_EQ(wire_error_from_errno(-ENOSPC), kEnospc);
  EXPECT_EQ(wire_error_from_errno(-EFBIG), kEnospc);
  EXPECT_EQ(wire_error_from_errno(-EINVAL), kEinval);
  EXPECT_EQ(wire_error_from_errno(-EOPNOTSUPP), kEnotsup);
  EXPECT_EQ(wire_error_from_errno(-EBADF), kEio);
  EXPECT_EQ(wire_error_from_errno(ENOMEM), kEnomem);
}

// --- transmission flags ---------------------------------------------------------------------

TEST(NbdFlags, FollowTheExportKind) {
  const ExportFacts rw{"disk", 1, 512, false, false, true};
  const auto f = transmission_flags(rw, false);
  EXPECT_TRUE(f & kFlagHasFlags);
  EXPECT_TRUE(f & kFlagSendFlush);
  EXPECT_TRUE(f & kFlagSendFua);
  EXPECT_TRUE(f & kFlagSendTrim);
  EXPECT_TRUE(f & kFlagSendWriteZeroes);
  EXPECT_TRUE(f & kFlagSendCache);
  EXPECT_FALSE(f & kFlagReadOnly);
  EXPECT_FALSE(f & kFlagSendDf);
  EXPECT_FALSE(f & kFlagCanMultiConn);  // exclusive: one connection
  EXPECT_TRUE(transmission_flags(rw, true) & kFlagSendDf);
  const ExportFacts shared{"disk", 1, 512, false, true, false};
  EXPECT_TRUE(transmission_flags(shared, false) & kFlagCanMultiConn);
  EXPECT_FALSE(transmission_flags(shared, false) & kFlagSendTrim);
  const ExportFacts ro{"iso", 1, 512, true, false, false};
  const auto g = transmission_flags(ro, false);
  EXPECT_TRUE(g & kFlagReadOnly);
  EXPECT_TRUE(g & kFlagCanMultiConn);
  EXPECT_FALSE(g & kFlagSendWriteZeroes);
}

// --- handshake ------------------------------------------------------------------------------

class NbdHandshake : public ::testing::Test {
 protected:
  FakeCatalog catalog = two_exports();
  Handshake hs{catalog};
  std::vector<std::byte> out;

  Handshake::Next option(std::uint32_t opt, const std::vector<std::byte>& data = {}) {
    out.clear();
    return hs.on_option(opt, data, out);
  }
  void SetUp() override { ASSERT_EQ(hs.on_client_flags(be({{kClientFlagFixedNewstyle | kClientFlagNoZeroes, 4}})), Handshake::Next::kOption); }
};

TEST_F(NbdHandshake, UnknownClientFlagsClose) {
  Handshake fresh{catalog};
  EXPECT_EQ(fresh.on_client_flags(be({{0x80, 4}})), Handshake::Next::kClose);
  EXPECT_NE(fresh.reason().find("client flags"), std::string::npos);
}

TEST_F(NbdHandshake, ListNamesEveryExportThenAck) {
  ASSERT_EQ(option(kOptList), Handshake::Next::kOption);
  const auto r = replies(out);
  ASSERT_EQ(r.size(), 3u);
  EXPECT_EQ(r[0].type, kRepServer);
  EXPECT_EQ(r[0].data, cat(be({{4, 4}}), text("disk")));
  EXPECT_EQ(r[1].data, cat(be({{3, 4}}), text("iso")));
  EXPECT_EQ(r[2].type, kRepAck);
  EXPECT_EQ(r[2].option, kOptList);
}

TEST_F(NbdHandshake, ListWithDataIsInvalid) {
  ASSERT_EQ(option(kOptList, text("x")), Handshake::Next::kOption);
  const auto r = replies(out);
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0].type, kRepErrInvalid);
  EXPECT_EQ(hs.last_error(), kRepErrInvalid);
}

TEST_F(NbdHandshake, InfoDescribesWithoutOpening) {
  ASSERT_EQ(option(kOptInfo, query("disk", {kInfoBlockSize, kInfoName})), Handshake::Next::kOption);
  EXPECT_EQ(catalog.opens, 0);
  const auto r = replies(out);
  ASSERT_EQ(r.size(), 4u);
  EXPECT_EQ(r[0].type, kRepInfo);
  const auto info = load<InfoExportWire>(r[0].data);
  EXPECT_EQ(info.type.get(), kInfoExport);
  EXPECT_EQ(info.size.get(), 1u << 20);
  EXPECT_EQ(info.transmission_flags.get(), transmission_flags(catalog.exports["disk"], false));
  EXPECT_EQ(r[1].data, cat(be({{kInfoName, 2}}), text("disk")));
  EXPECT_EQ(r[2].data, be({{kInfoBlockSize, 2}, {1, 4}, {4096, 4}, {kMaxPayload, 4}}));
  EXPECT_EQ(r[3].type, kRepAck);
  EXPECT_EQ(hs.last_error(), 0u);
}

TEST_F(NbdHandshake, GoEntersTransmissionWithTheExport) {
  ASSERT_EQ(option(kOptGo, query("iso")), Handshake::Next::kTransmission);
  EXPECT_EQ(catalog.opens, 1);
  const auto r = replies(out);
  ASSERT_EQ(r.size(), 2u);
  const auto info = load<InfoExportWire>(r[0].data);
  EXPECT_TRUE(info.transmission_flags.get() & kFlagReadOnly);
  EXPECT_EQ(r[1].type, kRepAck);
  EXPECT_EQ(hs.transmission().facts.name, "iso");
  EXPECT_FALSE(hs.transmission().structured);
  EXPECT_EQ(hs.transmission().flags, info.transmission_flags.get());
}

TEST_F(NbdHandshake, StructuredReplyIsAckedAndCarriedIntoTransmission) {
  ASSERT_EQ(option(kOptStructuredReply), Handshake::Next::kOption);
  ASSERT_EQ(replies(out).at(0).type, kRepAck);
  ASSERT_EQ(option(kOptGo, query("disk")), Handshake::Next::kTransmission);
  EXPECT_TRUE(hs.transmission().structured);
  EXPECT_TRUE(hs.transmission().flags & kFlagSendDf);
}

TEST_F(NbdHandshake, StructuredReplyWithDataIsInvalid) {
  ASSERT_EQ(option(kOptStructuredReply, text("x")), Handshake::Next::kOption);
  EXPECT_EQ(replies(out).at(0).type, kRepErrInvalid);
  ASSERT_EQ(option(kOptGo, query("disk")), Handshake::Next::kTransmission);
  EXPECT_FALSE(hs.transmission().structured);
}

TEST_F(NbdHandshake, UnknownExportIsErrUnknownWithAMessage) {
  ASSERT_EQ(option(kOptGo, query("nope")), Handshake::Next::kOption);
  const auto r = replies(out);
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0].type, kRepErrUnknown);
  EXPECT_NE(r[0].data_text().find("nope"), std::string::npos);
  EXPECT_EQ(catalog.opens, 0);
}

TEST_F(NbdHandshake, BusyExportIsErrPolicyAndTheClientMayRetry) {
  catalog.busy["disk"] = true;
  ASSERT_EQ(option(kOptInfo, query("disk")), Handshake::Next::kOption);
  EXPECT_EQ(replies(out).at(0).type, kRepErrPolicy);
  ASSERT_EQ(option(kOptGo, query("disk")), Handshake::Next::kOption);
  const auto r = replies(out);
  EXPECT_EQ(r.at(0).type, kRepErrPolicy);
  EXPECT_NE(r.at(0).data_text().find("writer"), std::string::npos);
  ASSERT_EQ(option(kOptGo, query("iso")), Handshake::Next::kTransmission);
}

TEST_F(NbdHandshake, MalformedGoIsErrInvalid) {
  ASSERT_EQ(option(kOptGo, be({{9, 4}})), Handshake::Next::kOption);
  EXPECT_EQ(replies(out).at(0).type, kRepErrInvalid);
}

TEST_F(NbdHandshake, EmptyNameIsTheOnlyExportOrRefused) {
  ASSERT_EQ(option(kOptGo, query("")), Handshake::Next::kOption);
  const auto r = replies(out);
  EXPECT_EQ(r.at(0).type, kRepErrUnknown);
  EXPECT_NE(r.at(0).data_text().find("disk, iso"), std::string::npos);

  FakeCatalog one;
  one.exports["only"] = {"only", 8192, 512, false, false, false};
  Handshake h1{one};
  std::vector<std::byte> o;
  ASSERT_EQ(h1.on_client_flags(be({{1, 4}})), Handshake::Next::kOption);
  ASSERT_EQ(h1.on_option(kOptGo, query("", {kInfoName}), o), Handshake::Next::kTransmission);
  EXPECT_EQ(h1.transmission().facts.name, "only");
  EXPECT_EQ(replies(o).at(1).data, cat(be({{kInfoName, 2}}), text("only")));
}

TEST_F(NbdHandshake, ExportNameRepliesSizeAndFlags) {
  ASSERT_EQ(option(kOptExportName, text("disk")), Handshake::Next::kTransmission);
  // The client negotiated NO_ZEROES in SetUp: 10 bytes only.
  EXPECT_EQ(out, be({{1 << 20, 8}, {transmission_flags(catalog.exports["disk"], false), 2}}));

  Handshake old{catalog};
  ASSERT_EQ(old.on_client_flags(be({{kClientFlagFixedNewstyle, 4}})), Handshake::Next::kOption);
  std::vector<std::byte> o;
  ASSERT_EQ(old.on_option(kOptExportName, text("iso"), o), Handshake::Next::kTransmission);
  EXPECT_EQ(o.size(), sizeof(ExportNameReplyWire) + kExportNameZeroes);
}

// An old newstyle client (no fixed-newstyle flag) sends only NBD_OPT_EXPORT_NAME.
TEST_F(NbdHandshake, NonFixedNewstyleClientGetsExportNameWithZeroes) {
  Handshake old{catalog};
  ASSERT_EQ(old.on_client_flags(be({{0, 4}})), Handshake::Next::kOption);
  EXPECT_FALSE(old.no_zeroes());
  std::vector<std::byte> o;
  ASSERT_EQ(old.on_option(kOptExportName, text("disk"), o), Handshake::Next::kTransmission);
  ASSERT_EQ(o.size(), sizeof(ExportNameReplyWire) + kExportNameZeroes);
  EXPECT_EQ(load<ExportNameReplyWire>(o).size.get(), 1u << 20);
  EXPECT_EQ(std::vector<std::byte>(o.begin() + sizeof(ExportNameReplyWire), o.end()),
            std::vector<std::byte>(kExportNameZeroes));
}

TEST_F(NbdHandshake, ExportNameRefusedCloses) {
  EXPECT_EQ(option(kOptExportName, text("nope")), Handshake::Next::kClose);
  EXPECT_TRUE(out.empty());
  EXPECT_NE(hs.reason().find("nope"), std::string::npos);
  catalog.busy["disk"] = true;
  Handshake h2{catalog};
  std::vector<std::byte> o;
  ASSERT_EQ(h2.on_client_flags(be({{1, 4}})), Handshake::Next::kOption);
  EXPECT_EQ(h2.on_option(kOptExportName, text("disk"), o), Handshake::Next::kClose);
}

TEST_F(NbdHandshake, AbortIsAckedThenCloses) {
  EXPECT_EQ(option(kOptAbort), Handshake::Next::kClose);
  const auto r = replies(out);
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0].type, kRepAck);
}

TEST_F(NbdHandshake, UnsupportedOptionsAreRefusedAndHaggleGoesOn) {
  ASSERT_EQ(option(kOptStartTls), Handshake::Next::kOption);
  EXPECT_EQ(replies(out).at(0).type, kRepErrPolicy);
  ASSERT_EQ(option(kOptExtendedHeaders), Handshake::Next::kOption);
  EXPECT_EQ(replies(out).at(0).type, kRepErrUnsup);
  ASSERT_EQ(option(0xdead), Handshake::Next::kOption);
  const auto r = replies(out);
  EXPECT_EQ(r.at(0).option, 0xdeadu);
  EXPECT_EQ(r.at(0).type, kRepErrUnsup);
  EXPECT_EQ(option(kOptGo, query("disk")), Handshake::Next::kTransmission);
}

// The data of NBD_OPT_LIST/SET_META_CONTEXT.
std::vector<std::byte> meta(std::string_view name, std::vector<std::string_view> queries) {
  auto out = cat(be({{name.size(), 4}}), text(name));
  out = cat(out, be({{queries.size(), 4}}));
  for (auto q : queries) out = cat(cat(out, be({{q.size(), 4}})), text(q));
  return out;
}

TEST_F(NbdHandshake, MetaContextsOfferBaseAllocationAndSelectItForGo) {
  // SET before structured replies is invalid; LIST is not.
  ASSERT_EQ(option(kOptSetMetaContext, meta("disk", {"base:allocation"})), Handshake::Next::kOption);
  EXPECT_EQ(replies(out).at(0).type, kRepErrInvalid);
  ASSERT_EQ(option(kOptListMetaContext, meta("disk", {})), Handshake::Next::kOption);
  auto r = replies(out);
  ASSERT_EQ(r.size(), 2u);
  EXPECT_EQ(r[0].type, kRepMetaContext);
  EXPECT_EQ(r[0].data, cat(be({{kBaseAllocationId, 4}}), text("base:allocation")));
  EXPECT_EQ(r[1].type, kRepAck);
  ASSERT_EQ(option(kOptListMetaContext, meta("disk", {"base:"})), Handshake::Next::kOption);
  EXPECT_EQ(replies(out).size(), 2u);
  ASSERT_EQ(option(kOptListMetaContext, meta("disk", {"qemu:dirty-bitmap:x"})), Handshake::Next::kOption);
  ASSERT_EQ(replies(out).size(), 1u);  // nothing matches: only the ack
  ASSERT_EQ(option(kOptListMetaContext, meta("nope", {})), Handshake::Next::kOption);
  EXPECT_EQ(replies(out).at(0).type, kRepErrUnknown);
  auto bad = meta("disk", {"base:allocation"});
  bad.pop_back();
  ASSERT_EQ(option(kOptListMetaContext, bad), Handshake::Next::kOption);
  EXPECT_EQ(replies(out).at(0).type, kRepErrInvalid);
  ASSERT_EQ(option(kOptStructuredReply), Handshake::Next::kOption);
  ASSERT_EQ(option(kOptSetMetaContext, meta("disk", {"base:allocation", "other:thing"})), Handshake::Next::kOption);
  r = replies(out);
  ASSERT_EQ(r.size(), 2u);
  EXPECT_EQ(r[0].type, kRepMetaContext);
  ASSERT_EQ(option(kOptGo, query("disk")), Handshake::Next::kTransmission);
  EXPECT_TRUE(hs.transmission().block_status);
}

TEST_F(NbdHandshake, MetaContextForAnotherExportOrNoneLeavesBlockStatusOff) {
  ASSERT_EQ(option(kOptStructuredReply), Handshake::Next::kOption);
  ASSERT_EQ(option(kOptSetMetaContext, meta("iso", {"base:allocation"})), Handshake::Next::kOption);
  ASSERT_EQ(option(kOptGo, query("disk")), Handshake::Next::kTransmission);
  EXPECT_FALSE(hs.transmission().block_status);
  Handshake h2{catalog};
  std::vector<std::byte> o;
  ASSERT_EQ(h2.on_client_flags(be({{kClientFlagFixedNewstyle, 4}})), Handshake::Next::kOption);
  ASSERT_EQ(h2.on_option(kOptStructuredReply, {}, o), Handshake::Next::kOption);
  ASSERT_EQ(h2.on_option(kOptSetMetaContext, meta("disk", {"base:allocation"}), o), Handshake::Next::kOption);
  ASSERT_EQ(h2.on_option(kOptSetMetaContext, meta("disk", {}), o), Handshake::Next::kOption);  // selects none
  ASSERT_EQ(h2.on_option(kOptGo, query("disk"), o), Handshake::Next::kTransmission);
  EXPECT_FALSE(h2.transmission().block_status);
}

TEST(NbdRequestCheck, BlockStatusNeedsASelectedContext) {
  Request r;
  r.type = kCmdBlockStatus;
  r.length = 4096;
  ExportLimits x;
  x.size = 1 << 20;
  EXPECT_EQ(check_request(r, x).error, kEinval);
  x.block_status = true;
  EXPECT_EQ(check_request(r, x).error, 0u);
  r.flags = kCmdFlagReqOne;
  EXPECT_EQ(check_request(r, x).error, 0u);
  r.offset = (1 << 20) - 100;
  EXPECT_EQ(check_request(r, x).error, kEinval);
  r.offset = 0;
  r.length = 0;
  EXPECT_EQ(check_request(r, x).error, kEinval);
}

TEST_F(NbdHandshake, EndlessOptionsClose) {
  Handshake::Next n = Handshake::Next::kOption;
  for (unsigned i = 0; i <= Handshake::kMaxOptions && n == Handshake::Next::kOption; ++i) n = option(kOptList);
  EXPECT_EQ(n, Handshake::Next::kClose);
}

// TLS required (serve --nbd-tls): before TLS, every option but STARTTLS and ABORT is refused
// with NBD_REP_ERR_TLS_REQD and EXPORT_NAME closes; STARTTLS is acknowledged once, without
// data; inside TLS the haggle goes on from a clean slate.
class NbdHandshakeTls : public NbdHandshake {
 protected:
  Handshake tls{catalog, TlsMode::kRequired};
  Handshake::Next tls_option(std::uint32_t opt, const std::vector<std::byte>& data = {}) {
    out.clear();
    return tls.on_option(opt, data, out);
  }
  void SetUp() override {
    NbdHandshake::SetUp();
    ASSERT_EQ(tls.on_client_flags(be({{kClientFlagFixedNewstyle | kClientFlagNoZeroes, 4}})), Handshake::Next::kOption);
  }
};

TEST_F(NbdHandshakeTls, EveryOptionBeforeTlsIsRefusedWithTlsRequired) {
  for (const std::uint32_t opt : std::vector<std::uint32_t>{kOptList, kOptStructuredReply, kOptInfo, kOptGo, kOptListMetaContext, 0xdead}) {
    const auto data = (opt == kOptInfo || opt == kOptGo) ? query("disk") : std::vector<std::byte>{};
    ASSERT_EQ(tls_option(opt, data), Handshake::Next::kOption) << opt;
    const auto r = replies(out);
    ASSERT_EQ(r.size(), 1u) << opt;
    EXPECT_EQ(r[0].type, kRepErrTlsReqd) << opt;
    EXPECT_NE(std::string(reinterpret_cast<const char*>(r[0].data.data()), r[0].data.size()).find("requires TLS"),
              std::string::npos);
  }
  EXPECT_FALSE(tls.tls());
  Handshake other{catalog, TlsMode::kRequired};
  std::vector<std::byte> o;
  ASSERT_EQ(other.on_client_flags(be({{kClientFlagFixedNewstyle, 4}})), Handshake::Next::kOption);
  EXPECT_EQ(other.on_option(kOptExportName, text("disk"), o), Handshake::Next::kClose);
  EXPECT_TRUE(o.empty());
  EXPECT_NE(other.reason().find("requires TLS"), std::string::npos);
}

TEST_F(NbdHandshakeTls, StartTlsIsAckedOnceThenOptionsGoOnFromACleanSlate) {
  ASSERT_EQ(tls_option(kOptStartTls, text("x")), Handshake::Next::kOption);
  EXPECT_EQ(replies(out).at(0).type, kRepErrInvalid);  // STARTTLS takes no data
  ASSERT_EQ(tls_option(kOptStartTls), Handshake::Next::kStartTls);
  auto r = replies(out);
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0].type, kRepAck);
  tls.tls_established();
  EXPECT_TRUE(tls.tls());
  ASSERT_EQ(tls_option(kOptStartTls), Handshake::Next::kOption);
  EXPECT_EQ(replies(out).at(0).type, kRepErrInvalid);  // once only
  ASSERT_EQ(tls_option(kOptList), Handshake::Next::kOption);
  EXPECT_EQ(replies(out).back().type, kRepAck);
  ASSERT_EQ(tls_option(kOptStructuredReply), Handshake::Next::kOption);
  ASSERT_EQ(tls_option(kOptGo, query("disk")), Handshake::Next::kTransmission);
  EXPECT_TRUE(tls.transmission().structured);
}

// tls_established() forgets what was negotiated in the clear (the protocol requires it: a
// man in the middle could have chosen it). With TLS required nothing is negotiated before it,
// so this shows it on a handshake driven by hand.
TEST_F(NbdHandshakeTls, WhatWasNegotiatedBeforeTlsIsForgotten) {
  ASSERT_EQ(option(kOptStructuredReply), Handshake::Next::kOption);
  hs.tls_established();
  ASSERT_EQ(option(kOptGo, query("disk")), Handshake::Next::kTransmission);
  EXPECT_FALSE(hs.transmission().structured);
}

TEST_F(NbdHandshakeTls, AbortBeforeTlsIsAcked) {
  EXPECT_EQ(tls_option(kOptAbort), Handshake::Next::kClose);
  EXPECT_EQ(replies(out).at(0).type, kRepAck);
}

// psktool key files: IDENTITY:HEXKEY lines.
TEST(NbdPskKeys, ParsesPsktoolLinesAndRefusesBadOnesNamingTheLine) {
  const std::string k32(64, 'a');
  const auto keys = parse_psk_keys("alice:" + k32 + "\n\nbob:" + std::string(32, '0') + "\r\n", "f");
  ASSERT_EQ(keys.size(), 2u);
  EXPECT_EQ(keys[0].identity, "alice");
  EXPECT_EQ(keys[0].key, std::string(32, '\xaa'));
  EXPECT_EQ(keys[1].identity, "bob");
  EXPECT_EQ(keys[1].key, std::string(16, '\0'));
  const auto refused = [](const std::string& text) {
    try {
      parse_psk_keys(text, "keys.psk");
    } catch (const SystemError& e) {
      return std::string(e.what());
    }
    return std::string("accepted");
  };
  EXPECT_NE(refused("alice" + k32).find("line 1"), std::string::npos);                      // no colon
  EXPECT_NE(refused("alice:" + k32 + "\n:" + k32).find("line 2"), std::string::npos);        // no identity
  EXPECT_NE(refused("alice:" + std::string(63, 'a') + "g").find("not hexadecimal"), std::string::npos);
  EXPECT_NE(refused("alice:abc").find("not hexadecimal"), std::string::npos);               // odd length
  EXPECT_NE(refused("alice:" + std::string(30, 'a')).find("at least 16"), std::string::npos);
  EXPECT_NE(refused("a:" + k32 + "\na:" + k32).find("appears twice"), std::string::npos);
  EXPECT_NE(refused("\n\n").find("holds no key"), std::string::npos);
}

}  // namespace
}  // namespace ibdisk::nbd
