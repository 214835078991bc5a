#pragma once
// Every `--json` output goes through here: nlohmann's writer, one document per command, with
// "schema" first so scripts can tell when a field changes meaning.
#include <string>

#include <nlohmann/json.hpp>

namespace ibdisk {

// Objects keep the order their fields were added in: the order a reader sees in the docs.
using Json = nlohmann::ordered_json;

// The version of the --json formats (docs/json.md); bump it when a field is renamed, removed
// or changes meaning, not when one is added.
inline constexpr int kJsonSchema = 1;

// {"schema": kJsonSchema, ...body} indented, with a trailing newline. Strings that are not
// valid UTF-8 (file names may be anything) have their bad bytes replaced by U+FFFD.
std::string json_document(const Json& body);

}  // namespace ibdisk
