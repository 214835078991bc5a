#include "target/extents.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>

namespace ibdisk::target {
namespace {

constexpr std::uint32_t kHole = wire::kExtentHole | wire::kExtentZero;

// Appends a run, merging it into the last one of the same type.
void add(wire::ExtentList* l, std::uint64_t length, std::uint32_t type) {
  if (l->count > 0 && l->runs[l->count - 1].type == type) {
    l->runs[l->count - 1].length += length;
    return;
  }
  l->runs[l->count++] = {length, type};
}

void all_data(wire::ExtentList* l, std::uint64_t length) {
  l->flags = 0;
  l->count = 0;
  add(l, length, 0);
}

}  // namespace

int map_extents(const BackingFile& f, std::uint64_t offset, std::uint64_t length, wire::ExtentList* out) {
  if (offset > f.size || length > f.size - offset) return -EINVAL;
  out->flags = wire::kExtentsExact;
  out->count = 0;
  if (length == 0) return 0;
  if (f.block_device) {
    // What a device's unmapped blocks read as is not reliably known (discard_zeroes_data is
    // gone from the kernel): everything is data, and the answer says it is not exact.
    all_data(out, length);
    return 0;
  }
  const std::uint64_t end = offset + length;
  std::uint64_t pos = offset;
  // Each step adds one whole run (runs alternate), so a list cut at kMaxExtents is still true.
  while (pos < end && out->count < wire::kMaxExtents) {
    off_t data = ::lseek(f.fd, static_cast<off_t>(pos), SEEK_DATA);
    if (data < 0) {
      if (errno == ENXIO) {
        data = static_cast<off_t>(end);  // no data after pos: a hole to the end of the file
      } else if (errno == EINVAL || errno == EOPNOTSUPP) {
        all_data(out, length);  // the file system cannot tell
        return 0;
      } else {
        return -errno;
      }
    }
    const std::uint64_t data_at = std::min<std::uint64_t>(static_cast<std::uint64_t>(data), end);
    if (data_at > pos) {
      add(out, data_at - pos, kHole);
      pos = data_at;
      continue;
    }
    const off_t hole = ::lseek(f.fd, static_cast<off_t>(pos), SEEK_HOLE);
    if (hole < 0) {
      // ENXIO here means the file shrank under us: report the rest as data, never as a hole.
      if (errno != ENXIO) return -errno;
      add(out, end - pos, 0);
      break;
    }
    const std::uint64_t hole_at = std::clamp<std::uint64_t>(static_cast<std::uint64_t>(hole), pos + 1, end);
    add(out, hole_at - pos, 0);
    pos = hole_at;
  }
  return 0;
}

int map_extents(const BackingFile& f, std::uint64_t offset, std::uint64_t length, std::byte* out) {
  wire::ExtentList l;
  if (const int rc = map_extents(f, offset, length, &l); rc < 0) return rc;
  if (l.count == 0) return 0;
  wire::encode(l, out);
  return static_cast<int>(wire::extents_size(l.count));
}

}  // namespace ibdisk::target
