#pragma once
// `--config FILE`: a TOML file (toml++) whose tables are named after subcommands and whose
// keys are their long options, e.g. [serve] export = ["vm1=/dev/sda"]. Unknown tables and
// keys are refused with FILE:LINE and the closest valid name; the command line wins over it.
#include <memory>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

namespace ibdisk::cli {

class TomlConfig : public CLI::Config {
 public:
  // app: the top-level app, whose subcommands and options say what is valid.
  explicit TomlConfig(const CLI::App& app) : app_(app) {}
  // The name CLI11 opened, for messages (it hands from_config a stream only).
  void set_source(std::string path) { source_ = std::move(path); }

  std::vector<CLI::ConfigItem> from_config(std::istream& in) const override;
  std::string to_config(const CLI::App*, bool, bool, std::string) const override;

 private:
  const CLI::App& app_;
  std::string source_ = "config";
};

// The long option names (without "--") a config table may set for sub.
std::vector<std::string> config_keys(const CLI::App& sub);
// The candidate closest to word by edit distance, or "" when none is near.
std::string closest(const std::string& word, const std::vector<std::string>& candidates);

}  // namespace ibdisk::cli
