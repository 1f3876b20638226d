// The MoE transformer (docs/design.md §3): parameters in one buffer (see ParamLayout), activations
// in one planned arena, forward and backward as lists of layer steps (src/model/: the attention
// block and head here, the SwiGLU FFN in ffn.cpp, the MoE layer's router, dispatcher and experts
// in moe/).
//
//   x = embed[tokens]
//   per layer: x += Attn(RMSNorm(x));  x += FFN(RMSNorm(x))   (dense SwiGLU, or MoE)
//   logits = lm_head(RMSNorm(x));  objective = CE + sum_l aux_coef L_aux + sum_l z_coef L_z
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "moetrain/backend.hpp"
#include "moetrain/config.hpp"
#include "moetrain/device_stats.hpp"
#include "moetrain/param_layout.hpp"

namespace moetrain {
class ArenaPlan;
}

namespace moetrain {

// What one forward pass reports. Per-layer vectors have n_layers entries; MoE fields of dense
// layers are zero / empty.
struct ForwardStats {
  double objective = 0;  // ce + sum aux_coef * aux + sum z_coef * z
  double ce = 0;         // mean cross-entropy over the valid (non-negative) targets
  double ce_sum = 0;     // their sum, and their number (for averaging across batches/ranks)
  std::int64_t ce_tokens = 0;
  std::vector<double> aux, z, entropy;          // per layer: L_aux, L_z, mean router entropy
  std::vector<std::vector<std::int32_t>> load;  // per layer: assignments per expert (this batch)
  std::vector<std::vector<double>> smax;        // per layer, per query head: max q.k/sqrt(hd)
};

template <typename T>
class Model {
 public:
  // Plans parameters and the activation arena for micro-batches of `batch` sequences of
  // cfg.seq_len tokens. The forward statistics go to `stats_slots` slots (one per micro-batch of
  // a step) of `stats`, which its owner allocates once every user reserved its regions; without
  // one the model keeps a one-slot block of its own.
  Model(const ModelConfig& cfg, Backend<T>& backend, int batch, DeviceStats<T>* stats = nullptr,
        int stats_slots = 1);
  // The bytes of the activation arena such a model allocates (and its routers' expert biases),
  // computed by the same requests without allocating (attention_saved_elems and head_chunk_rows:
  // the backend's queries for this shape). Throws std::overflow_error when a size does not fit in
  // 64 bits.
  static std::size_t activation_bytes(const ModelConfig& cfg, std::size_t batch,
                                      std::size_t attention_saved_elems, int head_chunk_rows,
                                      Storage activations);
  ~Model();
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  const ModelConfig& config() const { return cfg_; }
  const ParamLayout& layout() const { return layout_; }
  int batch() const { return batch_; }
  int tokens() const { return batch_ * cfg_.seq_len; }
  Backend<T>& backend() { return be_; }

  T* params() { return params_; }
  T* grads() { return grads_; }

  // The sigmoid_bias routers' bias update with the loads summed over the global batch (see
  // Router::update_bias); layers with empty loads are left as they are.
  void update_router_biases(const std::vector<std::vector<std::int64_t>>& loads, double rate);
  // The routers' expert biases as checkpoint state, [n_layers][n_experts] (zeros for dense
  // layers), and back (errors name `source`).
  std::vector<std::vector<double>> expert_bias_state() const;
  void load_expert_bias_state(const std::vector<std::vector<double>>& bias,
                              const std::string& source);

  // Normal(0, std) weights per ParamLayout, gains 1; deterministic in `seed`.
  void init_weights(std::uint64_t seed);
  void zero_grads();

  // Forward only (evaluation), then its statistics (slot 0; one download of the stats block).
  // tokens, targets: host arrays of tokens() ids; a negative target is padding and carries no loss.
  const ForwardStats& forward(const std::int32_t* tokens, const std::int32_t* targets);
  // Forward, then backward of grad_scale * objective, accumulated into grads(). Nothing is read
  // back: the statistics stay in slot `slot` of the stats block until its next download.
  // grads_ready, when given, is called with each stage of grad_ready_stage (0 .. n_layers, in
  // order) once backward has enqueued every gradient of that stage: the hook the gradient
  // buckets' communication starts from. It enqueues work that is not the backend's, so that
  // micro-batch then runs without Backend::run_repeated (no CUDA graph).
  using GradsReadyFn = std::function<void(int stage)>;
  void forward_backward_async(const std::int32_t* tokens, const std::int32_t* targets,
                              double grad_scale, int slot, const GradsReadyFn& grads_ready = {});
  // The same in slot 0, then its statistics (one download of the stats block).
  const ForwardStats& forward_backward(const std::int32_t* tokens, const std::int32_t* targets,
                                       double grad_scale);
  // A slot's statistics as the stats block's last download found them.
  ForwardStats slot_stats(int slot) const;
  // The device statistics the optimizer reads: S_max [stats_slots][n_layers][n_heads] and the
  // cross-entropy sums [stats_slots] (valid after the forwards that wrote them).
  T* smax_device() const { return stats_block_->device(regions_.smax); }
  const double* loss_sums_device() const { return stats_block_->device(regions_.ce_sum); }
  int stats_slots() const { return slots_; }
  // Forward to the logits of token `row` (0 <= row < tokens()) only: a [vocab] device buffer of
  // the activation storage, valid until the next forward. For sampling.
  CDevPtr forward_logits(const std::int32_t* tokens, int row);

  const ForwardStats& stats() const { return stats_; }

 private:
  struct Layer;
  static void plan_arena(ArenaPlan& plan, const ModelConfig& cfg, std::size_t batch,
                         std::size_t att_saved, int head_rows, Storage act, Model* model);
  // The forward statistics in the stats block, each [slots][n_layers][width] but ce_sum [slots].
  struct StatsRegions {
    typename DeviceStats<T>::template Region<double> ce_sum;
    typename DeviceStats<T>::template Region<T> smax, router;  // width n_heads; 3 (L_aux, L_z, H)
    typename DeviceStats<T>::template Region<std::int32_t> counts;  // width n_experts
  };
  static StatsRegions reserve_stats(DeviceStats<T>& stats, const ModelConfig& cfg, int slots);
  // Layer `layer`'s row of a region in the current slot.
  template <typename U>
  U* stat_ptr(typename DeviceStats<T>::template Region<U> r, int layer, int width) const {
    return stats_block_->device(r) +
           (std::size_t(slot_) * std::size_t(cfg_.n_layers) + std::size_t(layer)) *
               std::size_t(width);
  }
  // Uploads a micro-batch (tokens; targets and their count of valid ones when given; the
  // cross-entropy gradient's scale when given) and selects its statistics slot.
  void stage_inputs(const std::int32_t* tokens, const std::int32_t* targets, const T* ce_scale,
                    int slot);
  // The device work of a forward from the staged inputs (with the loss when `loss`, and dlogits in
  // place of the logits when also `grad`) and of a backward: ops only, no host transfer, so a
  // micro-batch's forward and backward repeat as one recording (Backend::run_repeated).
  void enqueue_forward(bool loss, bool grad);
  void enqueue_backward(double grad_scale, const GradsReadyFn& grads_ready);
  void attention_forward(Layer& l, CDevPtr x);
  void attention_backward(Layer& l, CDevPtr x);
  static std::int64_t count_valid(const std::int32_t* targets, int n);

  ModelConfig cfg_;
  Backend<T>& be_;
  int batch_;
  ParamLayout layout_;
  AttentionShape att_;
  T* params_ = nullptr;
  T* grads_ = nullptr;
  void* arena_ = nullptr;
  std::vector<std::unique_ptr<Layer>> layers_;

  // Activations in the arena (N = batch * seq tokens, d = d_model, V = vocab), in the backend's
  // activation storage; the integer buffers and the T statistics beside them.
  Storage act_ = Storage::F32;
  std::int32_t* tokens_ = nullptr;   // [N]
  std::int32_t* targets_ = nullptr;  // [N]
  T* ce_scale_ = nullptr;            // [1]   the cross-entropy gradient's scale (a device scalar)
  std::vector<DevPtr> resid_;        // n_layers + 1 residual streams, each [N, d]
  DevPtr final_norm_;                // [N, d]
  T* final_rstd_ = nullptr;          // [N]
  int head_rows_ = 0;                // rows of one lm_head + cross-entropy chunk (backend's query)
  DevPtr logits_;                    // [head_rows_, V]  one chunk's logits, then its dlogits
  T* losses_ = nullptr;              // [N]
  T* rope_cos_ = nullptr;            // [seq, head_dim / 2]
  T* rope_sin_ = nullptr;            // [seq, head_dim / 2]
  DevPtr tmp_;                       // [N, d]  the MoE combine's scratch
  // Backward scratch in the arena, reused by every layer.
  DevPtr dres_;    // [N, d]  gradient of the residual stream
  DevPtr dnorm_;   // [N, d]  gradient of a norm's output
  DevPtr datt_;    // [N, n_heads * head_dim]
  DevPtr dqkv_;    // [N, (n_heads + 2 n_kv_heads) * head_dim]
  struct Scratch;  // the FFN and MoE blocks' backward scratch (model.cpp)
  std::unique_ptr<Scratch> scratch_;

  std::unique_ptr<DeviceStats<T>> own_stats_;
  DeviceStats<T>* stats_block_ = nullptr;
  int slots_ = 1, slot_ = 0;
  StatsRegions regions_;
  std::vector<std::int64_t> slot_valid_;  // [slots] valid targets of each slot's forward
  std::vector<double> repeat_scales_;     // the grad_scales seen: with the slot, a repeat key
  ForwardStats stats_;
};

extern template class Model<float>;
extern template class Model<double>;

}  // namespace moetrain
