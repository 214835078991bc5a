// ibdisk: export a disk over RDMA with TCP fallback, and the tools to set up and measure
// the link. One executable; every subcommand lives in its own group (see cli/commands.h).
#include <malloc.h>

#include <algorithm>
#include <cstring>
#include <iostream>
#include <map>

#include "cli/commands.h"
#include "cli/config.h"
#include "common/error.h"
#include "common/log.h"
#include "common/version.h"

namespace {

using namespace ibdisk;

constexpr const char* kGlobalFooter =
    "Global options, before or after the subcommand: --log-level LEVEL, --config FILE (TOML).\n"
    "Exit status: 0 success, 1 runtime error, 2 usage error (setup doctor: see its --help).";

// The value of a global option wherever it stands, "" when absent.
std::string find_global(const std::vector<std::string>& args, const std::string& name) {
  for (std::size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--") break;
    if (args[i] == name && i + 1 < args.size()) return args[i + 1];
    if (args[i].rfind(name + "=", 0) == 0) return args[i].substr(name.size() + 1);
  }
  return {};
}

// The first word that is neither an option nor the value of a global one: the subcommand.
std::string first_word(const std::vector<std::string>& args) {
  for (std::size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--log-level" || args[i] == "--config") {
      ++i;
      continue;
    }
    if (!args[i].empty() && args[i][0] != '-') return args[i];
  }
  return {};
}

void add_footers(CLI::App& app) {
  for (CLI::App* sub : app.get_subcommands({})) {
    sub->footer(sub->get_footer().empty() ? std::string(kGlobalFooter) : sub->get_footer() + "\n" + kGlobalFooter);
    add_footers(*sub);
  }
}

}  // namespace

int main(int argc, char** argv) {
  // One malloc arena for every thread, set before any thread starts. librdmacm up to rdma-core
  // 51 (Debian 12 has 44) sorts its device list with a comparator that truncates pointer
  // differences to int (fixed upstream in c4a5ac8b); ibv_device objects that libibverbs makes in
  // different threads' arenas lie further apart than that, so after an RDMA device went and came
  // back its list could lose every entry, and its next initialisation deadlocked on its own
  // mutex: the chaos suite caught a target whose RDMA listener never came back that way. One
  // arena keeps the objects close (a 1 GiB copy over loopback took as long either way).
  ::mallopt(M_ARENA_MAX, 1);
  std::vector<std::string> args(argv + 1, argv + argc);
  // `ibdisk help [SUBCOMMAND...]` is `ibdisk [SUBCOMMAND...] --help`.
  if (!args.empty() && args[0] == "help") {
    args.erase(args.begin());
    args.emplace_back("--help");
  }

  CLI::App app{"ibdisk: export a disk from one Linux server to another over RDMA (InfiniBand or RoCE),\n"
               "falling back to TCP when RDMA is unavailable.",
               "ibdisk"};
  // Subcommands hand options they do not know to their parent: global options go anywhere.
  app.fallthrough();
  app.set_version_flag("-V,--version", std::string("ibdisk ") + kVersion);
  app.require_subcommand(1);
  app.set_config("--config", "", "read options from this TOML file: tables named after subcommands, e.g. [serve]");
  auto config = std::make_shared<cli::TomlConfig>(app);
  if (const std::string path = find_global(args, "--config"); !path.empty()) config->set_source(path);
  app.config_formatter(config);
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
  cli::add_info_commands(app, on_run);
  add_footers(app);
  // After the subcommands, which would inherit it.
  app.footer("Run `ibdisk help SUBCOMMAND` or `ibdisk SUBCOMMAND --help` for the options of one subcommand.\n" +
             std::string(kGlobalFooter));

  std::vector<char*> cargv{argv[0]};
  for (auto& a : args) cargv.push_back(a.data());
  try {
    app.parse(static_cast<int>(cargv.size()), cargv.data());
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help, --version
    const auto subs = app.get_subcommands({});
    const std::string word = first_word(args);
    const bool known = std::any_of(subs.begin(), subs.end(), [&](const CLI::App* s) { return s->get_name() == word; });
    if (!word.empty() && !known && app.get_subcommands().empty()) {
      std::cerr << "ibdisk: unknown subcommand '" << word << "'. Subcommands:";
      for (const auto* sub : subs) std::cerr << ' ' << sub->get_name();
      std::cerr << "\nRun `ibdisk help` for what each does.\n";
      return cli::kExitUsage;
    }
    app.exit(e);
    return cli::kExitUsage;
  }
  std::string context = "ibdisk";
  try {
    set_log_level(log_level);
    for (CLI::App* sub = app.get_subcommands().empty() ? nullptr : app.get_subcommands().front(); sub;
         sub = sub->get_subcommands().empty() ? nullptr : sub->get_subcommands().front()) {
      context += " " + sub->get_name();
    }
    for (auto* sub : app.get_subcommands()) {
      if (auto it = runners.find(sub); it != runners.end()) return it->second();
    }
    std::cerr << "ibdisk: no subcommand ran\n";
    return cli::kExitUsage;
  } catch (const cli::UsageError& e) {
    std::cerr << context << ": " << e.what() << "\nRun `" << context << " --help` for the options.\n";
    return cli::kExitUsage;
  } catch (const std::invalid_argument& e) {
    std::cerr << context << ": " << e.what() << "\nRun `" << context << " --help` for the options.\n";
    return cli::kExitUsage;
  } catch (const std::exception& e) {
    std::cerr << context << ": " << e.what() << '\n';
    return cli::kExitFailure;
  }
}
