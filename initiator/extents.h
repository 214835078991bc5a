#pragma once
// An export's allocation map through the extents command, for `ibdisk copy`, `--verify` and
// `ibdisk info --map`: the runs of a range with their absolute offsets, asked for as many
// times as the bounded replies need.
// Threads: the Client's (these call run_until()).
#include <cstdint>
#include <vector>

#include "initiator/client.h"

namespace ibdisk::initiator {

struct ExtentRun {
  std::uint64_t offset = 0;
  std::uint64_t length = 0;
  std::uint32_t type = 0;  // 0 data, or wire::kExtentHole | wire::kExtentZero
  bool hole() const { return (type & wire::kExtentHole) != 0; }
  bool zero() const { return (type & wire::kExtentZero) != 0; }
};

struct ExtentMap {
  std::vector<ExtentRun> runs;  // contiguous, adjacent runs of one type merged
  bool exact = true;            // every reply was exact (the storage knew where data is)
};

// Every run of [offset, offset + length) of an open export, on queue q, with up to `depth`
// requests in flight (each asks for at most 4 GiB - 1). `supported` is Opened.extents: when
// false, one data run, not exact, without asking. Throws SystemError naming the failure.
ExtentMap map_extents(Client& c, unsigned q, std::uint32_t handle, std::uint64_t offset, std::uint64_t length,
                      bool supported, unsigned depth = 4);

}  // namespace ibdisk::initiator
