// docs/configs.md is generated from the config schema (`moetrain config --defaults --markdown`):
// these tests fail when the checked-in file differs from what the schema generates, so a new
// field, default, range or enum value cannot land without its documentation.

#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "cli_fixture.hpp"
#include "moetrain/config.hpp"
#include "moetrain/config_markdown.hpp"

using moetrain::config_markdown;
using moetrain::config_schema;

namespace {

const std::string kDocPath = MOETRAIN_SOURCE_DIR "/docs/configs.md";

// Empty when equal, else where the two texts first differ (line number and both lines).
std::string first_difference(const std::string& expected, const std::string& actual) {
  if (expected == actual) return "";
  std::size_t line = 1, a = 0, b = 0;
  for (;;) {
    const std::size_t ea = expected.find('\n', a), eb = actual.find('\n', b);
    const std::string la = expected.substr(a, ea == std::string::npos ? ea : ea - a);
    const std::string lb = actual.substr(b, eb == std::string::npos ? eb : eb - b);
    if (la != lb || ea == std::string::npos || eb == std::string::npos) {
      return "first difference at line " + std::to_string(line) + ":\n  generated:  " + la +
             "\n  file has:   " + lb;
    }
    a = ea + 1;
    b = eb + 1;
    ++line;
  }
}

std::string stale_message(const std::string& what, const std::string& diff) {
  return "docs/configs.md differs from " + what + " (" + diff +
         ")\nRegenerate it from the repository root with:\n  " + moetrain::kConfigMarkdownCommand;
}

}  // namespace

TEST_CASE("config markdown: every schema field is documented in one table row", "[config][docs]") {
  const std::string md = config_markdown();
  for (const auto& f : config_schema()) {
    INFO(f.path);
    CHECK(md.find("| `" + f.path + "` |") != std::string::npos);
    CHECK(md.find("\n## " + f.path.substr(0, f.path.find('.')) + "\n") != std::string::npos);
  }
  CHECK(md.find(moetrain::kConfigMarkdownCommand) != std::string::npos);
}

TEST_CASE("config markdown: enum choices, ranges and table escapes", "[config][docs]") {
  const std::vector<moetrain::ConfigField> schema = {
      {"a.kind", "one of x|y", "x", "Pick | one", ""},
      {"a.n", "integer", 3, "A count", ">= 1"},
      {"b.s", "string", "p*q", "Glob *.bin", "non-empty"},
  };
  const std::string md = config_markdown(schema);
  CHECK_THAT(
      md, Catch::Matchers::Contains("| `a.kind` | string | `\"x\"` | `x`, `y` | Pick \\| one |"));
  CHECK_THAT(md, Catch::Matchers::Contains("| `a.n` | integer | `3` | >= 1 | A count |"));
  CHECK_THAT(
      md, Catch::Matchers::Contains("| `b.s` | string | `\"p*q\"` | non-empty | Glob \\*.bin |"));
  CHECK_THAT(md, Catch::Matchers::Contains("\n## a\n"));
  CHECK_THAT(md, Catch::Matchers::Contains("\n## b\n"));
}

TEST_CASE("docs/configs.md is what the config schema generates", "[config][docs]") {
  namespace test = moetrain::test;
  const std::string checked_in = test::read_file(kDocPath);
  REQUIRE_FALSE(checked_in.empty());

  const std::string diff = first_difference(config_markdown(), checked_in);
  if (!diff.empty()) FAIL_CHECK(stale_message("config_markdown()", diff));

  const auto r = test::run_command(test::binary() + " config --defaults --markdown");
  REQUIRE(r.exit_code == 0);
  const std::string cli_diff = first_difference(r.output, checked_in);
  if (!cli_diff.empty()) {
    FAIL_CHECK(stale_message("`moetrain config --defaults --markdown`", cli_diff));
  }
}
