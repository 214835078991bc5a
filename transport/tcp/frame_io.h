#pragma once
// Internal to transport/tcp: the frames of docs/protocol.md on a byte stream, shared by both
// roles: a pure decoder (what the stream fuzzer drives), buffered input and gathered output.
#include <array>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <span>
#include <string>
#include <vector>

#include "proto/ibdisk.pb.h"
#include "proto/wire.h"
#include "transport/connection.h"
#include "transport/tcp/asio.h"
#include "transport/tcp/peer_cred.h"

namespace ibdisk::transport::tcp_detail {

// Largest control frame before the queue is admitted: Hello and Auth are far smaller, and a
// stranger must not make the target buffer a megabyte per connection.
inline constexpr std::uint32_t kMaxHandshakeControl = 4096;

// What the next frame in a buffer is. The payload of a write (target) or of a read's
// completion (initiator) is not part of it: it follows in the stream, `payload` bytes long.
struct Decoded {
  enum class Kind { kNeedMore, kControl, kCommand, kCompletion, kBad };
  Kind kind = Kind::kNeedMore;
  std::size_t need = 0;       // kNeedMore: bytes the buffer must hold to decode the frame
  std::size_t consumed = 0;   // bytes of the buffer this frame's header and capsule or body take
  std::span<const std::byte> control;  // kControl: the serialized message, inside the buffer
  wire::Command command;               // kCommand
  wire::Completion completion;         // kCompletion
  std::uint32_t payload = 0;           // kCommand, kCompletion: data bytes that follow
  std::string error;                   // kBad: what is wrong, for the peer and the log
};

enum class Role { kTarget, kInitiator };  // which frames the reader accepts

// Decodes the frame at the start of `in`. Never reads past `in`; checks every length.
Decoded decode_frame(std::span<const std::byte> in, Role role, std::uint32_t max_control);

// Buffered input. One recv takes every frame the socket holds (headers, capsules, completions,
// small payloads), so a batch of N frames costs one system call and one handler turn, not three
// of each per frame; a payload of at least kDirectRead bytes still to come is read straight
// into its destination. When a recv returns less than it asked for, Asio waits for the next
// readiness event instead of trying again (no recv that only says EAGAIN).
class Reader {
 public:
  static constexpr std::size_t kDirectRead = 64 * 1024;

  Reader(boost::asio::ip::tcp::socket& s, std::size_t size) : sock_(s), buf_(size) {}

  std::span<const std::byte> buffered() const { return {buf_.data() + pos_, end_ - pos_}; }
  std::size_t available() const { return end_ - pos_; }
  void consume(std::size_t n) { pos_ += n; }
  // Moves up to n buffered bytes to dst (or drops them, dst == nullptr); returns how many.
  std::size_t take(std::byte* dst, std::size_t n);
  // Whether `left` more bytes of a payload should be read straight into its destination.
  bool direct(std::size_t left) const { return available() == 0 && left >= kDirectRead; }
  // The buffer may hold this many bytes at once (grows when the queue is admitted).
  void reserve(std::size_t size);

  // One read into the buffer, with room for at least `want` contiguous bytes after what is
  // buffered. done(ec) runs once the bytes are in.
  template <class Done>
  void fill(std::size_t want, Done done) {
    make_room(want);
    sock_.async_read_some(boost::asio::buffer(buf_.data() + end_, buf_.size() - end_),
                          [this, done = std::move(done)](const boost::system::error_code& ec, std::size_t n) mutable {
                            end_ += n;
                            done(ec);
                          });
  }
  // Reads exactly len bytes straight into dst (a large payload).
  template <class Done>
  void fill_direct(std::byte* dst, std::size_t len, Done done) {
    boost::asio::async_read(sock_, boost::asio::buffer(dst, len), transfer_whole,
                            [done = std::move(done)](const boost::system::error_code& ec, std::size_t) mutable {
                              done(ec);
                            });
  }

 private:
  static std::size_t transfer_whole(const boost::system::error_code& ec, std::size_t);
  void make_room(std::size_t want);

  boost::asio::ip::tcp::socket& sock_;
  std::vector<std::byte> buf_;
  std::size_t pos_ = 0, end_ = 0;  // buffered, not yet parsed: buf_[pos_, end_)
};

// One queued output frame: header and capsule (or control bytes), then optional data.
struct OutFrame {
  std::array<std::byte, wire::kFrameHeaderSize + wire::kCommandSize> head{};
  std::size_t head_len = 0;
  std::string control;  // serialized protobuf, for control frames
  const std::byte* data = nullptr;
  std::size_t data_len = 0;
  DataOp* op = nullptr;  // a reply's command, told once its last byte is in the socket
};

OutFrame control_frame(const proto::Control& msg);

// Output queue shared by both roles. Frames queued during one handler turn go out together in
// one gathered sendmsg; the socket is written until it is full (EAGAIN) before waiting for room,
// and each frame is reported sent as soon as its last byte is in the socket, so a read's slot
// frees while later replies are still going out.
class Writer {
 public:
  struct Events {
    virtual void frame_sent(OutFrame& f) = 0;                          // f's last byte is in the socket
    virtual void send_failed(const boost::system::error_code& ec) = 0;  // once; nothing more is sent
    virtual void drained() = 0;                                        // every queued frame is sent
  };
  explicit Writer(boost::asio::ip::tcp::socket& s) : sock_(s) {}

  void push(OutFrame&& f);
  bool idle() const { return queue_.empty(); }
  std::size_t frames() const { return queue_.size(); }
  std::size_t copied_bytes() const { return copied_; }  // bytes held in control frames
  // Whether a send is scheduled (posted or waiting for room): push() then needs no new one.
  bool scheduled() const { return scheduled_; }
  void set_scheduled(bool s) { scheduled_ = s; }

  // Sends until the queue is empty (returns false) or the socket is full (returns true: wait
  // for room, then call again). Events may push more frames; they go out in the same loop.
  bool send(Events& ev);
  // After an error: the frames that never went out.
  std::deque<OutFrame> take_unsent();

 private:
  static constexpr std::size_t kMaxBuffers = 64;  // Asio gathers at most 64 buffers per call
  void add(boost::asio::const_buffer b, std::size_t* skip);

  boost::asio::ip::tcp::socket& sock_;
  std::deque<OutFrame> queue_;
  std::size_t sent_ = 0;    // bytes of queue_.front() already sent
  std::size_t copied_ = 0;  // control bytes queued
  std::vector<boost::asio::const_buffer> bufs_;
  bool scheduled_ = false;
  bool failed_ = false;
};

// "10.0.0.2:51234", "[fe80::1]:7420".
std::string endpoint_text(const boost::asio::ip::tcp::endpoint& ep);
// No Nagle, and non-blocking for the Writer. Buffer sizes stay with the kernel: setting
// SO_SNDBUF/SO_RCVBUF turns off autotuning, which measured slower on loopback.
// peer_timeout > 0: the kernel ends the connection (ETIMEDOUT) when sent data stays
// unacknowledged that long (TCP_USER_TIMEOUT), or when an idle peer does not answer
// keepalive probes (SO_KEEPALIVE; first probe after a third of it, then every third).
void tune(boost::asio::ip::tcp::socket& s, std::chrono::milliseconds peer_timeout);

std::unique_ptr<ClientConnection> make_client_connection(boost::asio::io_context& io, boost::asio::ip::tcp::socket s,
                                                         std::chrono::milliseconds timeout,
                                                         std::chrono::milliseconds peer_timeout);
std::shared_ptr<ServerConnection> make_server_connection(boost::asio::ip::tcp::socket s,
                                                         std::chrono::milliseconds peer_timeout);
// How a failed read or send ends the connection: ETIMEDOUT (the kernel's user timeout or
// keepalive) is kTimeout, any other error kNetwork.
CloseCode close_code_of(const boost::system::error_code& ec);

}  // namespace ibdisk::transport::tcp_detail
