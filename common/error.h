#pragma once
// Setup-path errors: what failed, why (errno text), and what to do about it.
// The datapath never throws; it returns negative errno values instead.
#include <stdexcept>
#include <string>

namespace ibdisk {

class SystemError : public std::runtime_error {
 public:
  // call: the failing call or action ("rdma_bind_addr(10.0.0.1:7420)"); err: an errno value
  // (0 if none); hint: one sentence telling the user what to do.
  SystemError(std::string call, int err, std::string hint = {});
  // The same, with the reason given as text instead of an errno value.
  SystemError(std::string call, std::string reason, std::string hint = {}, int err = 0);

  const std::string& call() const { return call_; }
  int error_code() const { return err_; }
  const std::string& hint() const { return hint_; }

 private:
  std::string call_;
  int err_;
  std::string hint_;
};

// strerror_r wrapper that always returns the message text.
std::string errno_text(int err);

}  // namespace ibdisk
