#pragma once
// Small output helpers shared by the subcommands: sizes and progress bars.
#include <cstdint>
#include <string>

namespace ibdisk::cli {

std::string human_bytes(std::uint64_t bytes);  // "1.0 GiB"

// A one-line progress bar on stderr, redrawn in place when stderr is a terminal and printed
// every few seconds otherwise.
class Progress {
 public:
  explicit Progress(std::string label, bool enabled = true);
  void update(std::uint64_t done, std::uint64_t total);
  void finish();

 private:
  std::string label_;
  bool enabled_;
  bool tty_;
  double started_;
  double last_print_ = 0;
};

}  // namespace ibdisk::cli
