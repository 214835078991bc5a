#pragma once
// A raw initiator that writes ibdisk frames by hand (docs/protocol.md), for tests that act as a
// hostile or broken client would: frames cut anywhere, wrong fields, never reading. Blocking
// socket with a receive timeout, so a test that waits for an answer that never comes fails
// instead of hanging. Header-only: it uses gtest's EXPECT_* and is built into test binaries.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <sys/socket.h>

#include <cerrno>
#include <chrono>
#include <string>

#include "common/auth.h"
#include "proto/ibdisk.pb.h"
#include "proto/wire.h"
#include "transport/tcp/asio.h"

namespace ibdisk::testing {

// What a raw Hello asks for; the defaults are what the older tests sent.
struct RawHello {
  std::uint32_t queue_depth = 4;
  std::uint32_t max_io_size = 0;  // 0: not set (the target's default)
  std::uint64_t join_session = 0;
  std::string client_name;
  std::string key;  // the key itself (load_key_file), empty: Auth without a mac
  std::uint32_t version = wire::kProtocolVersion;  // offered as both min and max
};

class RawPeer {
 public:
  explicit RawPeer(std::uint16_t port, int recv_timeout_s = 10) : sock_(io_) {
    sock_.connect({boost::asio::ip::make_address("127.0.0.1"), port});
    set_recv_timeout(std::chrono::milliseconds(recv_timeout_s * 1000));
  }
  int fd() { return sock_.native_handle(); }
  void set_recv_timeout(std::chrono::milliseconds t) {
    const timeval tv{static_cast<time_t>(t.count() / 1000), static_cast<suseconds_t>(t.count() % 1000 * 1000)};
    ::setsockopt(fd(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  }
  void send_bytes(const void* p, std::size_t n) { boost::asio::write(sock_, boost::asio::buffer(p, n)); }
  // Blocking read of exactly n bytes with the receive timeout; false on EOF, error or timeout.
  bool recv_exact(void* p, std::size_t n) {
    auto* b = static_cast<char*>(p);
    while (n > 0) {
      const ssize_t got = ::recv(fd(), b, n, 0);
      if (got < 0 && errno == EINTR) continue;  // with a receive timeout, a signal is not restarted
      if (got <= 0) return false;
      b += got;
      n -= static_cast<std::size_t>(got);
    }
    return true;
  }
  void send_frame(wire::FrameType type, const std::string& payload) {
    std::byte h[wire::kFrameHeaderSize];
    wire::encode(wire::FrameHeader{type, static_cast<std::uint32_t>(payload.size())}, h);
    send_bytes(h, sizeof h);
    send_bytes(payload.data(), payload.size());
  }
  void send_control(const proto::Control& c) { send_frame(wire::FrameType::kControl, c.SerializeAsString()); }
  // A command frame (a write's payload, if any, is sent by the caller right after).
  void send_command(const wire::Command& c) {
    std::byte buf[wire::kFrameHeaderSize + wire::kCommandSize];
    const bool write = c.opcode == wire::Opcode::kWrite;
    wire::encode(wire::FrameHeader{wire::FrameType::kCommand,
                                   static_cast<std::uint32_t>(wire::kCommandSize + (write ? c.length : 0))},
                 buf);
    wire::encode(c, buf + wire::kFrameHeaderSize);
    send_bytes(buf, sizeof buf);
  }
  // Reads one control frame; returns false on EOF/error.
  bool read_control(proto::Control* out) {
    std::byte h[wire::kFrameHeaderSize];
    if (!recv_exact(h, sizeof h)) return false;
    wire::FrameHeader fh;
    if (wire::decode(h, &fh) != wire::DecodeError::kNone || fh.type != wire::FrameType::kControl) return false;
    std::string body(fh.length, '\0');
    return recv_exact(body.data(), body.size()) && out->ParseFromString(body);
  }
  bool read_completion(wire::Completion* out) {
    std::byte h[wire::kFrameHeaderSize + wire::kCompletionSize];
    if (!recv_exact(h, sizeof h)) return false;
    return wire::decode({h + wire::kFrameHeaderSize, wire::kCompletionSize}, out) == wire::DecodeError::kNone;
  }
  // Reads one frame of any type; its header into *h and its payload into *body.
  bool read_frame(wire::FrameHeader* h, std::string* body) {
    std::byte hb[wire::kFrameHeaderSize];
    if (!recv_exact(hb, sizeof hb) || wire::decode(hb, h) != wire::DecodeError::kNone) return false;
    body->assign(h->length, '\0');
    return recv_exact(body->data(), body->size());
  }
  bool closed_by_peer() {
    char c;
    ssize_t got;
    do got = ::recv(fd(), &c, 1, 0);
    while (got < 0 && errno == EINTR);
    return got == 0 || (got < 0 && errno == ECONNRESET);
  }
  // Reads and drops whatever comes until the peer closes (true) or the receive timeout passes
  // or another error happens (false).
  bool drain_until_closed() {
    char buf[65536];
    for (;;) {
      const ssize_t got = ::recv(fd(), buf, sizeof buf, 0);
      if (got < 0 && errno == EINTR) continue;
      if (got == 0 || (got < 0 && errno == ECONNRESET)) return true;
      if (got < 0) return false;
    }
  }
  // Hello, then Auth (with the key's mac when h.key is set). Returns the reply to Auth: the
  // Welcome, or the Error; or the Error that answered Hello.
  proto::Control handshake(const RawHello& h = {}) {
    const std::string client_nonce(32, 'n');
    proto::Control hello;
    hello.mutable_hello()->set_min_version(h.version);
    hello.mutable_hello()->set_max_version(h.version);
    hello.mutable_hello()->set_queue_depth(h.queue_depth);
    if (h.max_io_size) hello.mutable_hello()->set_max_io_size(h.max_io_size);
    hello.mutable_hello()->set_join_session(h.join_session);
    hello.mutable_hello()->set_client_name(h.client_name);
    hello.mutable_hello()->set_client_nonce(client_nonce);
    send_control(hello);
    proto::Control ch;
    EXPECT_TRUE(read_control(&ch));
    if (!ch.has_challenge()) return ch;
    proto::Control auth;
    auth.mutable_auth();
    if (!h.key.empty()) auth.mutable_auth()->set_mac(client_mac(h.key, ch.challenge().server_nonce(), client_nonce));
    send_control(auth);
    proto::Control w;
    EXPECT_TRUE(read_control(&w));
    return w;
  }
  // Open NAME; returns the reply (Opened or Error).
  proto::Control open(const std::string& name, bool read_only = false) {
    proto::Control open;
    open.mutable_open()->set_name(name);
    open.mutable_open()->set_read_only(read_only);
    send_control(open);
    proto::Control reply;
    EXPECT_TRUE(read_control(&reply));
    return reply;
  }

 private:
  boost::asio::io_context io_;
  boost::asio::ip::tcp::socket sock_;
};

}  // namespace ibdisk::testing
