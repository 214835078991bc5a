#include "transport/tcp/frame_io.h"

#include <linux/inet_diag.h>
#include <linux/netlink.h>
#include <linux/sock_diag.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <limits>

namespace ibdisk::transport::tcp_detail {

namespace asio = boost::asio;
using asio::ip::tcp;
using boost::system::error_code;

Decoded decode_frame(std::span<const std::byte> in, Role role, std::uint32_t max_control) {
  Decoded d;
  if (in.size() < wire::kFrameHeaderSize) {
    d.need = wire::kFrameHeaderSize;
    return d;
  }
  wire::FrameHeader h;
  if (const auto e = wire::decode(in.first(wire::kFrameHeaderSize), &h); e != wire::DecodeError::kNone) {
    d.kind = Decoded::Kind::kBad;
    d.error = std::string("frame header: ") + wire::describe(e);
    return d;
  }
  const auto bad = [&d](std::string what) {
    d.kind = Decoded::Kind::kBad;
    d.error = std::move(what);
    return d;
  };
  switch (h.type) {
    case wire::FrameType::kControl: {
      if (h.length > max_control) {
        return bad("control frame of " + std::to_string(h.length) + " bytes, above the limit of " +
                   std::to_string(max_control) + " here");
      }
      d.need = wire::kFrameHeaderSize + h.length;
      if (in.size() < d.need) return d;
      d.kind = Decoded::Kind::kControl;
      d.control = in.subspan(wire::kFrameHeaderSize, h.length);
      d.consumed = d.need;
      return d;
    }
    case wire::FrameType::kCommand: {
      if (role != Role::kTarget) return bad("an initiator does not accept commands");
      if (h.length < wire::kCommandSize) return bad("command frame shorter than a capsule");
      d.need = wire::kFrameHeaderSize + wire::kCommandSize;
      if (in.size() < d.need) return d;
      if (const auto e = wire::decode(in.subspan(wire::kFrameHeaderSize, wire::kCommandSize), &d.command);
          e != wire::DecodeError::kNone) {
        return bad(std::string("command: ") + wire::describe(e));
      }
      d.payload = h.length - static_cast<std::uint32_t>(wire::kCommandSize);
      if (d.payload != (d.command.opcode == wire::Opcode::kWrite ? d.command.length : 0u)) {
        return bad("frame length does not match the command");
      }
      d.kind = Decoded::Kind::kCommand;
      d.consumed = d.need;
      return d;
    }
    case wire::FrameType::kCompletion: {
      if (role != Role::kInitiator) return bad("a target does not accept completions");
      if (h.length < wire::kCompletionSize) return bad("completion frame shorter than a capsule");
      d.need = wire::kFrameHeaderSize + wire::kCompletionSize;
      if (in.size() < d.need) return d;
      if (const auto e = wire::decode(in.subspan(wire::kFrameHeaderSize, wire::kCompletionSize), &d.completion);
          e != wire::DecodeError::kNone) {
        return bad(std::string("completion: ") + wire::describe(e));
      }
      d.payload = h.length - static_cast<std::uint32_t>(wire::kCompletionSize);
      if (d.payload != d.completion.length) return bad("completion length does not match its frame");
      d.kind = Decoded::Kind::kCompletion;
      d.consumed = d.need;
      return d;
    }
  }
  return bad("unknown frame type");
}

std::size_t Reader::take(std::byte* dst, std::size_t n) {
  n = std::min(n, available());
  if (dst) std::memcpy(dst, buf_.data() + pos_, n);
  pos_ += n;
  return n;
}

void Reader::reserve(std::size_t size) {
  if (buf_.size() >= size) return;
  std::vector<std::byte> bigger(size);
  std::memcpy(bigger.data(), buf_.data() + pos_, end_ - pos_);
  end_ -= pos_;
  pos_ = 0;
  buf_.swap(bigger);
}

void Reader::make_room(std::size_t want) {
  if (pos_ == end_) pos_ = end_ = 0;
  if (buf_.size() - pos_ >= want) return;
  std::memmove(buf_.data(), buf_.data() + pos_, end_ - pos_);
  end_ -= pos_;
  pos_ = 0;
  if (buf_.size() < want) buf_.resize(want);  // a control message longer than the buffer (bounded by the caller)
}

// Completion condition for async_read without Asio's default cap of 64 KiB per system call: a
// 1 MiB payload moves in as few recvmsg calls as the socket allows.
std::size_t Reader::transfer_whole(const error_code& ec, std::size_t) {
  return ec ? 0 : std::numeric_limits<std::size_t>::max();
}

OutFrame control_frame(const proto::Control& msg) {
  OutFrame f;
  f.control = msg.SerializeAsString();
  wire::encode(wire::FrameHeader{wire::FrameType::kControl, static_cast<std::uint32_t>(f.control.size())},
               f.head.data());
  f.head_len = wire::kFrameHeaderSize;
  return f;
}

void Writer::push(OutFrame&& f) {
  copied_ += f.control.size();
  queue_.push_back(std::move(f));
}

bool Writer::send(Events& ev) {
  if (failed_) return false;
  while (!queue_.empty()) {
    bufs_.clear();
    std::size_t skip = sent_;
    for (auto& f : queue_) {
      if (bufs_.size() + 3 > kMaxBuffers) break;
      add(asio::buffer(f.head.data(), f.head_len), &skip);
      add(asio::buffer(f.control), &skip);
      add(asio::buffer(f.data, f.data_len), &skip);
    }
    error_code ec;
    std::size_t n = sock_.write_some(bufs_, ec);
    if (ec == asio::error::would_block || ec == asio::error::try_again) return true;
    if (ec == asio::error::interrupted) continue;
    if (ec) {
      failed_ = true;
      ev.send_failed(ec);
      return false;
    }
    // Retire the frames this write finished.
    n += sent_;
    sent_ = 0;
    while (!queue_.empty()) {
      OutFrame& f = queue_.front();
      const std::size_t len = f.head_len + f.control.size() + f.data_len;
      if (n < len) {
        sent_ = n;
        break;
      }
      n -= len;
      OutFrame done = std::move(f);
      queue_.pop_front();
      copied_ -= done.control.size();
      ev.frame_sent(done);
      if (failed_) return false;
    }
  }
  ev.drained();
  return false;
}

std::deque<OutFrame> Writer::take_unsent() {
  failed_ = true;
  sent_ = 0;
  copied_ = 0;
  return std::exchange(queue_, {});
}

void Writer::add(asio::const_buffer b, std::size_t* skip) {
  if (b.size() <= *skip) {
    *skip -= b.size();
    return;
  }
  bufs_.push_back(b + *skip);
  *skip = 0;
}

std::string endpoint_text(const tcp::endpoint& ep) {
  const auto a = ep.address();
  return (a.is_v6() ? "[" + a.to_string() + "]" : a.to_string()) + ":" + std::to_string(ep.port());
}

void tune(tcp::socket& s, std::chrono::milliseconds peer_timeout) {
  error_code ec;
  s.set_option(tcp::no_delay(true), ec);
  s.non_blocking(true, ec);
  if (peer_timeout.count() <= 0) return;
  const int fd = s.native_handle();
  const auto ms = static_cast<unsigned>(std::min<std::int64_t>(peer_timeout.count(), 24LL * 3600 * 1000));
  const int probe_s = std::max(1, static_cast<int>(ms / 3000));
  const int on = 1, count = 3;
  // Best effort: a socket that refuses them still works, it only notices a dead peer later.
  ::setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &ms, sizeof ms);
  ::setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &on, sizeof on);
  ::setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &probe_s, sizeof probe_s);
  ::setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &probe_s, sizeof probe_s);
  ::setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &count, sizeof count);
}

CloseCode close_code_of(const error_code& ec) {
  return ec == asio::error::timed_out ? CloseCode::kTimeout : CloseCode::kNetwork;
}

}  // namespace ibdisk::transport::tcp_detail

namespace ibdisk::transport {

namespace asio = boost::asio;
using asio::ip::tcp;

namespace {

// One exact-match sock_diag query: the socket whose source is `src` and destination `dst`.
std::optional<uid_t> diag_uid(int family, const asio::ip::address& src, std::uint16_t sport,
                              const asio::ip::address& dst, std::uint16_t dport) {
  const int fd = ::socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_SOCK_DIAG);
  if (fd < 0) return std::nullopt;
  struct {
    nlmsghdr nlh;
    inet_diag_req_v2 req;
  } msg{};
  msg.nlh.nlmsg_len = sizeof msg;
  msg.nlh.nlmsg_type = SOCK_DIAG_BY_FAMILY;
  msg.nlh.nlmsg_flags = NLM_F_REQUEST;
  msg.req.sdiag_family = static_cast<std::uint8_t>(family);
  msg.req.sdiag_protocol = IPPROTO_TCP;
  msg.req.idiag_states = ~0u;
  msg.req.id.idiag_sport = htons(sport);
  msg.req.id.idiag_dport = htons(dport);
  msg.req.id.idiag_cookie[0] = INET_DIAG_NOCOOKIE;
  msg.req.id.idiag_cookie[1] = INET_DIAG_NOCOOKIE;
  const auto put = [family](const asio::ip::address& a, __be32* out) {
    if (family == AF_INET) {
      const auto b = a.to_v4().to_bytes();
      std::memcpy(out, b.data(), b.size());
    } else {
      const auto b = a.to_v6().to_bytes();
      std::memcpy(out, b.data(), b.size());
    }
  };
  put(src, msg.req.id.idiag_src);
  put(dst, msg.req.id.idiag_dst);
  std::optional<uid_t> uid;
  const timeval tv{1, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  if (::send(fd, &msg, sizeof msg, 0) == static_cast<ssize_t>(sizeof msg)) {
    alignas(nlmsghdr) char buf[8192];
    const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n > 0) {
      auto* h = reinterpret_cast<nlmsghdr*>(buf);
      for (auto len = static_cast<unsigned>(n); NLMSG_OK(h, len); h = NLMSG_NEXT(h, len)) {
        if (h->nlmsg_type != SOCK_DIAG_BY_FAMILY) break;
        const auto* m = static_cast<const inet_diag_msg*>(NLMSG_DATA(h));
        uid = m->idiag_uid;
        break;
      }
    }
  }
  ::close(fd);
  return uid;
}

// The same from /proc/net/tcp{,6}, for kernels whose sock_diag module (tcp_diag) is not
// loaded: "sl local rem st tx:rx tr:when retrnsmt uid ...", addresses as the kernel's words in
// hex.
std::optional<uid_t> proc_uid(const asio::ip::address& src, std::uint16_t sport, const asio::ip::address& dst,
                              std::uint16_t dport) {
  const auto hex = [](const asio::ip::address& a, std::uint16_t port) {
    char out[64];
    std::string h;
    if (a.is_v4()) {
      const auto b = a.to_v4().to_bytes();
      std::uint32_t w;
      std::memcpy(&w, b.data(), 4);
      std::snprintf(out, sizeof out, "%08X", w);
      h = out;
    } else {
      const auto b = a.to_v6().to_bytes();
      for (int i = 0; i < 4; ++i) {
        std::uint32_t w;
        std::memcpy(&w, b.data() + 4 * i, 4);
        std::snprintf(out, sizeof out, "%08X", w);
        h += out;
      }
    }
    std::snprintf(out, sizeof out, ":%04X", port);
    return h + out;
  };
  const std::string local = hex(src, sport), remote = hex(dst, dport);
  FILE* f = std::fopen(src.is_v4() ? "/proc/net/tcp" : "/proc/net/tcp6", "re");
  if (!f) return std::nullopt;
  std::optional<uid_t> uid;
  char line[512];
  while (std::fgets(line, sizeof line, f)) {
    char l[80], r[80];
    unsigned st = 0;
    unsigned long u = 0;
    if (std::sscanf(line, " %*u: %79s %79s %x %*s %*s %*s %lu", l, r, &st, &u) != 4) continue;
    if (local == l && remote == r) {
      uid = static_cast<uid_t>(u);
      break;
    }
  }
  std::fclose(f);
  return uid;
}

asio::ip::address unmapped(const asio::ip::address& a) {
  if (a.is_v6() && a.to_v6().is_v4_mapped()) return asio::ip::make_address_v4(asio::ip::v4_mapped, a.to_v6());
  return a;
}

}  // namespace

std::optional<uid_t> loopback_peer_uid(const tcp::endpoint& local, const tcp::endpoint& remote) {
  const auto r = unmapped(remote.address());
  const auto l = unmapped(local.address());
  if (!r.is_loopback() || r.is_v4() != l.is_v4()) return std::nullopt;
  // The peer's socket has the remote endpoint as its source and ours as its destination.
  if (auto uid = diag_uid(r.is_v4() ? AF_INET : AF_INET6, r, remote.port(), l, local.port())) return uid;
  return proc_uid(r, remote.port(), l, local.port());
}

std::optional<uid_t> loopback_peer_uid_from_proc(const tcp::endpoint& local, const tcp::endpoint& remote) {
  const auto r = unmapped(remote.address());
  const auto l = unmapped(local.address());
  if (!r.is_loopback() || r.is_v4() != l.is_v4()) return std::nullopt;
  return proc_uid(r, remote.port(), l, local.port());
}

}  // namespace ibdisk::transport
