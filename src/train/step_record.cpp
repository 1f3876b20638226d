#include "train/step_record.hpp"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>

#include <spdlog/fmt/fmt.h>

namespace moetrain {

namespace {

std::string format_duration(double s) {
  const long t = long(std::max(0.0, s));
  char buf[32];
  if (t >= 3600)
    std::snprintf(buf, sizeof(buf), "%ldh%02ldm", t / 3600, (t / 60) % 60);
  else
    std::snprintf(buf, sizeof(buf), "%ldm%02lds", t / 60, t % 60);
  return buf;
}

}  // namespace

nlohmann::json step_record(const ModelConfig& m, const StepResult& r, const StepInfo& info) {
  nlohmann::json smax_max = nlohmann::json::array(), smax = nlohmann::json::array(),
                 expert_tokens = nlohmann::json::array(), imbalance = nlohmann::json::array(),
                 entropy = nlohmann::json::array(), aux = nlohmann::json::array(),
                 z = nlohmann::json::array();
  double aux_total = 0, z_total = 0;
  for (int l = 0; l < m.n_layers; ++l) {
    const std::size_t li = std::size_t(l);
    smax_max.push_back(*std::max_element(r.smax[li].begin(), r.smax[li].end()));
    smax.push_back(r.smax[li]);
    if (!is_moe_layer(m, l)) {
      for (auto* a : {&expert_tokens, &imbalance, &entropy, &aux, &z}) a->push_back(nullptr);
      continue;
    }
    expert_tokens.push_back(r.load[li]);
    double total = 0, mx = 0;
    for (auto c : r.load[li]) {
      total += double(c);
      mx = std::max(mx, double(c));
    }
    imbalance.push_back(total > 0 ? mx / (total / m.moe.n_experts) : 0.0);
    entropy.push_back(r.entropy[li]);
    aux.push_back(r.aux[li]);
    z.push_back(r.z[li]);
    aux_total += r.aux[li];
    z_total += r.z[li];
  }
  return {{"step", info.step},
          {"tokens", info.tokens},
          {"loss", r.objective},
          {"ce", r.ce},
          {"aux_loss", aux_total},
          {"z_loss", z_total},
          {"aux_loss_layers", aux},
          {"z_loss_layers", z},
          {"lr", info.lr},
          {"grad_norm", r.opt.grad_norm},
          {"tokens_per_s", info.tokens_per_s},
          {"mfu", info.mfu},
          {"update_rms", {{"muon", r.opt.update_rms_muon}, {"adamw", r.opt.update_rms_adamw}}},
          {"smax_max", smax_max},
          {"smax", smax},
          {"expert_tokens", expert_tokens},
          {"clipped_heads", r.opt.clipped_heads},
          {"imbalance", imbalance},
          {"router_entropy", entropy},
          {"loss_spikes", info.loss_spikes},
          {"spike", info.spike},
          {"step_ms", info.step_s * 1e3},
          {"data_ms", r.data_s * 1e3},
          {"fwd_bwd_ms", r.compute_s * 1e3},
          {"comm_ms", r.comm_s * 1e3},
          {"comm_bytes", r.comm_bytes},
          {"comm_blocked_ms", r.comm_blocked_s * 1e3},
          {"optimizer_ms", r.optimizer_s * 1e3}};
}

nlohmann::json eval_record(std::int64_t step, std::int64_t tokens, double val_loss) {
  return {
      {"step", step}, {"tokens", tokens}, {"val_loss", val_loss}, {"val_ppl", std::exp(val_loss)}};
}

std::string progress_line(const StepResult& r, const StepInfo& info, std::int64_t total_steps,
                          double eta_s) {
  double smax_all = -1e300;
  for (const auto& layer : r.smax)
    smax_all = std::max(smax_all, *std::max_element(layer.begin(), layer.end()));
  return fmt::format(
      "step {}/{} | loss {:.4f} | lr {:.2e} | {:.0f} tok/s | MFU {:.1f}% | "
      "S_max {:.1f} | clipped {} | ETA {}",
      info.step, total_steps, r.objective, info.lr, info.tokens_per_s, 100 * info.mfu, smax_all,
      r.opt.clipped_heads, format_duration(eta_s));
}

nlohmann::json shard_report(const Communicator& comm, const std::string& optimizer_name,
                            const Optimizer<float>& opt) {
  return {{"rank", comm.rank()},
          {"world", comm.world()},
          {"communicator", comm.name()},
          {"pid", ::getpid()},
          {"optimizer", optimizer_name},
          {"optimizer_state_bytes", opt.state_bytes()},
          {"owned_muon_matrices", opt.owned_matrix_names()},
          {"grad_buckets", opt.grad_buckets()},
          {"orthogonalised_last_step", opt.orthogonalised_last_step()}};
}

}  // namespace moetrain
