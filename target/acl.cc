#include "target/acl.h"

#include <stdexcept>

namespace ibdisk::target {
namespace ip = boost::asio::ip;

namespace {
ip::address unmap(const ip::address& a) {
  if (a.is_v6() && a.to_v6().is_v4_mapped()) return ip::make_address_v4(ip::v4_mapped, a.to_v6());
  return a;
}

// One to_bytes() result per address: begin() and end() of two temporaries are two arrays.
std::vector<unsigned char> address_bytes(const ip::address& a) {
  if (a.is_v4()) {
    const auto b = a.to_v4().to_bytes();
    return {b.begin(), b.end()};
  }
  const auto b = a.to_v6().to_bytes();
  return {b.begin(), b.end()};
}

bool prefix_match(const ip::address& a, const ip::address& b, unsigned prefix) {
  if (a.is_v4() != b.is_v4()) return false;
  const auto bytes_a = address_bytes(a);
  const auto bytes_b = address_bytes(b);
  for (unsigned bit = 0; bit < prefix; ++bit) {
    const unsigned mask = 0x80u >> (bit % 8);
    if ((bytes_a[bit / 8] & mask) != (bytes_b[bit / 8] & mask)) return false;
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
    nets_.push_back({unmap(base), prefix});
  }
}

bool NetworkAllowList::allows(const ip::address& peer) const {
  if (nets_.empty()) return true;
  const auto p = unmap(peer);
  for (const auto& n : nets_) {
    if (prefix_match(p, n.base, n.prefix)) return true;
  }
  return false;
}

std::string NetworkAllowList::describe() const {
  std::string s;
  for (const auto& n : nets_) s += (s.empty() ? "" : ", ") + n.base.to_string() + "/" + std::to_string(n.prefix);
  return s.empty() ? "any" : s;
}

}  // namespace ibdisk::target
