#pragma once
// Each group of subcommands registers itself on the top-level app; the returned callback
// runs when that subcommand was chosen and gives the process exit status.
#include <functional>
#include <stdexcept>

#include <CLI/CLI.hpp>

namespace ibdisk::cli {

// Exit status of every subcommand (setup doctor adds its findings: see its --help).
inline constexpr int kExitOk = 0;
inline constexpr int kExitFailure = 1;  // a runtime error: the target refused, a file failed...
inline constexpr int kExitUsage = 2;    // the command line or config is wrong

// A command line that parses but does not make sense (conflicting options, a bad value).
class UsageError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

using Runner = std::function<int()>;
using Register = std::function<void(CLI::App& app, std::function<void(CLI::App*, Runner)> on_run)>;

void add_selftest(CLI::App& app, const std::function<void(CLI::App*, Runner)>& on_run);
void add_bench(CLI::App& app, const std::function<void(CLI::App*, Runner)>& on_run);
void add_setup(CLI::App& app, const std::function<void(CLI::App*, Runner)>& on_run);
void add_demo(CLI::App& app, const std::function<void(CLI::App*, Runner)>& on_run);
void add_serve(CLI::App& app, const std::function<void(CLI::App*, Runner)>& on_run);
void add_client_commands(CLI::App& app, const std::function<void(CLI::App*, Runner)>& on_run);
void add_attach_commands(CLI::App& app, const std::function<void(CLI::App*, Runner)>& on_run);
// version, help, completion
void add_info_commands(CLI::App& app, const std::function<void(CLI::App*, Runner)>& on_run);

}  // namespace ibdisk::cli
