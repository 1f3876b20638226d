// The Markdown config reference (docs/configs.md) from the config schema.

#include "moetrain/config_markdown.hpp"

#include <string>
#include <vector>

namespace moetrain {
namespace {

// Text for a Markdown table cell: '|' would end the cell and '*' could start emphasis.
std::string cell(const std::string& s) {
  std::string out;
  for (const char c : s) {
    if (c == '|' || c == '*' || c == '\\') out += '\\';
    out += c;
  }
  return out;
}

// Inline code in a table cell (a '|' still needs its backslash inside a code span there).
std::string code(const std::string& s) {
  std::string out = "`";
  for (const char c : s) {
    if (c == '|') out += '\\';
    out += c;
  }
  return out + "`";
}

std::string top_group(const std::string& path) {
  return path.substr(0, path.find('.'));
}

// "one of a|b|c" -> {a, b, c}; empty for any other type.
std::vector<std::string> choices(const std::string& type) {
  const std::string prefix = "one of ";
  if (type.rfind(prefix, 0) != 0) return {};
  std::vector<std::string> out;
  std::size_t start = prefix.size();
  for (;;) {
    const std::size_t bar = type.find('|', start);
    out.push_back(type.substr(start, bar - start));
    if (bar == std::string::npos) return out;
    start = bar + 1;
  }
}

std::string row(const ConfigField& f) {
  const std::vector<std::string> names = choices(f.type);
  std::string type = f.type, accepted = cell(f.constraint);
  if (!names.empty()) {
    type = "string";
    accepted.clear();
    for (const auto& n : names) accepted += (accepted.empty() ? "" : ", ") + code(n);
  }
  return "| " + code(f.path) + " | " + type + " | " + code(f.default_value.dump()) + " | " +
         accepted + " | " + cell(f.description) + " |\n";
}

}  // namespace

std::string config_markdown(const std::vector<ConfigField>& schema) {
  std::string md = "# Config reference\n\n";
  md += "> Generated from the config schema by `moetrain config --defaults --markdown`; do not ";
  md += "edit. Regenerate from the repository root with `";
  md += kConfigMarkdownCommand;
  md += "`.\n\n";
  md +=
      "A config file is a JSON object that sets any subset of these fields, nested by their "
      "paths (`{\"model\": {\"moe\": {\"top_k\": 2}}}`); every other field keeps its default. "
      "`--set path=value` overrides one field on the command line. "
      "`moetrain config --check FILE` validates a file and prints it resolved, "
      "`moetrain config --defaults --json` prints the defaults as a config file.\n";
  std::string group;
  for (const auto& f : schema) {
    if (top_group(f.path) != group) {
      group = top_group(f.path);
      md += "\n## " + group + "\n\n";
      md += "| Field | Type | Default | Accepted | Description |\n";
      md += "| --- | --- | --- | --- | --- |\n";
    }
    md += row(f);
  }
  return md;
}

std::string config_markdown() {
  return config_markdown(config_schema());
}

}  // namespace moetrain
