#include "moetrain/trainer.hpp"

#include <chrono>
#include <cmath>
#include <filesystem>
#include <memory>
#include <stdexcept>

#include <spdlog/spdlog.h>

#include "moetrain/atomic_file.hpp"
#include "moetrain/checkpoint.hpp"
#include "moetrain/checkpoint_session.hpp"
#include "moetrain/data_loader.hpp"
#include "moetrain/device_stats.hpp"
#include "moetrain/lr_schedule.hpp"
#include "moetrain/memory_check.hpp"
#include "moetrain/model.hpp"
#include "moetrain/optimizer.hpp"
#include "moetrain/runtime.hpp"
#include "moetrain/signals.hpp"
#include "moetrain/tokenizer.hpp"
#include "train/run_lock.hpp"
#include "train/step_record.hpp"
#include "train/watchdog.hpp"

namespace fs = std::filesystem;

namespace moetrain {

namespace {
using Clock = std::chrono::steady_clock;
double since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}
}  // namespace

Trainer::Trainer(const Config& cfg, Runtime& rt, const TrainOptions& opts)
    : cfg_(cfg),
      comm_(*rt.comm),
      opts_(opts),
      be_(*rt.backend),
      spikes_(cfg.train.spike_std),
      out_dir_(cfg.train.out_dir) {
  const ModelConfig& m = cfg_.model;
  const bool fresh = opts_.resume.empty();
  check_tokenizer_file(cfg_.data.tokenizer, "data.tokenizer");
  check_memory_fits(cfg_, be_, comm_.world(), leader());  // before anything large is allocated
  if (leader()) {
    lock_ = std::make_unique<RunLock>(out_dir_);
    remove_checkpoint_leftovers(out_dir_);
    const std::string metrics = (fs::path(out_dir_) / "metrics.jsonl").string();
    if (fresh && !list_checkpoints(out_dir_).empty())
      throw std::runtime_error("train.out_dir '" + out_dir_ +
                               "' already holds a run with checkpoints: continue it with "
                               "--resume, or choose another train.out_dir");
    // A run killed before its first checkpoint: nothing can resume it, so a fresh start proceeds.
    if (fresh)
      if (const auto aside = set_stale_metrics_aside(metrics))
        spdlog::warn("{} is from a run that left no checkpoint; moved it to {}", metrics, *aside);
  }

  stats_ = std::make_unique<DeviceStats<float>>(be_);
  model_ = std::make_unique<Model<float>>(m, be_, cfg_.data.batch_size, stats_.get(),
                                          cfg_.train.grad_accum);
  model_->init_weights(cfg_.train.seed);
  opt_ = std::make_unique<Optimizer<float>>(cfg_, model_->layout(), be_, &comm_, stats_.get());
  stats_->allocate();
  train_ = std::make_unique<DataLoader>(
      match_shards(cfg_.data.train_pattern, "data.train_pattern"), std::uint32_t(m.vocab_size),
      cfg_.data.batch_size, m.seq_len, comm_.rank(), comm_.world(), cfg_.data.shuffle,
      cfg_.train.seed, "data.train_pattern '" + cfg_.data.train_pattern + "'");
  if (cfg_.train.eval_interval > 0)
    val_ = std::make_unique<EvalLoader>(match_shards(cfg_.data.val_pattern, "data.val_pattern"),
                                        std::uint32_t(m.vocab_size), cfg_.data.batch_size,
                                        m.seq_len, comm_.rank(), comm_.world(),
                                        "data.val_pattern '" + cfg_.data.val_pattern + "'");
  checkpoints_ = std::make_unique<CheckpointSession>(
      cfg_, comm_, CheckpointSession::Parts{*model_, *opt_, *train_, spikes_});

  if (!fresh) {
    const TrainingProgress p = checkpoints_->resume(checkpoints_->resolve(opts_.resume));
    step_ = p.step;
    tokens_seen_ = p.tokens_seen;
  }
  // Everything is loaded: from here on files are written.
  if (leader()) {
    fs::create_directories(out_dir_);
    write_text_atomically((fs::path(out_dir_) / "config.json").string(),
                          config_to_json(cfg_).dump(2) + "\n");
    if (!cfg_.data.tokenizer.empty())
      fs::copy_file(cfg_.data.tokenizer, fs::path(out_dir_) / "tokenizer.json",
                    fs::copy_options::overwrite_existing);
    metrics_ = std::make_unique<MetricsLog>((fs::path(out_dir_) / "metrics.jsonl").string(),
                                            fresh ? -1 : step_);
  }
  flops_ = flops_per_token(m);
  const bool given_peak = cfg_.train.peak_gflops > 0;
  peak_gflops_ = given_peak ? cfg_.train.peak_gflops : measure_gemm_peak_gflops(be_);
  if (leader())
    spdlog::info(
        "model: {:.2f}M parameters, {:.1f} MFLOP/token (training); {} ranks x {} "
        "micro-batches x {} x {} = {} tokens per step; gemm peak {:.1f} GFLOP/s ({})",
        double(model_->layout().total()) / 1e6, flops_.training() / 1e6, comm_.world(),
        cfg_.train.grad_accum, cfg_.data.batch_size, m.seq_len, global_tokens_per_step(),
        peak_gflops_, given_peak ? "train.peak_gflops" : "measured");
}

Trainer::~Trainer() = default;

std::int64_t Trainer::global_tokens_per_step() const {
  return std::int64_t(cfg_.data.batch_size) * cfg_.model.seq_len * cfg_.train.grad_accum *
         comm_.world();
}

StepResult Trainer::train_step(double lr) {
  const ModelConfig& m = cfg_.model;
  const int L = m.n_layers, H = m.n_heads, ga = cfg_.train.grad_accum;
  StepResult r;
  r.aux.assign(std::size_t(L), 0);
  r.z.assign(std::size_t(L), 0);
  r.entropy.assign(std::size_t(L), 0);
  r.smax.assign(std::size_t(L), std::vector<double>(std::size_t(H), -1e300));

  r.load.assign(std::size_t(L), {});
  const std::uint64_t bytes0 = comm_.bytes_moved();
  const double blocked0 = comm_.blocked_seconds();
  const Model<float>::GradsReadyFn grads_ready = [&](int stage) {
    opt_->grads_ready(stage, model_->grads());
  };

  // The micro-batches and the optimizer step are enqueued without reading anything back; one
  // download of the stats block then brings the whole step's statistics (docs/design.md §7.1).
  model_->zero_grads();
  Batch batch;
  for (int micro = 0; micro < ga; ++micro) {
    auto t0 = Clock::now();
    train_->next(batch);
    r.data_s += since(t0);
    t0 = Clock::now();
    // The last micro-batch completes the gradients: each bucket's reduce-scatter starts as soon
    // as backward has produced it (docs/design.md §5.2).
    const bool overlap = micro == ga - 1 && cfg_.train.overlap_grad_reduce && comm_.world() > 1;
    model_->forward_backward_async(batch.inputs.data(), batch.targets.data(), 1.0 / ga, micro,
                                   overlap ? grads_ready : Model<float>::GradsReadyFn{});
    r.compute_s += since(t0);
  }
  auto t0 = Clock::now();
  opt_->step_async(model_->params(), model_->grads(), lr,
                   StepInputs<float>{model_->smax_device(), ga, model_->loss_sums_device(), ga});
  stats_->download();
  r.optimizer_s = since(t0);

  for (int micro = 0; micro < ga; ++micro) {
    const ForwardStats st = model_->slot_stats(micro);
    r.objective += st.objective / ga;
    r.ce += st.ce / ga;
    for (std::size_t l = 0; l < std::size_t(L); ++l) {
      r.aux[l] += st.aux[l] / ga;
      r.z[l] += st.z[l] / ga;
      r.entropy[l] += st.entropy[l] / ga;
      for (std::size_t h = 0; h < std::size_t(H); ++h)
        r.smax[l][h] = std::max(r.smax[l][h], st.smax[l][h]);
      if (!st.load[l].empty()) {
        r.load[l].resize(st.load[l].size(), 0);
        for (std::size_t e = 0; e < st.load[l].size(); ++e) r.load[l][e] += st.load[l][e];
      }
    }
  }

  // Average the logged losses over ranks (sum / world); S_max (max) and expert loads (sum) feed
  // the bias update; the optimizer's sums (update RMS, clipped heads) follow: all of them in one
  // host collective per step. (QK-clip reduced S_max on the device.)
  t0 = Clock::now();
  const int world = comm_.world();
  std::vector<double> sums = {r.objective, r.ce}, maxes;
  for (std::size_t l = 0; l < std::size_t(L); ++l) {
    sums.push_back(r.aux[l]);
    sums.push_back(r.z[l]);
    sums.push_back(r.entropy[l]);
    for (auto c : r.load[l]) sums.push_back(double(c));
    maxes.insert(maxes.end(), r.smax[l].begin(), r.smax[l].end());
  }
  const std::size_t n_stats = sums.size();
  const std::vector<double> opt_sums = opt_->local_sums();
  sums.insert(sums.end(), opt_sums.begin(), opt_sums.end());
  comm_.reduce_host(sums.data(), sums.size(), maxes.data(), maxes.size());
  r.objective = sums[0] / world;
  r.ce = sums[1] / world;
  std::size_t at = 2;
  for (std::size_t l = 0; l < std::size_t(L); ++l) {
    r.aux[l] = sums[at++] / world;
    r.z[l] = sums[at++] / world;
    r.entropy[l] = sums[at++] / world;
    for (auto& c : r.load[l]) c = std::int64_t(sums[at++]);
    std::copy(maxes.begin() + std::ptrdiff_t(l * std::size_t(H)),
              maxes.begin() + std::ptrdiff_t((l + 1) * std::size_t(H)), r.smax[l].begin());
  }
  r.opt =
      opt_->finish_step(std::vector<double>(sums.begin() + std::ptrdiff_t(n_stats), sums.end()));
  r.comm_s = since(t0);
  // After the reductions, so every rank sees the same verdict. The optimizer's gate made every
  // update op of the step a no-op for a non-finite cross-entropy or gradient norm (the router
  // losses enter the gradients, so a non-finite one shows in the norm).
  if (!std::isfinite(r.objective))
    throw NonFiniteError("non-finite loss (" + std::to_string(r.objective) + ") at step " +
                         std::to_string(step_ + 1) + "; no parameter was updated");
  if (r.opt.skipped) throw NonFiniteError(skipped_step_message(r.opt, opt_->step_count() + 1));
  if (m.moe.router == RouterType::SigmoidBias && m.moe.bias_update_rate > 0)
    model_->update_router_biases(r.load, m.moe.bias_update_rate);
  r.comm_bytes = comm_.bytes_moved() - bytes0;
  r.comm_blocked_s = comm_.blocked_seconds() - blocked0;
  return r;
}

double Trainer::evaluate() {
  val_->reset();
  Batch batch;
  double sums[2] = {0, 0};  // loss sum, valid targets
  std::int64_t batches = 0;
  while ((cfg_.train.eval_batches == 0 || batches < cfg_.train.eval_batches) && val_->next(batch)) {
    ++batches;
    if (batch.valid_targets() == 0) continue;
    const ForwardStats& st = model_->forward(batch.inputs.data(), batch.targets.data());
    sums[0] += st.ce_sum;
    sums[1] += double(st.ce_tokens);
  }
  comm_.reduce_host(sums, 2, nullptr, 0);
  return sums[1] > 0 ? sums[0] / sums[1] : 0.0;
}

void Trainer::save_checkpoint() {
  checkpoints_->save({step_, tokens_seen_});
}

void Trainer::log_step(const StepResult& r, double lr, double step_s, bool spike) {
  StepInfo info;
  info.step = step_;
  info.tokens = tokens_seen_;
  info.lr = lr;
  info.step_s = step_s;
  info.tokens_per_s = double(global_tokens_per_step()) / step_s;
  info.mfu = flops_.training() * info.tokens_per_s / 1e9 / peak_gflops_ / comm_.world();
  info.loss_spikes = spikes_.spikes();
  info.spike = spike;
  if (!log_safely(step_record(cfg_.model, r, info))) return;
  if (step_ % cfg_.train.log_interval == 0 || step_ == cfg_.train.steps) {
    const double elapsed = since(started_);
    const double eta = elapsed / double(step_ - first_step_) * double(cfg_.train.steps - step_);
    spdlog::info("{}", progress_line(r, info, cfg_.train.steps, eta));
  }
}

void Trainer::write_shard_report() {
  write_text_atomically(
      (fs::path(out_dir_) / ("zero1_rank" + std::to_string(comm_.rank()) + ".json")).string(),
      shard_report(comm_, to_string(cfg_.optim.name), *opt_).dump(2) + "\n");
}

std::string Trainer::after_divergence() {
  const auto newest = checkpoints_->newest();
  if (!newest) return "no checkpoint was written";
  if (unproven_ && leader() && *newest == checkpoint_path(out_dir_, step_)) {
    // The checkpoint of the step right before: its weights gave this non-finite loss, so move it
    // out of --resume's way.
    const std::string aside = set_checkpoint_aside(*newest, "diverged");
    const auto previous = checkpoints_->newest();
    return "the checkpoint of the step before, " + *newest + ", was moved to " + aside + "; " +
           (previous ? "--resume continues from " + *previous + " (consider a lower optim.lr)"
                     : std::string("no earlier checkpoint is left"));
  }
  return "--resume continues from " + *newest;
}

bool Trainer::log_safely(const nlohmann::json& record) {
  if (!leader()) return true;
  if (!metrics_failure_.empty()) return false;
  try {
    metrics_->write(record);
    return true;
  } catch (const MetricsWriteError& e) {
    metrics_failure_ = e.what();
    return false;
  }
}

int Trainer::run() {
  stop_signals_save_from_now();
  started_ = Clock::now();
  watchdog_ = std::make_unique<Watchdog>(cfg_.train.watchdog_seconds, comm_.rank());
  first_step_ = step_;
  while (step_ < cfg_.train.steps) {
    const double lr = lr_at(cfg_.optim, int(step_), cfg_.train.steps);
    const auto t0 = Clock::now();
    watchdog_->beat();
    StepResult r;
    try {
      r = train_step(lr);
    } catch (const NonFiniteError& e) {
      throw NonFiniteError(std::string(e.what()) + "; " + after_divergence());
    }
    watchdog_->beat();
    const double step_s = since(t0);
    ++step_;
    tokens_seen_ += global_tokens_per_step();
    // A step ran from the newest checkpoint's weights with a finite loss and gradients: it is
    // good, so the older ones beyond train.keep_checkpoints may go.
    if (unproven_) {
      checkpoints_->prune();
      unproven_ = false;
    }
    const bool spike = spikes_.observe(r.objective);
    if (step_ == first_step_ + 1) write_shard_report();
    if (leader()) log_step(r, lr, step_s, spike);

    if (val_ && cfg_.train.eval_interval > 0 &&
        (step_ % cfg_.train.eval_interval == 0 || step_ == cfg_.train.steps)) {
      const double v = evaluate();
      watchdog_->beat();
      if (leader() && log_safely(eval_record(step_, tokens_seen_, v)))
        spdlog::info("eval step {}: val loss {:.4f}, perplexity {:.2f}", step_, v, std::exp(v));
    }

    // Stop requests and a lost metrics record are decided together, so all ranks agree.
    double flags[2] = {double(stop_requested() || (opts_.stop_at >= 0 && step_ >= opts_.stop_at)),
                       double(!metrics_failure_.empty())};
    comm_.reduce_host(nullptr, 0, flags, 2);
    const bool stop = flags[0] > 0, failed = flags[1] > 0;
    const bool due =
        cfg_.train.checkpoint_interval > 0 && step_ % cfg_.train.checkpoint_interval == 0;
    if (failed) {
      std::string outcome;
      try {
        save_checkpoint();
        outcome = "a checkpoint of step " + std::to_string(step_) + " was written";
      } catch (const std::exception& e) {
        outcome = std::string("the checkpoint attempt failed too (") + e.what() + ")";
      }
      throw std::runtime_error(
          (leader() ? metrics_failure_ : "rank 0 could not write metrics.jsonl") +
          "; stopped after step " + std::to_string(step_) + ": " + outcome);
    }
    if (due || stop || step_ == cfg_.train.steps) {
      save_checkpoint();
      unproven_ = true;
    }
    watchdog_->beat();
    if (stop) {
      if (leader())
        spdlog::info("stopped after step {} (checkpoint written); continue with --resume", step_);
      return 0;
    }
  }
  // The last step: nothing more will test the final checkpoint.
  if (unproven_) checkpoints_->prune();
  if (leader())
    spdlog::info("done: {} steps, {} tokens; metrics in {}, checkpoints in {}", step_, tokens_seen_,
                 (fs::path(out_dir_) / "metrics.jsonl").string(), checkpoints_root(out_dir_));
  return 0;
}

int run_training(const Config& cfg, Runtime& rt, const TrainOptions& opts) {
  Trainer t(cfg, rt, opts);
  return t.run();
}

}  // namespace moetrain
