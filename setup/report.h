#pragma once
// How `ibdisk setup status` and `ibdisk setup doctor` print: tables for people, JSON for
// scripts (nlohmann::ordered_json keeps the field order documented in docs/setup.md).
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "setup/doctor.h"
#include "setup/inventory.h"

namespace ibdisk::setup {

// Rows of cells printed as left-aligned columns two spaces apart, first row a header.
std::string format_table(const std::vector<std::vector<std::string>>& rows, const std::string& indent = "  ");

std::string format_status(const Inventory& inv);
nlohmann::ordered_json status_json(const Inventory& inv);

std::string format_findings(const std::vector<Finding>& findings);
nlohmann::ordered_json findings_json(const std::vector<Finding>& findings);

}  // namespace ibdisk::setup
