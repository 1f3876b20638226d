// `moetrain train`: runs training from a JSON config (see moetrain::run_training).
#include <cstdio>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include "cli/commands.hpp"
#include "moetrain/runtime.hpp"
#include "moetrain/signals.hpp"
#include "moetrain/trainer.hpp"

namespace moetrain::cli {

namespace {
struct TrainCliOptions {
  std::string config;
  std::vector<std::string> sets;
  bool resume = false;
  std::string resume_from;
  std::int64_t stop_at = -1;
};
}  // namespace

void add_train_command(CLI::App& app) {
  auto o = std::make_shared<TrainCliOptions>();
  CLI::App* cmd = app.add_subcommand("train", "Train a model from a JSON config");
  cmd->add_option("--config", o->config, "JSON config file")->required();
  cmd->add_option("--set", o->sets, "Override a config field: key=value (repeatable)");
  cmd->add_flag("--resume", o->resume, "Continue from the newest checkpoint of train.out_dir");
  cmd->add_option("--resume-from", o->resume_from, "Continue from this checkpoint directory");
  cmd->add_option("--stop-at", o->stop_at,
                  "Stop after this many completed steps, with a checkpoint (resume later)")
      ->check(CLI::PositiveNumber);
  cmd->callback([o] {
    const Config cfg = load_config(o->config, o->sets);
    TrainOptions opts;
    opts.resume = !o->resume_from.empty() ? o->resume_from : (o->resume ? "latest" : "");
    opts.stop_at = o->stop_at;
    install_stop_signal_handlers();
    Runtime rt = make_runtime(cfg);
    int rc = 0;
    try {
      rc = run_training(cfg, rt, opts);
    } catch (const std::exception& e) {
      if (rt.comm->world() == 1) throw;
      // Peers may be waiting in a collective for this rank: say why here, then end the job.
      std::fprintf(stderr, "error: rank %d of %d: %s\n", rt.comm->rank(), rt.comm->world(),
                   e.what());
      std::fflush(stderr);
      rt.comm->abort_job(1);
    }
    if (rc != 0) throw CLI::RuntimeError(rc);
  });
}

}  // namespace moetrain::cli
