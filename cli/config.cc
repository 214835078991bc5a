#include "cli/config.h"

#include <algorithm>
#include <sstream>

#include <toml++/toml.h>

namespace ibdisk::cli {
namespace {

std::size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<std::size_t> row(b.size() + 1);
  for (std::size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (std::size_t i = 1; i <= a.size(); ++i) {
    std::size_t diag = row[0];
    row[0] = i;
    for (std::size_t j = 1; j <= b.size(); ++j) {
      const std::size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diag = up;
    }
  }
  return row[b.size()];
}

class Walker {
 public:
  Walker(const std::string& source, std::vector<CLI::ConfigItem>& out) : source_(source), out_(out) {}

  void table(const CLI::App& app, const toml::table& t, std::vector<std::string>& parents) {
    for (auto&& [key, node] : t) {
      const std::string name(key.str());
      if (node.is_table()) {
        const CLI::App* sub = find_sub(app, name);
        if (!sub) {
          std::vector<std::string> names;
          for (const CLI::App* s : app.get_subcommands({})) names.push_back(s->get_name());
          fail(key.source(), "unknown table [" + path(parents, name) + "]", name, names, path(parents, ""), "[", "]",
               "tables are named after subcommands");
        }
        parents.push_back(name);
        table(*sub, *node.as_table(), parents);
        parents.pop_back();
        continue;
      }
      const auto keys = config_keys(app);
      if (std::find(keys.begin(), keys.end(), name) == keys.end()) {
        fail(key.source(), "unknown key '" + name + "' in " + (parents.empty() ? "the top level" : "[" + path(parents, "") + "]"),
             name, keys, "", "'", "'", "keys are the long options of `ibdisk " + path(parents, "", ' ') + " --help`");
      }
      CLI::ConfigItem item;
      item.parents = parents;
      item.name = name;
      if (const toml::array* arr = node.as_array()) {
        for (const toml::node& v : *arr) item.inputs.push_back(scalar(v, name));
      } else {
        item.inputs.push_back(scalar(node, name));
      }
      out_.push_back(std::move(item));
    }
  }

 private:
  static const CLI::App* find_sub(const CLI::App& app, const std::string& name) {
    for (const CLI::App* s : app.get_subcommands({})) {
      if (s->get_name() == name) return s;
    }
    return nullptr;
  }

  static std::string path(const std::vector<std::string>& parents, const std::string& last, char sep = '.') {
    std::string p;
    for (const auto& x : parents) p += (p.empty() ? "" : std::string(1, sep)) + x;
    if (!last.empty()) p += (p.empty() ? "" : std::string(1, sep)) + last;
    return p;
  }

  std::string scalar(const toml::node& v, const std::string& key) {
    if (auto s = v.value_exact<std::string>()) return *s;
    if (auto b = v.value_exact<bool>()) return *b ? "true" : "false";
    if (auto i = v.value_exact<std::int64_t>()) return std::to_string(*i);
    if (auto d = v.value_exact<double>()) {
      std::ostringstream ss;
      ss << *d;
      return ss.str();
    }
    fail(v.source(), "key '" + key + "': expected a string, number, boolean or an array of them", "", {}, "", "", "", "");
  }

  [[noreturn]] void fail(const toml::source_region& where, const std::string& what, const std::string& word,
                         const std::vector<std::string>& valid,
                         const std::string& prefix, const std::string& open, const std::string& close,
                         const std::string& note) {
    std::string msg = source_ + ":" + std::to_string(where.begin.line) + ": " + what;
    if (const std::string near = closest(word, valid); !near.empty()) {
      msg += "; did you mean " + open + (prefix.empty() ? "" : prefix + ".") + near + close + "?";
    } else if (!note.empty()) {
      msg += " (" + note + ")";
    }
    throw CLI::ConfigError(msg);
  }

  const std::string& source_;
  std::vector<CLI::ConfigItem>& out_;
};

}  // namespace

std::vector<std::string> config_keys(const CLI::App& sub) {
  std::vector<std::string> keys;
  for (const CLI::Option* o : sub.get_options()) {
    if (!o->nonpositional()) continue;
    for (const auto& n : o->get_lnames()) {
      if (n != "help" && n != "config" && n != "version") keys.push_back(n);
    }
  }
  return keys;
}

std::string closest(const std::string& word, const std::vector<std::string>& candidates) {
  std::string best;
  std::size_t best_d = std::max<std::size_t>(2, word.size() / 3) + 1;
  for (const auto& c : candidates) {
    const std::size_t d = edit_distance(word, c);
    if (d < best_d) {
      best_d = d;
      best = c;
    }
  }
  return best;
}

std::vector<CLI::ConfigItem> TomlConfig::from_config(std::istream& in) const {
  toml::table root;
  try {
    root = toml::parse(in, source_);
  } catch (const toml::parse_error& e) {
    throw CLI::ConfigError(source_ + ":" + std::to_string(e.source().begin.line) + ": " + std::string(e.description()));
  }
  std::vector<CLI::ConfigItem> items;
  std::vector<std::string> parents;
  Walker(source_, items).table(app_, root, parents);
  return items;
}

std::string TomlConfig::to_config(const CLI::App*, bool, bool, std::string) const { return {}; }

}  // namespace ibdisk::cli
