#pragma once
// The target's exports: names mapped to backing files, with the access rules every front end
// (ibdisk protocol over TCP or RDMA, NBD) applies the same way: read-only exports, one writer
// at a time unless the export is shared. Thread-safe: sessions on any worker thread open and
// release exports concurrently.
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "target/storage.h"

namespace ibdisk::target {

struct ExportConfig {
  std::string name;
  std::string path;
  bool read_only = false;
  bool shared = false;  // allow several writers at once (the user coordinates them)
  // O_DIRECT for aligned I/O. Unset: direct for block devices, page cache for image files
  // (as nbdkit and qemu-nbd do; re-reads and readahead then come from memory).
  std::optional<bool> direct;
};

// Parses "NAME=PATH[,ro][,shared][,direct|,cached]" (the --export syntax). Throws std::invalid_argument with
// a message naming the bad part and the expected form.
ExportConfig parse_export_spec(const std::string& spec);

struct ExportInfo {
  std::string name;
  std::uint64_t size = 0;
  std::uint32_t block_size = 512;
  bool read_only = false;
  bool shared = false;
  bool trim = false;
  unsigned readers = 0, writers = 0;  // open sessions
};

class ExportRegistry;

// A session's hold on an export; released on destruction.
class ExportLease {
 public:
  ~ExportLease();
  ExportLease(const ExportLease&) = delete;
  ExportLease& operator=(const ExportLease&) = delete;
  BackingFile& file() const { return *file_; }
  const std::string& name() const { return name_; }
  bool writable() const { return writable_; }

 private:
  friend class ExportRegistry;
  ExportLease(ExportRegistry* reg, std::string name, std::shared_ptr<BackingFile> f, bool writable)
      : registry_(reg), name_(std::move(name)), file_(std::move(f)), writable_(writable) {}
  ExportRegistry* registry_;
  std::string name_;
  std::shared_ptr<BackingFile> file_;
  bool writable_;
};

// Why an open was refused. The numbers are part of the wire protocol (proto/ErrorCode).
enum class OpenError { kNone = 0, kUnknownExport, kReadOnly, kBusy };

struct OpenResult {
  std::unique_ptr<ExportLease> lease;  // set on success
  OpenError error = OpenError::kNone;
  std::string message;  // for the user: names the export, the reason and what to do
};

class ExportRegistry {
 public:
  // Opens every backing file now, so a bad path fails at start, naming the export.
  explicit ExportRegistry(const std::vector<ExportConfig>& exports);
  ~ExportRegistry();

  std::vector<ExportInfo> list() const;
  bool find(const std::string& name, ExportInfo* out) const;
  // want_write: the session will write. Exclusive exports admit one writer; read-only
  // exports refuse writers with kReadOnly.
  OpenResult open(const std::string& name, bool want_write);

 private:
  friend class ExportLease;
  void release(const std::string& name, bool writable);
  struct Entry {
    ExportConfig config;
    std::shared_ptr<BackingFile> file;
    unsigned readers = 0, writers = 0;
  };
  mutable std::mutex mu_;
  std::map<std::string, Entry> exports_;
};

}  // namespace ibdisk::target
