// The export's storage: opening a regular file or a block device (with the reason and the
// fix when it cannot be), what its O_DIRECT descriptor accepts, and the path a request takes.
#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>

#include "common/error.h"
#include "common/log.h"
#include "target/storage.h"

namespace ibdisk::target {
namespace {

std::shared_ptr<spdlog::logger> storage_log() {
  static const auto l = logger("storage");
  return l;
}

bool aligned(std::uint64_t v, std::uint32_t a) { return (v & (a - 1)) == 0; }

std::string open_hint(int err, bool read_only, const std::string& path) {
  switch (err) {
    case ENOENT:
      return "check the path, or create a backing file first, e.g. `truncate -s 10G " + path + "`";
    case EACCES:
    case EPERM:
      return read_only ? "run as root or give this user read permission"
                       : "run as root, give this user read-write permission, or export it read-only (NAME=PATH,ro)";
    case EROFS:
      return "the file system is mounted read-only: export it read-only (NAME=PATH,ro)";
    case EISDIR:
      return "give a regular file or a block device, not a directory";
    case EBUSY:
      return "the device is held exclusively by something else (mounted, in a RAID or LVM): free it first";
    default:
      return "check that the path names a regular file or a block device this user can open";
  }
}

// Which O_DIRECT alignment a regular file's file system wants: 512, 4096, or 0 if O_DIRECT
// reads fail either way. A buffer aligned to the size tested but not to twice it.
std::uint32_t probe_direct_alignment(int direct_fd) {
  void* mem = std::aligned_alloc(8192, 16384);
  if (!mem) return 0;
  std::uint32_t found = 0;
  for (const std::uint32_t a : {512u, 4096u}) {
    if (::pread(direct_fd, static_cast<char*>(mem) + a, a, 0) >= 0) {
      found = a;
      break;
    }
    if (errno != EINVAL) break;
  }
  std::free(mem);
  return found;
}

bool block_device_discards(dev_t rdev) {
  const std::string base = "/sys/dev/block/" + std::to_string(major(rdev)) + ":" + std::to_string(minor(rdev));
  // A partition has no queue/ of its own; its disk's is one level up.
  for (const char* rel : {"/queue/discard_max_bytes", "/../queue/discard_max_bytes"}) {
    std::ifstream in(base + rel);
    std::uint64_t max_bytes = 0;
    if (in >> max_bytes) return max_bytes > 0;
  }
  return false;
}


}  // namespace

bool goes_direct(const BackingFile& f, std::uint64_t offset, std::uint64_t length, const void* buf) {
  return f.direct_fd >= 0 && aligned(offset, f.logical_block_size) && aligned(length, f.logical_block_size) &&
         aligned(reinterpret_cast<std::uintptr_t>(buf), f.logical_block_size);
}

RangeLock::Mode order_mode(const BackingFile& f, const IoRequest& r) {
  switch (r.op) {
    case IoOp::kRead:
    case IoOp::kWrite:
      return goes_direct(f, r.offset, r.length, r.data) ? RangeLock::Mode::kDirect : RangeLock::Mode::kBuffered;
    case IoOp::kExtents:
      return RangeLock::Mode::kQuery;
    default:
      // Trim and write-zeroes touch the page cache and the device both (fallocate, BLKDISCARD,
      // zero-filling writes): nothing else runs on their pages meanwhile.
      return RangeLock::Mode::kExclusive;
  }
}

BackingFile::~BackingFile() {
  if (direct_fd >= 0 && ::close(direct_fd) != 0) storage_log()->warn("close({}, O_DIRECT): {}", path, errno_text(errno));
  if (fd >= 0 && ::close(fd) != 0) storage_log()->warn("close({}): {}", path, errno_text(errno));
}

std::shared_ptr<BackingFile> open_backing(const std::string& path, bool read_only) {
  auto f = std::make_shared<BackingFile>();
  f->path = path;
  f->read_only = read_only;
  const int flags = (read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC;
  const std::string mode = read_only ? "read-only" : "read-write";
  f->fd = ::open(path.c_str(), flags);
  if (f->fd < 0) {
    const int err = errno;
    throw SystemError("open(" + path + ", " + mode + ")", err, open_hint(err, read_only, path));
  }
  struct stat st {};
  if (::fstat(f->fd, &st) != 0) throw SystemError("fstat(" + path + ")", errno, "check the file system");
  if (S_ISDIR(st.st_mode)) {
    throw SystemError("export " + path, std::string("it is a directory"),
                      "give a regular file or a block device, e.g. `truncate -s 10G " + path + "/disk.img`");
  }
  if (S_ISBLK(st.st_mode)) {
    f->block_device = true;
    if (::ioctl(f->fd, BLKGETSIZE64, &f->size) != 0) {
      throw SystemError("ioctl(" + path + ", BLKGETSIZE64)", errno, "check that the device is present");
    }
    int lbs = 512;
    if (::ioctl(f->fd, BLKSSZGET, &lbs) != 0) {
      throw SystemError("ioctl(" + path + ", BLKSSZGET)", errno, "check that the device is present");
    }
    f->logical_block_size = static_cast<std::uint32_t>(lbs);
    f->trim_supported = block_device_discards(st.st_rdev);
  } else if (S_ISREG(st.st_mode)) {
    f->size = static_cast<std::uint64_t>(st.st_size);
    f->trim_supported = true;  // fallocate(PUNCH_HOLE); a file system without it answers -EOPNOTSUPP
  } else {
    throw SystemError("export " + path, std::string("it is neither a regular file nor a block device"),
                      "give a regular file (e.g. made with `truncate -s 10G FILE`) or a block device");
  }
  if (f->size == 0) {
    throw SystemError("export " + path, std::string("its size is 0"),
                      f->block_device ? "check that the device has a medium and is not a zero-sized partition"
                                      : "give it a size first, e.g. `truncate -s 10G " + path + "`");
  }

  f->direct_fd = ::open(path.c_str(), flags | O_DIRECT);
  if (f->direct_fd < 0) {
    storage_log()->info("{}: no O_DIRECT ({}); all I/O goes through the page cache", path, errno_text(errno));
  } else if (!f->block_device) {
    const std::uint32_t a = probe_direct_alignment(f->direct_fd);
    if (a == 0) {
      storage_log()->info("{}: O_DIRECT reads fail at 512 and 4096 alignment; all I/O goes through the page cache", path);
      ::close(f->direct_fd);
      f->direct_fd = -1;
    } else {
      f->logical_block_size = a;
    }
  }
  storage_log()->debug("{}: {} bytes, block {}, {}{}{}", path, f->size, f->logical_block_size,
               f->block_device ? "block device" : "file", f->direct_fd >= 0 ? ", O_DIRECT" : "",
               f->trim_supported ? ", trim" : "");
  return f;
}


}  // namespace ibdisk::target
