#pragma once
// `ibdisk setup plan|apply|undo`: the system changes that fix what doctor finds. A plan is
// computed from the inventory and the files under the root; it holds only what differs, so
// an applied plan plans nothing. Apply keeps a journal with backups; undo replays it back.
#include <optional>
#include <string>
#include <vector>

#include "setup/inventory.h"
#include "setup/mstconfig.h"
#include "setup/root.h"

namespace ibdisk::setup {

// A configuration file (or symlink) as it should be after apply.
struct FileChange {
  std::string path;                    // system path, e.g. /etc/sysctl.d/60-ibdisk-ipoib.conf
  std::optional<std::string> content;  // nullopt: the file is removed
  std::string link_target;             // non-empty: a symlink to this, content unused
  unsigned mode = 0644;
  std::string why;                     // which component and what for
};

// A kernel attribute written now (sysfs, /proc/sys): takes effect at once, lost at reboot.
struct AttrWrite {
  std::string path;
  std::string value;
  std::string old_value;
};

struct Command {
  std::vector<std::string> argv;
  std::string why;
  std::vector<std::string> undo;  // what reverts it; empty: nothing to revert
  bool needs_systemd = false;     // skipped (with a note) where systemd is not running
};

struct Plan {
  std::vector<std::string> components;
  std::vector<FileChange> files;
  std::vector<AttrWrite> writes;
  std::vector<Command> commands;
  std::vector<std::string> notes;
  bool empty() const { return files.empty() && writes.empty() && commands.empty(); }
};

struct PlanOptions {
  std::vector<std::string> components;
  // ipoib, bond
  std::string iface;
  std::string address;                   // "10.30.0.1/24"
  std::optional<NetworkSystem> network;  // default: what the host uses
  int mtu = 65520;
  // sm
  std::string guid;
  // port-type
  std::string device;
  int port = 0;
  std::string link_type;
  std::vector<MstDevice> mst;
  // names: OLD=NEW
  std::vector<std::string> renames;
  // soft-roce
  std::string netdev;
  std::string rxe_name;
  // bond
  std::string bond_name = "bond0";
  std::string bond_mode;
  std::vector<std::string> slaves;
};

// Every component name `plan` accepts, in the order they are applied.
const std::vector<std::string>& plan_components();

// Throws SystemError naming the option that is missing or wrong and how to give it.
Plan make_plan(const Root& root, const Inventory& inv, const PlanOptions& opts);

// Unified diffs of the files, then kernel writes, commands and notes; "Nothing to do." when empty.
std::string format_plan(const Root& root, const Plan& plan);

// Shell-quoted command line for display.
std::string shell_join(const std::vector<std::string>& argv);

struct ApplyResult {
  std::string journal;          // journal directory (system path), "" when nothing was done
  std::vector<std::string> log; // one line per action
  bool ok = true;
};

// run_commands: execute the plan's commands (only sensible on the live root). Stops at the
// first failing command; the journal keeps what was done so `undo` can revert it.
ApplyResult apply_plan(const Root& root, const Plan& plan, bool run_commands);

// Reverts the most recent apply (all of them with all=true): files byte for byte, kernel
// writes to their old values, and the recorded undo commands when run_commands.
ApplyResult undo_last(const Root& root, bool run_commands, bool all);

// Where the journal lives under the root.
inline constexpr const char* kJournalDir = "/var/lib/ibdisk/setup/journal";

}  // namespace ibdisk::setup
