// `moetrain config`: prints the documented defaults (a table, a JSON config file or the Markdown
// reference docs/configs.md), or validates a config file and prints the resolved config.

#include <algorithm>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "cli/commands.hpp"
#include "moetrain/config.hpp"
#include "moetrain/config_markdown.hpp"
#include "moetrain/cpu_backend.hpp"
#include "moetrain/memory_check.hpp"

namespace moetrain::cli {
namespace {

struct ConfigOptions {
  bool defaults = false;
  bool json = false;
  bool markdown = false;
  std::string check;
  std::vector<std::string> overrides;
};

// "integer >= 1", "number in [0, 1)", "non-empty string", "boolean".
std::string type_column(const ConfigField& f) {
  if (f.constraint.empty()) return f.type;
  const char c = f.constraint[0];
  const bool relation = c == '<' || c == '>' || f.constraint.rfind("in ", 0) == 0;
  return relation ? f.type + " " + f.constraint : f.constraint + " " + f.type;
}

void print_defaults_table() {
  const auto& schema = config_schema();
  std::size_t wp = 4, wt = 4, wd = 7;  // the header widths
  for (const auto& f : schema) {
    wp = std::max(wp, f.path.size());
    wt = std::max(wt, type_column(f).size());
    wd = std::max(wd, f.default_value.dump().size());
  }
  const auto row = [&](const std::string& path, const std::string& type, const std::string& def,
                       const std::string& desc) {
    std::printf("%-*s  %-*s  %-*s  %s\n", int(wp), path.c_str(), int(wt), type.c_str(), int(wd),
                def.c_str(), desc.c_str());
  };
  row("PATH", "TYPE", "DEFAULT", "DESCRIPTION");
  for (const auto& f : schema) row(f.path, type_column(f), f.default_value.dump(), f.description);
}

void run_config(const ConfigOptions& o) {
  if (o.defaults && !o.check.empty()) {
    throw CLI::ValidationError("config", "--defaults and --check cannot be combined");
  }
  if (!o.defaults && o.check.empty()) {
    throw CLI::ValidationError("config", "give one of --defaults or --check FILE");
  }
  if (o.defaults) {
    if (o.json) {
      std::printf("%s\n", default_config_json().dump(2).c_str());
    } else if (o.markdown) {
      std::fputs(config_markdown().c_str(), stdout);
    } else {
      print_defaults_table();
    }
    return;
  }
  const Config cfg = load_config(o.check, o.overrides);
  // The memory a run of it needs, on the CPU backend with one rank (checked before printing ok).
  const CpuBackend<float> cpu;
  const MemoryEstimate e = estimate_memory(cfg, cpu, 1);
  std::printf("%s: ok\n%s\n", o.check.c_str(), config_to_json(cfg).dump(2).c_str());
  std::fflush(stdout);
  // stdout stays "ok" and the config as JSON (machine-readable); the estimate goes to stderr.
  std::fprintf(stderr,
               "memory estimate (1 rank; R ranks each hold about 1/R of the optimizer state): "
               "%s\n",
               describe(e).c_str());
  if (cfg.train.backend != "cpu" && bf16_gemms(cfg.train, true))
    std::fprintf(stderr, "on a GPU in bf16 add the weights' bf16 copy: %s\n",
                 format_bytes(e.param_count * 2).c_str());
  std::fprintf(stderr, "host memory: %s\n", describe_available(cpu).c_str());
}

}  // namespace

void add_config_command(CLI::App& app) {
  auto opts = std::make_shared<ConfigOptions>();
  CLI::App* cmd = app.add_subcommand(
      "config", "Print the config defaults, or validate a config file and print it resolved");
  CLI::Option* defaults = cmd->add_flag(
      "--defaults", opts->defaults, "Print every config field: path, type, default, description");
  CLI::Option* json = cmd->add_flag("--json", opts->json,
                                    "With --defaults: print the defaults as a JSON config file")
                          ->needs(defaults);
  cmd->add_flag("--markdown", opts->markdown,
                "With --defaults: print the config reference in Markdown (docs/configs.md)")
      ->needs(defaults)
      ->excludes(json);
  CLI::Option* check = cmd->add_option("--check", opts->check,
                                       "Validate a JSON config file and print the resolved config")
                           ->type_name("FILE");
  cmd->add_option("--set", opts->overrides,
                  "With --check: override a field before validation (repeatable)")
      ->type_name("KEY=VALUE")
      ->needs(check);
  defaults->excludes(check);
  cmd->callback([opts] { run_config(*opts); });
}

}  // namespace moetrain::cli
