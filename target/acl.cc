#include "target/acl.h"

#include <stdexcept>

namespace ibdisk::target {
namespace ip = boost::asio::ip;

namespace {
ip::address unmap(const ip::address& a) {
  if (a.is_v6() && a.to_v6().is_v4_mapped()) return ip::make_address_v4(ip::v4_mapped, a.to_v6());
  return a;
}

// The address as bytes in the family of a network: 4 for an IPv4 network (a v4-mapped peer
// unmapped), 16 for an IPv6 one (an IPv4 peer as ::ffff:a.b.c.d). Empty when an IPv6 peer
// cannot be in an IPv4 network.
std::vector<unsigned char> bytes_as(const ip::address& a, bool v4) {
  if (v4) {
    const ip::address u = unmap(a);
    if (!u.is_v4()) return {};
    const auto b = u.to_v4().to_bytes();
    return {b.begin(), b.end()};
  }
  const auto b = a.is_v4() ? ip::make_address_v6(ip::v4_mapped, a.to_v4()).to_bytes() : a.to_v6().to_bytes();
  return {b.begin(), b.end()};
}

// Whether the first `prefix` bits agree; never reads past either address.
bool prefix_match(const std::vector<unsigned char>& a, const std::vector<unsigned char>& b, unsigned prefix) {
  if (a.empty() || a.size() != b.size() || prefix > a.size() * 8) return false;
  for (unsigned bit = 0; bit < prefix; ++bit) {
    const unsigned mask = 0x80u >> (bit % 8);
    if ((a[bit / 8] & mask) != (b[bit / 8] & mask)) return false;
  }
  return true;
}
}  // namespace

NetworkAllowList::NetworkAllowList(const std::vector<std::string>& cidrs) {
  for (const auto& c : cidrs) {
    const auto slash = c.find('/');
    boost::system::error_code ec;
    const auto base = ip::make_address(c.substr(0, slash), ec);
    if (ec) throw std::invalid_argument("allowed network '" + c + "': not an IP address (expected e.g. 10.30.0.0/24)");
    const unsigned max = base.is_v4() ? 32 : 128;
    unsigned prefix = max;
    if (slash != std::string::npos) {
      const std::string p = c.substr(slash + 1);
      if (p.empty() || p.size() > 3 || p.find_first_not_of("0123456789") != std::string::npos || std::stoul(p) > max) {
        throw std::invalid_argument("allowed network '" + c + "': prefix must be 0 to " + std::to_string(max));
      }
      prefix = static_cast<unsigned>(std::stoul(p));
    }
    // ::ffff:a.b.c.d/N (N >= 96) is the IPv4 network a.b.c.d/(N - 96); a shorter prefix stays an
    // IPv6 network, which IPv4 peers match in their mapped form.
    if (base.is_v6() && base.to_v6().is_v4_mapped() && prefix >= 96) {
      nets_.push_back({unmap(base), prefix - 96});
    } else {
      nets_.push_back({base, prefix});
    }
  }
}

bool NetworkAllowList::allows(const ip::address& peer) const {
  if (nets_.empty()) return true;
  for (const auto& n : nets_) {
    const bool v4 = n.base.is_v4();
    if (prefix_match(bytes_as(peer, v4), bytes_as(n.base, v4), n.prefix)) return true;
  }
  return false;
}

std::string NetworkAllowList::describe() const {
  std::string s;
  for (const auto& n : nets_) s += (s.empty() ? "" : ", ") + n.base.to_string() + "/" + std::to_string(n.prefix);
  return s.empty() ? "any" : s;
}

}  // namespace ibdisk::target
