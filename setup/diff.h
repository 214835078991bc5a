#pragma once
// Unified diffs (diff -u style, 3 lines of context) for `ibdisk setup plan`.
#include <string>

namespace ibdisk::setup {

// old_label/new_label go on the ---/+++ lines ("a/etc/x", "/dev/null"). Returns "" when
// the texts are equal. A text without a final newline gets "\ No newline at end of file".
std::string unified_diff(const std::string& old_text, const std::string& new_text, const std::string& old_label,
                         const std::string& new_label);

}  // namespace ibdisk::setup
