// `ibdisk setup`: inventory (status), diagnosis (doctor) and system changes (plan, apply,
// undo) for InfiniBand, IPoIB and RoCE hosts. Everything reads and writes under --root.
#include <algorithm>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>

#include "cli/commands.h"
#include "common/error.h"
#include "common/json.h"
#include "setup/diff.h"
#include "setup/doctor.h"
#include "setup/inventory.h"
#include "setup/mstconfig.h"
#include "setup/plan.h"
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
  PlanOptions plan;
  std::string network;
  std::string slaves;
  bool no_commands = false;
  bool run_commands = false;
  bool all = false;
};

void add_plan_options(CLI::App* sub, Common& c) {
  std::string names;
  for (const auto& k : plan_components()) names += (names.empty() ? "" : ", ") + k;
  sub->add_option("components", c.plan.components, "What to configure, one or more of: " + names)
      ->required()
      ->check(CLI::IsMember(plan_components()));
  sub->add_option("--iface", c.plan.iface, "ipoib: the IPoIB interface (ib0)");
  sub->add_option("--address", c.plan.address, "ipoib, bond: IPv4 address with prefix (10.30.0.1/24; ipoib keeps the current one by default)");
  sub->add_option("--network", c.network, "ipoib, bond: ifupdown, networkd or networkmanager (default: what the host uses)")
      ->check(CLI::IsMember({"ifupdown", "networkd", "networkmanager"}));
  sub->add_option("--mtu", c.plan.mtu, "ipoib: MTU in connected mode")->capture_default_str()->check(CLI::Range(1280, 65520));
  sub->add_option("--guid", c.plan.guid, "sm: port GUID opensm binds to (default: the InfiniBand port without a subnet manager)");
  sub->add_option("--device", c.plan.device, "port-type: PCI address of the card (0000:05:00.0)");
  sub->add_option("--port", c.plan.port, "port-type: port number (1 or 2)");
  sub->add_option("--link-type", c.plan.link_type, "port-type: ib, eth or vpi")->check(CLI::IsMember({"ib", "eth", "vpi"}));
  sub->add_option("--mstconfig", c.mstconfig, "port-type: file with `mstconfig query` output (default: run mstconfig when --root is /)");
  sub->add_option("--rename", c.plan.renames, "names: OLD=NEW, persistent name by hardware address (repeat the option)")
      ->allow_extra_args(false);
  sub->add_option("--netdev", c.plan.netdev, "soft-roce: the Ethernet interface to run Soft-RoCE on");
  sub->add_option("--rxe-name", c.plan.rxe_name, "soft-roce: name of the RDMA device (default rxe_NETDEV)");
  sub->add_option("--bond-name", c.plan.bond_name, "bond: the bond interface")->capture_default_str();
  sub->add_option("--bond-mode", c.plan.bond_mode, "bond: active-backup or balance-rr")
      ->check(CLI::IsMember({"active-backup", "balance-rr"}));
  sub->add_option("--slaves", c.slaves, "bond: the member interfaces, comma-separated (eth40a,eth40b)");
}

Plan build_plan(Common& c, const Root& root) {
  check_root(c.root);
  if (c.network == "ifupdown") c.plan.network = NetworkSystem::kIfupdown;
  if (c.network == "networkd") c.plan.network = NetworkSystem::kNetworkd;
  if (c.network == "networkmanager") c.plan.network = NetworkSystem::kNetworkManager;
  c.plan.slaves.clear();
  std::stringstream ss(c.slaves);
  for (std::string s; std::getline(ss, s, ',');) {
    if (!s.empty()) c.plan.slaves.push_back(s);
  }
  if (std::find(c.plan.components.begin(), c.plan.components.end(), "port-type") != c.plan.components.end()) {
    c.plan.mst = load_mstconfig(root, c.mstconfig);
  }
  return make_plan(root, read_inventory(root), c.plan);
}

// The plan for scripts: each file with its new content and the diff from the current one.
Json plan_json(const Root& root, const Plan& p) {
  Json files = Json::array();
  for (const auto& f : p.files) {
    Json j = {{"path", f.path}, {"why", f.why}, {"mode", f.mode}};
    if (!f.link_target.empty()) {
      j["action"] = "symlink";
      j["link_target"] = f.link_target;
    } else if (!f.content) {
      j["action"] = "remove";
    } else {
      j["action"] = "write";
      j["content"] = *f.content;
    }
    if (f.link_target.empty()) {
      const auto old = root.read(f.path);
      j["diff"] = unified_diff(old.value_or(""), f.content.value_or(""), old ? "a" + f.path : "/dev/null",
                               f.content ? "b" + f.path : "/dev/null");
    }
    files.push_back(j);
  }
  Json writes = Json::array();
  for (const auto& w : p.writes) writes.push_back({{"path", w.path}, {"value", w.value}, {"old_value", w.old_value}});
  Json commands = Json::array();
  for (const auto& c : p.commands) {
    commands.push_back({{"argv", c.argv}, {"why", c.why}, {"undo", c.undo}, {"needs_systemd", c.needs_systemd}});
  }
  return {{"components", p.components}, {"empty", p.empty()}, {"files", files},
          {"kernel_writes", writes},    {"commands", commands}, {"notes", p.notes}};
}

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
      std::cout << json_document(status_json(inv));
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
        Json j = findings_json(findings);
        j["exit_status"] = exit_status(findings);
        std::cout << json_document(j);
      } else {
        std::cout << format_findings(findings);
      }
      return exit_status(findings);
    } catch (const std::exception& e) {
      std::cerr << "ibdisk setup doctor: " << e.what() << "\n";
      return kDoctorFailed;
    }
  });

  auto* plan = setup->add_subcommand(
      "plan", "Show what apply would change: unified diffs of the files, kernel settings and commands. Changes nothing");
  add_root_option(plan, *common);
  add_plan_options(plan, *common);
  plan->add_flag("--json", common->json, "Print JSON instead of diffs");
  on_run(plan, [common] {
    const Root root(common->root);
    const Plan p = build_plan(*common, root);
    std::cout << (common->json ? json_document(plan_json(root, p)) : format_plan(root, p));
    return 0;
  });

  auto* apply = setup->add_subcommand(
      "apply", "Make the changes plan shows; idempotent, with a journal and backups for undo.\n"
               "Commands (modprobe, systemctl, rdma, mstconfig) run only when --root is /");
  add_root_option(apply, *common);
  add_plan_options(apply, *common);
  apply->add_flag("--no-commands", common->no_commands, "Write files and kernel settings only; print the commands instead of running them");
  apply->add_flag("--run-commands", common->run_commands,
                  "Run the commands although --root is not / (a root whose sys/ and proc/ are the live ones, bind-mounted)");
  on_run(apply, [common] {
    const Root root(common->root);
    const auto p = build_plan(*common, root);
    std::cout << format_plan(root, p);
    const auto r = apply_plan(root, p, (root.is_live() || common->run_commands) && !common->no_commands);
    std::cout << "\n";
    for (const auto& line : r.log) std::cout << "apply: " << line << "\n";
    if (!r.journal.empty()) std::cout << "apply: journal " << root.at(r.journal).string() << " (`ibdisk setup undo` reverts)\n";
    if (!r.ok) std::cerr << "ibdisk setup apply: a command failed; the steps before it stay applied (`ibdisk setup undo` reverts them)\n";
    return r.ok ? 0 : 1;
  });

  auto* undo = setup->add_subcommand("undo", "Revert the last apply (or all of them): files byte for byte, kernel settings, commands");
  add_root_option(undo, *common);
  undo->add_flag("--all", common->all, "Revert every apply, newest first");
  undo->add_flag("--no-commands", common->no_commands, "Do not run the undo commands (rdma link delete, systemctl disable, ...)");
  undo->add_flag("--run-commands", common->run_commands, "Run the undo commands although --root is not /");
  on_run(undo, [common] {
    check_root(common->root);
    const Root root(common->root);
    const auto r = undo_last(root, (root.is_live() || common->run_commands) && !common->no_commands, common->all);
    for (const auto& line : r.log) std::cout << "undo: " << line << "\n";
    return r.ok ? 0 : 1;
  });
}

}  // namespace ibdisk::cli
