#include "moetrain/optimizer.hpp"

#include <algorithm>
#include <cmath>
#include <map>
#include <stdexcept>

namespace moetrain {

namespace {

// Newton-Schulz quintic coefficients (Muon).
constexpr double kNsA = 3.4445, kNsB = -4.7750, kNsC = 2.0315;
constexpr double kNsEps = 1e-7;
// Matrices orthogonalised together at most: bounds the workspace on large models.
constexpr int kMaxBatch = 64;

struct AdamWEntry {
  std::size_t offset, numel, state;  // in params/grads, and in the m/v buffers
  double lr_scale, weight_decay;
  std::string name;
};

struct MuonMatrix {
  std::size_t offset;
  std::string name;
};

// Same-shape matrices orthogonalised as one batched GEMM chain.
struct MuonGroup {
  int rows, cols;  // [A, B] as stored
  std::vector<MuonMatrix> mats;
  std::size_t state = 0;  // momentum of matrix i at state + i * A * B
};

}  // namespace

template <typename T>
struct Optimizer<T>::Impl {
  Impl(const Config& c, const ParamLayout& l, Backend<T>& b) : cfg(c), layout(l), be(b) {}
  ~Impl() {
    for (T* p : {m, v, momentum, ws_g, ws_u, ws_x, ws_y, ws_s, ws_s2})
      if (p) be.free_bytes(p);
  }

  T* alloc(std::size_t n) { return n ? static_cast<T*>(be.alloc_bytes(n * sizeof(T))) : nullptr; }

  Config cfg;
  const ParamLayout& layout;
  Backend<T>& be;
  bool use_muon = false, use_clip = false;
  std::vector<AdamWEntry> adamw;
  std::vector<MuonGroup> muon;
  std::size_t adamw_elems = 0, muon_elems = 0;
  T *m = nullptr, *v = nullptr, *momentum = nullptr;
  T *ws_g = nullptr, *ws_u = nullptr, *ws_x = nullptr, *ws_y = nullptr, *ws_s = nullptr,
    *ws_s2 = nullptr;

  double muon_group_step(const MuonGroup& g, int first, int count, T* params, const T* grads,
                         double lr);
  int qk_clip(T* params, const std::vector<std::vector<double>>& smax);
};

template <typename T>
Optimizer<T>::Optimizer(const Config& cfg, const ParamLayout& layout, Backend<T>& backend)
    : impl_(std::make_unique<Impl>(cfg, layout, backend)) {
  Impl& s = *impl_;
  const OptimConfig& o = cfg.optim;
  s.use_muon = o.name == "muon" || o.name == "muonclip";
  s.use_clip = o.name == "muonclip";
  if (!s.use_muon && o.name != "adamw")
    throw std::invalid_argument("optim.name: expected adamw, muon or muonclip, got " + o.name);

  std::map<std::pair<int, int>, std::size_t> group_of;
  std::size_t max_ws = 0, max_s = 0;
  for (const ParamTensor& t : layout.tensors()) {
    const bool hidden = is_hidden_matrix(t.role);
    if (hidden && s.use_muon) {
      const auto key = std::pair{int(t.shape[0]), int(t.shape[1])};
      auto it = group_of.find(key);
      if (it == group_of.end()) {
        it = group_of.emplace(key, s.muon.size()).first;
        s.muon.push_back(MuonGroup{key.first, key.second, {}, 0});
      }
      s.muon[it->second].mats.push_back({t.offset, t.name});
      continue;
    }
    const GroupConfig& gc = hidden ? o.muon_group : o.adamw_group;
    const double wd = t.role == ParamRole::Norm ? 0.0 : gc.weight_decay;
    s.adamw.push_back({t.offset, t.numel, s.adamw_elems, gc.lr_scale, wd, t.name});
    s.adamw_elems += t.numel;
  }
  for (MuonGroup& g : s.muon) {
    const std::size_t elems = std::size_t(g.rows) * g.cols;
    const std::size_t small = std::size_t(std::min(g.rows, g.cols));
    const std::size_t batch = std::min<std::size_t>(g.mats.size(), kMaxBatch);
    g.state = s.muon_elems;
    s.muon_elems += elems * g.mats.size();
    max_ws = std::max(max_ws, elems * batch);
    max_s = std::max(max_s, small * small * batch);
  }
  s.m = s.alloc(s.adamw_elems);
  s.v = s.alloc(s.adamw_elems);
  s.momentum = s.alloc(s.muon_elems);
  s.ws_g = s.alloc(max_ws);
  s.ws_u = s.alloc(max_ws);
  s.ws_x = s.alloc(max_ws);
  s.ws_y = s.alloc(max_ws);
  s.ws_s = s.alloc(max_s);
  s.ws_s2 = s.alloc(max_s);
}

template <typename T>
Optimizer<T>::~Optimizer() = default;

// Momentum, Newton-Schulz and the update for matrices [first, first+count) of one group.
// Returns the sum of squares of s*O over them.
template <typename T>
double Optimizer<T>::Impl::muon_group_step(const MuonGroup& g, int first, int count, T* params,
                                           const T* grads, double lr) {
  const OptimConfig& o = cfg.optim;
  const int A = g.rows, B = g.cols;
  const std::size_t elems = std::size_t(A) * B;
  const bool transposed = A > B;  // work on the wide orientation: X is [m, n], m <= n
  const int rows = transposed ? B : A, cols = transposed ? A : B;
  const std::size_t mm = std::size_t(rows) * rows;

  for (int i = 0; i < count; ++i)
    be.copy(ws_g + std::size_t(i) * elems, grads + g.mats[std::size_t(first + i)].offset,
            elems * sizeof(T));
  T* M = momentum + g.state + std::size_t(first) * elems;
  be.muon_momentum(M, ws_u, ws_g, elems * std::size_t(count), o.momentum, o.nesterov);

  if (transposed)
    be.transpose_batched(ws_x, ws_u, count, A, B);
  else
    be.copy(ws_x, ws_u, elems * std::size_t(count) * sizeof(T));
  be.frobenius_normalize(ws_x, count, elems, kNsEps);
  T *X = ws_x, *Y = ws_y;
  for (int it = 0; it < o.ns_steps; ++it) {
    // S = X X^T;  S2 = c S S + b S;  Y = a X + S2 X
    be.gemm_batched(false, true, rows, rows, cols, T(1), X, cols, elems, X, cols, elems, T(0), ws_s,
                    rows, mm, count);
    be.gemm_batched(false, false, rows, rows, rows, T(kNsC), ws_s, rows, mm, ws_s, rows, mm, T(0),
                    ws_s2, rows, mm, count);
    be.axpby(ws_s2, ws_s, mm * std::size_t(count), kNsB, 1.0);
    be.copy(Y, X, elems * std::size_t(count) * sizeof(T));
    be.gemm_batched(false, false, rows, cols, rows, T(1), ws_s2, rows, mm, X, cols, elems, T(kNsA),
                    Y, cols, elems, count);
    std::swap(X, Y);
  }
  T* O = X;
  if (transposed) {
    be.transpose_batched(ws_u, X, count, rows, cols);  // back to [A, B]
    O = ws_u;
  }
  const double scale = o.muon_scale == "original" ? std::sqrt(std::max(1.0, double(A) / double(B)))
                                                  : 0.2 * std::sqrt(double(std::max(A, B)));
  double sq = 0;
  for (int i = 0; i < count; ++i)
    sq += be.muon_update(params + g.mats[std::size_t(first + i)].offset, O + std::size_t(i) * elems,
                         elems, lr * o.muon_group.lr_scale, scale, o.muon_group.weight_decay);
  return sq;
}

// Per-head QK-clip (MuonClip): gamma_h = min(1, tau / S_max[l][h]); q rows of head h scaled by
// gamma_h^alpha; k rows of kv head g by (min over its query heads of gamma_h)^(1-alpha).
template <typename T>
int Optimizer<T>::Impl::qk_clip(T* params, const std::vector<std::vector<double>>& smax) {
  const ModelConfig& mc = cfg.model;
  const double tau = cfg.optim.qk_clip_tau, alpha = cfg.optim.qk_clip_alpha;
  const int hd = mc.head_dim, d = mc.d_model, group = mc.n_heads / mc.n_kv_heads;
  const std::size_t head_elems = std::size_t(hd) * d;
  int clipped = 0;
  for (int l = 0; l < mc.n_layers; ++l) {
    const std::size_t q = layout.layer(l).qkv;
    const std::size_t k = q + std::size_t(mc.n_heads) * head_elems;
    for (int g = 0; g < mc.n_kv_heads; ++g) {
      double gmin = 1.0;
      for (int h = g * group; h < (g + 1) * group; ++h) {
        const double s = smax[std::size_t(l)][std::size_t(h)];
        if (!(s > tau)) continue;
        const double gamma = tau / s;
        ++clipped;
        gmin = std::min(gmin, gamma);
        be.scale(params + q + std::size_t(h) * head_elems, head_elems, std::pow(gamma, alpha));
      }
      if (gmin < 1.0)
        be.scale(params + k + std::size_t(g) * head_elems, head_elems, std::pow(gmin, 1.0 - alpha));
    }
  }
  return clipped;
}

template <typename T>
OptimizerStats Optimizer<T>::step(T* params, T* grads, double lr,
                                  const std::vector<std::vector<double>>& smax) {
  Impl& s = *impl_;
  const OptimConfig& o = s.cfg.optim;
  OptimizerStats st;
  st.grad_norm = std::sqrt(s.be.sum_squares(grads, s.layout.total()));
  if (!std::isfinite(st.grad_norm))
    throw std::runtime_error("non-finite gradient norm (" + std::to_string(st.grad_norm) +
                             ") at optimizer step " + std::to_string(t_ + 1) +
                             "; no parameter was updated");
  if (o.grad_clip > 0) {
    const double coef = o.grad_clip / (st.grad_norm + 1e-6);
    if (coef < 1.0) s.be.scale(grads, s.layout.total(), coef);
  }
  ++t_;

  double adam_sq = 0;
  for (const AdamWEntry& e : s.adamw)
    adam_sq +=
        s.be.adamw_update(params + e.offset, grads + e.offset, s.m + e.state, s.v + e.state,
                          e.numel, lr * e.lr_scale, o.beta1, o.beta2, o.eps, e.weight_decay, t_);
  st.update_rms_adamw = s.adamw_elems ? std::sqrt(adam_sq / double(s.adamw_elems)) : 0.0;

  double muon_sq = 0;
  for (const MuonGroup& g : s.muon)
    for (int first = 0; first < int(g.mats.size()); first += kMaxBatch)
      muon_sq += s.muon_group_step(g, first, std::min(kMaxBatch, int(g.mats.size()) - first),
                                   params, grads, lr);
  st.update_rms_muon = s.muon_elems ? std::sqrt(muon_sq / double(s.muon_elems)) : 0.0;

  if (s.use_clip) st.clipped_heads = s.qk_clip(params, smax);
  return st;
}

template <typename T>
TensorMap Optimizer<T>::state() const {
  const Impl& s = *impl_;
  TensorMap out;
  auto put = [&](const std::string& name, const T* src, std::size_t n,
                 std::vector<std::int64_t> shape) {
    std::vector<T> host(n);
    s.be.download(host.data(), src, n * sizeof(T));
    if constexpr (sizeof(T) == sizeof(float))
      out[name] = HostTensor::f32(std::move(shape), host.data());
    else
      out[name] = HostTensor::f64(std::move(shape), host.data());
  };
  for (const AdamWEntry& e : s.adamw) {
    put("adamw.m." + e.name, s.m + e.state, e.numel, {std::int64_t(e.numel)});
    put("adamw.v." + e.name, s.v + e.state, e.numel, {std::int64_t(e.numel)});
  }
  for (const MuonGroup& g : s.muon)
    for (std::size_t i = 0; i < g.mats.size(); ++i) {
      const std::size_t elems = std::size_t(g.rows) * g.cols;
      put("muon.momentum." + g.mats[i].name, s.momentum + g.state + i * elems, elems,
          {g.rows, g.cols});
    }
  const std::int64_t t = t_;
  out["step"] = HostTensor::i64({1}, &t);
  return out;
}

template <typename T>
void Optimizer<T>::load_state(const TensorMap& st, const std::string& source) {
  Impl& s = *impl_;
  auto get = [&](const std::string& name, T* dst, std::size_t n) {
    const auto it = st.find(name);
    if (it == st.end())
      throw std::runtime_error(source + ": optimizer state lacks '" + name +
                               "' (saved with another optimizer or model?)");
    if (it->second.numel() != n)
      throw std::runtime_error(source + ": optimizer state '" + name + "' has " +
                               std::to_string(it->second.numel()) + " elements, expected " +
                               std::to_string(n));
    const std::vector<double> v = it->second.to_f64();
    std::vector<T> host(v.begin(), v.end());
    s.be.upload(dst, host.data(), n * sizeof(T));
  };
  for (const AdamWEntry& e : s.adamw) {
    get("adamw.m." + e.name, s.m + e.state, e.numel);
    get("adamw.v." + e.name, s.v + e.state, e.numel);
  }
  for (const MuonGroup& g : s.muon)
    for (std::size_t i = 0; i < g.mats.size(); ++i) {
      const std::size_t elems = std::size_t(g.rows) * g.cols;
      get("muon.momentum." + g.mats[i].name, s.momentum + g.state + i * elems, elems);
    }
  const auto it = st.find("step");
  if (it == st.end() || it->second.numel() != 1)
    throw std::runtime_error(source + ": optimizer state lacks 'step'");
  t_ = it->second.to_i64()[0];
}

template class Optimizer<float>;
template class Optimizer<double>;

}  // namespace moetrain
