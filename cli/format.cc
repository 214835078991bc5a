#include "common/json.h"
#include "cli/format.h"

#include <unistd.h>

#include <chrono>
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

Progress::Progress(std::string label, bool enabled)
    : label_(std::move(label)), enabled_(enabled), tty_(::isatty(2) == 1), started_(now_s()) {}

void Progress::update(std::uint64_t done, std::uint64_t total) {
  if (!enabled_) return;
  const double t = now_s();
  if (!tty_ && t - last_print_ < 5 && done != total) return;
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
