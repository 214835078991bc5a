#pragma once
// Who is behind a TCP connection over loopback: the uid owning the peer's socket, asked of the
// kernel by NETLINK_SOCK_DIAG (what `ss -e` shows). Both ends are on this host, so the kernel
// knows; nothing when the peer is not on loopback or the kernel does not say.
#include <sys/types.h>

#include <optional>

#include "transport/tcp/asio.h"

namespace ibdisk::transport {

std::optional<uid_t> loopback_peer_uid(const boost::asio::ip::tcp::endpoint& local,
                                       const boost::asio::ip::tcp::endpoint& remote);
// The same from /proc/net/tcp{,6} only (what loopback_peer_uid falls back to when the kernel's
// tcp_diag module is not loaded); for tests.
std::optional<uid_t> loopback_peer_uid_from_proc(const boost::asio::ip::tcp::endpoint& local,
                                                 const boost::asio::ip::tcp::endpoint& remote);

}  // namespace ibdisk::transport
