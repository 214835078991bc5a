#include "initiator/extents.h"

#include <algorithm>
#include <map>

#include "common/error.h"

namespace ibdisk::initiator {
namespace {

// Pieces asked for in one command: the largest length a command carries, rounded to 1 MiB.
constexpr std::uint64_t kPiece = 0xfff00000ull;

void append(ExtentMap& m, std::uint64_t offset, std::uint64_t length, std::uint32_t type) {
  if (!m.runs.empty() && m.runs.back().type == type && m.runs.back().offset + m.runs.back().length == offset) {
    m.runs.back().length += length;
    return;
  }
  m.runs.push_back({offset, length, type});
}

}  // namespace

ExtentMap map_extents(Client& c, unsigned q, std::uint32_t handle, std::uint64_t offset, std::uint64_t length,
                      bool supported, unsigned depth) {
  ExtentMap m;
  if (length == 0) return m;
  if (!supported) {
    m.exact = false;
    m.runs.push_back({offset, length, 0});
    return m;
  }
  // Pieces are asked for in parallel; each piece's replies come back in order, and a reply
  // that ends early is followed by a request for the rest of its piece.
  struct Piece {
    std::uint64_t next, end;
    std::vector<ExtentRun> runs;
    bool busy = false;
  };
  std::vector<Piece> pieces;
  for (std::uint64_t at = offset, end = offset + length; at < end; at += std::min(kPiece, end - at)) {
    pieces.push_back({at, at + std::min(kPiece, end - at), {}});
  }
  int error = 0;
  unsigned inflight = 0;
  std::size_t first_idle = 0;
  const auto ask = [&](std::size_t i, auto& self) -> void {
    Piece& p = pieces[i];
    p.busy = true;
    ++inflight;
    const auto len = static_cast<std::uint32_t>(p.end - p.next);
    c.extents(q, handle, p.next, len, [&, i](int status, const wire::ExtentList& l) {
      --inflight;
      Piece& pc = pieces[i];
      pc.busy = false;
      if (status != 0) {
        if (error == 0) error = status;
        return;
      }
      std::uint64_t at = pc.next;
      for (std::uint32_t k = 0; k < l.count; ++k) {
        pc.runs.push_back({at, l.runs[k].length, l.runs[k].type});
        at += l.runs[k].length;
      }
      if (!(l.flags & wire::kExtentsExact)) m.exact = false;
      pc.next = at;
      if (pc.next < pc.end && error == 0) self(i, self);
    });
  };
  while (true) {
    while (error == 0 && inflight < std::max(1u, depth) && first_idle < pieces.size()) ask(first_idle++, ask);
    if (inflight == 0 && (error != 0 || first_idle == pieces.size())) break;
    const unsigned before = inflight;
    c.run_until([&] { return inflight < before || error != 0; });
    if (error != 0) c.run_until([&] { return inflight == 0; });
  }
  if (error != 0) {
    throw SystemError("extents of " + std::to_string(offset) + "+" + std::to_string(length), -error,
                      "check the target's log; an older target may not answer extents");
  }
  for (const Piece& p : pieces) {
    for (const ExtentRun& r : p.runs) append(m, r.offset, r.length, r.type);
  }
  return m;
}

}  // namespace ibdisk::initiator
