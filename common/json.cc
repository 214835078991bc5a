#include "common/json.h"

namespace ibdisk {

std::string json_document(const Json& body) {
  Json doc = {{"schema", kJsonSchema}};
  for (const auto& [k, v] : body.items()) doc[k] = v;
  return doc.dump(2, ' ', false, Json::error_handler_t::replace) + "\n";
}

}  // namespace ibdisk
