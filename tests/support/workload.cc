#include "tests/support/workload.h"

#include <algorithm>
#include <cstring>

#include "common/checksum.h"

namespace ibdisk::testing {

struct RandomWorkload::Op {
  bool write;
  std::uint64_t off;
  std::uint32_t len;
  std::vector<std::byte> buf;
};

RandomWorkload::RandomWorkload(initiator::Client& client, std::uint32_t handle, std::vector<std::byte>& model,
                               WorkloadOptions opts)
    : client_(client), handle_(handle), model_(model), opts_(opts), rng_(opts.seed) {}

RandomWorkload::~RandomWorkload() = default;

bool RandomWorkload::overlaps(std::uint64_t off, std::uint32_t len) const {
  for (const auto& o : inflight_) {
    if (off < o->off + o->len && o->off < off + len) return true;
  }
  return false;
}

void RandomWorkload::issue() {
  const std::uint64_t size = model_.size();
  while (may_issue_ && may_issue_() && in_flight() < opts_.max_in_flight) {
    std::uint32_t len;
    if (issued_ == 0) {
      len = 1u << 20;
    } else if (opts_.mostly_small && rng_() % 4 != 0) {
      len = 512u * static_cast<std::uint32_t>(1 + rng_() % 64);
    } else {
      len = 512u * static_cast<std::uint32_t>(1 + rng_() % 2048);
    }
    std::uint64_t off;
    do {
      off = (rng_() % ((size - len) / 512)) * 512;
      if (rng_() % 4 == 0) off += rng_() % 512;  // some unaligned offsets too
      if (off + len > size) off = size - len;
    } while (overlaps(off, len));
    auto op = std::make_unique<Op>(Op{rng_() % 2 == 0, off, len, std::vector<std::byte>(len)});
    if (op->write) {
      fill_pattern(op->buf, rng_());
      std::memcpy(model_.data() + off, op->buf.data(), len);
    }
    Op* raw = op.get();
    inflight_.push_back(std::move(op));
    const unsigned q = issued_++ % client_.queue_count();
    auto done = [this, raw](int st) {
      if (st != 0) ++result_.errors;
      if (!raw->write && std::memcmp(raw->buf.data(), model_.data() + raw->off, raw->len) != 0) ++result_.mismatches;
      result_.bytes += raw->len;
      ++result_.completed;
      std::erase_if(inflight_, [raw](const auto& p) { return p.get() == raw; });
      issue();
    };
    if (raw->write) client_.write(q, handle_, off, len, raw->buf.data(), 0, done);
    else client_.read(q, handle_, off, len, raw->buf.data(), done);
  }
}

void RandomWorkload::run(unsigned ops) {
  const unsigned until = issued_ + ops;
  run_while([&] { return issued_ < until; });
}

void RandomWorkload::run_while(const std::function<bool()>& more) {
  may_issue_ = more;
  try {
    issue();
    client_.run_until([&] {
      if (in_flight() != 0) return false;
      if (!more()) return true;
      issue();  // more() turned true again while nothing was in flight
      return false;
    });
  } catch (...) {
    may_issue_ = nullptr;
    throw;
  }
  may_issue_ = nullptr;
}

unsigned read_back_mismatches(initiator::Client& client, std::uint32_t handle, const std::vector<std::byte>& model) {
  constexpr std::uint32_t kBlock = 1u << 20;
  const std::uint64_t blocks = model.size() / kBlock;
  const unsigned depth = std::max(1u, client.queue_count() * 2);
  std::vector<std::vector<std::byte>> bufs(depth, std::vector<std::byte>(kBlock));
  std::vector<std::uint64_t> free_bufs;
  for (unsigned i = 0; i < depth; ++i) free_bufs.push_back(i);
  std::uint64_t next = 0, done = 0;
  unsigned bad = 0;
  std::function<void()> issue = [&] {
    while (next < blocks && !free_bufs.empty()) {
      const std::uint64_t b = free_bufs.back(), block = next++;
      free_bufs.pop_back();
      client.read(static_cast<unsigned>(block % client.queue_count()), handle, block * kBlock, kBlock, bufs[b].data(),
                  [&, b, block](int st) {
                    if (st != 0 || std::memcmp(bufs[b].data(), model.data() + block * kBlock, kBlock) != 0) ++bad;
                    ++done;
                    free_bufs.push_back(b);
                    issue();
                  });
    }
  };
  issue();
  client.run_until([&] { return done == blocks; });
  return bad;
}

}  // namespace ibdisk::testing
