#include "cli/format.h"

#include <unistd.h>

#include <cctype>
#include <chrono>
#include <climits>
#include <cstdint>
#include <stdexcept>
#include <cstdio>

namespace ibdisk::cli {
namespace {
double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
}  // namespace

std::string human_bytes(std::uint64_t bytes) {
  static const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024 && u < 5) {
    v /= 1024;
    ++u;
  }
  char buf[32];
  if (u == 0) std::snprintf(buf, sizeof buf, "%llu B", static_cast<unsigned long long>(bytes));
  else std::snprintf(buf, sizeof buf, "%.1f %s", v, kUnits[u]);
  return buf;
}

std::string host_port(const std::string& host, std::uint16_t port) {
  const bool v6 = host.find(':') != std::string::npos && host.front() != '[';
  return (v6 ? "[" + host + "]" : host) + ":" + std::to_string(port);
}

std::uint64_t parse_size(const std::string& text, std::uint64_t plain_unit) {
  std::size_t used = 0;
  unsigned long long n = 0;
  try {
    if (text.empty() || !std::isdigit(static_cast<unsigned char>(text[0]))) throw std::invalid_argument(text);
    n = std::stoull(text, &used);
  } catch (const std::exception&) {
    throw std::invalid_argument("'" + text + "' is not a size (e.g. 4096, 64K, 1M, 2G)");
  }
  std::string unit = text.substr(used);
  for (auto& ch : unit) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
  if (unit.size() > 1 && (unit.substr(1) == "IB" || unit.substr(1) == "B")) unit.resize(1);
  std::uint64_t mult = plain_unit;
  if (unit == "B") mult = 1;
  else if (unit == "K") mult = 1ull << 10;
  else if (unit == "M") mult = 1ull << 20;
  else if (unit == "G") mult = 1ull << 30;
  else if (unit == "T") mult = 1ull << 40;
  else if (!unit.empty()) throw std::invalid_argument("'" + text + "': unknown size suffix (use K, M, G or T)");
  if (n > UINT64_MAX / mult) throw std::invalid_argument("'" + text + "' is too large");
  return n * mult;
}

CLI::Validator size_transform(std::uint64_t plain_unit) {
  return CLI::Validator(
      [plain_unit](std::string& value) {
        try {
          value = std::to_string(parse_size(value, plain_unit));
        } catch (const std::invalid_argument& e) {
          return std::string(e.what());
        }
        return std::string();
      },
      "SIZE", "size");
}

Progress::Progress(std::string label, bool enabled)
    : label_(std::move(label)), enabled_(enabled && ::isatty(2) == 1), tty_(::isatty(2) == 1), started_(now_s()) {}

void Progress::update(std::uint64_t done, std::uint64_t total) {
  if (!enabled_) return;
  const double t = now_s();
  if (t - last_print_ < 0.1 && done != total) return;
  last_print_ = t;
  const double secs = t - started_;
  const double rate = secs > 0 ? static_cast<double>(done) / secs : 0;
  const double frac = total ? static_cast<double>(done) / static_cast<double>(total) : 1;
  constexpr int kWidth = 30;
  const int filled = static_cast<int>(frac * kWidth);
  std::string bar(static_cast<std::size_t>(filled), '#');
  bar.resize(kWidth, '.');
  const double eta = rate > 0 ? static_cast<double>(total - done) / rate : 0;
  std::fprintf(stderr, "%s%s [%s] %5.1f%%  %s / %s  %s/s  eta %.0fs%s", tty_ ? "\r" : "", label_.c_str(), bar.c_str(),
               frac * 100, human_bytes(done).c_str(), human_bytes(total).c_str(),
               human_bytes(static_cast<std::uint64_t>(rate)).c_str(), eta, tty_ ? "\033[K" : "\n");
  std::fflush(stderr);
}

void Progress::finish() {
  if (enabled_ && tty_) std::fprintf(stderr, "\n");
}

}  // namespace ibdisk::cli
