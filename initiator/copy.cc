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
#include "initiator/extents.h"

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

// A range of the export a pass moves: data, or (upload) zeros to write without a payload.
struct Range {
  std::uint64_t offset = 0;
  std::uint64_t length = 0;
  bool zeroes = false;
};

// Pieces of a write-zeroes range per request: one is fast on a file, but a block device
// zeroes it block by block and must answer within the initiator's --io-timeout.
constexpr std::uint32_t kZeroPiece = 64u << 20;

// State of one pass shared by its lanes (one Client and thread each): lanes take the next
// block of `work` in order, so a faster lane simply does more of the work.
struct Pass {
  std::uint64_t size = 0;  // what progress counts to: the export's whole range
  std::vector<Range> work;
  std::atomic<std::uint64_t> done{0};  // starts at what needed no request (holes)
  std::atomic<std::uint64_t> skipped{0};
  std::atomic<std::uint64_t> moved{0};
  std::atomic<bool> failed{false};
  std::mutex mu;
  std::string error;  // the first error, under mu
  std::size_t run = 0;        // cursor into work, under mu
  std::uint64_t used = 0;     // bytes of work[run] handed out, under mu
  void fail(std::string what) {
    std::lock_guard lock(mu);
    if (error.empty()) error = std::move(what);
    failed = true;
  }
  // The next piece of at most `block` bytes (kZeroPiece for zeros), or false at the end.
  bool take(std::uint32_t block, Range* out) {
    std::lock_guard lock(mu);
    while (run < work.size() && used >= work[run].length) {
      ++run;
      used = 0;
    }
    if (run == work.size()) return false;
    const Range& r = work[run];
    out->offset = r.offset + used;
    out->length = std::min<std::uint64_t>(r.zeroes ? kZeroPiece : block, r.length - used);
    out->zeroes = r.zeroes;
    used += out->length;
    return true;
  }
};

// One lane of a pass: issue(client, queue, range, buf, done) starts one request; the lane keeps
// its client's queues full. Runs on the calling thread; lane 0 (the caller's) reports progress.
template <typename Issue>
void lane(Client& client, Pass& pass, const CopyOptions& opts, bool report, Issue& issue) try {
  const std::uint32_t block = std::min(opts.block_size, client.max_io());
  Buffers bufs(std::max(1u, slots_for(client)), block);
  unsigned rr = 0;
  bool more = true;
  auto last_progress = std::chrono::steady_clock::now();
  std::function<void()> fill = [&] {
    while (more && !pass.failed && !bufs.free_.empty()) {
      Range r;
      if (!pass.take(block, &r)) {
        more = false;
        break;
      }
      std::byte* buf = bufs.free_.back();
      bufs.free_.pop_back();
      issue(client, rr++ % client.queue_count(), r, buf, [&, buf, len = r.length](bool ok) {
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

// The export's runs over [0, size): holes and zero runs as not-data, when it can tell.
ExtentMap export_map(Client& c, std::uint32_t handle, std::uint64_t size, const CopyOptions& opts) {
  return map_extents(c, 0, handle, 0, size, opts.extents);
}

bool is_data(const ExtentRun& r) { return !r.hole() && !r.zero(); }

// The data runs of a local file over [0, size) by SEEK_DATA/SEEK_HOLE (all of it when the fd
// cannot say: a block device, a pipe, a file system without them).
std::vector<Range> local_data(int fd, std::uint64_t size) {
  std::vector<Range> runs;
  std::uint64_t at = 0;
  while (at < size) {
    const off_t data = ::lseek(fd, static_cast<off_t>(at), SEEK_DATA);
    if (data < 0) {
      if (errno == ENXIO) break;  // no data from here to the end of the file
      return {{0, size, false}};
    }
    if (static_cast<std::uint64_t>(data) >= size) break;
    off_t hole = ::lseek(fd, data, SEEK_HOLE);
    if (hole < 0) return {{0, size, false}};
    const std::uint64_t end = std::min<std::uint64_t>(static_cast<std::uint64_t>(hole), size);
    runs.push_back({static_cast<std::uint64_t>(data), end - static_cast<std::uint64_t>(data), false});
    at = end;
  }
  return runs;
}

// Writes zeros to [off, off + len) of fd from a zero buffer. Returns 0 or -errno (*failed_at set).
int write_zeros(int fd, std::uint64_t off, std::uint64_t len, std::uint64_t* failed_at) {
  static std::byte zeros[1 << 20] = {};
  for (std::uint64_t at = off; at < off + len;) {
    const std::size_t n = std::min<std::uint64_t>(sizeof zeros, off + len - at);
    if (const int st = move_all(::pwrite, fd, zeros, n, at, failed_at); st < 0) return st;
    at += n;
  }
  return 0;
}

CopyResult result_of(const Pass& pass, std::chrono::steady_clock::time_point start) {
  CopyResult r;
  r.bytes = pass.done;
  r.moved_bytes = pass.moved;
  r.skipped_zero_bytes = pass.skipped;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return r;
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
  // Zeros [off, off + len) of the destination without data from the export: a sparse file
  // keeps or gets a hole there, anything else gets zeros (ZERO_RANGE where it can).
  const auto zero_dest = [&](std::uint64_t off, std::uint64_t len) -> int {
    std::uint64_t at = 0;
    if (sparse_dest) {
      if (off >= old_data) return 0;  // a hole already (ftruncate)
      const std::uint64_t n = std::min<std::uint64_t>(len, old_data - off);
      if (::fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(off),
                      static_cast<off_t>(n)) == 0) {
        return 0;
      }
      if (const int st = write_zeros(fd, off, n, &at); st < 0) {
        return st;
      }
      return 0;
    }
    if (::fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(off),
                    static_cast<off_t>(len)) == 0) {
      return 0;
    }
    return write_zeros(fd, off, len, &at);
  };
  Pass pass;
  pass.size = size;
  for (const ExtentRun& r : export_map(*clients[0], handle, size, opts).runs) {
    if (is_data(r)) {
      pass.work.push_back({r.offset, r.length, false});
      continue;
    }
    if (const int st = zero_dest(r.offset, r.length); st < 0) {
      throw SystemError("copy", io_error("zeroing the destination", r.offset, st));
    }
    pass.done += r.length;
    pass.skipped += r.length;
  }
  run_pass(
      clients, pass, opts,
      [&](Client& client, unsigned q, const Range& r, std::byte* buf, auto done) {
        const std::uint64_t off = r.offset;
        const auto len = static_cast<std::uint32_t>(r.length);
        client.read(q, handle, off, len, buf, [&, off, len, buf, done](int st) {
          if (st < 0) {
            pass.fail(io_error("reading the export", off, st));
            return done(false);
          }
          pass.moved += len;
          if (sparse_dest && all_zero(buf, len)) {
            pass.skipped += len;
            if (const int zst = zero_dest(off, len); zst < 0) {
              pass.fail(io_error("zeroing the destination", off, zst));
              return done(false);
            }
          } else {
            std::uint64_t at = 0;
            if (const int wst = move_all(::pwrite, fd, buf, len, off, &at); wst < 0) {
              pass.fail(io_error("writing the destination", at, wst));
              return done(false);
            }
          }
          done(true);
        });
      },
      "copy");
  return result_of(pass, start);
}

CopyResult upload(std::span<Client* const> clients, std::uint32_t handle, std::uint64_t size, int fd,
                  const CopyOptions& opts) {
  const auto start = std::chrono::steady_clock::now();
  Pass pass;
  pass.size = size;
  // The source's holes become zeros on the export, except where the export has a hole
  // already: those are left as they are.
  const std::vector<ExtentRun> remote = export_map(*clients[0], handle, size, opts).runs;
  std::size_t ri = 0;
  const auto zero_gap = [&](std::uint64_t from, std::uint64_t to) {
    while (from < to) {
      while (ri < remote.size() && remote[ri].offset + remote[ri].length <= from) ++ri;
      const std::uint64_t end = ri < remote.size() ? std::min(to, remote[ri].offset + remote[ri].length) : to;
      if (ri < remote.size() && !is_data(remote[ri])) {
        pass.done += end - from;
      } else if (!pass.work.empty() && pass.work.back().zeroes &&
                 pass.work.back().offset + pass.work.back().length == from) {
        pass.work.back().length += end - from;
      } else {
        pass.work.push_back({from, end - from, true});
      }
      pass.skipped += end - from;
      from = end;
    }
  };
  std::uint64_t at = 0;
  for (const Range& d : local_data(fd, size)) {
    zero_gap(at, d.offset);
    pass.work.push_back(d);
    at = d.offset + d.length;
  }
  zero_gap(at, size);
  const std::uint32_t zero_flags = opts.zeroes_may_trim ? wire::kFlagMayTrim : 0;
  run_pass(
      clients, pass, opts,
      [&](Client& client, unsigned q, const Range& r, std::byte* buf, auto done) {
        const std::uint64_t off = r.offset;
        const auto len = static_cast<std::uint32_t>(r.length);
        auto finish = [&, off, done](int st) {
          if (st < 0) pass.fail(io_error("writing the export", off, st));
          done(st == 0);
        };
        if (r.zeroes) return client.write_zeroes(q, handle, off, len, zero_flags, finish);
        std::uint64_t failed_at = 0;
        if (const int st = move_all(::pread, fd, buf, len, off, &failed_at); st < 0) {
          pass.fail(io_error("reading the source", failed_at, st));
          return done(false);
        }
        if (all_zero(buf, len)) {
          pass.skipped += len;
          client.write_zeroes(q, handle, off, len, zero_flags, finish);
        } else {
          pass.moved += len;
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
  return result_of(pass, start);
}

std::string remote_sha256(std::span<Client* const> clients, std::uint32_t handle, std::uint64_t size,
                          const CopyOptions& opts) {
  // Reads complete out of order and on several lanes; hash them in order by holding early
  // blocks back. The export's holes wait there too, as zeros of their length (no bytes).
  struct Chunk {
    std::uint64_t length = 0;
    std::vector<std::byte> bytes;  // empty: `length` zeros
  };
  static const std::byte kZeros[1 << 16] = {};
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr);
  std::mutex mu;
  std::map<std::uint64_t, Chunk> early;
  std::uint64_t hashed = 0;
  const auto drain = [&] {  // under mu
    for (auto it = early.find(hashed); it != early.end(); it = early.find(hashed)) {
      if (it->second.bytes.empty()) {
        for (std::uint64_t n = 0; n < it->second.length; n += sizeof kZeros) {
          EVP_DigestUpdate(ctx, kZeros, std::min<std::uint64_t>(sizeof kZeros, it->second.length - n));
        }
      } else {
        EVP_DigestUpdate(ctx, it->second.bytes.data(), it->second.bytes.size());
      }
      hashed += it->second.length;
      early.erase(it);
    }
  };
  Pass pass;
  pass.size = size;
  try {
    for (const ExtentRun& r : export_map(*clients[0], handle, size, opts).runs) {
      if (is_data(r)) {
        pass.work.push_back({r.offset, r.length, false});
      } else {
        early.emplace(r.offset, Chunk{r.length, {}});
        pass.done += r.length;
      }
    }
    drain();
    run_pass(
        clients, pass, opts,
        [&](Client& client, unsigned q, const Range& r, std::byte* buf, auto done) {
          const std::uint64_t off = r.offset;
          const auto len = static_cast<std::uint32_t>(r.length);
          client.read(q, handle, off, len, buf, [&, off, len, buf, done](int st) {
            if (st < 0) {
              pass.fail(io_error("reading the export", off, st));
              return done(false);
            }
            std::lock_guard lock(mu);
            if (off == hashed) {
              EVP_DigestUpdate(ctx, buf, len);
              hashed += len;
              drain();
            } else {
              early.emplace(off, Chunk{len, std::vector<std::byte>(buf, buf + len)});
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
