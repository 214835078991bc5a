// `ibdisk setup apply` and `undo`: a Plan's steps carried out under a journal (every file's
// old content kept in /var/lib/ibdisk/setup/journal/N), and the last journal rolled back.
#include "setup/plan.h"

#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/log.h"

namespace ibdisk::setup {
namespace fs = std::filesystem;
namespace {

using Json = nlohmann::ordered_json;

struct RunResult {
  int status;
  std::string output;
};

RunResult run(const std::vector<std::string>& argv) {
  std::string line;
  for (const auto& a : argv) line += shell_join({a}) + " ";
  line += "2>&1";
  RunResult r{-1, {}};
  FILE* p = ::popen(line.c_str(), "r");
  if (!p) return r;
  char buf[4096];
  std::size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) r.output.append(buf, n);
  const int st = ::pclose(p);
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : 128;
  return r;
}

void write_file_atomic(const fs::path& path, const std::string& content, unsigned mode) {
  const fs::path tmp = path.string() + ".ibdisk-tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw SystemError("writing " + tmp.string(), errno, "check that the directory is writable (run as root)");
    out << content;
    out.flush();
    if (!out) throw SystemError("writing " + tmp.string(), errno, "check free space and permissions");
  }
  if (::chmod(tmp.c_str(), mode) != 0) throw SystemError("chmod " + tmp.string(), errno);
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) throw SystemError("rename " + tmp.string() + " -> " + path.string(), ec.value());
}

// Sysfs and procfs attributes are written in place, never replaced.
void write_attr(const fs::path& path, const std::string& value) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) throw SystemError("opening " + path.string(), errno, "run as root; the interface or key must exist");
  out << value << "\n";
  out.flush();
  if (!out) throw SystemError("writing " + value + " to " + path.string(), errno, "the kernel refused the value");
}

std::string next_journal(const Root& root) {
  int last = 0;
  for (const auto& e : root.list(kJournalDir)) last = std::max(last, std::atoi(e.c_str()));
  char name[16];
  std::snprintf(name, sizeof name, "%04d", last + 1);
  return std::string(kJournalDir) + "/" + name;
}

void save_manifest(const Root& root, const std::string& jdir, const Json& m) {
  write_file_atomic(root.at(jdir + "/manifest.json"), m.dump(2) + "\n", 0600);
}

}  // namespace

ApplyResult apply_plan(const Root& root, const Plan& plan, bool run_commands) {
  ApplyResult r;
  if (plan.empty()) {
    r.log.push_back("nothing to do: the system already matches");
    return r;
  }
  const std::string jdir = next_journal(root);
  std::error_code ec;
  fs::create_directories(root.at(jdir + "/files"), ec);
  if (ec) throw SystemError("creating " + root.at(jdir).string(), ec.value(), "run as root");
  r.journal = jdir;
  Json m;
  m["version"] = 1;
  m["created"] = static_cast<std::int64_t>(std::time(nullptr));
  m["components"] = plan.components;
  m["files"] = Json::array();
  m["writes"] = Json::array();
  m["commands"] = Json::array();
  // Save after every step so an interrupted apply can still be undone.
  int idx = 0;
  for (const auto& f : plan.files) {
    const fs::path target = root.at(f.path);
    Json e;
    e["path"] = f.path;
    const auto st = fs::symlink_status(target, ec);
    if (!ec && fs::is_symlink(st)) {
      e["was"] = "symlink";
      e["link"] = fs::read_symlink(target).string();
    } else if (!ec && fs::exists(st)) {
      const std::string backup = "files/" + std::to_string(idx++);
      fs::copy_file(target, root.at(jdir + "/" + backup), fs::copy_options::overwrite_existing, ec);
      if (ec) throw SystemError("backing up " + target.string(), ec.value());
      struct stat s{};
      ::stat(target.c_str(), &s);
      e["was"] = "file";
      e["backup"] = backup;
      e["mode"] = s.st_mode & 07777;
    } else {
      e["was"] = "absent";
    }
    // Directories apply creates, deepest last, so undo can remove them.
    Json made = Json::array();
    std::vector<fs::path> missing;
    for (fs::path p = target.parent_path(); !p.empty() && !fs::exists(p); p = p.parent_path()) missing.push_back(p);
    std::reverse(missing.begin(), missing.end());
    for (const auto& p : missing) {
      fs::create_directory(p, ec);
      if (ec) throw SystemError("creating " + p.string(), ec.value(), "run as root");
      made.push_back(p.string());
    }
    e["made_dirs"] = made;
    m["files"].push_back(e);
    save_manifest(root, jdir, m);
    if (!f.link_target.empty()) {
      fs::remove(target, ec);
      fs::create_symlink(f.link_target, target, ec);
      if (ec) throw SystemError("symlink " + target.string() + " -> " + f.link_target, ec.value());
      r.log.push_back("linked " + f.path + " -> " + f.link_target);
    } else if (f.content) {
      if (fs::is_symlink(fs::symlink_status(target, ec))) fs::remove(target, ec);
      write_file_atomic(target, *f.content, f.mode);
      r.log.push_back("wrote " + f.path);
    } else {
      fs::remove(target, ec);
      r.log.push_back("removed " + f.path);
    }
  }
  for (const auto& w : plan.writes) {
    m["writes"].push_back({{"path", w.path}, {"old", w.old_value}});
    save_manifest(root, jdir, m);
    write_attr(root.at(w.path), w.value);
    r.log.push_back("set " + w.path + " = " + w.value);
  }
  const bool systemd = root.exists("/run/systemd/system");
  for (const auto& c : plan.commands) {
    if (!run_commands) {
      r.log.push_back("not run (root is not /; --run-commands runs them): " + shell_join(c.argv));
      continue;
    }
    if (c.needs_systemd && !systemd) {
      r.log.push_back("skipped, systemd is not running: " + shell_join(c.argv));
      continue;
    }
    const auto res = run(c.argv);
    m["commands"].push_back({{"argv", c.argv}, {"undo", c.undo}, {"status", res.status}});
    save_manifest(root, jdir, m);
    if (res.status != 0) {
      r.ok = false;
      r.log.push_back("FAILED (exit " + std::to_string(res.status) + "): " + shell_join(c.argv) + ": " + trim(res.output));
      break;
    }
    r.log.push_back("ran: " + shell_join(c.argv));
  }
  save_manifest(root, jdir, m);
  return r;
}

ApplyResult undo_last(const Root& root, bool run_commands, bool all) {
  ApplyResult r;
  for (;;) {
    const auto entries = root.list(kJournalDir);
    if (entries.empty()) {
      if (r.log.empty()) r.log.push_back(std::string("nothing to undo: no journal in ") + kJournalDir);
      return r;
    }
    const std::string jdir = std::string(kJournalDir) + "/" + entries.back();
    const auto text = root.read(jdir + "/manifest.json");
    if (!text) {
      throw SystemError("undo " + root.at(jdir).string(), "no manifest.json",
                        "the apply that made it was interrupted before its first step; remove the directory");
    }
    const auto m = Json::parse(*text);
    r.journal = jdir;
    const bool systemd = root.exists("/run/systemd/system");
    // Reverse order: commands, then kernel writes, then files.
    const auto& cmds = m["commands"];
    for (auto it = cmds.rbegin(); it != cmds.rend(); ++it) {
      const auto undo = (*it)["undo"].get<std::vector<std::string>>();
      if (undo.empty() || (*it)["status"].get<int>() != 0) continue;
      if (!run_commands || (undo[0] == "systemctl" && !systemd)) {
        r.log.push_back("not run: " + shell_join(undo));
        continue;
      }
      const auto res = run(undo);
      r.log.push_back((res.status == 0 ? "ran: " : "FAILED: ") + shell_join(undo));
      if (res.status != 0) r.ok = false;
    }
    const auto& writes = m["writes"];
    for (auto it = writes.rbegin(); it != writes.rend(); ++it) {
      const std::string path = (*it)["path"], old = (*it)["old"];
      if (old.empty()) continue;
      try {
        write_attr(root.at(path), old);
        r.log.push_back("set " + path + " = " + old);
      } catch (const SystemError& e) {
        r.ok = false;
        r.log.push_back(std::string("FAILED: ") + e.what());
      }
    }
    const auto& files = m["files"];
    std::error_code ec;
    for (auto it = files.rbegin(); it != files.rend(); ++it) {
      const std::string path = (*it)["path"], was = (*it)["was"];
      const fs::path target = root.at(path);
      fs::remove(target, ec);
      if (was == "file") {
        const std::string backup = (*it)["backup"];
        const auto content = root.read(jdir + "/" + backup);
        if (!content) throw SystemError("undo " + path, "backup " + backup + " is missing", "restore it by hand");
        write_file_atomic(target, *content, (*it)["mode"].get<unsigned>());
        r.log.push_back("restored " + path);
      } else if (was == "symlink") {
        fs::create_symlink((*it)["link"].get<std::string>(), target, ec);
        r.log.push_back("restored link " + path);
      } else {
        r.log.push_back("removed " + path);
      }
      const auto dirs = (*it)["made_dirs"].get<std::vector<std::string>>();
      for (auto d = dirs.rbegin(); d != dirs.rend(); ++d) {
        if (fs::is_empty(*d, ec)) fs::remove(*d, ec);
      }
    }
    fs::remove_all(root.at(jdir), ec);
    // The last undo leaves no trace: drop the journal folders apply created.
    for (const char* d : {kJournalDir, "/var/lib/ibdisk/setup", "/var/lib/ibdisk", "/var/lib", "/var"}) {
      if (fs::is_empty(root.at(d), ec) && !ec) fs::remove(root.at(d), ec);
    }
    if (!all) return r;
  }
}

}  // namespace ibdisk::setup
