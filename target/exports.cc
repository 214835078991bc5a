#include "target/exports.h"

#include <cctype>
#include <stdexcept>

#include <unistd.h>

#include "common/error.h"

namespace ibdisk::target {

ExportConfig parse_export_spec(const std::string& spec) {
  const auto eq = spec.find('=');
  if (eq == std::string::npos || eq == 0 || eq + 1 == spec.size()) {
    throw std::invalid_argument("export '" + spec + "': expected NAME=PATH[,ro][,shared][,direct|,cached]");
  }
  ExportConfig c;
  c.name = spec.substr(0, eq);
  for (const char ch : c.name) {
    if (!std::isalnum(static_cast<unsigned char>(ch)) && ch != '-' && ch != '_' && ch != '.') {
      throw std::invalid_argument("export name '" + c.name +
                                  "': use letters, digits, '-', '_' and '.' only");
    }
  }
  std::string rest = spec.substr(eq + 1);
  // Options follow the last comma(s); a path may itself contain commas, so peel known options.
  for (;;) {
    const auto comma = rest.rfind(',');
    if (comma == std::string::npos) break;
    const std::string opt = rest.substr(comma + 1);
    if (opt == "ro") c.read_only = true;
    else if (opt == "shared") c.shared = true;
    else if (opt == "direct") c.direct = true;
    else if (opt == "cached") c.direct = false;
    else if (opt == "rw") c.read_only = false;
    else break;
    rest.resize(comma);
  }
  if (rest.empty()) throw std::invalid_argument("export '" + spec + "': the path is empty");
  c.path = rest;
  return c;
}

ExportLease::~ExportLease() { registry_->release(name_, writable_); }

ExportRegistry::ExportRegistry(const std::vector<ExportConfig>& exports) {
  for (const auto& c : exports) {
    if (exports_.count(c.name)) {
      throw SystemError("export '" + c.name + "'", std::string("the name is given twice"),
                        "give each --export a different NAME");
    }
    Entry e;
    e.config = c;
    e.file = open_backing(c.path, c.read_only);
    if (!c.direct.value_or(e.file->block_device) && e.file->direct_fd >= 0) {
      ::close(e.file->direct_fd);
      e.file->direct_fd = -1;
    }
    exports_.emplace(c.name, std::move(e));
  }
}

ExportRegistry::~ExportRegistry() = default;

namespace {
ExportInfo info_of(const std::string& name, const ExportConfig& c, const BackingFile& f, unsigned r, unsigned w) {
  ExportInfo i;
  i.name = name;
  i.size = f.size;
  i.block_size = f.logical_block_size;
  i.read_only = c.read_only;
  i.shared = c.shared;
  i.trim = f.trim_supported && !c.read_only;
  i.readers = r;
  i.writers = w;
  return i;
}
}  // namespace

std::vector<ExportInfo> ExportRegistry::list() const {
  std::lock_guard lock(mu_);
  std::vector<ExportInfo> out;
  for (const auto& [name, e] : exports_) out.push_back(info_of(name, e.config, *e.file, e.readers, e.writers));
  return out;
}

bool ExportRegistry::find(const std::string& name, ExportInfo* out) const {
  std::lock_guard lock(mu_);
  const auto it = exports_.find(name);
  if (it == exports_.end()) return false;
  if (out) *out = info_of(name, it->second.config, *it->second.file, it->second.readers, it->second.writers);
  return true;
}

OpenResult ExportRegistry::open(const std::string& name, bool want_write) {
  std::lock_guard lock(mu_);
  OpenResult r;
  const auto it = exports_.find(name);
  if (it == exports_.end()) {
    r.error = OpenError::kUnknownExport;
    std::string names;
    for (const auto& [n, e] : exports_) names += (names.empty() ? "" : ", ") + n;
    r.message = "no export named '" + name + "' (this target exports: " + (names.empty() ? "nothing" : names) + ")";
    return r;
  }
  Entry& e = it->second;
  if (want_write && e.config.read_only) {
    r.error = OpenError::kReadOnly;
    r.message = "export '" + name + "' is read-only; open it read-only";
    return r;
  }
  if (want_write && !e.config.shared && e.writers > 0) {
    r.error = OpenError::kBusy;
    r.message = "export '" + name + "' already has a writer; it is exclusive (serve it with ,shared to allow several)";
    return r;
  }
  (want_write ? e.writers : e.readers)++;
  r.lease.reset(new ExportLease(this, name, e.file, want_write));
  return r;
}

void ExportRegistry::release(const std::string& name, bool writable) {
  std::lock_guard lock(mu_);
  const auto it = exports_.find(name);
  if (it == exports_.end()) return;
  auto& n = writable ? it->second.writers : it->second.readers;
  if (n > 0) --n;
}

}  // namespace ibdisk::target
