// Subcommands of the `moetrain` binary. Each registers itself on the app with its own options
// and a callback; main() only parses and reports errors.
#pragma once

#include <CLI/CLI.hpp>

namespace moetrain::cli {

void add_config_command(CLI::App& app);  // config --defaults | --check FILE
void add_bench_command(CLI::App& app);   // bench --config FILE

}  // namespace moetrain::cli
