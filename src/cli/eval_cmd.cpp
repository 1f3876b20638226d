// `moetrain eval`: validation loss and perplexity of a checkpoint over the whole val split.
#include <cmath>
#include <cstdio>
#include <memory>
#include <stdexcept>
#include <string>

#include "cli/commands.hpp"
#include "cli/common.hpp"
#include "moetrain/data_loader.hpp"
#include "moetrain/runtime.hpp"

namespace moetrain::cli {

void add_eval_command(CLI::App& app) {
  struct Options {
    std::string checkpoint;
    std::vector<std::string> sets;
  };
  auto o = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand("eval", "Validation loss and perplexity of a checkpoint");
  cmd->add_option("--checkpoint", o->checkpoint, "Checkpoint directory")->required();
  cmd->add_option("--set", o->sets, "Override a config field, e.g. data.val_pattern=...");
  cmd->callback([o] {
    const Config cfg = checkpoint_config(o->checkpoint, o->sets);
    const Runtime rt = make_runtime(cfg);
    auto model = load_checkpoint_model(o->checkpoint, cfg, *rt.backend, cfg.data.batch_size);
    EvalLoader val(match_shards(cfg.data.val_pattern, "data.val_pattern"),
                   std::uint32_t(cfg.model.vocab_size), cfg.data.batch_size, cfg.model.seq_len, 0,
                   1, "data.val_pattern '" + cfg.data.val_pattern + "'");
    Batch b;
    double sum = 0;
    std::int64_t n = 0;
    while (val.next(b)) {
      if (b.valid_targets() == 0) continue;
      const ForwardStats& st = model->forward(b.inputs.data(), b.targets.data());
      sum += st.ce_sum;
      n += st.ce_tokens;
    }
    const double loss = n ? sum / double(n) : 0.0;
    if (!std::isfinite(loss)) {
      char buf[32];
      std::snprintf(buf, sizeof buf, "%g", loss);
      throw std::runtime_error(o->checkpoint + ": val loss is " + buf + " over " +
                               std::to_string(n) +
                               " tokens: the checkpoint's weights are not usable (non-finite "
                               "values in model.safetensors?)");
    }
    // The short form for people, then the loss in round-trip precision (%.17g) for scripts.
    std::printf(
        "%s: val loss %.4f, perplexity %.2f over %lld tokens (%llu windows of %d); val loss "
        "%.17g\n",
        o->checkpoint.c_str(), loss, std::exp(loss), static_cast<long long>(n),
        static_cast<unsigned long long>(val.total_windows()), cfg.model.seq_len, loss);
  });
}

}  // namespace moetrain::cli
