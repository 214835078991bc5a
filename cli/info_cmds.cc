// `ibdisk version`, `help` and `completion`: what this binary is and how to drive it.
#include <sys/utsname.h>

#include <algorithm>
#include <cstdio>
#include <iostream>

#include <boost/version.hpp>
#include <google/protobuf/stubs/common.h>
#include <openssl/crypto.h>
#include <spdlog/version.h>

#include "cli/build_info.h"
#include "cli/commands.h"
#include "common/json.h"
#include "common/version.h"

namespace ibdisk::cli {
namespace {

// Build-time versions come from pkg-config; OpenSSL and the kernel are read at run time.
std::vector<std::pair<std::string, std::string>> library_versions() {
  const std::string boost = std::to_string(BOOST_VERSION / 100000) + "." + std::to_string(BOOST_VERSION / 100 % 1000) +
                            "." + std::to_string(BOOST_VERSION % 100);
  return {
      {"libibverbs", kIbverbsVersion},
      {"librdmacm", kRdmacmVersion},
      {"liburing", kUringVersion},
      {"libsystemd", kSystemdVersion},
      {"openssl", OpenSSL_version(OPENSSL_VERSION)},
      {"protobuf", google::protobuf::internal::VersionString(GOOGLE_PROTOBUF_VERSION)},
      {"boost", boost},
      {"spdlog", std::to_string(SPDLOG_VER_MAJOR) + "." + std::to_string(SPDLOG_VER_MINOR) + "." +
                     std::to_string(SPDLOG_VER_PATCH)},
      {"cli11", CLI11_VERSION},
      {"tomlplusplus", kTomlVersion},
      {"nlohmann-json", std::to_string(NLOHMANN_JSON_VERSION_MAJOR) + "." + std::to_string(NLOHMANN_JSON_VERSION_MINOR) +
                            "." + std::to_string(NLOHMANN_JSON_VERSION_PATCH)},
  };
}

int run_version(bool json) {
  utsname u{};
  ::uname(&u);
  const std::string kernel = std::string(u.sysname) + " " + u.release + " " + u.machine;
  if (json) {
    Json libs = Json::object();
    for (const auto& [name, v] : library_versions()) libs[name] = v;
    std::cout << json_document({{"version", kVersion}, {"build_type", kBuildType}, {"compiler", kCompiler},
                                {"kernel", kernel}, {"libraries", libs}});
    return kExitOk;
  }
  std::printf("ibdisk %s (%s, %s)\nkernel %s\n", kVersion, kBuildType, kCompiler, kernel.c_str());
  for (const auto& [name, v] : library_versions()) std::printf("%-14s %s\n", name.c_str(), v.c_str());
  return kExitOk;
}

// The options of sub that take a value, and those that do not.
void option_words(const CLI::App& sub, std::string& with_value, std::string& flags) {
  for (const CLI::Option* o : sub.get_options()) {
    if (!o->nonpositional()) continue;
    std::string& into = o->get_items_expected_min() > 0 ? with_value : flags;
    for (const auto& n : o->get_lnames()) into += (into.empty() ? "--" : " --") + n;
    for (const auto& n : o->get_snames()) into += (into.empty() ? "-" : " -") + n;
  }
}

void completion_tables(const CLI::App& app, const std::string& path, std::string& out) {
  std::string subs, values, flags;
  for (const CLI::App* s : app.get_subcommands({})) subs += (subs.empty() ? "" : " ") + s->get_name();
  option_words(app, values, flags);
  const auto options = app.get_options();
  const bool positional = std::any_of(options.begin(), options.end(), [](const CLI::Option* o) { return o->get_positional(); });
  out += "  subs[\"" + path + "\"]=\"" + subs + "\"; values[\"" + path + "\"]=\"" + values + "\"; flags[\"" + path +
         "\"]=\"" + flags + "\"; args[\"" + path + "\"]=" + (positional ? "1" : "0") + "\n";
  for (const CLI::App* s : app.get_subcommands({})) {
    completion_tables(*s, path + " " + s->get_name(), out);
  }
}

// One bash function whose tables are this binary's own subcommands and options.
std::string bash_completion(const CLI::App& app) {
  std::string tables;
  completion_tables(app, "ibdisk", tables);
  return "# bash completion for ibdisk, written by `ibdisk completion bash`\n"
         "_ibdisk() {\n"
         "  local cur prev words cword\n"
         "  _init_completion || return\n"
         "  local -A subs values flags args\n" +
         tables +
         "  local path=ibdisk w i\n"
         "  for ((i = 1; i < cword; i++)); do\n"
         "    w=${words[i]}\n"
         "    if [[ \" ${subs[$path]} \" == *\" $w \"* ]]; then path=\"$path $w\"; fi\n"
         "  done\n"
         "  local global=\"--log-level --config --help\"\n"
         "  case $prev in\n"
         "    --log-level) COMPREPLY=($(compgen -W 'trace debug info warn error off' -- \"$cur\")); return ;;\n"
         "    --config) _filedir toml; return ;;\n"
         "  esac\n"
         "  if [[ \" ${values[$path]} \" == *\" $prev \"* ]]; then _filedir; return; fi\n"
         "  if [[ $cur == -* ]]; then\n"
         "    COMPREPLY=($(compgen -W \"${values[$path]} ${flags[$path]} $global\" -- \"$cur\"))\n"
         "  elif [[ -n ${subs[$path]} ]]; then\n"
         "    COMPREPLY=($(compgen -W \"${subs[$path]}\" -- \"$cur\"))\n"
         "  elif [[ ${args[$path]} == 1 ]]; then\n"
         "    _filedir\n"
         "  fi\n"
         "}\n"
         "complete -F _ibdisk ibdisk\n";
}

}  // namespace

void add_info_commands(CLI::App& app, const std::function<void(CLI::App*, Runner)>& on_run) {
  {
    auto json = std::make_shared<bool>(false);
    auto* sub = app.add_subcommand("version", "Print the version of ibdisk, its build, the kernel and the libraries it uses.");
    sub->add_flag("--json", *json, "print JSON instead of text");
    on_run(sub, [json] { return run_version(*json); });
  }
  // main() turns `help [SUBCOMMAND...]` into `[SUBCOMMAND...] --help` before parsing; this
  // entry lists it in `ibdisk --help` and the completion.
  app.add_subcommand("help", "Show the help of ibdisk or of one subcommand: `ibdisk help setup doctor`.")
      ->allow_extras();
  {
    auto shell = std::make_shared<std::string>("bash");
    auto* sub = app.add_subcommand("completion", "Print the shell completion script (bash): "
                                                 "`source <(ibdisk completion bash)`.");
    sub->add_option("shell", *shell, "the shell")->capture_default_str()->check(CLI::IsMember({"bash"}));
    on_run(sub, [&app] {
      std::cout << bash_completion(app);
      return kExitOk;
    });
  }
}

}  // namespace ibdisk::cli
