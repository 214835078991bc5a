// The kernel's side of `ibdisk attach`: reading NBD requests from the kernel's sockets,
// submitting them to the session, writing the replies back (by reference for large ones),
// and renewing sockets the kernel marked dead.
#include <fcntl.h>
#include <linux/sockios.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "initiator/attachment.h"

namespace ibdisk::initiator::attach_internal {
// Our end of a new socketpair for s, the kernel's end in s.kernel_fd, and its splice pipe.
void Attachment::make_socket(KernelSocket& s) {
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) throw SystemError("socketpair", errno);
  s.fd = sv[0];
  s.kernel_fd = sv[1];  // the kernel takes its own reference; ours is for SIOCINQ
  ::fcntl(s.fd, F_SETFL, ::fcntl(s.fd, F_GETFL) | O_NONBLOCK);
  for (const int fd : sv) {
    // Above net.core.wmem_max needs CAP_NET_ADMIN; without it the default stays, which works.
    if (::setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &kSocketBuffer, sizeof kSocketBuffer) != 0) {
      ::setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &kSocketBuffer, sizeof kSocketBuffer);
    }
  }
  int p[2];
  if (::pipe2(p, O_CLOEXEC | O_NONBLOCK) != 0) throw SystemError("pipe2", errno);
  s.pipe_r = p[0];
  s.pipe_w = p[1];
  ::fcntl(s.pipe_w, F_SETPIPE_SZ, kPipeBytes);  // larger is fewer calls; the default also works
}

void Attachment::bind_all() {
  for (auto& s : socks_) bind(*s);
  ++sig_epoch_;
  sig_armed_ = false;
  if (sig_sd_) sig_sd_->release();
  sig_sd_ = std::make_unique<asio::posix::stream_descriptor>(current_io(), sigfd_);
  arm_signals();
}

// Takes every descriptor off the current io_context (before that context goes away).
void Attachment::release_all() {
  for (auto& s : socks_) {
    ++s->epoch;
    s->read_armed = s->write_armed = s->flush_posted = false;
    if (s->sd) s->sd->release();
    s->sd.reset();
  }
  ++sig_epoch_;
  sig_armed_ = false;
  if (sig_sd_) sig_sd_->release();
  sig_sd_.reset();
}

void Attachment::bind(KernelSocket& s) {
  ++s.epoch;
  s.read_armed = s.write_armed = s.flush_posted = false;
  if (s.sd) s.sd->release();
  s.sd.reset();
  if (s.eof) return;
  s.sd = std::make_unique<asio::posix::stream_descriptor>(current_io(), s.fd);
  arm_read(s);
  if (!s.out.empty()) arm_write(s);
}

// No poll() after queueing a wait: Asio starts an async_wait with EPOLL_CTL_MOD on its
// edge-triggered registration, and the kernel re-checks readiness on MOD, so bytes that arrived
// after our last read wake the wait at once (boost/asio/detail/impl/epoll_reactor.ipp,
// start_op; fs/eventpoll.c, ep_modify).

void Attachment::arm_read(KernelSocket& s) {
  if (s.read_armed || s.eof || !s.sd) return;
  s.read_armed = true;
  s.sd->async_wait(asio::posix::stream_descriptor::wait_read, [this, &s, epoch = s.epoch](const boost::system::error_code& ec) {
    if (epoch != s.epoch) return;
    s.read_armed = false;
    if (!ec) on_readable(s);
  });
}

void Attachment::arm_write(KernelSocket& s) {
  if (s.write_armed || s.eof || !s.sd) return;
  s.write_armed = true;
  s.sd->async_wait(asio::posix::stream_descriptor::wait_write, [this, &s, epoch = s.epoch](const boost::system::error_code& ec) {
    if (epoch != s.epoch) return;
    s.write_armed = false;
    if (!ec) flush_out(s);
  });
}

void Attachment::on_readable(KernelSocket& s) {
  bool drained = false;  // the last read returned less than it asked for
  for (;;) {
    // 1. Everything already buffered: headers, and the payloads of writes.
    while (!s.eof) {
      const std::size_t avail = s.in_end - s.in_pos;
      if (s.receiving) {
        Request& r = *s.receiving;
        const std::size_t take = std::min<std::size_t>(avail, r.req.length - s.payload_got);
        std::memcpy(r.data.get() + s.payload_got, s.in.get() + s.in_pos, take);
        s.in_pos += take;
        s.payload_got += take;
        if (s.payload_got < r.req.length) break;
        s.payload_got = 0;
        on_request(s, std::move(s.receiving));
        continue;
      }
      if (avail < sizeof(nbd::RequestWire)) break;
      auto r = std::make_unique<Request>();
      std::array<std::byte, sizeof(nbd::RequestWire)> hdr;
      std::memcpy(hdr.data(), s.in.get() + s.in_pos, hdr.size());
      s.in_pos += hdr.size();
      if (nbd::parse_request(hdr, &r->req) != nbd::Parse::kOk) {
        return close_socket(s, "a request with a bad magic number from the kernel");
      }
      if (r->req.type == nbd::kCmdDisc) {
        disc_seen_ = true;
        return close_socket(s, "NBD_CMD_DISC");
      }
      if (r->req.type == nbd::kCmdRead || r->req.type == nbd::kCmdWrite) {
        if (r->req.length > nbd::kMaxPayload) {
          return close_socket(s, "a " + std::to_string(r->req.length) + "-byte request, beyond the 32 MiB limit");
        }
        r->data = buffer(r->req.length);
      }
      if (r->req.type == nbd::kCmdWrite && r->req.length > 0) {
        s.receiving = std::move(r);
        continue;
      }
      on_request(s, std::move(r));
    }
    if (s.eof) return;
    // A short read emptied the socket: wait (arm_read) rather than read again for EAGAIN.
    if (drained) break;
    // 2. Read more: a large payload straight into its request, the rest into the buffer.
    if (s.in_pos == s.in_end) {
      s.in_pos = s.in_end = 0;
    } else if (s.in_pos > 0) {  // a partial header: to the front
      std::memmove(s.in.get(), s.in.get() + s.in_pos, s.in_end - s.in_pos);
      s.in_end -= s.in_pos;
      s.in_pos = 0;
    }
    std::byte* into = s.in.get() + s.in_end;
    std::size_t room = kInBuffer - s.in_end;
    const bool direct = s.receiving && s.in_end == 0 && s.receiving->req.length - s.payload_got >= kInBuffer;
    if (direct) {
      into = s.receiving->data.get() + s.payload_got;
      room = s.receiving->req.length - s.payload_got;
    }
    const ssize_t n = ::read(s.fd, into, room);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
    if (n <= 0) return close_socket(s, n == 0 ? "the kernel closed it" : errno_text(errno), n == 0 || errno == ECONNRESET);
    drained = static_cast<std::size_t>(n) < room;
    if (!direct) {
      s.in_end += static_cast<std::size_t>(n);
      continue;
    }
    s.payload_got += static_cast<std::size_t>(n);
    if (s.payload_got == s.receiving->req.length) {
      s.payload_got = 0;
      on_request(s, std::move(s.receiving));
    }
  }
  arm_read(s);
}

void Attachment::on_request(KernelSocket& s, std::unique_ptr<Request> r) {
  nbd::ExportLimits limits;
  limits.size = opened_.info().size();
  limits.transmission_flags = tflags_;
  const nbd::Verdict v = nbd::check_request(r->req, limits);
  if (v.error != 0) {
    log()->warn("{}: {} at offset {} length {} refused: {}", dev_->path(), nbd::command_name(r->req.type), r->req.offset,
                r->req.length, v.message ? v.message : "invalid");
    return reply(s, std::move(r), v.error, false);
  }
  if (failing_) return reply(s, std::move(r), nbd::kEio, false);
  Request* raw = r.get();
  s.active.emplace(raw, std::move(r));
  if (client_) submit(s, raw);
}

void Attachment::submit(KernelSocket& s, Request* r) {
  r->gen = gen_;
  r->submitted = true;
  r->lost = false;
  r->status = 0;
  const std::uint32_t handle = opened_.handle();
  const nbd::Request& q = r->req;
  const bool fua = (q.flags & nbd::kCmdFlagFua) != 0;
  auto done = [this, sp = &s, r, gen = gen_](int st) { part_done(*sp, r, gen, st); };
  // One extra part while issuing, so a synchronous completion cannot finish the request
  // before every part is out.
  r->parts_left = 1;
  switch (q.type) {
    case nbd::kCmdRead:
    case nbd::kCmdWrite: {
      const std::uint32_t max = client_->max_io();
      for (std::uint32_t off = 0; off < q.length; off += max) {
        const std::uint32_t len = std::min(max, q.length - off);
        ++r->parts_left;
        if (q.type == nbd::kCmdRead) client_->read(lane(s, len), handle, q.offset + off, len, r->data.get() + off, done);
        else client_->write(lane(s, len), handle, q.offset + off, len, r->data.get() + off, fua ? wire::kFlagFua : 0, done);
      }
      break;
    }
    case nbd::kCmdFlush:
      ++r->parts_left;
      client_->flush(home(s), handle, done);
      break;
    case nbd::kCmdTrim:
      ++r->parts_left;
      client_->trim(home(s), handle, q.offset, q.length, done);
      break;
    case nbd::kCmdWriteZeroes:
      ++r->parts_left;
      client_->write_zeroes(home(s), handle, q.offset, q.length, fua ? wire::kFlagFua : 0, done);
      break;
    default:
      ++r->parts_left;
      done(-EINVAL);
      break;
  }
  part_done(s, r, gen_, 0);
}

void Attachment::part_done(KernelSocket& s, Request* r, std::uint64_t gen, int status) {
  if (gen != gen_ || r->gen != gen) return;  // a session that is gone
  if (status == -ENOTCONN || status == -ECONNRESET || status == -EPIPE) {
    r->lost = true;
    wake_ = true;
  } else if (status < 0 && r->status == 0) {
    r->status = status;
  }
  if (--r->parts_left > 0) return;
  if (r->lost) {
    r->submitted = false;  // sent again once a session is back
    return;
  }
  finish(s, r, r->status);
}

void Attachment::finish(KernelSocket& s, Request* r, int status) {
  auto it = s.active.find(r);
  if (it == s.active.end()) return;
  std::unique_ptr<Request> owned = std::move(it->second);
  s.active.erase(it);
  if (status < 0) {
    log()->warn("{}: {} at offset {} length {} failed: {}", dev_->path(), nbd::command_name(owned->req.type),
                owned->req.offset, owned->req.length, errno_text(-status));
  }
  const bool read = owned->req.type == nbd::kCmdRead;
  reply(s, std::move(owned), status < 0 ? nbd::wire_error_from_errno(status) : 0, read && status == 0);
}

void Attachment::reply(KernelSocket& s, std::unique_ptr<Request> r, std::uint32_t error, bool with_payload) {
  if (s.eof) return;
  Reply rep;
  r->reply = nbd::make_simple_reply(r->req.cookie, error);
  rep.payload = with_payload ? r->req.length : 0;
  rep.req = std::move(r);
  s.out.push_back(std::move(rep));
  // Replies finished in one loop turn (a batch of completions) go out in one writev.
  if (s.write_armed || s.flush_posted) return;
  s.flush_posted = true;
  asio::post(current_io(), [this, &s, epoch = s.epoch] {
    if (epoch != s.epoch) return;  // rebound: bind() flushes what is queued
    s.flush_posted = false;
    if (!s.eof && !s.write_armed) flush_out(s);
  });
}

// Replies into the kernel's socket, in order. Small ones are copied, a turn's worth in one writev.
// A large payload goes by reference instead: vmsplice puts its pages into the pipe, splice moves
// them into the socket, and the kernel copies the bytes straight into its request when it reads
// them, so the reply stays untouched in s.unread until then. (A writev of 1 MiB copies it once
// more and clears the pages it copies into; for small replies that costs less than the extra
// calls and the kernel reader's wakeup per page.)
void Attachment::flush_out(KernelSocket& s) {
  while (!s.eof) {
    if (s.in_pipe > 0) {  // what is in the pipe goes before anything queued after it
      const ssize_t w = ::splice(s.pipe_r, nullptr, s.fd, nullptr, s.in_pipe, SPLICE_F_NONBLOCK | SPLICE_F_MOVE);
      if (w < 0 && errno == EINTR) continue;
      if (w < 0 && errno == EAGAIN) return arm_write(s);  // the socket is full
      if (w <= 0) {
        return close_socket(s, w == 0 ? std::string("splice wrote nothing") : "splice: " + errno_text(errno),
                            w < 0 && (errno == EPIPE || errno == ECONNRESET));
      }
      s.in_pipe -= static_cast<std::size_t>(w);
      s.written += static_cast<std::size_t>(w);
      continue;
    }
    if (s.out.empty()) break;
    const bool by_reference = s.out.front().payload >= kSpliceFrom;
    std::array<iovec, 64> iov{};
    std::size_t n = 0;
    for (auto it = s.out.begin(); it != s.out.end() && n + 2 <= iov.size(); ++it) {
      if ((it->payload >= kSpliceFrom) != by_reference) break;
      std::size_t skip = it->sent;
      auto add = [&](const void* p, std::size_t len) {
        if (skip >= len) {
          skip -= len;
          return;
        }
        iov[n++] = {const_cast<std::byte*>(static_cast<const std::byte*>(p)) + skip, len - skip};
        skip = 0;
      };
      add(&it->req->reply, sizeof it->req->reply);
      if (it->payload) add(it->req->data.get(), it->payload);
    }
    const ssize_t w = by_reference ? ::vmsplice(s.pipe_w, iov.data(), n, SPLICE_F_NONBLOCK)
                                   : ::writev(s.fd, iov.data(), static_cast<int>(n));
    if (w < 0 && errno == EINTR) continue;
    if (w < 0 && errno == EAGAIN && !by_reference) return arm_write(s);
    if (w <= 0) {
      return close_socket(s, std::string(by_reference ? "vmsplice: " : "writev: ") + errno_text(errno),
                          w < 0 && (errno == EPIPE || errno == ECONNRESET));
    }
    (by_reference ? s.in_pipe : s.written) += static_cast<std::size_t>(w);
    for (std::size_t left = static_cast<std::size_t>(w); left > 0;) {
      Reply& front = s.out.front();
      const std::size_t take = std::min(left, front.total() - front.sent);
      front.sent += take;
      left -= take;
      if (front.sent < front.total()) break;
      if (by_reference) {
        s.unread_bytes += front.total();
        s.unread.push_back({s.written + s.in_pipe - left, front.total(), std::move(front.req)});
      }
      s.out.pop_front();
    }
  }
  if (s.unread.size() > kUnreadEntries || s.unread_bytes > kUnreadBytes) reclaim(s);
}

// Frees the replies the kernel has read.
void Attachment::reclaim(KernelSocket& s) {
  if (s.unread.empty()) return;
  int queued = 0;
  if (::ioctl(s.kernel_fd, SIOCINQ, &queued) != 0 || queued < 0) return;
  const std::uint64_t read = s.written - static_cast<std::uint64_t>(queued);
  while (!s.unread.empty() && s.unread.front().end <= read) {
    s.unread_bytes -= s.unread.front().bytes;
    s.unread.pop_front();
  }
}

IoBuffer Attachment::buffer(std::size_t bytes) {
  if (pool_.exhausted(bytes)) {
    for (auto& s : socks_) reclaim(*s);
  }
  return pool_.get(bytes);
}

void Attachment::close_socket(KernelSocket& s, const std::string& why, bool kernel_gone) {
  if (s.eof) return;
  log()->debug("{} queue {}: {}", dev_ ? dev_->path() : std::string("device"), s.q, why);
  if (!stop_requested_ && !disconnect_sent_ && why != "NBD_CMD_DISC" && !kernel_gone) {
    log()->warn("{} queue {}: closing the kernel's socket: {}", dev_->path(), s.q, why);
  }
  s.eof = true;
  // Closed by the kernel, not in a disconnect: it marked this socket dead (a request timed
  // out) and requeued its requests; netlink lets us hand it a new one.
  s.renew = kernel_gone && !stop_requested_ && !disconnect_sent_ && !disc_seen_ && dev_ &&
            dev_->interface() == KernelInterface::kNetlink;
  ++s.epoch;
  if (s.sd) s.sd->release();
  s.sd.reset();
  s.out.clear();
  // s.unread stays: the kernel may still read what is queued on its end.
  // The server side closes after NBD_CMD_DISC: the kernel's receive thread (and NBD_DO_IT with
  // the ioctl interface) waits for that.
  ::shutdown(s.fd, SHUT_RDWR);
  wake_ = true;
}

// Replaces the sockets the kernel marked dead. Their requests are dropped: the kernel sends
// them again on a live socket. One that is still in flight to the target could land after its
// own retry, and after a later write that retry let through: so the session is ended too, and
// the new one (the target lets the old one's I/O finish first, an exclusive export stays busy
// until then) carries the retries.
void Attachment::renew_dead_sockets() {
  for (auto& sp : socks_) {
    KernelSocket& s = *sp;
    if (!s.renew || disc_seen_ || stop_requested_) continue;
    s.renew = false;
    std::size_t in_flight = 0;
    for (const auto& [raw, r] : s.active) in_flight += r->submitted ? 1 : 0;
    const std::size_t dropped = s.active.size() + (s.receiving ? 1 : 0);
    if (in_flight > 0 && client_) {
      on_lost("the kernel timed out " + std::to_string(in_flight) + " request(s) on queue " + std::to_string(s.q) +
              " (--kernel-timeout " + std::to_string(opts_.kernel_timeout.count()) + " s) and sends them again");
    }
    s.active.clear();
    s.receiving.reset();
    s.payload_got = 0;
    s.in_pos = s.in_end = 0;
    s.out.clear();
    s.unread.clear();
    s.unread_bytes = 0;
    s.in_pipe = 0;
    s.written = 0;
    for (int* fd : {&s.fd, &s.kernel_fd, &s.pipe_r, &s.pipe_w}) {
      if (*fd >= 0) ::close(*fd);
      *fd = -1;
    }
    make_socket(s);
    const int err = dev_->replace_sockets({s.kernel_fd});
    if (err != 0) {
      log()->error("{} queue {}: the kernel closed its socket and refused a new one (netlink NBD_CMD_RECONFIGURE: {}); "
                   "the device is going away",
                   dev_->path(), s.q, errno_text(err));
      continue;  // stays closed
    }
    s.eof = false;
    ++renewed_;
    log()->warn("{} queue {}: the kernel marked its socket dead and requeued {} request(s); gave it a new socket", dev_->path(),
                s.q, dropped);
    bind(s);
    write_state(state_);
  }
}

std::size_t Attachment::outstanding() const {
  std::size_t n = 0;
  for (const auto& s : socks_) n += s->active.size() + s->out.size() + (s->receiving ? 1 : 0);
  return n;
}

bool Attachment::all_closed() const {
  return std::all_of(socks_.begin(), socks_.end(), [](const auto& s) { return s->eof; });
}

}  // namespace ibdisk::initiator::attach_internal
