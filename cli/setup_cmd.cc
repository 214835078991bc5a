// `ibdisk setup`: inventory (status), diagnosis (doctor) and system changes (plan, apply,
// undo) for InfiniBand, IPoIB and RoCE hosts. Everything reads and writes under --root.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>

#include "cli/commands.h"
#include "common/error.h"
#include "setup/doctor.h"
#include "setup/inventory.h"
#include "setup/mstconfig.h"
#include "setup/report.h"

namespace ibdisk::cli {
namespace {

using namespace ibdisk::setup;

// Doctor's exit status when it could not look at all (bad --root, unreadable input).
constexpr int kDoctorFailed = 3;

std::string read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw SystemError("reading " + path, errno, "pass the file that `mstconfig query` printed");
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// `mstconfig query` output: from --mstconfig FILE, else from running mstconfig on the live
// system when it is installed; empty when neither.
std::vector<MstDevice> load_mstconfig(const Root& root, const std::string& file) {
  if (!file.empty()) return parse_mstconfig_query(read_text_file(file));
  if (!root.is_live()) return {};
  for (const char* bin : {"/usr/bin/mstconfig", "/usr/sbin/mstconfig"}) {
    if (!root.exists(bin)) continue;
    std::string text;
    if (FILE* p = ::popen((std::string(bin) + " query 2>/dev/null").c_str(), "r")) {
      char buf[4096];
      std::size_t n;
      while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) text.append(buf, n);
      ::pclose(p);
    }
    return parse_mstconfig_query(text);
  }
  return {};
}

void check_root(const std::string& dir) {
  std::error_code ec;
  if (!std::filesystem::is_directory(dir, ec)) {
    throw SystemError("--root " + dir, "not a directory", "give the directory that holds sys/, proc/ and etc/ (default /)");
  }
}

struct Common {
  std::string root = "/";
  bool json = false;
  std::string mstconfig;
};

void add_root_option(CLI::App* sub, Common& c) {
  sub->add_option("--root", c.root,
                  "Read (and write) sysfs, procfs and /etc under DIR instead of / (fixture trees, test roots)")
      ->capture_default_str();
}

}  // namespace

void add_setup(CLI::App& app, const std::function<void(CLI::App*, Runner)>& top_on_run) {
  auto* setup = app.add_subcommand("setup", "Inventory, diagnosis and configuration of InfiniBand/RoCE/IPoIB on this host");
  setup->require_subcommand(1);
  setup->footer("See docs/setup.md for every finding and for what apply writes.");
  auto common = std::make_shared<Common>();
  // main() dispatches on top-level subcommands only; `setup` dispatches to its own.
  auto runners = std::make_shared<std::map<CLI::App*, Runner>>();
  const auto on_run = [runners](CLI::App* sub, Runner r) { (*runners)[sub] = std::move(r); };
  top_on_run(setup, [setup, runners] {
    for (auto* sub : setup->get_subcommands()) {
      if (auto it = runners->find(sub); it != runners->end()) return it->second();
    }
    std::cerr << "ibdisk setup: no subcommand ran\n";
    return 2;
  });

  auto* status = setup->add_subcommand("status", "Print RDMA ports, PCIe links, net devices, modules, memlock, sysctl and subnet manager");
  add_root_option(status, *common);
  status->add_flag("--json", common->json, "Print JSON instead of tables");
  on_run(status, [common] {
    check_root(common->root);
    const auto inv = read_inventory(Root(common->root));
    if (common->json) {
      std::cout << status_json(inv).dump(2) << "\n";
    } else {
      std::cout << format_status(inv);
    }
    return 0;
  });

  auto* doctor = setup->add_subcommand(
      "doctor", "Find what is wrong with the fabric setup, with the reason and the exact fix.\n"
                "Exit status: 0 healthy, 1 warnings, 2 errors, 3 could not run");
  add_root_option(doctor, *common);
  doctor->add_flag("--json", common->json, "Print JSON instead of text");
  doctor->add_option("--mstconfig", common->mstconfig,
                     "File holding `mstconfig query` output (default: run mstconfig when installed and --root is /)");
  on_run(doctor, [common] {
    try {
      check_root(common->root);
      const Root root(common->root);
      const auto inv = read_inventory(root);
      const auto findings = diagnose(inv, load_mstconfig(root, common->mstconfig));
      if (common->json) {
        std::cout << findings_json(findings).dump(2) << "\n";
      } else {
        std::cout << format_findings(findings);
      }
      return exit_status(findings);
    } catch (const std::exception& e) {
      std::cerr << "ibdisk setup doctor: " << e.what() << "\n";
      return kDoctorFailed;
    }
  });
}

}  // namespace ibdisk::cli
