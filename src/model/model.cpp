#include "moetrain/model.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "model/arena.hpp"
#include "model/ffn.hpp"
#include "model/linear.hpp"
#include "model/moe/moe_layer.hpp"
#include "moetrain/device_stats.hpp"
#include "moetrain/rng.hpp"

namespace moetrain {

// One transformer layer: x += Attn(RMSNorm(x)); x += FFN(RMSNorm(x)), FFN dense SwiGLU or MoE.
// Shapes: N tokens, d = d_model, H query heads, Hkv kv heads, hd = head_dim.
template <typename T>
struct Model<T>::Layer {
  int index = 0;
  const LayerOffsets* w = nullptr;
  DevPtr an1;                        // [N, d]  RMSNorm(x) into attention
  T* rstd1 = nullptr;                // [N]
  DevPtr qkv;                        // [N, (H + 2 Hkv) hd]  q, k (both rotated) and v
  T* att_saved = nullptr;            // [attention_saved_elems]  what the backend keeps for backward
  DevPtr att_out;                    // [N, H hd]
  DevPtr mid;                        // [N, d]  x + Attn(...): the residual between the two blocks
  DevPtr an2;                        // [N, d]  RMSNorm(mid) into the FFN
  T* rstd2 = nullptr;                // [N]
  FfnActs dense;                     // dense layers
  std::unique_ptr<MoeLayer<T>> moe;  // MoE layers
};

template <typename T>
struct Model<T>::Scratch {
  FfnScratch ffn;                     // the largest SwiGLU block's [rows, 2 ff], [rows, ff]
  typename MoeLayer<T>::Scratch moe;  // the MoE layers' (its ffn member aliases ffn)
};

// The model's arena requests, in one place: bound to `model`'s buffers (its constructor), or,
// with no model, on a dry plan where one layer of each kind, repeated, stands for all the layers
// of that kind (activation_bytes, the memory estimate). Sizes are 64-bit and checked.
template <typename T>
void Model<T>::plan_arena(ArenaPlan& plan, const ModelConfig& cfg, std::size_t batch,
                          std::size_t att_saved, int head_rows, Storage act, Model* model) {
  const std::size_t N = checked_mul(batch, std::size_t(cfg.seq_len)), d = std::size_t(cfg.d_model);
  const std::size_t E = std::size_t(cfg.moe.n_experts),
                    NK = checked_mul(N, std::size_t(cfg.moe.top_k));
  const std::size_t hd = std::size_t(cfg.head_dim), H = std::size_t(cfg.n_heads);
  const std::size_t qkv = checked_mul(checked_add(H, 2 * std::size_t(cfg.n_kv_heads)), hd);
  const std::size_t out = checked_mul(H, hd), Nd = checked_mul(N, d);
  const std::size_t L = std::size_t(cfg.n_layers), n_dense = std::size_t(cfg.dense_layers);
  // A dry plan's requests name stand-in slots (never bound).
  T* sink = nullptr;
  DevPtr act_sink;
  std::int32_t* int_sink = nullptr;
  Scratch dry_scratch;
  const auto slot = [&](T* Model::*member) -> T*& { return model ? model->*member : sink; };
  const auto act_slot = [&](DevPtr Model::*member) -> DevPtr& {
    return model ? model->*member : act_sink;
  };
  const auto int_slot = [&](std::int32_t* Model::*member) -> std::int32_t*& {
    return model ? model->*member : int_sink;
  };

  plan.request(int_slot(&Model::tokens_), N);
  plan.request(int_slot(&Model::targets_), N);
  plan.request(slot(&Model::ce_scale_), 1);
  std::size_t ffn_rows_ff = 0;  // the largest rows * ff of a SwiGLU block: sizes its scratch
  const auto layer_requests = [&](Layer& a, bool moe) {
    plan.request(a.an1, Nd, act);
    plan.request(a.rstd1, N);
    plan.request(a.qkv, checked_mul(N, qkv), act);
    plan.request(a.att_saved, att_saved);
    plan.request(a.att_out, checked_mul(N, out), act);
    plan.request(a.mid, Nd, act);
    plan.request(a.an2, Nd, act);
    plan.request(a.rstd2, N);
    if (!moe) {
      a.dense.plan(plan, N, std::size_t(cfg.dense_ff), act);
      ffn_rows_ff = std::max(ffn_rows_ff, checked_mul(N, std::size_t(cfg.dense_ff)));
    } else {
      MoeLayer<T>::plan_acts(plan, cfg, N, act, a.moe.get());
      ffn_rows_ff = std::max(ffn_rows_ff, checked_mul(NK, std::size_t(cfg.moe.expert_ff)));
      if (cfg.moe.n_shared_experts > 0)
        ffn_rows_ff = std::max(ffn_rows_ff, checked_mul(N, std::size_t(cfg.moe.shared_ff)));
    }
  };
  if (model) {
    model->resid_.assign(L + 1, nullptr);
    for (auto& r : model->resid_) plan.request(r, Nd, act);
    for (auto& layer : model->layers_) layer_requests(*layer, layer->moe != nullptr);
  } else {
    DevPtr resid;
    Layer dense, moe;
    plan.set_repeat(L + 1);
    plan.request(resid, Nd, act);
    plan.set_repeat(n_dense);
    if (n_dense) layer_requests(dense, false);
    plan.set_repeat(L - n_dense);
    if (L > n_dense) layer_requests(moe, true);
    plan.set_repeat(1);
  }
  plan.request(act_slot(&Model::final_norm_), Nd, act);
  plan.request(slot(&Model::final_rstd_), N);
  plan.request(act_slot(&Model::logits_),
               checked_mul(std::size_t(head_rows), std::size_t(cfg.vocab_size)), act);
  plan.request(slot(&Model::losses_), N);
  plan.request(slot(&Model::rope_cos_), checked_mul(std::size_t(cfg.seq_len), hd / 2));
  plan.request(slot(&Model::rope_sin_), checked_mul(std::size_t(cfg.seq_len), hd / 2));
  plan.request(act_slot(&Model::tmp_), Nd, act);
  plan.request(act_slot(&Model::dres_), Nd, act);
  plan.request(act_slot(&Model::dnorm_), Nd, act);
  plan.request(act_slot(&Model::datt_), checked_mul(N, out), act);
  plan.request(act_slot(&Model::dqkv_), checked_mul(N, qkv), act);
  Scratch& s = model ? *model->scratch_ : dry_scratch;
  plan.request(s.ffn.dh, checked_mul(2, ffn_rows_ff), act);
  plan.request(s.ffn.dact, ffn_rows_ff, act);
  plan.request(s.moe.dyg, checked_mul(NK, d), act);
  plan.request(s.moe.dxg, checked_mul(NK, d), act);
  plan.request(s.moe.dgates, NK);
  plan.request(s.moe.dlogits, checked_mul(N, E));
}

template <typename T>
std::size_t Model<T>::activation_bytes(const ModelConfig& cfg, std::size_t batch,
                                       std::size_t attention_saved_elems, int head_chunk_rows,
                                       Storage activations) {
  if (head_chunk_rows <= 0)
    throw std::invalid_argument("Model::activation_bytes: head_chunk_rows must be >= 1");
  ArenaPlan plan = ArenaPlan::dry();
  plan_arena(plan, cfg, batch, attention_saved_elems, head_chunk_rows, activations, nullptr);
  // Each MoE layer's router allocates its expert bias [E] on its own (64-byte rounded).
  const std::size_t bias =
      checked_add(checked_mul(std::size_t(cfg.moe.n_experts), sizeof(T)), 63) / 64 * 64;
  const std::size_t moe_layers = std::size_t(cfg.n_layers - cfg.dense_layers);
  // A model used on its own keeps its statistics in a one-slot block of its own.
  DeviceStats<T> sizing;
  reserve_stats(sizing, cfg, 1);
  const std::size_t stats = checked_add(sizing.bytes(), 63) / 64 * 64;
  return checked_add(checked_add(plan.planned_bytes(), checked_mul(moe_layers, bias)), stats);
}

template <typename T>
typename Model<T>::StatsRegions Model<T>::reserve_stats(DeviceStats<T>& stats,
                                                        const ModelConfig& cfg, int slots) {
  const std::size_t S = std::size_t(slots), L = std::size_t(cfg.n_layers);
  StatsRegions r;
  r.ce_sum = stats.template reserve<double>(S);
  r.smax = stats.template reserve<T>(checked_mul(S * L, std::size_t(cfg.n_heads)));
  r.router = stats.template reserve<T>(S * L * 3);
  r.counts =
      stats.template reserve<std::int32_t>(checked_mul(S * L, std::size_t(cfg.moe.n_experts)));
  return r;
}

template <typename T>
Model<T>::Model(const ModelConfig& cfg, Backend<T>& backend, int batch, DeviceStats<T>* stats,
                int stats_slots)
    : cfg_(cfg), be_(backend), batch_(batch), layout_(cfg), scratch_(std::make_unique<Scratch>()) {
  if (cfg_.head_dim <= 0) throw std::invalid_argument("Model: head_dim must be resolved (> 0)");
  if (batch <= 0) throw std::invalid_argument("Model: batch must be >= 1");
  if (stats_slots <= 0) throw std::invalid_argument("Model: stats_slots must be >= 1");
  if (!stats) own_stats_ = std::make_unique<DeviceStats<T>>(be_);
  stats_block_ = stats ? stats : own_stats_.get();
  slots_ = stats_slots;
  regions_ = reserve_stats(*stats_block_, cfg_, slots_);
  slot_valid_.assign(std::size_t(slots_), 0);
  att_ = AttentionShape{batch, cfg_.seq_len, cfg_.n_heads, cfg_.n_kv_heads, cfg_.head_dim};

  params_ = static_cast<T*>(be_.alloc_bytes(layout_.total() * sizeof(T)));
  be_.set_weights(params_, layout_.total());
  grads_ = static_cast<T*>(be_.alloc_bytes(layout_.total() * sizeof(T)));

  for (int l = 0; l < cfg_.n_layers; ++l) {
    auto layer = std::make_unique<Layer>();
    layer->index = l;
    layer->w = &layout_.layer(l);
    if (layer->w->moe) layer->moe = std::make_unique<MoeLayer<T>>(cfg_, *layer->w, be_, tokens());
    layers_.push_back(std::move(layer));
  }
  act_ = be_.activation_storage();
  head_rows_ = be_.head_chunk_rows(tokens(), cfg_.vocab_size);
  if (head_rows_ < 1 || head_rows_ > tokens())
    throw std::logic_error("Model: the backend's head_chunk_rows " + std::to_string(head_rows_) +
                           " is not in 1.." + std::to_string(tokens()));
  ArenaPlan plan;
  plan_arena(plan, cfg_, std::size_t(batch), be_.attention_saved_elems(att_), head_rows_, act_,
             this);
  arena_ = plan.commit(be_);
  Scratch& s = *scratch_;
  s.moe.ffn = s.ffn;

  // RoPE tables, computed in double on the host so every backend rotates by the same angles.
  const int half = cfg_.head_dim / 2;
  std::vector<T> c(std::size_t(cfg_.seq_len) * half), sn(c.size());
  for (int p = 0; p < cfg_.seq_len; ++p)
    for (int i = 0; i < half; ++i) {
      const double freq = std::pow(cfg_.rope_theta, -2.0 * i / cfg_.head_dim);
      c[std::size_t(p) * half + i] = T(std::cos(p * freq));
      sn[std::size_t(p) * half + i] = T(std::sin(p * freq));
    }
  be_.upload(rope_cos_, c.data(), c.size() * sizeof(T));
  be_.upload(rope_sin_, sn.data(), sn.size() * sizeof(T));

  const std::size_t L = std::size_t(cfg_.n_layers);
  stats_.aux.assign(L, 0);
  stats_.z.assign(L, 0);
  stats_.entropy.assign(L, 0);
  stats_.load.assign(L, {});
  stats_.smax.assign(L, std::vector<double>(std::size_t(cfg_.n_heads), 0));
  if (own_stats_) own_stats_->allocate();
}

template <typename T>
Model<T>::~Model() {
  layers_.clear();  // the routers free their biases
  be_.free_bytes(arena_);
  be_.free_bytes(grads_);
  be_.free_bytes(params_);
}

template <typename T>
void Model<T>::init_weights(std::uint64_t seed) {
  Rng rng(seed);
  std::vector<T> host(layout_.total());
  for (const ParamTensor& t : layout_.tensors())
    for (std::size_t i = 0; i < t.numel; ++i)
      host[t.offset + i] = t.init_std == 0 ? T(1) : T(rng.normal() * t.init_std);
  be_.upload(params_, host.data(), host.size() * sizeof(T));
}

template <typename T>
void Model<T>::update_router_biases(const std::vector<std::vector<std::int64_t>>& loads,
                                    double rate) {
  for (std::size_t l = 0; l < layers_.size() && l < loads.size(); ++l)
    if (layers_[l]->moe && !loads[l].empty()) layers_[l]->moe->router().update_bias(loads[l], rate);
}

template <typename T>
std::vector<std::vector<double>> Model<T>::expert_bias_state() const {
  std::vector<std::vector<double>> out;
  for (const auto& layer : layers_)
    out.push_back(layer->moe ? layer->moe->router().bias_state()
                             : std::vector<double>(std::size_t(cfg_.moe.n_experts), 0.0));
  return out;
}

template <typename T>
void Model<T>::load_expert_bias_state(const std::vector<std::vector<double>>& bias,
                                      const std::string& source) {
  if (bias.size() != layers_.size())
    throw std::runtime_error(source + ": expert_bias has " + std::to_string(bias.size()) +
                             " layers, expected " + std::to_string(layers_.size()));
  for (const auto& row : bias) {  // every row is checked before any is loaded
    if (row.size() != std::size_t(cfg_.moe.n_experts))
      throw std::runtime_error(source + ": expert_bias rows must have " +
                               std::to_string(cfg_.moe.n_experts) + " entries");
    for (double b : row)
      if (!std::isfinite(b))
        throw std::runtime_error(source + ": expert_bias holds a non-finite value (" +
                                 std::to_string(b) + ")");
  }
  for (std::size_t l = 0; l < layers_.size(); ++l)
    if (layers_[l]->moe) layers_[l]->moe->router().load_bias_state(bias[l], source);
}

template <typename T>
void Model<T>::zero_grads() {
  be_.zero(grads_, layout_.total() * sizeof(T));
}

// mid = x + o_proj(Attn(RoPE(qkv(RMSNorm(x)))))
template <typename T>
void Model<T>::attention_forward(Layer& a, CDevPtr x) {
  const int N = tokens(), d = cfg_.d_model, hd = cfg_.head_dim;
  const LayerOffsets& w = *a.w;
  be_.rmsnorm_forward(a.an1, a.rstd1, x, params_ + w.attn_norm, N, d, cfg_.norm_eps);
  linear_forward(be_, a.qkv, a.an1, params_ + w.qkv, N, d, att_.qkv_width());
  be_.rope_forward(a.qkv, att_.qkv_width(), N, cfg_.seq_len, cfg_.n_heads, hd, rope_cos_,
                   rope_sin_);
  be_.rope_forward(a.qkv + std::size_t(cfg_.n_heads) * hd, att_.qkv_width(), N, cfg_.seq_len,
                   cfg_.n_kv_heads, hd, rope_cos_, rope_sin_);
  be_.attention_forward(a.att_out, a.att_saved, stat_ptr(regions_.smax, a.index, cfg_.n_heads),
                        a.qkv, att_);
  be_.copy(a.mid.get(), x.get(), std::size_t(N) * d * storage_bytes(act_));
  linear_forward(be_, a.mid, a.att_out, params_ + w.o_proj, N, att_.out_width(), d, true);
}

// dres_ = d/d(mid) on entry; d/dx on exit (the residual path plus the attention branch).
template <typename T>
void Model<T>::attention_backward(Layer& a, CDevPtr x) {
  const int N = tokens(), d = cfg_.d_model, hd = cfg_.head_dim;
  const LayerOffsets& w = *a.w;
  linear_backward(be_, datt_, grads_ + w.o_proj, dres_, a.att_out, params_ + w.o_proj, N,
                  att_.out_width(), d, false);
  be_.attention_backward(dqkv_, datt_, a.qkv, a.att_out, a.att_saved, att_);
  be_.rope_backward(dqkv_, att_.qkv_width(), N, cfg_.seq_len, cfg_.n_heads, hd, rope_cos_,
                    rope_sin_);
  be_.rope_backward(dqkv_ + std::size_t(cfg_.n_heads) * hd, att_.qkv_width(), N, cfg_.seq_len,
                    cfg_.n_kv_heads, hd, rope_cos_, rope_sin_);
  linear_backward(be_, dnorm_, grads_ + w.qkv, dqkv_, a.an1, params_ + w.qkv, N, d,
                  att_.qkv_width(), false);
  be_.rmsnorm_backward(dres_, grads_ + w.attn_norm, dnorm_, x, params_ + w.attn_norm, a.rstd1, N,
                       d);
}

template <typename T>
void Model<T>::stage_inputs(const std::int32_t* tok, const std::int32_t* tgt, const T* ce_scale,
                            int slot) {
  const std::size_t N = std::size_t(tokens());
  if (slot < 0 || slot >= slots_)
    throw std::invalid_argument("Model: statistics slot " + std::to_string(slot) + " of " +
                                std::to_string(slots_));
  slot_ = slot;
  be_.upload(tokens_, tok, N * sizeof(std::int32_t));
  if (tgt) {
    be_.upload(targets_, tgt, N * sizeof(std::int32_t));
    slot_valid_[std::size_t(slot)] = count_valid(tgt, int(N));
  }
  if (ce_scale) be_.upload(ce_scale_, ce_scale, sizeof(T));
}

template <typename T>
void Model<T>::enqueue_forward(bool loss, bool grad) {
  const int N = tokens(), d = cfg_.d_model, V = cfg_.vocab_size;
  be_.embedding_forward(resid_[0], tokens_, params_ + layout_.embed(), N, d);

  for (auto& layer : layers_) {
    Layer& a = *layer;
    const CDevPtr x = resid_[std::size_t(a.index)];
    const DevPtr out = resid_[std::size_t(a.index) + 1];
    attention_forward(a, x);
    // FFN block: out = mid + FFN(RMSNorm(mid)).
    be_.rmsnorm_forward(a.an2, a.rstd2, a.mid, params_ + a.w->ffn_norm, N, d, cfg_.norm_eps);
    be_.copy(out.get(), a.mid.get(), std::size_t(N) * d * storage_bytes(act_));
    if (a.moe) {
      a.moe->forward(params_, a.an2, out, tmp_);
      const typename Router<T>::Acts& r = a.moe->router().acts();
      be_.copy(stat_ptr(regions_.router, a.index, 3), r.stats, 3 * sizeof(T));
      be_.copy(stat_ptr(regions_.counts, a.index, cfg_.moe.n_experts), r.counts,
               std::size_t(cfg_.moe.n_experts) * sizeof(std::int32_t));
    } else {
      ffn_forward(be_, params_, a.w->dense, d, a.an2, N, a.dense, out);
    }
  }

  be_.rmsnorm_forward(final_norm_, final_rstd_, resid_.back(), params_ + layout_.final_norm(), N, d,
                      cfg_.norm_eps);
  if (!loss) return;
  // The head in chunks of head_rows_ tokens: lm_head, cross-entropy (dlogits over the logits),
  // and in training the head's backward at once, while the chunk is still in cache — dnorm_ =
  // dlogits W for the chunk's rows, dW += dlogits^T x — so no [N, V] buffer exists.
  double* ce_sum = stats_block_->device(regions_.ce_sum) + slot_;
  be_.zero(ce_sum, sizeof(double));
  const T* W = params_ + layout_.lm_head();
  for (int r0 = 0; r0 < N; r0 += head_rows_) {
    const int n = std::min(head_rows_, N - r0);
    const std::size_t at = std::size_t(r0) * std::size_t(d);
    linear_forward(be_, logits_, final_norm_ + at, W, n, d, V);
    be_.cross_entropy(losses_ + r0, ce_sum, logits_, targets_ + r0, n, V,
                      grad ? ce_scale_ : nullptr);
    if (grad)
      linear_backward(be_, dnorm_ + at, grads_ + layout_.lm_head(), logits_, final_norm_ + at, W, n,
                      d, V, false);
  }
}

template <typename T>
std::int64_t Model<T>::count_valid(const std::int32_t* targets, int n) {
  std::int64_t v = 0;
  for (int i = 0; i < n; ++i) v += targets[i] >= 0;
  return v;
}

template <typename T>
ForwardStats Model<T>::slot_stats(int slot) const {
  if (slot < 0 || slot >= slots_)
    throw std::invalid_argument("Model::slot_stats: slot " + std::to_string(slot) + " of " +
                                std::to_string(slots_));
  const DeviceStats<T>& b = *stats_block_;
  const std::size_t L = std::size_t(cfg_.n_layers), H = std::size_t(cfg_.n_heads),
                    E = std::size_t(cfg_.moe.n_experts), s = std::size_t(slot);
  const std::vector<double> ce = b.host(regions_.ce_sum);
  const std::vector<T> smax = b.host(regions_.smax), router = b.host(regions_.router);
  const std::vector<std::int32_t> counts = b.host(regions_.counts);
  ForwardStats st;
  st.ce_sum = ce[s];
  st.ce_tokens = slot_valid_[s];
  st.ce = st.ce_tokens > 0 ? st.ce_sum / double(st.ce_tokens) : 0.0;
  st.objective = st.ce;
  st.aux.assign(L, 0);
  st.z.assign(L, 0);
  st.entropy.assign(L, 0);
  st.load.assign(L, {});
  st.smax.assign(L, std::vector<double>(H, 0));
  for (const auto& layer : layers_) {
    const std::size_t l = std::size_t(layer->index), at = s * L + l;
    for (std::size_t h = 0; h < H; ++h) st.smax[l][h] = double(smax[at * H + h]);
    if (!layer->moe) continue;
    st.aux[l] = double(router[at * 3]);
    st.z[l] = double(router[at * 3 + 1]);
    st.entropy[l] = double(router[at * 3 + 2]);
    st.objective += cfg_.moe.aux_loss_coef * st.aux[l] + cfg_.moe.z_loss_coef * st.z[l];
    st.load[l].assign(counts.begin() + std::ptrdiff_t(at * E),
                      counts.begin() + std::ptrdiff_t((at + 1) * E));
  }
  return st;
}

template <typename T>
void Model<T>::enqueue_backward(double grad_scale, const GradsReadyFn& grads_ready) {
  const int N = tokens(), d = cfg_.d_model;
  // The training forward's chunked head left dnorm_ = d(grad_scale * objective)/d final_norm_
  // and added the lm_head's gradient.
  be_.zero(dres_.get(), std::size_t(N) * d * storage_bytes(act_));
  be_.rmsnorm_backward(dres_, grads_ + layout_.final_norm(), dnorm_, resid_.back(),
                       params_ + layout_.final_norm(), final_rstd_, N, d);

  for (auto it = layers_.rbegin(); it != layers_.rend(); ++it) {
    Layer& a = **it;
    // dres_ = d/d(out of this layer). FFN block backward into dnorm_ (d/d an2), then through the
    // FFN norm; the residual path already carries dres_.
    if (a.moe)
      a.moe->backward(params_, grads_, a.an2, dres_, dnorm_, grad_scale, scratch_->moe);
    else
      ffn_backward(be_, params_, grads_, a.w->dense, d, a.an2, N, a.dense, dres_, dnorm_, false,
                   scratch_->ffn);
    be_.rmsnorm_backward(dres_, grads_ + a.w->ffn_norm, dnorm_, a.mid, params_ + a.w->ffn_norm,
                         a.rstd2, N, d);
    attention_backward(a, resid_[std::size_t(a.index)]);
    if (grads_ready) grads_ready(backward_stage(a.index, cfg_.n_layers));
  }
  be_.embedding_backward(grads_ + layout_.embed(), dres_, tokens_, N, d);
  if (grads_ready) grads_ready(backward_stage(-1, cfg_.n_layers));
}

template <typename T>
const ForwardStats& Model<T>::forward(const std::int32_t* tok, const std::int32_t* tgt) {
  if (!tgt) throw std::invalid_argument("Model::forward: targets required");
  stage_inputs(tok, tgt, nullptr, 0);
  enqueue_forward(true, false);
  stats_block_->download();
  stats_ = slot_stats(0);
  return stats_;
}

template <typename T>
void Model<T>::forward_backward_async(const std::int32_t* tok, const std::int32_t* tgt,
                                      double grad_scale, int slot,
                                      const GradsReadyFn& grads_ready) {
  if (!tgt) throw std::invalid_argument("Model::forward_backward: targets required");
  if (grad_scale == 0) throw std::invalid_argument("Model::forward_backward: grad_scale is 0");
  const std::int64_t valid = count_valid(tgt, tokens());
  if (valid == 0) throw std::invalid_argument("Model::forward_backward: every target is padding");
  const T ce_scale = T(grad_scale / double(valid));
  stage_inputs(tok, tgt, &ce_scale, slot);
  if (grads_ready) {
    enqueue_forward(true, true);
    enqueue_backward(grad_scale, grads_ready);
    return;
  }
  // The same ops with the same arguments for each (slot, grad_scale): one recording each.
  std::size_t scale_index = 0;
  while (scale_index < repeat_scales_.size() && repeat_scales_[scale_index] != grad_scale)
    ++scale_index;
  if (scale_index == repeat_scales_.size()) repeat_scales_.push_back(grad_scale);
  const std::uint64_t id = std::uint64_t(scale_index) * std::uint64_t(slots_) + std::uint64_t(slot);
  be_.run_repeated({this, id}, [&] {
    enqueue_forward(true, true);
    enqueue_backward(grad_scale, {});
  });
}

template <typename T>
const ForwardStats& Model<T>::forward_backward(const std::int32_t* tok, const std::int32_t* tgt,
                                               double grad_scale) {
  forward_backward_async(tok, tgt, grad_scale, 0);
  stats_block_->download();
  stats_ = slot_stats(0);
  return stats_;
}

template <typename T>
CDevPtr Model<T>::forward_logits(const std::int32_t* tok, int row) {
  if (row < 0 || row >= tokens())
    throw std::invalid_argument("Model::forward_logits: row " + std::to_string(row) +
                                " is not a token of the batch (0.." + std::to_string(tokens() - 1) +
                                ")");
  stage_inputs(tok, nullptr, nullptr, 0);
  enqueue_forward(false, false);
  linear_forward(be_, logits_, final_norm_ + std::size_t(row) * std::size_t(cfg_.d_model),
                 params_ + layout_.lm_head(), 1, cfg_.d_model, cfg_.vocab_size);
  return logits_;
}

template class Model<float>;
template class Model<double>;

}  // namespace moetrain
