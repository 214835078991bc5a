#pragma once
// Where an export's data is: the runs of data and holes of a range, as an ibdisk extent list
// (proto/wire.h), for the extents command of both front ends (the ibdisk protocol and NBD's
// base:allocation block status).
#include <cstddef>
#include <cstdint>

#include "proto/wire.h"
#include "target/storage.h"

namespace ibdisk::target {

// Fills *out with the runs of [offset, offset + length) of f, at most wire::kMaxExtents of
// them (the list then ends before offset + length). Regular files: SEEK_DATA / SEEK_HOLE on
// the page-cache descriptor, which sees dirty pages, so a completed write is data whatever
// its path; holes are kExtentHole | kExtentZero and the list is kExtentsExact. Block devices,
// and file systems without SEEK_DATA: one data run, not exact. 0 or -errno.
int map_extents(const BackingFile& f, std::uint64_t offset, std::uint64_t length, wire::ExtentList* out);
// The same, encoded into out (wire::kExtentsReplySize bytes): the encoding's size, or -errno.
int map_extents(const BackingFile& f, std::uint64_t offset, std::uint64_t length, std::byte* out);

}  // namespace ibdisk::target
