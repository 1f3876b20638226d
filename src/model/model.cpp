#include "moetrain/model.hpp"

#include <cmath>
#include <stdexcept>

#include "model/arena.hpp"
#include "moetrain/rng.hpp"

namespace moetrain {

namespace {

// y[N,out] = x[N,in] W[out,in]^T (+ y when accumulate)
template <typename T>
void linear_forward(Backend<T>& be, T* y, const T* x, const T* W, int N, int in, int out,
                    bool accumulate = false) {
  be.gemm(false, true, N, out, in, T(1), x, in, W, in, T(accumulate ? 1 : 0), y, out);
}

// dx[N,in] (+)= dy[N,out] W[out,in];  dW[out,in] += dy^T x
template <typename T>
void linear_backward(Backend<T>& be, T* dx, T* dW, const T* dy, const T* x, const T* W, int N,
                     int in, int out, bool accumulate_dx) {
  be.gemm(false, false, N, in, out, T(1), dy, out, W, in, T(accumulate_dx ? 1 : 0), dx, in);
  be.gemm(true, false, out, in, N, T(1), dy, out, x, in, T(1), dW, in);
}

}  // namespace

template <typename T>
struct Model<T>::LayerActs {
  T *an1 = nullptr, *rstd1 = nullptr, *qkv = nullptr, *att_saved = nullptr, *att_out = nullptr;
  T *mid = nullptr, *an2 = nullptr, *rstd2 = nullptr, *smax = nullptr;
  T *h = nullptr, *act = nullptr;  // dense SwiGLU
  // MoE: router, grouped expert activations
  T *rlogits = nullptr, *scores = nullptr, *gates = nullptr, *router_stats = nullptr;
  T *xg = nullptr, *hg = nullptr, *actg = nullptr, *yg = nullptr;
  std::int32_t *topk = nullptr, *counts = nullptr, *offsets = nullptr, *pos = nullptr;
  std::vector<T*> sh, sact;                // shared experts
  std::vector<std::int32_t> host_offsets;  // offsets on the host, to size the expert GEMMs
};

template <typename T>
Model<T>::Model(const ModelConfig& cfg, Backend<T>& backend, int batch)
    : cfg_(cfg), be_(backend), batch_(batch), layout_(cfg) {
  if (cfg_.head_dim <= 0) throw std::invalid_argument("Model: head_dim must be resolved (> 0)");
  if (batch <= 0) throw std::invalid_argument("Model: batch must be >= 1");
  att_ = AttentionShape{batch, cfg_.seq_len, cfg_.n_heads, cfg_.n_kv_heads, cfg_.head_dim};
  const std::size_t N = std::size_t(tokens()), d = std::size_t(cfg_.d_model);
  const int L = cfg_.n_layers, E = cfg_.moe.n_experts, K = cfg_.moe.top_k;
  const std::size_t NK = N * std::size_t(K);

  params_ = static_cast<T*>(be_.alloc_bytes(layout_.total() * sizeof(T)));
  be_.set_weights(params_, layout_.total());
  grads_ = static_cast<T*>(be_.alloc_bytes(layout_.total() * sizeof(T)));
  expert_bias_ = static_cast<T*>(be_.alloc_bytes(std::size_t(L) * E * sizeof(T)));

  ArenaPlan plan;
  plan.request(tokens_, N);
  plan.request(targets_, N);
  resid_.assign(std::size_t(L) + 1, nullptr);
  for (auto& r : resid_) plan.request(r, N * d);
  acts_.resize(std::size_t(L));
  std::size_t max_h = 0, max_act = 0;  // sizes of the shared backward scratch
  for (int l = 0; l < L; ++l) {
    LayerActs& a = acts_[std::size_t(l)];
    plan.request(a.an1, N * d);
    plan.request(a.rstd1, N);
    plan.request(a.qkv, N * std::size_t(att_.qkv_width()));
    plan.request(a.att_saved, be_.attention_saved_elems(att_));
    plan.request(a.att_out, N * std::size_t(att_.out_width()));
    plan.request(a.mid, N * d);
    plan.request(a.an2, N * d);
    plan.request(a.rstd2, N);
    plan.request(a.smax, std::size_t(cfg_.n_heads));
    if (!is_moe_layer(cfg_, l)) {
      const std::size_t ff = std::size_t(cfg_.dense_ff);
      plan.request(a.h, N * 2 * ff);
      plan.request(a.act, N * ff);
      max_h = std::max(max_h, N * 2 * ff);
      max_act = std::max(max_act, N * ff);
    } else {
      const std::size_t ff = std::size_t(cfg_.moe.expert_ff);
      plan.request(a.rlogits, N * E);
      plan.request(a.scores, N * E);
      plan.request(a.gates, NK);
      plan.request(a.router_stats, 3);
      plan.request(a.topk, NK);
      plan.request(a.counts, std::size_t(E));
      plan.request(a.offsets, std::size_t(E) + 1);
      plan.request(a.pos, NK);
      plan.request(a.xg, NK * d);
      plan.request(a.hg, NK * 2 * ff);
      plan.request(a.actg, NK * ff);
      plan.request(a.yg, NK * d);
      max_h = std::max(max_h, NK * 2 * ff);
      max_act = std::max(max_act, NK * ff);
      const std::size_t sff = std::size_t(cfg_.moe.shared_ff);
      a.sh.assign(std::size_t(cfg_.moe.n_shared_experts), nullptr);
      a.sact.assign(std::size_t(cfg_.moe.n_shared_experts), nullptr);
      for (int s = 0; s < cfg_.moe.n_shared_experts; ++s) {
        plan.request(a.sh[std::size_t(s)], N * 2 * sff);
        plan.request(a.sact[std::size_t(s)], N * sff);
      }
      if (cfg_.moe.n_shared_experts > 0) {
        max_h = std::max(max_h, N * 2 * sff);
        max_act = std::max(max_act, N * sff);
      }
      a.host_offsets.assign(std::size_t(E) + 1, 0);
    }
  }
  plan.request(final_norm_, N * d);
  plan.request(final_rstd_, N);
  plan.request(logits_, N * std::size_t(cfg_.vocab_size));
  plan.request(losses_, N);
  plan.request(rope_cos_, std::size_t(cfg_.seq_len) * cfg_.head_dim / 2);
  plan.request(rope_sin_, std::size_t(cfg_.seq_len) * cfg_.head_dim / 2);
  plan.request(tmp_, N * d);
  plan.request(dres_, N * d);
  plan.request(dnorm_, N * d);
  plan.request(datt_, N * std::size_t(att_.out_width()));
  plan.request(dqkv_, N * std::size_t(att_.qkv_width()));
  plan.request(dh_, max_h);
  plan.request(dact_, max_act);
  plan.request(dyg_, NK * d);
  plan.request(dxg_, NK * d);
  plan.request(dgates_, NK);
  plan.request(drouter_, N * E);
  arena_ = plan.commit(be_);

  // RoPE tables, computed in double on the host so every backend rotates by the same angles.
  const int half = cfg_.head_dim / 2;
  std::vector<T> c(std::size_t(cfg_.seq_len) * half), s(c.size());
  for (int p = 0; p < cfg_.seq_len; ++p)
    for (int i = 0; i < half; ++i) {
      const double freq = std::pow(cfg_.rope_theta, -2.0 * i / cfg_.head_dim);
      c[std::size_t(p) * half + i] = T(std::cos(p * freq));
      s[std::size_t(p) * half + i] = T(std::sin(p * freq));
    }
  be_.upload(rope_cos_, c.data(), c.size() * sizeof(T));
  be_.upload(rope_sin_, s.data(), s.size() * sizeof(T));

  stats_.aux.assign(std::size_t(L), 0);
  stats_.z.assign(std::size_t(L), 0);
  stats_.entropy.assign(std::size_t(L), 0);
  stats_.load.assign(std::size_t(L), {});
  stats_.smax.assign(std::size_t(L), std::vector<double>(std::size_t(cfg_.n_heads), 0));
  host_losses_.resize(N);
}

template <typename T>
Model<T>::~Model() {
  be_.free_bytes(arena_);
  be_.free_bytes(expert_bias_);
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
void Model<T>::update_expert_bias(const std::vector<std::vector<std::int64_t>>& loads,
                                  double rate) {
  const int E = cfg_.moe.n_experts;
  std::vector<T> bias(std::size_t(cfg_.n_layers) * E);
  be_.download(bias.data(), expert_bias_, bias.size() * sizeof(T));
  for (int l = 0; l < cfg_.n_layers; ++l) {
    const auto& load = loads[std::size_t(l)];
    if (!is_moe_layer(cfg_, l) || load.empty()) continue;
    double mean = 0;
    for (auto c : load) mean += double(c);
    mean /= E;
    for (int e = 0; e < E; ++e) {
      const double diff = mean - double(load[std::size_t(e)]);
      const double sign = diff > 0 ? 1.0 : (diff < 0 ? -1.0 : 0.0);
      bias[std::size_t(l) * E + e] += T(rate * sign);
    }
  }
  be_.upload(expert_bias_, bias.data(), bias.size() * sizeof(T));
}

template <typename T>
void Model<T>::zero_grads() {
  be_.zero(grads_, layout_.total() * sizeof(T));
}

// h = x [w1; w3]^T, act = silu(h1) * h3, out += act w2^T
template <typename T>
void Model<T>::swiglu_forward(const SwiGluOffsets& w, const T* x, int rows, T* h, T* act, T* out) {
  const int d = cfg_.d_model;
  linear_forward(be_, h, x, params_ + w.w13, rows, d, 2 * w.ff);
  be_.swiglu_forward(act, h, rows, w.ff);
  linear_forward(be_, out, act, params_ + w.w2, rows, w.ff, d, /*accumulate=*/true);
}

template <typename T>
void Model<T>::swiglu_backward(const SwiGluOffsets& w, const T* x, int rows, const T* h,
                               const T* act, const T* dout, T* dx, bool accumulate_dx) {
  const int d = cfg_.d_model;
  linear_backward(be_, dact_, grads_ + w.w2, dout, act, params_ + w.w2, rows, w.ff, d, false);
  be_.swiglu_backward(dh_, dact_, h, rows, w.ff);
  linear_backward(be_, dx, grads_ + w.w13, dh_, x, params_ + w.w13, rows, d, 2 * w.ff,
                  accumulate_dx);
}

template <typename T>
void Model<T>::run_forward(const std::int32_t* tok, const std::int32_t* tgt, double ce_grad_scale) {
  const int N = tokens(), d = cfg_.d_model, V = cfg_.vocab_size, hd = cfg_.head_dim;
  const int E = cfg_.moe.n_experts, K = cfg_.moe.top_k;
  const std::size_t Nd = std::size_t(N) * d;
  be_.upload(tokens_, tok, std::size_t(N) * sizeof(std::int32_t));
  be_.embedding_forward(resid_[0], tokens_, params_ + layout_.embed(), N, d);

  for (int l = 0; l < cfg_.n_layers; ++l) {
    const LayerOffsets& w = layout_.layer(l);
    LayerActs& a = acts_[std::size_t(l)];
    const T* x = resid_[std::size_t(l)];
    T* out = resid_[std::size_t(l) + 1];

    // Attention block.
    be_.rmsnorm_forward(a.an1, a.rstd1, x, params_ + w.attn_norm, N, d, cfg_.norm_eps);
    linear_forward(be_, a.qkv, a.an1, params_ + w.qkv, N, d, att_.qkv_width());
    be_.rope_forward(a.qkv, att_.qkv_width(), N, cfg_.seq_len, cfg_.n_heads, hd, rope_cos_,
                     rope_sin_);
    be_.rope_forward(a.qkv + std::size_t(cfg_.n_heads) * hd, att_.qkv_width(), N, cfg_.seq_len,
                     cfg_.n_kv_heads, hd, rope_cos_, rope_sin_);
    be_.attention_forward(a.att_out, a.att_saved, a.smax, a.qkv, att_);
    be_.copy(a.mid, x, Nd * sizeof(T));
    linear_forward(be_, a.mid, a.att_out, params_ + w.o_proj, N, att_.out_width(), d, true);

    // FFN block: out = mid + FFN(RMSNorm(mid)).
    be_.rmsnorm_forward(a.an2, a.rstd2, a.mid, params_ + w.ffn_norm, N, d, cfg_.norm_eps);
    be_.copy(out, a.mid, Nd * sizeof(T));
    if (!w.moe) {
      swiglu_forward(w.dense, a.an2, N, a.h, a.act, out);
      continue;
    }
    // MoE: route, group tokens by expert, run each expert on its rows, combine with the gates.
    const RouterShape rs{N, E, K, cfg_.moe.router, cfg_.moe.route_scale};
    linear_forward(be_, a.rlogits, a.an2, params_ + w.router, N, d, E);
    be_.router_forward(a.scores, a.topk, a.gates, a.counts, a.router_stats, a.rlogits,
                       expert_bias_ + std::size_t(l) * E, rs);
    be_.moe_permute(a.xg, a.pos, a.offsets, a.an2, a.topk, a.counts, N, d, E, K);
    be_.download(a.host_offsets.data(), a.offsets, (std::size_t(E) + 1) * sizeof(std::int32_t));
    const int ff = cfg_.moe.expert_ff;
    for (int e = 0; e < E; ++e) {
      const std::size_t r0 = std::size_t(a.host_offsets[std::size_t(e)]);
      const int rows = a.host_offsets[std::size_t(e) + 1] - int(r0);
      linear_forward(be_, a.hg + r0 * 2 * ff, a.xg + r0 * d,
                     params_ + w.experts[std::size_t(e)].w13, rows, d, 2 * ff);
    }
    be_.swiglu_forward(a.actg, a.hg, N * K, ff);
    for (int e = 0; e < E; ++e) {
      const std::size_t r0 = std::size_t(a.host_offsets[std::size_t(e)]);
      const int rows = a.host_offsets[std::size_t(e) + 1] - int(r0);
      linear_forward(be_, a.yg + r0 * d, a.actg + r0 * ff, params_ + w.experts[std::size_t(e)].w2,
                     rows, ff, d);
    }
    be_.moe_unpermute(tmp_, a.yg, a.gates, a.pos, N, d, K);
    be_.add_inplace(out, tmp_, Nd);
    for (std::size_t s = 0; s < w.shared.size(); ++s)
      swiglu_forward(w.shared[s], a.an2, N, a.sh[s], a.sact[s], out);
  }

  be_.rmsnorm_forward(final_norm_, final_rstd_, resid_.back(), params_ + layout_.final_norm(), N, d,
                      cfg_.norm_eps);
  linear_forward(be_, logits_, final_norm_, params_ + layout_.lm_head(), N, d, V);
  if (!tgt) return;
  be_.upload(targets_, tgt, std::size_t(N) * sizeof(std::int32_t));
  be_.cross_entropy(losses_, logits_, targets_, N, V, T(ce_grad_scale));
  be_.download(host_losses_.data(), losses_, std::size_t(N) * sizeof(T));
  double ce_sum = 0;
  for (T v : host_losses_) ce_sum += double(v);
  collect_stats(ce_sum, count_valid(tgt, N));
}

template <typename T>
std::int64_t Model<T>::count_valid(const std::int32_t* targets, int n) {
  std::int64_t v = 0;
  for (int i = 0; i < n; ++i) v += targets[i] >= 0;
  return v;
}

template <typename T>
void Model<T>::collect_stats(double ce_sum, std::int64_t ce_tokens) {
  const int E = cfg_.moe.n_experts;
  stats_.ce_sum = ce_sum;
  stats_.ce_tokens = ce_tokens;
  stats_.ce = ce_tokens > 0 ? ce_sum / double(ce_tokens) : 0.0;
  stats_.objective = stats_.ce;
  std::vector<T> buf(std::size_t(std::max(cfg_.n_heads, 3)));
  for (int l = 0; l < cfg_.n_layers; ++l) {
    const std::size_t li = std::size_t(l);
    LayerActs& a = acts_[li];
    be_.download(buf.data(), a.smax, std::size_t(cfg_.n_heads) * sizeof(T));
    for (int h = 0; h < cfg_.n_heads; ++h)
      stats_.smax[li][std::size_t(h)] = double(buf[std::size_t(h)]);
    if (!is_moe_layer(cfg_, l)) continue;
    be_.download(buf.data(), a.router_stats, 3 * sizeof(T));
    stats_.aux[li] = double(buf[0]);
    stats_.z[li] = double(buf[1]);
    stats_.entropy[li] = double(buf[2]);
    stats_.objective +=
        cfg_.moe.aux_loss_coef * stats_.aux[li] + cfg_.moe.z_loss_coef * stats_.z[li];
    stats_.load[li].resize(std::size_t(E));
    be_.download(stats_.load[li].data(), a.counts, std::size_t(E) * sizeof(std::int32_t));
  }
}

template <typename T>
void Model<T>::run_backward(double grad_scale) {
  const int N = tokens(), d = cfg_.d_model, V = cfg_.vocab_size, hd = cfg_.head_dim;
  const int E = cfg_.moe.n_experts, K = cfg_.moe.top_k;
  const std::size_t Nd = std::size_t(N) * d;

  // logits_ holds d(grad_scale * objective)/dlogits, written by the fused cross-entropy.
  linear_backward(be_, dnorm_, grads_ + layout_.lm_head(), logits_, final_norm_,
                  params_ + layout_.lm_head(), N, d, V, false);
  be_.zero(dres_, Nd * sizeof(T));
  be_.rmsnorm_backward(dres_, grads_ + layout_.final_norm(), dnorm_, resid_.back(),
                       params_ + layout_.final_norm(), final_rstd_, N, d);

  for (int l = cfg_.n_layers - 1; l >= 0; --l) {
    const LayerOffsets& w = layout_.layer(l);
    LayerActs& a = acts_[std::size_t(l)];
    // dres_ = d/d(out of this layer). FFN block backward into dnorm_ (d/d an2).
    if (!w.moe) {
      swiglu_backward(w.dense, a.an2, N, a.h, a.act, dres_, dnorm_, false);
    } else {
      const int ff = cfg_.moe.expert_ff;
      be_.moe_unpermute_backward(dyg_, dgates_, dres_, a.yg, a.gates, a.pos, N, d, K);
      for (int e = 0; e < E; ++e) {
        const std::size_t r0 = std::size_t(a.host_offsets[std::size_t(e)]);
        const int rows = a.host_offsets[std::size_t(e) + 1] - int(r0);
        const SwiGluOffsets& x = w.experts[std::size_t(e)];
        linear_backward(be_, dact_ + r0 * ff, grads_ + x.w2, dyg_ + r0 * d, a.actg + r0 * ff,
                        params_ + x.w2, rows, ff, d, false);
      }
      be_.swiglu_backward(dh_, dact_, a.hg, N * K, ff);
      for (int e = 0; e < E; ++e) {
        const std::size_t r0 = std::size_t(a.host_offsets[std::size_t(e)]);
        const int rows = a.host_offsets[std::size_t(e) + 1] - int(r0);
        const SwiGluOffsets& x = w.experts[std::size_t(e)];
        linear_backward(be_, dxg_ + r0 * d, grads_ + x.w13, dh_ + r0 * 2 * ff, a.xg + r0 * d,
                        params_ + x.w13, rows, d, 2 * ff, false);
      }
      // Router: gate-weight gradients plus the aux and z losses.
      const RouterShape rs{N, E, K, cfg_.moe.router, cfg_.moe.route_scale};
      be_.router_backward(drouter_, dgates_, a.rlogits, a.scores, a.topk, a.gates, a.counts, rs,
                          cfg_.moe.aux_loss_coef, cfg_.moe.z_loss_coef, grad_scale);
      linear_backward(be_, dnorm_, grads_ + w.router, drouter_, a.an2, params_ + w.router, N, d, E,
                      false);
      be_.moe_permute_backward(dnorm_, dxg_, a.pos, N, d, K);
      for (std::size_t s = 0; s < w.shared.size(); ++s)
        swiglu_backward(w.shared[s], a.an2, N, a.sh[s], a.sact[s], dres_, dnorm_, true);
    }
    // Through the FFN norm; the residual path already carries dres_.
    be_.rmsnorm_backward(dres_, grads_ + w.ffn_norm, dnorm_, a.mid, params_ + w.ffn_norm, a.rstd2,
                         N, d);

    // Attention block backward.
    linear_backward(be_, datt_, grads_ + w.o_proj, dres_, a.att_out, params_ + w.o_proj, N,
                    att_.out_width(), d, false);
    be_.attention_backward(dqkv_, datt_, a.qkv, a.att_saved, att_);
    be_.rope_backward(dqkv_, att_.qkv_width(), N, cfg_.seq_len, cfg_.n_heads, hd, rope_cos_,
                      rope_sin_);
    be_.rope_backward(dqkv_ + std::size_t(cfg_.n_heads) * hd, att_.qkv_width(), N, cfg_.seq_len,
                      cfg_.n_kv_heads, hd, rope_cos_, rope_sin_);
    linear_backward(be_, dnorm_, grads_ + w.qkv, dqkv_, a.an1, params_ + w.qkv, N, d,
                    att_.qkv_width(), false);
    be_.rmsnorm_backward(dres_, grads_ + w.attn_norm, dnorm_, resid_[std::size_t(l)],
                         params_ + w.attn_norm, a.rstd1, N, d);
  }
  be_.embedding_backward(grads_ + layout_.embed(), dres_, tokens_, N, d);
}

template <typename T>
const ForwardStats& Model<T>::forward(const std::int32_t* tok, const std::int32_t* tgt) {
  if (!tgt) throw std::invalid_argument("Model::forward: targets required");
  run_forward(tok, tgt, 0.0);
  return stats_;
}

template <typename T>
const ForwardStats& Model<T>::forward_backward(const std::int32_t* tok, const std::int32_t* tgt,
                                               double grad_scale) {
  if (!tgt) throw std::invalid_argument("Model::forward_backward: targets required");
  if (grad_scale == 0) throw std::invalid_argument("Model::forward_backward: grad_scale is 0");
  const std::int64_t valid = count_valid(tgt, tokens());
  if (valid == 0) throw std::invalid_argument("Model::forward_backward: every target is padding");
  run_forward(tok, tgt, grad_scale / double(valid));
  run_backward(grad_scale);
  return stats_;
}

template <typename T>
const T* Model<T>::forward_logits(const std::int32_t* tok) {
  run_forward(tok, nullptr, 0.0);
  return logits_;
}

template class Model<float>;
template class Model<double>;

}  // namespace moetrain
