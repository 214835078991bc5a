// `ibdisk version`, `help` and `completion`: what this binary is and how to drive it.
#include <sys/utsname.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <sstream>
#include <iostream>

#include <boost/version.hpp>
#include <google/protobuf/stubs/common.h>
#include <openssl/crypto.h>
#include <spdlog/version.h>

#include "cli/build_info.h"
#include "cli/commands.h"
#include "common/error.h"
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
  for (const CLI::App* s : app.get_subcommands({})) {
    if (!s->get_group().empty()) subs += (subs.empty() ? "" : " ") + s->get_name();
  }
  option_words(app, values, flags);
  const auto options = app.get_options();
  const bool positional = std::any_of(options.begin(), options.end(), [](const CLI::Option* o) { return o->get_positional(); });
  out += "  subs[\"" + path + "\"]=\"" + subs + "\"; values[\"" + path + "\"]=\"" + values + "\"; flags[\"" + path +
         "\"]=\"" + flags + "\"; args[\"" + path + "\"]=" + (positional ? "1" : "0") + "\n";
  for (const CLI::App* s : app.get_subcommands({})) {
    if (s->get_group().empty()) continue;
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

// --- man pages -----------------------------------------------------------------------------
// The options of each page come from the same CLI11 tree as --help; the prose sections from
// docs/man/PAGE.man.in ("[SECTION]" lines, then roff).

std::string roff_escape(const std::string& text) {
  std::string out;
  bool line_start = true;
  for (const char c : text) {
    if (line_start && (c == '.' || c == '\'')) out += "\\&";
    if (c == '\\') out += "\\e";
    else if (c == '-') out += "\\-";
    else out.push_back(c);
    line_start = c == '\n';
  }
  return out;
}

// Help text lines as roff: lines indented like examples become no-fill blocks.
std::string roff_text(const std::string& text) {
  std::string out;
  bool nofill = false;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) {
    const bool example = line.rfind("  ", 0) == 0;
    if (example != nofill) out += example ? ".nf\n" : ".fi\n";
    nofill = example;
    out += roff_escape(example ? line.substr(2) : line) + "\n";
  }
  if (nofill) out += ".fi\n";
  return out;
}

std::string roff_options(const CLI::App& sub) {
  std::string out;
  for (const CLI::Option* o : sub.get_options()) {
    if (o->get_lnames().size() == 1 && o->get_lnames()[0] == "help") continue;
    std::string names;
    if (o->nonpositional()) {
      for (const auto& n : o->get_snames()) names += (names.empty() ? "" : ", ") + std::string("\\fB\\-") + n + "\\fR";
      for (const auto& n : o->get_lnames()) names += (names.empty() ? "" : ", ") + std::string("\\fB\\-\\-") + roff_escape(n) + "\\fR";
    } else {
      names = "\\fI" + roff_escape(o->get_name()) + "\\fR";
    }
    if (o->nonpositional() && o->get_items_expected_min() > 0) names += " \\fI" + roff_escape(o->get_type_name()) + "\\fR";
    std::string desc = o->get_description();
    if (!o->get_default_str().empty() && o->get_items_expected_min() > 0) desc += " (default " + o->get_default_str() + ")";
    if (o->get_required()) desc += " (required)";
    out += ".TP\n" + names + "\n" + roff_escape(desc) + "\n";
  }
  return out;
}

// [SECTION] blocks of an include file, in order.
std::vector<std::pair<std::string, std::string>> read_sections(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw SystemError("reading " + path, errno);
  std::vector<std::pair<std::string, std::string>> out;
  for (std::string line; std::getline(in, line);) {
    if (line.size() > 2 && line.front() == '[' && line.back() == ']') {
      out.emplace_back(line.substr(1, line.size() - 2), "");
    } else if (!out.empty()) {
      out.back().second += line + "\n";
    }
  }
  return out;
}

int run_manpage(const CLI::App& app, const std::string& page, const std::string& title,
                const std::vector<std::string>& includes, const std::vector<std::string>& commands) {
  std::vector<const CLI::App*> subs;
  for (const auto& c : commands) {
    const CLI::App* a = &app;
    std::istringstream words(c);
    for (std::string w; words >> w;) a = a->get_subcommand(w);
    subs.push_back(a);
  }
  if (subs.empty()) subs.push_back(&app);
  std::vector<std::pair<std::string, std::string>> sections;
  for (const auto& f : includes) {
    for (auto& s : read_sections(f)) sections.push_back(std::move(s));
  }
  const auto section = [&](const std::string& name) {
    std::string text;
    for (const auto& [n, t] : sections) {
      if (n == name) text += t;
    }
    return text;
  };
  const char* epoch = std::getenv("SOURCE_DATE_EPOCH");
  const std::time_t t = epoch ? static_cast<std::time_t>(std::strtoll(epoch, nullptr, 10)) : std::time(nullptr);
  char date[32];
  std::strftime(date, sizeof date, "%Y-%m-%d", std::gmtime(&t));
  std::string upper = page;
  for (auto& ch : upper) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
  std::cout << ".\\\" Generated by `ibdisk manpage` from the options of `ibdisk --help` and docs/man.\n"
            << ".TH " << roff_escape(upper) << " 8 " << date << " \"ibdisk " << kVersion << "\" \"ibdisk\"\n"
            << ".SH NAME\n" << roff_escape(page) << " \\- " << roff_escape(title) << "\n.SH SYNOPSIS\n";
  const auto full_name = [](const CLI::App* a) {
    std::string n;
    for (; a; a = a->get_parent()) n = a->get_name() + (n.empty() ? "" : " " + n);
    return n;
  };
  for (const CLI::App* s : subs) {
    std::string positional;
    for (const CLI::Option* o : s->get_options()) {
      if (!o->nonpositional()) positional += " " + std::string(o->get_required() ? "" : "[") + o->get_name() + (o->get_required() ? "" : "]");
    }
    std::cout << ".B " << roff_escape(full_name(s)) << "\n[\\fIOPTIONS\\fR]" << roff_escape(positional)
              << (s->get_subcommands({}).empty() ? "" : " \\fISUBCOMMAND\\fR") << "\n.br\n";
  }
  std::cout << ".SH DESCRIPTION\n" << section("DESCRIPTION");
  if (subs.size() == 1) {
    std::cout << ".PP\n" << roff_text(subs[0]->get_description()) << ".SH OPTIONS\n" << roff_options(*subs[0]);
    if (subs[0] == &app) {
      std::cout << ".SH SUBCOMMANDS\n";
      for (const CLI::App* s : app.get_subcommands({})) {
        if (s->get_group().empty()) continue;
        std::cout << ".TP\n\\fB" << roff_escape(s->get_name()) << "\\fR\n" << roff_text(s->get_description());
      }
    }
  } else {
    std::cout << ".SH COMMANDS\n";
    for (const CLI::App* s : subs) {
      std::cout << ".SS \"" << roff_escape(full_name(s)) << "\"\n" << roff_text(s->get_description()) << roff_options(*s);
    }
  }
  for (const auto& [name, text] : sections) {
    if (name != "DESCRIPTION") std::cout << ".SH " << name << "\n" << text;
  }
  return kExitOk;
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
    on_run(sub, [&app, shell] {  // shell lives as long as the runner: CLI11 writes into it
      std::cout << bash_completion(app);
      return kExitOk;
    });
  }
  {
    // Hidden (no group): the build writes the man pages with it (docs/man/CMakeLists.txt).
    struct ManArgs {
      std::string page, title;
      std::vector<std::string> includes, commands;
    };
    auto a = std::make_shared<ManArgs>();
    auto* sub = app.add_subcommand("manpage", "Write a man page (roff) for the given subcommands to stdout.")->group("");
    sub->add_option("--page", a->page, "page name, e.g. ibdisk-serve")->required();
    sub->add_option("--title", a->title, "what the page is about")->required();
    sub->add_option("--include", a->includes, "files of [SECTION] blocks of roff");
    sub->add_option("commands", a->commands, "subcommands, e.g. \"setup doctor\"");
    on_run(sub, [&app, a] { return run_manpage(app, a->page, a->title, a->includes, a->commands); });
  }
}

}  // namespace ibdisk::cli
