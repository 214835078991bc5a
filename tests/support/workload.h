#pragma once
// The random read/write workload the data-path tests share: requests of 512 B to 1 MiB at
// random (some unaligned) offsets over every queue of a Client, never overlapping while in
// flight, so an in-memory model of the export is exact: each write updates the model when it
// is issued, each read is compared with it when it completes.
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <random>
#include <vector>

#include "initiator/client.h"

namespace ibdisk::testing {

struct WorkloadOptions {
  std::uint64_t seed = 42;
  unsigned max_in_flight = 32;  // across all queues
  // Three requests in four of at most 32 KiB (the rest up to 1 MiB): for the emulated guest.
  // Otherwise sizes are uniform from 512 B to 1 MiB. The first request is always 1 MiB.
  bool mostly_small = false;
};

struct WorkloadResult {
  unsigned completed = 0, errors = 0, mismatches = 0;
  std::uint64_t bytes = 0;
};

// Runs on the Client's thread; `client` and `model` (the export's expected contents, its size
// the export's) must outlive it.
class RandomWorkload {
 public:
  RandomWorkload(initiator::Client& client, std::uint32_t handle, std::vector<std::byte>& model, WorkloadOptions opts);
  ~RandomWorkload();
  RandomWorkload(const RandomWorkload&) = delete;
  RandomWorkload& operator=(const RandomWorkload&) = delete;

  // Issues `ops` more requests and returns when every request issued so far has completed.
  void run(unsigned ops);
  // Keeps requests in flight while more() holds, then returns when every one has completed.
  // more() is asked after each completion and at least every 500 ms.
  void run_while(const std::function<bool()>& more);

  const WorkloadResult& result() const { return result_; }
  unsigned issued() const { return issued_; }
  unsigned in_flight() const { return issued_ - result_.completed; }

 private:
  struct Op;
  void issue();
  bool overlaps(std::uint64_t off, std::uint32_t len) const;

  initiator::Client& client_;
  std::uint32_t handle_;
  std::vector<std::byte>& model_;
  WorkloadOptions opts_;
  std::mt19937_64 rng_;
  std::vector<std::unique_ptr<Op>> inflight_;
  std::function<bool()> may_issue_;
  unsigned issued_ = 0;
  WorkloadResult result_;
};

// Reads the whole export back in 1 MiB requests spread over the queues and returns how many
// 1 MiB blocks differ from the model (a failed read counts as a differing block).
unsigned read_back_mismatches(initiator::Client& client, std::uint32_t handle, const std::vector<std::byte>& model);

}  // namespace ibdisk::testing
