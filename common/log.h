#pragma once
// One spdlog logger per component ("rdma", "tcp", "target", ...), all writing to stderr.
#include <memory>
#include <string>

#include <spdlog/spdlog.h>

namespace ibdisk {

// Returns the logger for a component, creating it on first use. Thread-safe.
std::shared_ptr<spdlog::logger> logger(const std::string& component);

// Sets the level of every logger, present and future: trace, debug, info, warn, error, off.
// Throws std::invalid_argument naming the accepted levels on an unknown name.
void set_log_level(const std::string& level);

}  // namespace ibdisk
