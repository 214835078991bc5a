#include "initiator/copy.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <thread>
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

// State of one pass shared by its lanes (one Client and thread each): lanes take the next
// block from `next`, so a faster lane simply does more of the work.
struct Pass {
  std::uint64_t size = 0;
  std::atomic<std::uint64_t> next{0};
  std::atomic<std::uint64_t> done{0};
  std::atomic<std::uint64_t> skipped{0};
  std::atomic<bool> failed{false};
  std::mutex mu;
  std::string error;  // the first error, under mu
  void fail(std::string what) {
    std::lock_guard lock(mu);
    if (error.empty()) error = std::move(what);
    failed = true;
  }
};

// One lane of a pass over [0, size): issue(client, queue, offset, len, buf, done) starts one
// request; the lane keeps its client's queues full. Runs on the calling thread; lane 0 (the
// caller's) reports progress.
template <typename Issue>
void lane(Client& client, Pass& pass, const CopyOptions& opts, bool report, Issue& issue) try {
  const std::uint32_t block = std::min(opts.block_size, client.max_io());
  Buffers bufs(std::max(1u, slots_for(client)), block);
  unsigned rr = 0;
  bool more = true;
  auto last_progress = std::chrono::steady_clock::now();
  std::function<void()> fill = [&] {
    while (more && !pass.failed && !bufs.free_.empty()) {
      const std::uint64_t off = pass.next.fetch_add(block);
      if (off >= pass.size) {
        more = false;
        break;
      }
      std::byte* buf = bufs.free_.back();
      bufs.free_.pop_back();
      const auto len = static_cast<std::uint32_t>(std::min<std::uint64_t>(block, pass.size - off));
      issue(client, rr++ % client.queue_count(), off, len, buf, [&, buf, len](bool ok) {
        bufs.free_.push_back(buf);
        if (ok) pass.done += len;
        const auto now = std::chrono::steady_clock::now();
        if (report && opts.progress && now - last_progress > std::chrono::milliseconds(200)) {
          last_progress = now;
          opts.progress(pass.done, pass.size);
        }
        fill();
      });
    }
  };
  fill();
  client.run_until([&] { return (!more || pass.failed) && client.in_flight() == 0; });
} catch (const std::exception& e) {
  pass.fail(e.what());  // on a lane's own thread: nothing may escape it
}

// Runs the lanes, one thread each beyond the caller's, and throws the first error as `what`.
template <typename Issue>
void run_pass(std::span<Client* const> clients, Pass& pass, const CopyOptions& opts, Issue issue, const char* what) {
  if (clients.empty()) throw std::invalid_argument("copy needs at least one client");
  std::vector<std::thread> threads;
  for (std::size_t i = 1; i < clients.size(); ++i) {
    threads.emplace_back([&, i] { lane(*clients[i], pass, opts, false, issue); });
  }
  lane(*clients[0], pass, opts, true, issue);
  for (auto& t : threads) t.join();
  if (opts.progress) opts.progress(pass.done, pass.size);
  if (pass.failed) throw SystemError(what, pass.error);
}

}  // namespace

CopyResult download(std::span<Client* const> clients, std::uint32_t handle, std::uint64_t size, int fd,
                    bool sparse_dest, const CopyOptions& opts) {
  const auto start = std::chrono::steady_clock::now();
  // The bytes the destination file had below the export's size: zero blocks there must be
  // zeroed, zero blocks past them are holes already.
  std::uint64_t old_data = 0;
  if (sparse_dest) {
    struct stat st{};
    if (::fstat(fd, &st) == 0) old_data = std::min<std::uint64_t>(static_cast<std::uint64_t>(st.st_size), size);
    if (::ftruncate(fd, static_cast<off_t>(size)) != 0) {
      throw SystemError("sizing the destination to " + std::to_string(size) + " bytes", errno,
                        "is there enough space, and is it a regular file?");
    }
  }
  Pass pass;
  pass.size = size;
  run_pass(
      clients, pass, opts,
      [&](Client& client, unsigned q, std::uint64_t off, std::uint32_t len, std::byte* buf, auto done) {
        client.read(q, handle, off, len, buf, [&, off, len, buf, done](int st) {
          if (st < 0) {
            pass.fail(io_error("reading the export", off, st));
            return done(false);
          }
          if (sparse_dest && all_zero(buf, len)) {
            pass.skipped += len;
            if (off < old_data) {
              // Old bytes there: punch them out (the file stays sparse), or write the zeros.
              const std::uint64_t n = std::min<std::uint64_t>(len, old_data - off);
              if (::fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(off),
                              static_cast<off_t>(n)) != 0) {
                std::uint64_t at = 0;
                if (const int st = move_all(::pwrite, fd, buf, n, off, &at); st < 0) {
                  pass.fail(io_error("zeroing the destination", at, st));
                  return done(false);
                }
              }
            }
          } else {
            std::uint64_t at = 0;
            if (const int st = move_all(::pwrite, fd, buf, len, off, &at); st < 0) {
              pass.fail(io_error("writing the destination", at, st));
              return done(false);
            }
          }
          done(true);
        });
      },
      "copy");
  CopyResult r;
  r.bytes = pass.done;
  r.skipped_zero_bytes = pass.skipped;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return r;
}

CopyResult upload(std::span<Client* const> clients, std::uint32_t handle, std::uint64_t size, int fd,
                  const CopyOptions& opts) {
  const auto start = std::chrono::steady_clock::now();
  Pass pass;
  pass.size = size;
  run_pass(
      clients, pass, opts,
      [&](Client& client, unsigned q, std::uint64_t off, std::uint32_t len, std::byte* buf, auto done) {
        std::uint64_t at = 0;
        if (const int st = move_all(::pread, fd, buf, len, off, &at); st < 0) {
          pass.fail(io_error("reading the source", at, st));
          return done(false);
        }
        auto finish = [&, off, done](int st) {
          if (st < 0) pass.fail(io_error("writing the export", off, st));
          done(st == 0);
        };
        if (all_zero(buf, len)) {
          pass.skipped += len;
          client.write_zeroes(q, handle, off, len, 0, finish);
        } else {
          client.write(q, handle, off, len, buf, 0, finish);
        }
      },
      "copy");
  // Every lane's writes have completed: one flush makes them all durable (one session).
  std::string error;
  bool flushed = false;
  clients[0]->flush(0, handle, [&](int st) {
    if (st < 0) error = std::string("flushing the export: ") + errno_text(-st);
    flushed = true;
  });
  clients[0]->run_until([&] { return flushed; });
  if (!error.empty()) throw SystemError("copy", error);
  CopyResult r;
  r.bytes = pass.done;
  r.skipped_zero_bytes = pass.skipped;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return r;
}

std::string remote_sha256(std::span<Client* const> clients, std::uint32_t handle, std::uint64_t size,
                          const CopyOptions& opts) {
  // Reads complete out of order and on several lanes; hash them in order by holding early
  // blocks back.
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr);
  std::mutex mu;
  std::map<std::uint64_t, std::vector<std::byte>> early;
  std::uint64_t hashed = 0;
  Pass pass;
  pass.size = size;
  try {
    run_pass(
        clients, pass, opts,
        [&](Client& client, unsigned q, std::uint64_t off, std::uint32_t len, std::byte* buf, auto done) {
          client.read(q, handle, off, len, buf, [&, off, len, buf, done](int st) {
            if (st < 0) {
              pass.fail(io_error("reading the export", off, st));
              return done(false);
            }
            std::lock_guard lock(mu);
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
        "verify");
  } catch (...) {
    EVP_MD_CTX_free(ctx);
    throw;
  }
  Sha256 d{};
  unsigned len = 0;
  EVP_DigestFinal_ex(ctx, d.data(), &len);
  EVP_MD_CTX_free(ctx);
  return to_hex(d);
}

CopyResult download(Client& client, std::uint32_t handle, std::uint64_t size, int fd, bool sparse_dest,
                    const CopyOptions& opts) {
  Client* const one[] = {&client};
  return download(one, handle, size, fd, sparse_dest, opts);
}

CopyResult upload(Client& client, std::uint32_t handle, std::uint64_t size, int fd, const CopyOptions& opts) {
  Client* const one[] = {&client};
  return upload(one, handle, size, fd, opts);
}

std::string remote_sha256(Client& client, std::uint32_t handle, std::uint64_t size, const CopyOptions& opts) {
  Client* const one[] = {&client};
  return remote_sha256(one, handle, size, opts);
}

}  // namespace ibdisk::initiator
