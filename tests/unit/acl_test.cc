// The allow-list (target/acl.cc): CIDR matching of IPv4, IPv6 and IPv4-mapped IPv6 networks
// and peers. Issue 14, finding 10: a v4-mapped network (::ffff:a.b.c.d/N, what `--allow` takes
// on a dual-stack host) matched with its IPv6 prefix length against a 4-byte address: /104
// refused its own members, and /128 (a bare mapped address) read past the 4 bytes.
#include <gtest/gtest.h>

#include "target/acl.h"

namespace ibdisk {
namespace {

namespace ip = boost::asio::ip;
using target::NetworkAllowList;

bool allows(const NetworkAllowList& l, const char* peer) { return l.allows(ip::make_address(peer)); }

// A v4-mapped network with a prefix of 96 or more is the IPv4 network of prefix - 96.
TEST(AllowList, V4MappedNetworkMatchesItsIpv4Members) {
  const NetworkAllowList l({"::ffff:127.0.0.0/104"});
  EXPECT_TRUE(allows(l, "127.0.0.1"));
  EXPECT_TRUE(allows(l, "127.255.0.9"));
  EXPECT_TRUE(allows(l, "::ffff:127.0.0.1"));
  EXPECT_FALSE(allows(l, "128.0.0.1"));
  EXPECT_FALSE(allows(l, "::ffff:10.0.0.1"));
  EXPECT_FALSE(allows(l, "::1"));
  EXPECT_EQ(l.describe(), "127.0.0.0/8");
}

// A bare v4-mapped address is that one IPv4 address (and the match never reads past it).
TEST(AllowList, BareV4MappedAddressIsOneHost) {
  const NetworkAllowList l({"::ffff:127.0.0.1"});
  EXPECT_TRUE(allows(l, "127.0.0.1"));
  EXPECT_TRUE(allows(l, "::ffff:127.0.0.1"));
  EXPECT_FALSE(allows(l, "127.0.0.2"));
  EXPECT_FALSE(allows(l, "::ffff:127.0.0.2"));
  EXPECT_EQ(l.describe(), "127.0.0.1/32");
}

// Every v4-mapped prefix from 96 to 128 behaves as its IPv4 prefix.
TEST(AllowList, EveryV4MappedPrefixLength) {
  for (unsigned p = 96; p <= 128; ++p) {
    SCOPED_TRACE("::ffff:10.1.2.3/" + std::to_string(p));
    const NetworkAllowList l({"::ffff:10.1.2.3/" + std::to_string(p)});
    EXPECT_TRUE(allows(l, "10.1.2.3"));
    // Flipping the first host bit stays inside; flipping the last network bit goes outside.
    const unsigned q = p - 96;
    if (q < 32) {
      const ip::address_v4 inside(0x0a010203u ^ (0x80000000u >> q));
      EXPECT_TRUE(l.allows(inside)) << inside.to_string();
    }
    if (q > 0) {
      const ip::address_v4 outside(0x0a010203u ^ (0x80000000u >> (q - 1)));
      EXPECT_FALSE(l.allows(outside)) << outside.to_string();
    }
  }
}

// Plain IPv4 and IPv6 networks keep working, and mapped peers match IPv4 networks.
TEST(AllowList, PlainNetworks) {
  const NetworkAllowList l({"10.30.0.0/24", "fd00::/8", "192.168.7.7"});
  EXPECT_TRUE(allows(l, "10.30.0.9"));
  EXPECT_TRUE(allows(l, "::ffff:10.30.0.9"));
  EXPECT_FALSE(allows(l, "10.30.1.9"));
  EXPECT_TRUE(allows(l, "fd12::1"));
  EXPECT_FALSE(allows(l, "fe80::1"));
  EXPECT_TRUE(allows(l, "192.168.7.7"));
  EXPECT_FALSE(allows(l, "192.168.7.8"));
  EXPECT_TRUE(NetworkAllowList().allows(ip::make_address("203.0.113.1")));
  EXPECT_THROW(NetworkAllowList({"::ffff:127.0.0.1/129"}), std::invalid_argument);
}

// An IPv6 network whose prefix is shorter than the v4-mapped range's 96 bits covers IPv4
// peers by their mapped form: ::/0 is everyone, ::ffff:0:0/96 every IPv4 peer.
TEST(AllowList, ShortIpv6PrefixesCoverMappedPeers) {
  const NetworkAllowList all({"::/0"});
  EXPECT_TRUE(allows(all, "127.0.0.1"));
  EXPECT_TRUE(allows(all, "2001:db8::1"));
  const NetworkAllowList v4({"::ffff:0:0/96"});
  EXPECT_TRUE(allows(v4, "10.9.8.7"));
  EXPECT_FALSE(allows(v4, "2001:db8::1"));
  const NetworkAllowList short_mapped({"::ffff:127.0.0.1/80"});
  EXPECT_TRUE(allows(short_mapped, "127.0.0.1"));
  EXPECT_TRUE(allows(short_mapped, "::1"));  // ::/80 holds ::1 too: an IPv6 network, as written
}

}  // namespace
}  // namespace ibdisk
