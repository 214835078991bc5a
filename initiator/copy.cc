#include "initiator/copy.h"

#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <vector>

#include <openssl/evp.h>

#include "common/checksum.h"
#include "common/error.h"

namespace ibdisk::initiator {
namespace {

struct Buffers {
  explicit Buffers(unsigned n, std::uint32_t size) : size_(size) {
    for (unsigned i = 0; i < n; ++i) {
      void* p = nullptr;
      if (::posix_memalign(&p, 4096, size) != 0) throw SystemError("allocating copy buffers", ENOMEM);
      owned_.emplace_back(static_cast<std::byte*>(p));
      free_.push_back(owned_.back().get());
    }
  }
  struct Free { void operator()(std::byte* p) const { std::free(p); } };
  std::uint32_t size_;
  std::vector<std::unique_ptr<std::byte, Free>> owned_;
  std::vector<std::byte*> free_;
};

bool all_zero(const std::byte* p, std::size_t n) {
  static const std::byte kZero[4096] = {};
  for (std::size_t off = 0; off < n; off += sizeof kZero) {
    const std::size_t len = std::min(sizeof kZero, n - off);
    if (std::memcmp(p + off, kZero, len) != 0) return false;
  }
  return true;
}

std::string io_error(const char* what, std::uint64_t offset, int status) {
  return std::string(what) + " at offset " + std::to_string(offset) + ": " + errno_text(-status);
}

// pread or pwrite until len bytes have moved. Returns 0, or -errno (-EIO at an early end of file)
// with *failed_at set to the offset where it stopped.
template <typename Op>
int move_all(Op op, int fd, std::byte* buf, std::size_t len, std::uint64_t off, std::uint64_t* failed_at) {
  std::size_t done = 0;
  while (done < len) {
    const ssize_t n = op(fd, buf + done, len - done, static_cast<off_t>(off + done));
    if (n <= 0) {
      if (n < 0 && errno == EINTR) continue;
      *failed_at = off + done;
      return n < 0 ? -errno : -EIO;
    }
    done += static_cast<std::size_t>(n);
  }
  return 0;
}

unsigned slots_for(Client& c) {
  unsigned n = 0;
  for (unsigned q = 0; q < c.queue_count(); ++q) n += c.queue_depth(q);
  return n;
}

// Runs a pipelined pass over [0, size): issue(offset, len, buf, done) starts one request;
// the pass keeps every queue full.
template <typename Issue>
void pipeline(Client& client, std::uint64_t size, const CopyOptions& opts, Issue issue, std::string* error,
              std::uint64_t* done_bytes) {
  const std::uint32_t block = std::min(opts.block_size, client.max_io());
  Buffers bufs(std::max(1u, slots_for(client)), block);
  std::uint64_t next = 0;
  unsigned rr = 0;
  auto last_progress = std::chrono::steady_clock::now();
  std::function<void()> fill = [&] {
    while (error->empty() && !bufs.free_.empty() && next < size) {
      std::byte* buf = bufs.free_.back();
      bufs.free_.pop_back();
      const std::uint64_t off = next;
      const auto len = static_cast<std::uint32_t>(std::min<std::uint64_t>(block, size - next));
      next += len;
      issue(rr++ % client.queue_count(), off, len, buf, [&, buf, len](bool ok) {
        bufs.free_.push_back(buf);
        if (ok) *done_bytes += len;
        const auto now = std::chrono::steady_clock::now();
        if (opts.progress && now - last_progress > std::chrono::milliseconds(200)) {
          last_progress = now;
          opts.progress(*done_bytes, size);
        }
        fill();
      });
    }
  };
  fill();
  client.run_until([&] { return (!error->empty() || *done_bytes == size) && client.in_flight() == 0; });
  if (opts.progress) opts.progress(*done_bytes, size);
}

}  // namespace

CopyResult download(Client& client, std::uint32_t handle, std::uint64_t size, int fd, bool sparse_dest,
                    const CopyOptions& opts) {
  const auto start = std::chrono::steady_clock::now();
  if (sparse_dest && ::ftruncate(fd, static_cast<off_t>(size)) != 0) {
    throw SystemError("sizing the destination to " + std::to_string(size) + " bytes", errno,
                      "is there enough space, and is it a regular file?");
  }
  CopyResult r;
  std::string error;
  pipeline(
      client, size, opts,
      [&](unsigned q, std::uint64_t off, std::uint32_t len, std::byte* buf, auto done) {
        client.read(q, handle, off, len, buf, [&, off, len, buf, done](int st) {
          if (st < 0) {
            if (error.empty()) error = io_error("reading the export", off, st);
            return done(false);
          }
          if (sparse_dest && all_zero(buf, len)) {
            r.skipped_zero_bytes += len;
          } else {
            std::uint64_t at = 0;
            if (const int st = move_all(::pwrite, fd, buf, len, off, &at); st < 0) {
              if (error.empty()) error = io_error("writing the destination", at, st);
              return done(false);
            }
          }
          done(true);
        });
      },
      &error, &r.bytes);
  if (!error.empty()) throw SystemError("copy", error);
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return r;
}

CopyResult upload(Client& client, std::uint32_t handle, std::uint64_t size, int fd, const CopyOptions& opts) {
  const auto start = std::chrono::steady_clock::now();
  CopyResult r;
  std::string error;
  pipeline(
      client, size, opts,
      [&](unsigned q, std::uint64_t off, std::uint32_t len, std::byte* buf, auto done) {
        std::uint64_t at = 0;
        if (const int st = move_all(::pread, fd, buf, len, off, &at); st < 0) {
          if (error.empty()) error = io_error("reading the source", at, st);
          return done(false);
        }
        auto finish = [&, off, done](int st) {
          if (st < 0 && error.empty()) error = io_error("writing the export", off, st);
          done(st == 0);
        };
        if (all_zero(buf, len)) {
          r.skipped_zero_bytes += len;
          client.write_zeroes(q, handle, off, len, 0, finish);
        } else {
          client.write(q, handle, off, len, buf, 0, finish);
        }
      },
      &error, &r.bytes);
  if (error.empty()) {
    bool flushed = false;
    client.flush(0, handle, [&](int st) {
      if (st < 0) error = std::string("flushing the export: ") + errno_text(-st);
      flushed = true;
    });
    client.run_until([&] { return flushed; });
  }
  if (!error.empty()) throw SystemError("copy", error);
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return r;
}

std::string remote_sha256(Client& client, std::uint32_t handle, std::uint64_t size, const CopyOptions& opts) {
  // Reads complete out of order; hash them in order by holding early blocks back.
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr);
  std::map<std::uint64_t, std::vector<std::byte>> early;
  std::uint64_t hashed = 0, done_bytes = 0;
  std::string error;
  pipeline(
      client, size, opts,
      [&](unsigned q, std::uint64_t off, std::uint32_t len, std::byte* buf, auto done) {
        client.read(q, handle, off, len, buf, [&, off, len, buf, done](int st) {
          if (st < 0) {
            if (error.empty()) error = io_error("reading the export", off, st);
            return done(false);
          }
          if (off == hashed) {
            EVP_DigestUpdate(ctx, buf, len);
            hashed += len;
            for (auto it = early.find(hashed); it != early.end(); it = early.find(hashed)) {
              EVP_DigestUpdate(ctx, it->second.data(), it->second.size());
              hashed += it->second.size();
              early.erase(it);
            }
          } else {
            early.emplace(off, std::vector<std::byte>(buf, buf + len));
          }
          done(true);
        });
      },
      &error, &done_bytes);
  Sha256 d{};
  unsigned len = 0;
  EVP_DigestFinal_ex(ctx, d.data(), &len);
  EVP_MD_CTX_free(ctx);
  if (!error.empty()) throw SystemError("verify", error);
  return to_hex(d);
}

}  // namespace ibdisk::initiator
