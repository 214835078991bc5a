#pragma once
// The initiator's liveness options, the same on every subcommand that holds a session:
// --heartbeat and --io-timeout (ClientOptions::heartbeat, io_timeout; docs/attach.md, TIMEOUTS).
#include <CLI/CLI.hpp>

#include "initiator/client.h"

namespace ibdisk::cli {

struct LivenessArgs {
  double heartbeat_s = 5;
  double io_timeout_s = 15;
};

void add_liveness_options(CLI::App* sub, LivenessArgs& a);
// Into o; throws UsageError when a nonzero heartbeat is not below a nonzero I/O timeout.
void apply_liveness(const LivenessArgs& a, initiator::ClientOptions* o);

}  // namespace ibdisk::cli
