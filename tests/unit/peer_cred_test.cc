// The local user behind a TCP connection over loopback, as the keyless target checks it: by
// sock_diag, and by /proc/net/tcp where the kernel's tcp_diag module is not loaded (the guest).
#include <gtest/gtest.h>
#include <unistd.h>

#include "transport/tcp/peer_cred.h"

namespace ibdisk {
namespace {

namespace asio = boost::asio;
using asio::ip::tcp;

struct Pair {
  asio::io_context io;
  tcp::acceptor acceptor{io};
  tcp::socket client{io}, server{io};
  explicit Pair(const char* address) {
    const tcp::endpoint ep(asio::ip::make_address(address), 0);
    acceptor.open(ep.protocol());
    acceptor.bind(ep);
    acceptor.listen();
    client.connect(acceptor.local_endpoint());
    server = acceptor.accept();
  }
};

TEST(PeerCred, LoopbackPeerIsThisUserV4) {
  Pair p("127.0.0.1");
  const auto local = p.server.local_endpoint(), remote = p.server.remote_endpoint();
  EXPECT_EQ(transport::loopback_peer_uid(local, remote), ::geteuid());
  EXPECT_EQ(transport::loopback_peer_uid_from_proc(local, remote), ::geteuid());
}

TEST(PeerCred, LoopbackPeerIsThisUserV6) {
  Pair p("::1");
  const auto local = p.server.local_endpoint(), remote = p.server.remote_endpoint();
  EXPECT_EQ(transport::loopback_peer_uid(local, remote), ::geteuid());
  EXPECT_EQ(transport::loopback_peer_uid_from_proc(local, remote), ::geteuid());
}

TEST(PeerCred, NoAnswerForAnUnknownConnection) {
  Pair p("127.0.0.1");
  const tcp::endpoint nowhere(asio::ip::make_address("127.0.0.1"), 1);
  EXPECT_FALSE(transport::loopback_peer_uid_from_proc(p.server.local_endpoint(), nowhere).has_value());
  EXPECT_FALSE(transport::loopback_peer_uid(tcp::endpoint(asio::ip::make_address("10.1.2.3"), 5), nowhere).has_value());
}

}  // namespace
}  // namespace ibdisk
