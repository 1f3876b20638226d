#include <cstdio>
#include <exception>

#include <CLI/CLI.hpp>

#include "cli/commands.hpp"

int main(int argc, char** argv) {
  CLI::App app{"moetrain: pre-training of small Mixture-of-Experts transformers"};
  app.require_subcommand(1);
  moetrain::cli::add_config_command(app);
  moetrain::cli::add_bench_command(app);
  moetrain::cli::add_prepare_data_command(app);
  moetrain::cli::add_train_command(app);
  moetrain::cli::add_eval_command(app);
  moetrain::cli::add_sample_command(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
