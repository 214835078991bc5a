#pragma once
// Runs a child process for tests: argv in, exit status and combined stdout+stderr out.
#include <optional>
#include <string>
#include <vector>

namespace ibdisk::testing {

struct ProcessResult {
  int exit_code = -1;  // 128+N when killed by signal N
  std::string output;
};

class Child {
 public:
  explicit Child(const std::vector<std::string>& argv);
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;
  ~Child();  // kills the child if still running
  // Reads until the output contains `needle` or timeout_ms passes; returns whether it did.
  bool wait_for_output(const std::string& needle, int timeout_ms);
  ProcessResult wait(int timeout_ms = 120000);
  // Collects what output is ready without blocking; the result once the child has exited.
  std::optional<ProcessResult> try_wait();
  const std::string& output() const { return output_; }
  int pid() const { return pid_; }

 private:
  void drain(int timeout_ms);
  int pid_ = -1;
  int fd_ = -1;
  std::string output_;
};

inline ProcessResult run(const std::vector<std::string>& argv, int timeout_ms = 120000) {
  return Child(argv).wait(timeout_ms);
}

}  // namespace ibdisk::testing
