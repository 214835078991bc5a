// ibdisk: export a disk over RDMA with TCP fallback, and the tools to set up and measure
// the link. One executable; every subcommand lives in its own group (see cli/commands.h).
#include <algorithm>
#include <iostream>
#include <map>

#include "cli/commands.h"
#include "common/error.h"
#include "common/log.h"
#include "common/version.h"

int main(int argc, char** argv) {
  using namespace ibdisk;
  CLI::App app{"ibdisk: export a disk from one Linux server to another over RDMA (InfiniBand or RoCE),\n"
               "falling back to TCP when RDMA is unavailable.",
               "ibdisk"};
  app.set_version_flag("-V,--version", std::string("ibdisk ") + kVersion);
  app.require_subcommand(1);
  app.set_config("--config", "", "read options from this TOML/INI file (sections named after subcommands)");
  app.footer("Run `ibdisk SUBCOMMAND --help` for the options of one subcommand.");
  std::string log_level = "info";
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error or off")
      ->capture_default_str()
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error", "off"}));

  std::map<CLI::App*, cli::Runner> runners;
  const auto on_run = [&runners](CLI::App* sub, cli::Runner r) { runners[sub] = std::move(r); };
  cli::add_demo(app, on_run);
  cli::add_serve(app, on_run);
  cli::add_client_commands(app, on_run);
  cli::add_attach_commands(app, on_run);
  cli::add_selftest(app, on_run);
  cli::add_bench(app, on_run);
  cli::add_setup(app, on_run);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const auto subs = app.get_subcommands({});
    const bool known = argc > 1 && std::any_of(subs.begin(), subs.end(),
                                               [&](const CLI::App* s) { return s->get_name() == argv[1]; });
    if (e.get_exit_code() != 0 && argc > 1 && argv[1][0] != '-' && !known) {
      std::cerr << "ibdisk: unknown subcommand '" << argv[1] << "'. Subcommands:";
      for (const auto* sub : subs) std::cerr << ' ' << sub->get_name();
      std::cerr << "\nRun `ibdisk --help` for what each does.\n";
      return 2;
    }
    return app.exit(e);
  }
  try {
    set_log_level(log_level);
    for (auto* sub : app.get_subcommands()) {
      if (auto it = runners.find(sub); it != runners.end()) return it->second();
    }
    std::cerr << "ibdisk: no subcommand ran\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "ibdisk: " << e.what() << '\n';
    return 2;
  }
}
