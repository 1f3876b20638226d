// The config reference in Markdown (docs/configs.md), generated from config_schema() so that the
// documentation of every field cannot drift from the code that parses it.
#pragma once

#include <string>
#include <vector>

#include "moetrain/config.hpp"

namespace moetrain {

// The command that regenerates docs/configs.md from the repository root.
inline constexpr const char* kConfigMarkdownCommand =
    "build/moetrain config --defaults --markdown > docs/configs.md";

// A Markdown document: a header naming the command that regenerates it, then one section per
// top-level group of `schema` (in schema order) with a table of its fields: path, type, default,
// accepted values and description.
std::string config_markdown(const std::vector<ConfigField>& schema);

// config_markdown(config_schema()): what `moetrain config --defaults --markdown` prints.
std::string config_markdown();

}  // namespace moetrain
