#pragma once
// Every path the setup module reads or writes goes through a Root, so the same code runs on
// the live system (root "/") and on fixture trees or temporary roots in tests.
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace ibdisk::setup {

class Root {
 public:
  explicit Root(std::filesystem::path dir = "/");

  // True when this is the live system's root: only then are commands run and getrlimit used.
  bool is_live() const { return live_; }
  const std::filesystem::path& dir() const { return dir_; }

  // Maps an absolute system path ("/sys/class/net") to its place under the root.
  std::filesystem::path at(const std::string& system_path) const;

  bool exists(const std::string& path) const;
  bool is_dir(const std::string& path) const;
  bool is_symlink(const std::string& path) const;
  // Whole file, or nullopt when it does not exist or cannot be read.
  std::optional<std::string> read(const std::string& path) const;
  // First line without its newline, as the kernel prints sysfs attributes; "" when absent.
  std::string attr(const std::string& path) const;
  // Entry names in a directory, sorted; empty when it does not exist.
  std::vector<std::string> list(const std::string& path) const;
  // Last component of a symlink's target ("mlx4_core" for .../driver), "" when not a link.
  std::string link_name(const std::string& path) const;
  // Raw symlink target text, or nullopt.
  std::optional<std::string> link_target(const std::string& path) const;
  // The link resolved to a system path inside the root ("/sys/devices/pci0000:00/..."), for
  // sysfs class entries, which are relative symlinks into the device tree.
  std::string resolve(const std::string& path) const;

 private:
  std::filesystem::path dir_;
  bool live_;
};

// Removes trailing whitespace (kernel attributes end in "\n").
std::string trim(std::string s);
std::vector<std::string> split_lines(const std::string& text);
std::vector<std::string> split_ws(const std::string& text);

}  // namespace ibdisk::setup
