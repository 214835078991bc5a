#pragma once
// Where the fixtures and golden files are, and a golden comparison that can rewrite itself.
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <sys/wait.h>

#include <gtest/gtest.h>

namespace ibdisk::testing {

inline std::string fixture(const std::string& name) {
  return std::string(IBDISK_SOURCE_DIR) + "/tests/fixtures/sysfs/" + name;
}
inline std::string source_path(const std::string& rel) { return std::string(IBDISK_SOURCE_DIR) + "/" + rel; }

inline std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Compares `actual` with tests/setup/golden/NAME; IBDISK_UPDATE_GOLDEN=1 writes it instead.
inline void expect_golden(const std::string& name, const std::string& actual) {
  const std::string path = source_path("tests/setup/golden/" + name);
  if (const char* u = std::getenv("IBDISK_UPDATE_GOLDEN"); u && std::string(u) == "1") {
    std::ofstream(path, std::ios::binary) << actual;
    return;
  }
  std::ifstream probe(path);
  ASSERT_TRUE(probe.good()) << path << " is missing; run with IBDISK_UPDATE_GOLDEN=1 to create it";
  EXPECT_EQ(slurp(path), actual) << "golden file " << path << " differs (IBDISK_UPDATE_GOLDEN=1 rewrites it)";
}

struct CommandResult {
  int status = -1;
  std::string output;
};

// Runs a shell command line, capturing stdout (stderr goes to the test log).
inline CommandResult run_command(const std::string& cmd) {
  CommandResult r;
  FILE* p = ::popen(cmd.c_str(), "r");
  if (!p) return r;
  char buf[4096];
  std::size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) r.output.append(buf, n);
  const int st = ::pclose(p);
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  return r;
}

}  // namespace ibdisk::testing
