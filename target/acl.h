#pragma once
// An allow-list of client networks (CIDR). Empty means everyone.
#include <string>
#include <vector>

#include "transport/tcp/asio.h"

namespace ibdisk::target {

class NetworkAllowList {
 public:
  NetworkAllowList() = default;
  // Each entry "ADDR/PREFIX" or a bare address; IPv4 or IPv6. Throws std::invalid_argument
  // naming the bad entry.
  explicit NetworkAllowList(const std::vector<std::string>& cidrs);
  bool empty() const { return nets_.empty(); }
  // IPv4-mapped IPv6 peers are matched as IPv4; a v4-mapped network of prefix 96 or more is
  // the IPv4 network of prefix - 96.
  bool allows(const boost::asio::ip::address& peer) const;
  std::string describe() const;

 private:
  struct Net {
    boost::asio::ip::address base;
    unsigned prefix;
  };
  std::vector<Net> nets_;
};

}  // namespace ibdisk::target
