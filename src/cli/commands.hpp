// Subcommands of the `moetrain` binary. Each registers itself on the app with its own options
// and a callback; main() only parses and reports errors.
#pragma once

#include <CLI/CLI.hpp>

namespace moetrain::cli {

void add_config_command(CLI::App& app);        // config --defaults | --check FILE
void add_bench_command(CLI::App& app);         // bench --config FILE
void add_prepare_data_command(CLI::App& app);  // prepare-data --input PATH... --out DIR
void add_train_command(CLI::App& app);         // train --config FILE [--resume]
void add_eval_command(CLI::App& app);          // eval --checkpoint DIR
void add_sample_command(CLI::App& app);        // sample --checkpoint DIR --prompt TEXT

}  // namespace moetrain::cli
