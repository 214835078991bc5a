#pragma once
// The TCP implementation of the Connection interface: the frames of docs/protocol.md over
// one stream socket per queue; write data follows its command, read data its completion.
#include <chrono>
#include <memory>
#include <string>

#include "transport/buffer_pool.h"
#include "transport/connection.h"
#include "transport/tcp/asio.h"

namespace ibdisk::transport {

// Target side: wraps an accepted socket. Slots come from the worker's pool.
std::shared_ptr<ServerConnection> make_tcp_server_connection(boost::asio::ip::tcp::socket socket,
                                                             BufferPool& pool);

// Initiator side: connects to host:port within timeout. Throws SystemError naming the peer.
std::unique_ptr<ClientConnection> tcp_connect(boost::asio::io_context& io, const std::string& host,
                                              std::uint16_t port, std::chrono::milliseconds timeout);

// Runs io until done() or timeout; returns done(). For the blocking setup phase.
bool run_until(boost::asio::io_context& io, const std::function<bool()>& done, std::chrono::milliseconds timeout);

}  // namespace ibdisk::transport
