#include "setup/root.h"

#include <algorithm>
#include <fstream>
#include <sstream>

namespace ibdisk::setup {
namespace fs = std::filesystem;

Root::Root(fs::path dir) : dir_(std::move(dir)) {
  std::error_code ec;
  const auto canon = fs::weakly_canonical(dir_, ec);
  live_ = !ec && canon == fs::path("/");
}

fs::path Root::at(const std::string& system_path) const {
  if (live_) return fs::path(system_path);
  std::string rel = system_path;
  while (!rel.empty() && rel.front() == '/') rel.erase(rel.begin());
  return dir_ / rel;
}

bool Root::exists(const std::string& path) const {
  std::error_code ec;
  return fs::exists(at(path), ec);
}

bool Root::is_dir(const std::string& path) const {
  std::error_code ec;
  return fs::is_directory(at(path), ec);
}

bool Root::is_symlink(const std::string& path) const {
  std::error_code ec;
  return fs::is_symlink(at(path), ec);
}

std::optional<std::string> Root::read(const std::string& path) const {
  std::ifstream in(at(path), std::ios::binary);
  if (!in) return std::nullopt;
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return std::nullopt;
  return ss.str();
}

std::string Root::attr(const std::string& path) const {
  const auto text = read(path);
  if (!text) return {};
  const auto nl = text->find('\n');
  return trim(nl == std::string::npos ? *text : text->substr(0, nl));
}

std::vector<std::string> Root::list(const std::string& path) const {
  std::vector<std::string> names;
  std::error_code ec;
  for (fs::directory_iterator it(at(path), ec), end; !ec && it != end; it.increment(ec)) {
    names.push_back(it->path().filename().string());
  }
  std::sort(names.begin(), names.end());
  return names;
}

std::optional<std::string> Root::link_target(const std::string& path) const {
  std::error_code ec;
  const auto target = fs::read_symlink(at(path), ec);
  if (ec) return std::nullopt;
  return target.string();
}

std::string Root::link_name(const std::string& path) const {
  const auto target = link_target(path);
  if (!target) return {};
  return fs::path(*target).filename().string();
}

std::string Root::resolve(const std::string& path) const {
  // Resolve component by component within the system namespace, never escaping the root.
  fs::path done = "/";
  std::vector<fs::path> pending;
  for (const auto& part : fs::path(path).relative_path()) pending.push_back(part);
  std::reverse(pending.begin(), pending.end());
  for (int hops = 0; !pending.empty() && hops < 256; ++hops) {
    const fs::path part = pending.back();
    pending.pop_back();
    if (part == ".") continue;
    if (part == "..") {
      done = done.parent_path();
      continue;
    }
    const fs::path next = done / part;
    const auto target = link_target(next.string());
    if (!target) {
      done = next;
      continue;
    }
    const fs::path t(*target);
    if (t.is_absolute()) done = "/";
    std::vector<fs::path> parts;
    for (const auto& p : t.relative_path()) parts.push_back(p);
    for (auto it = parts.rbegin(); it != parts.rend(); ++it) pending.push_back(*it);
  }
  return done.lexically_normal().string();
}

std::string trim(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ' || s.back() == '\t' || s.back() == '\r')) s.pop_back();
  std::size_t i = 0;
  while (i < s.size() && (s[i] == ' ' || s[i] == '\t')) ++i;
  return s.substr(i);
}

std::vector<std::string> split_lines(const std::string& text) {
  std::vector<std::string> lines;
  std::string line;
  std::istringstream in(text);
  while (std::getline(in, line)) lines.push_back(line);
  return lines;
}

std::vector<std::string> split_ws(const std::string& text) {
  std::vector<std::string> out;
  std::istringstream in(text);
  std::string w;
  while (in >> w) out.push_back(w);
  return out;
}

}  // namespace ibdisk::setup
