#pragma once
// JSON output written by hand in the CLI and the benchmarks: one string quoting rule for all.
#include <string>

namespace ibdisk {

// s as a JSON string literal, with the surrounding quotes.
std::string json_quote(const std::string& s);

}  // namespace ibdisk
