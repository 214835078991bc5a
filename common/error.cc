#include "common/error.h"

#include <cstring>

namespace ibdisk {
namespace {
std::string compose(const std::string& call, const std::string& reason, const std::string& hint) {
  std::string msg = call + " failed";
  if (!reason.empty()) msg += ": " + reason;
  if (!hint.empty()) msg += " (" + hint + ")";
  return msg;
}
}  // namespace

SystemError::SystemError(std::string call, int err, std::string hint)
    : std::runtime_error(compose(call, err ? errno_text(err) : "", hint)), call_(std::move(call)),
      err_(err), hint_(std::move(hint)) {}

SystemError::SystemError(std::string call, std::string reason, std::string hint, int err)
    : std::runtime_error(compose(call, reason, hint)), call_(std::move(call)), err_(err),
      hint_(std::move(hint)) {}

std::string errno_text(int err) {
  char buf[256];
  // GNU strerror_r returns the message pointer, which may or may not be buf.
  return ::strerror_r(err, buf, sizeof buf);
}

}  // namespace ibdisk
