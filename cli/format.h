#pragma once
// Small output helpers shared by the subcommands: sizes and progress bars.
#include <cstdint>
#include <string>

#include <CLI/CLI.hpp>

namespace ibdisk::cli {

std::string human_bytes(std::uint64_t bytes);  // "1.0 GiB"

// "10.0.0.1:7420", "[fd00::1]:7420": an address a user can paste back.
std::string host_port(const std::string& host, std::uint16_t port);

// "64K", "1M", "2GiB", "512": bytes with K/M/G/T suffixes in powers of 1024 (an optional "iB"
// or "B" after them); a plain number counts in units of plain_unit bytes. Throws
// std::invalid_argument naming the text.
std::uint64_t parse_size(const std::string& text, std::uint64_t plain_unit);
// The same as a CLI11 transform: the option receives the size in bytes.
CLI::Validator size_transform(std::uint64_t plain_unit);

// A one-line progress bar on stderr, redrawn in place; drawn only when stderr is a terminal.
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
