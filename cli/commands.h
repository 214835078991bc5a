#pragma once
// Each group of subcommands registers itself on the top-level app; the returned callback
// runs when that subcommand was chosen and gives the process exit status.
#include <functional>

#include <CLI/CLI.hpp>

namespace ibdisk::cli {

using Runner = std::function<int()>;
using Register = std::function<void(CLI::App& app, std::function<void(CLI::App*, Runner)> on_run)>;

void add_selftest(CLI::App& app, const std::function<void(CLI::App*, Runner)>& on_run);
void add_bench(CLI::App& app, const std::function<void(CLI::App*, Runner)>& on_run);
void add_setup(CLI::App& app, const std::function<void(CLI::App*, Runner)>& on_run);
void add_demo(CLI::App& app, const std::function<void(CLI::App*, Runner)>& on_run);
void add_serve(CLI::App& app, const std::function<void(CLI::App*, Runner)>& on_run);
void add_client_commands(CLI::App& app, const std::function<void(CLI::App*, Runner)>& on_run);
void add_attach_commands(CLI::App& app, const std::function<void(CLI::App*, Runner)>& on_run);

}  // namespace ibdisk::cli
