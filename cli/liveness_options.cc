#include "cli/liveness_options.h"

#include "cli/commands.h"

namespace ibdisk::cli {

void add_liveness_options(CLI::App* sub, LivenessArgs& a) {
  sub->add_option("--heartbeat", a.heartbeat_s,
                  "SECONDS without a word from the target after which a queue sends it a heartbeat (0: never)")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 3600.0));
  sub->add_option("--io-timeout", a.io_timeout_s,
                  "SECONDS without a word from the target, while a command or heartbeat waits, after which the\n"
                  "connection counts as lost and is replaced (the I/O is sent again; 0: never)")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 3600.0));
}

void apply_liveness(const LivenessArgs& a, initiator::ClientOptions* o) {
  if (a.heartbeat_s > 0 && a.io_timeout_s > 0 && a.heartbeat_s >= a.io_timeout_s) {
    throw UsageError("--heartbeat " + CLI::detail::to_string(a.heartbeat_s) + " must be below --io-timeout " +
                     CLI::detail::to_string(a.io_timeout_s) + ": an idle queue needs a heartbeat answered in time");
  }
  const auto ms = [](double s) { return std::chrono::milliseconds(static_cast<std::int64_t>(s * 1000)); };
  o->heartbeat = ms(a.heartbeat_s);
  o->io_timeout = ms(a.io_timeout_s);
}

}  // namespace ibdisk::cli
