// `moetrain bench`: times forward+backward of the configured model on random tokens and reports
// model FLOPs utilisation against the GEMM peak of its backend (cblas_sgemm on the CPU, cuBLASLt on
// a GPU), measured in the same run. On the CUDA backend it also counts the host's launches and
// synchronisations per step, and --profile breaks a step into phases by device time (CUDA events
// around each op); on the CPU --profile times each op by wall clock.
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cli/commands.hpp"
#include "moetrain/checkpoint.hpp"
#include "moetrain/config.hpp"
#include "moetrain/flops.hpp"
#include "moetrain/memory_check.hpp"
#include "moetrain/model.hpp"
#include "moetrain/optimizer.hpp"
#include "moetrain/profiling_backend.hpp"
#include "moetrain/rng.hpp"
#include "moetrain/runtime.hpp"
#include "moetrain/safetensors.hpp"

namespace moetrain::cli {

namespace {

struct BenchOptions {
  std::string config;
  std::vector<std::string> overrides;
  int steps = 5;
  int warmup = 2;  // on CUDA: the eager warm-up of a micro-batch, then its graph capture
  int peak_size = 2048;
  bool json = false;
  bool profile = false;
  std::string dump;  // a folder for the weights and the batch timed (scripts/bench_vs_torch.py)
};

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

void run_bench(const BenchOptions& o) {
  const Config cfg = load_config(o.config, o.overrides);
  const ModelConfig& m = cfg.model;

  const Runtime rt = make_runtime(cfg);
  Backend<float>& be = *rt.backend;
  check_memory_fits(cfg, be, 1, !o.json);  // before the model is allocated
  const double peak = measure_gemm_peak_gflops(be, o.peak_size);

  const int B = cfg.data.batch_size, T = m.seq_len, N = B * T;
  // The profiler wraps the backend only when asked, so plain runs time the bare backend. It waits
  // for each op to finish (a download synchronises an asynchronous backend), so per-op times are
  // device times on a GPU too.
  DeviceBuffer<float, float> probe(be, 1);
  DeviceMarkers* markers = dynamic_cast<DeviceMarkers*>(&be);
  auto profiler = std::make_unique<ProfilingBackend<float>>(
      be,
      [&be, p = probe.get()] {
        float x;
        be.download(&x, p, sizeof x);
      },
      markers);
  const auto host_counts = [markers] {
    return markers ? std::pair{markers->host_launches(), markers->host_syncs()}
                   : std::pair<std::uint64_t, std::uint64_t>{0, 0};
  };
  Backend<float>& run_be = o.profile ? *profiler : static_cast<Backend<float>&>(be);
  Model<float> model(m, run_be, B);
  model.init_weights(cfg.train.seed);
  Rng rng(cfg.train.seed + 1);
  std::vector<std::int32_t> tokens(std::size_t(N) + 1);
  for (auto& t : tokens) t = std::int32_t(rng.below(std::uint64_t(m.vocab_size)));
  if (!o.dump.empty()) {
    // The PyTorch twin's inputs (scripts/torch_reference.py): the same weights and batch.
    std::filesystem::create_directories(o.dump);
    save_safetensors(o.dump + "/weights.safetensors", weights_to_tensors(model));
    TensorMap batch;
    batch["tokens"] = HostTensor::i32({B, T}, tokens.data());
    batch["targets"] = HostTensor::i32({B, T}, tokens.data() + 1);
    save_safetensors(o.dump + "/batch.safetensors", batch);
  }

  for (int i = 0; i < o.warmup; ++i) {
    model.zero_grads();
    model.forward_backward(tokens.data(), tokens.data() + 1, 1.0);
  }
  profiler->reset();
  double total = 0, best = 1e30;
  double loss = 0;
  const auto fb0 = host_counts();
  for (int i = 0; i < o.steps; ++i) {
    const auto t0 = Clock::now();
    model.zero_grads();
    loss = model.forward_backward(tokens.data(), tokens.data() + 1, 1.0).objective;
    const double s = seconds_since(t0);
    total += s;
    best = std::min(best, s);
    profiler->collect();  // forward_backward's stats download has synchronised
  }
  const auto fb1 = host_counts();
  const double mean = total / o.steps;

  // One optimizer step (Muon's Newton-Schulz included) per train.grad_accum micro-batches.
  Optimizer<float> opt(cfg, model.layout(), run_be);
  std::vector<std::vector<double>> smax = model.stats().smax;
  std::vector<float> grads(model.layout().total());
  run_be.download(grads.data(), model.grads(), grads.size() * sizeof(float));
  double opt_total = 0;
  profiler->set_phase("optimizer");
  OpProfile opt_warm;
  auto opt0 = host_counts();
  for (int i = 0; i < o.steps + 1; ++i) {
    run_be.upload(model.grads(), grads.data(), grads.size() * sizeof(float));
    if (i == 1) opt0 = host_counts();
    const auto t0 = Clock::now();
    opt.step(model.params(), model.grads(), cfg.optim.lr, smax);  // downloads its stats
    if (i > 0) opt_total += seconds_since(t0);                    // the first step warms up
    profiler->collect();
    if (i == 0)
      opt_warm =
          profiler->phases().count("optimizer") ? profiler->phases().at("optimizer") : OpProfile{};
  }
  const auto opt1 = host_counts();
  profiler->set_phase("");
  const double opt_s = opt_total / o.steps;
  // Per step of the run (grad_accum micro-batches and one optimizer step): launches, syncs, and the
  // phases' device time.
  const double ga = cfg.train.grad_accum;
  const double launches_per_step =
      (double(fb1.first - fb0.first) * ga + double(opt1.first - opt0.first)) / o.steps;
  const double syncs_per_step =
      (double(fb1.second - fb0.second) * ga + double(opt1.second - opt0.second)) / o.steps;
  std::vector<std::pair<std::string, double>> phase_s;  // seconds per step
  for (const char* ph : {"attention", "experts", "other GEMMs", "elementwise", "optimizer"}) {
    const auto it = profiler->phases().find(ph);
    double s = it == profiler->phases().end() ? 0.0 : it->second.seconds;
    if (std::string(ph) == "optimizer")
      s = (s - opt_warm.seconds) / o.steps;
    else
      s = s / o.steps * ga;
    phase_s.emplace_back(ph, s);
  }
  double phase_total = 0;
  for (const auto& [ph, s] : phase_s) phase_total += s;
  const double step_s = mean * cfg.train.grad_accum + opt_s;
  const double opt_share = opt_s / step_s;
  const FlopCount f = flops_per_token(m);
  const double tok_s = N / mean;
  const double gflops = f.training() * tok_s / 1e9;
  const double mfu = gflops / peak;

  const std::size_t total_params = model.layout().total();
  if (o.json) {
    nlohmann::json r = {{"config", o.config},
                        {"backend", be.name()},
                        {"tokens_per_step", N},
                        {"params", total_params},
                        {"step_seconds_mean", mean},
                        {"step_seconds_best", best},
                        {"tokens_per_second", tok_s},
                        {"flops_per_token", f.training()},
                        {"achieved_gflops", gflops},
                        {"sgemm_peak_gflops", peak},
                        {"mfu", mfu},
                        {"optimizer", to_string(cfg.optim.name)},
                        {"optimizer_seconds", opt_s},
                        {"grad_accum", cfg.train.grad_accum},
                        {"optimizer_share", opt_share},
                        {"loss", loss}};
    if (markers) {
      r["host_launches_per_step"] = launches_per_step;
      r["host_syncs_per_step"] = syncs_per_step;
    }
    if (o.profile) {
      nlohmann::json ph = nlohmann::json::object();
      for (const auto& [name, s] : phase_s) ph[name] = s;
      ph["communication"] = 0.0;  // one process: no collective
      r["phase_seconds_per_step"] = ph;
      r["phase_clock"] = markers ? "device (CUDA events)" : "wall (a sync after each op)";
    }
    std::printf("%s\n", r.dump(2).c_str());
    return;
  }
  std::printf("moetrain bench: %s  (backend %s)\n", o.config.c_str(), be.name());
  std::printf(
      "  model      d=%d layers=%d heads=%d/%d hd=%d seq=%d vocab=%d experts=%d top-%d "
      "ff=%d dense_layers=%d shared=%d\n",
      m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.head_dim, m.seq_len, m.vocab_size,
      m.moe.n_experts, m.moe.top_k, m.moe.expert_ff, m.dense_layers, m.moe.n_shared_experts);
  std::printf("  params     %.2fM total\n", double(total_params) / 1e6);
  std::printf(
      "  FLOPs/token forward %.2fM = attn proj %.2fM + attn core %.2fM + ffn %.2fM + "
      "router %.3fM + lm_head %.2fM; training = 3x forward = %.2fM\n",
      f.forward() / 1e6, f.attn_proj / 1e6, f.attn_core / 1e6, f.ffn / 1e6, f.router / 1e6,
      f.lm_head / 1e6, f.training() / 1e6);
  std::printf(
      "             (2 per multiply-add of each matmul a token passes, k routed experts, "
      "causal attention; lookups, norms, activations not counted)\n");
  std::printf(
      "  step       %d tokens (batch %d x seq %d): mean %.1f ms, best %.1f ms over %d "
      "steps (+%d warm-up)\n",
      N, B, T, mean * 1e3, best * 1e3, o.steps, o.warmup);
  std::printf("  throughput %.0f tokens/s, %.1f GFLOP/s\n", tok_s, gflops);
  // The backend's own gemm, in the run's precision: oneDNN's matmul on the CPU, cuBLASLt on a GPU
  // (bf16 operands rounded on the way in when train.precision gives bf16 GEMMs).
  std::printf("  GEMM peak  %.1f GFLOP/s (the backend's gemm %dx%dx%d, best of 3, same run)\n",
              peak, o.peak_size, o.peak_size, o.peak_size);
  std::printf("  MFU        %.1f%% of the measured GEMM peak\n", 100 * mfu);
  std::printf(
      "  optimizer  %s step %.1f ms; with train.grad_accum=%d (%d tokens per step) it is "
      "%.1f%% of the step (%.2f s fwd+bwd + %.2f s optimizer)\n",
      to_string(cfg.optim.name), opt_s * 1e3, cfg.train.grad_accum, N * cfg.train.grad_accum,
      100 * opt_share, mean * cfg.train.grad_accum, opt_s);
  if (markers)
    std::printf(
        "  host       %.0f launches and %.1f synchronisations per step (kernels, library calls and "
        "graph launches; train.cuda_graphs=%s)\n",
        launches_per_step, syncs_per_step, cfg.train.cuda_graphs ? "true" : "false");
  if (!o.profile) return;
  std::printf("  phases per step (%d micro-batch(es) + one optimizer step; %s, ops run eagerly):\n",
              cfg.train.grad_accum,
              markers ? "device time from CUDA events" : "wall time, a sync after each op");
  for (const auto& [name, s] : phase_s)
    std::printf("    %-24s %8.2f ms %5.1f%%\n", name.c_str(), s * 1e3,
                phase_total > 0 ? 100 * s / phase_total : 0.0);
  std::printf("    %-24s %8.2f ms        (one process: no collective)\n", "communication", 0.0);
  std::printf(
      "  per-op time per step (backend calls, each waited for; GEMMs inside attention count as "
      "attention):\n");
  for (const auto& [op, p] : profiler->profile()) {
    std::printf("    %-24s %8.2f ms %5.1f%%", op.c_str(), p.seconds / o.steps * 1e3,
                100 * p.seconds / total);
    if (p.flops > 0) std::printf("  %6.1f GFLOP/s", p.flops / p.seconds / 1e9);
    std::printf("\n");
  }
}

}  // namespace

void add_bench_command(CLI::App& app) {
  auto opts = std::make_shared<BenchOptions>();
  CLI::App* cmd = app.add_subcommand("bench", "Time forward+backward and report MFU");
  cmd->add_option("--config", opts->config, "JSON config file")->required();
  cmd->add_option("--set", opts->overrides, "Override a config field: key=value (repeatable)");
  cmd->add_option("--steps", opts->steps, "Timed steps")->check(CLI::PositiveNumber);
  cmd->add_option("--warmup", opts->warmup, "Untimed warm-up steps")->check(CLI::NonNegativeNumber);
  cmd->add_option("--peak-size", opts->peak_size, "Size n of the n x n x n GEMM peak probe")
      ->check(CLI::Range(64, 8192));
  cmd->add_flag("--json", opts->json, "Print the results as JSON");
  cmd->add_flag("--profile", opts->profile, "Also print the time per backend op");
  cmd->add_option("--dump", opts->dump,
                  "Write the timed weights and batch to this folder (weights.safetensors, "
                  "batch.safetensors: the PyTorch twin's inputs)");
  cmd->callback([opts] { run_bench(*opts); });
}

}  // namespace moetrain::cli
