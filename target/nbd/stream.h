#pragma once
// The NBD front end's per-connection byte stream (nbd_server.cc).
#include <optional>
#include <utility>

#include "transport/tcp/asio.h"
#include <boost/asio/ssl.hpp>

namespace ibdisk::nbd {

// A connection's byte stream: the socket, or TLS over it once NBD_OPT_STARTTLS succeeded. An
// Asio AsyncReadStream and AsyncWriteStream, so asio::async_read/async_write take either.
class Stream {
 public:
  using executor_type = boost::asio::ip::tcp::socket::executor_type;
  explicit Stream(boost::asio::ip::tcp::socket s) : socket_(std::move(s)) {}
  executor_type get_executor() { return socket_.get_executor(); }
  boost::asio::ip::tcp::socket& socket() { return socket_; }
  boost::asio::ssl::stream<boost::asio::ip::tcp::socket&>& start_tls(boost::asio::ssl::context& ctx) { return tls_.emplace(socket_, ctx); }
  bool tls() const { return tls_.has_value(); }

  template <typename Buffers, typename Handler>
  void async_read_some(const Buffers& b, Handler&& h) {
    if (tls_) {
      tls_->async_read_some(b, std::forward<Handler>(h));
    } else {
      socket_.async_read_some(b, std::forward<Handler>(h));
    }
  }
  template <typename Buffers, typename Handler>
  void async_write_some(const Buffers& b, Handler&& h) {
    if (tls_) {
      tls_->async_write_some(b, std::forward<Handler>(h));
    } else {
      socket_.async_write_some(b, std::forward<Handler>(h));
    }
  }

 private:
  boost::asio::ip::tcp::socket socket_;
  std::optional<boost::asio::ssl::stream<boost::asio::ip::tcp::socket&>> tls_;
};

}  // namespace ibdisk::nbd
