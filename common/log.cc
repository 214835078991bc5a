#include "common/log.h"

#include <stdexcept>

#include <spdlog/sinks/stdout_color_sinks.h>

namespace ibdisk {

std::shared_ptr<spdlog::logger> logger(const std::string& component) {
  if (auto existing = spdlog::get(component)) return existing;
  try {
    auto created = spdlog::stderr_color_mt(component);
    created->set_level(spdlog::get_level());
    created->set_pattern("%^%L%$ %H:%M:%S.%e %n: %v");
    return created;
  } catch (const spdlog::spdlog_ex&) {
    return spdlog::get(component);  // another thread created it first
  }
}

void set_log_level(const std::string& level) {
  const auto parsed = spdlog::level::from_str(level);
  if (parsed == spdlog::level::off && level != "off") {
    throw std::invalid_argument("unknown log level '" + level +
                                "': use trace, debug, info, warn, error or off");
  }
  spdlog::set_level(parsed);
  spdlog::apply_all([parsed](const std::shared_ptr<spdlog::logger>& l) { l->set_level(parsed); });
}

}  // namespace ibdisk
