// The optimizer step with ZeRO-1 (DESIGN §4, §5). Every rank holds the whole model but only its
// part of the optimizer state:
//   AdamW group: the group's gradients, packed into one flat vector, are reduce-scattered into
//     equal shards; each rank updates its shard (and holds m, v for it only); the updated
//     parameters are all-gathered.
//   Muon group: each matrix has one owner (assigned by Newton-Schulz cost, deterministically
//     from the layout); gradients are reduce-scattered so each owner receives the averaged
//     gradients of its matrices; the owner applies momentum, Newton-Schulz (batched over its
//     same-shape matrices), the update and QK-clip; the matrices are all-gathered.
// With one rank (LocalComm) the same code runs with the collectives as copies.
#include "moetrain/optimizer.hpp"

#include <algorithm>
#include <cmath>
#include <map>
#include <stdexcept>
#include <tuple>

namespace moetrain {

namespace {

// Newton-Schulz quintic coefficients (Muon).
constexpr double kNsA = 3.4445, kNsB = -4.7750, kNsC = 2.0315;
constexpr double kNsEps = 1e-7;
// Matrices orthogonalised together at most: bounds the workspace on large models.
constexpr int kMaxBatch = 64;

struct AdamWEntry {
  std::size_t offset, numel, flat;  // in params/grads, and in the packed AdamW vector
  double lr_scale, weight_decay;
};

struct MuonMatrix {
  std::size_t offset;  // in params/grads
  int rows, cols;
  ParamRole role;
  int layer;
  std::string name;
  int owner = 0;
  std::size_t slot = 0;  // offset inside the owner's partition of the packed Muon vectors
};

// Same-shape matrices of this rank, orthogonalised as one batched GEMM chain.
struct MuonGroup {
  int rows, cols;
  std::vector<std::size_t> mats;  // indices into muon matrices, in slot order
};

// Newton-Schulz cost of an m x n matrix, m <= n (DESIGN §4): about 5 (4 m^2 n + 2 m^3).
double ns_cost(int rows, int cols) {
  const double m = std::min(rows, cols), n = std::max(rows, cols);
  return 4 * m * m * n + 2 * m * m * m;
}

}  // namespace

template <typename T>
struct Optimizer<T>::Impl {
  Impl(const Config& c, const ParamLayout& l, Backend<T>& b, Communicator* external)
      : cfg(c), layout(l), be(b), comm(external ? external : &local) {}
  ~Impl() {
    for (T* p : {m, v, momentum, flat_grad, flat_param, shard_grad, muon_send, muon_recv,
                 muon_gather, ws_u, ws_x, ws_y, ws_s, ws_s2})
      if (p) be.free_bytes(p);
  }
  T* alloc(std::size_t n) { return n ? static_cast<T*>(be.alloc_bytes(n * sizeof(T))) : nullptr; }

  Config cfg;
  const ParamLayout& layout;
  Backend<T>& be;
  LocalComm local;
  Communicator* comm;
  bool use_muon = false, use_clip = false;

  std::vector<AdamWEntry> adamw;
  std::size_t adamw_total = 0, shard = 0;  // packed length, and per-rank shard length
  std::vector<MuonMatrix> muon;
  std::vector<MuonGroup> own_groups;
  std::size_t part = 0;       // per-rank partition length of the packed Muon vectors
  std::size_t own_elems = 0;  // elements of this rank's Muon matrices (= its partition fill)
  int own_matrices = 0;
  int orthogonalised = 0;  // matrices this rank ran Newton-Schulz on in the last step

  // Optimizer state (this rank's part only).
  T *m = nullptr, *v = nullptr, *momentum = nullptr;
  // Communication staging.
  T *flat_grad = nullptr, *flat_param = nullptr, *shard_grad = nullptr;
  T *muon_send = nullptr, *muon_recv = nullptr, *muon_gather = nullptr;
  // Newton-Schulz workspace.
  T *ws_u = nullptr, *ws_x = nullptr, *ws_y = nullptr, *ws_s = nullptr, *ws_s2 = nullptr;

  double muon_batch(const MuonGroup& g, std::size_t first, int count, T* params, double lr);
  int qk_clip(const MuonMatrix& mat, T* params, const std::vector<std::vector<double>>& smax);
};

template <typename T>
Optimizer<T>::Optimizer(const Config& cfg, const ParamLayout& layout, Backend<T>& backend)
    : Optimizer(cfg, layout, backend, nullptr) {}

template <typename T>
Optimizer<T>::Optimizer(const Config& cfg, const ParamLayout& layout, Backend<T>& backend,
                        Communicator* comm)
    : impl_(std::make_unique<Impl>(cfg, layout, backend, comm)) {
  Impl& s = *impl_;
  const OptimConfig& o = cfg.optim;
  const int world = s.comm->world(), rank = s.comm->rank();
  s.use_muon = o.name == "muon" || o.name == "muonclip";
  s.use_clip = o.name == "muonclip";
  if (!s.use_muon && o.name != "adamw")
    throw std::invalid_argument("optim.name: expected adamw, muon or muonclip, got " + o.name);

  for (const ParamTensor& t : layout.tensors()) {
    const bool hidden = is_hidden_matrix(t.role);
    if (hidden && s.use_muon) {
      s.muon.push_back({t.offset, int(t.shape[0]), int(t.shape[1]), t.role, t.layer, t.name});
      continue;
    }
    const GroupConfig& gc = hidden ? o.muon_group : o.adamw_group;
    const double wd = t.role == ParamRole::Norm ? 0.0 : gc.weight_decay;
    s.adamw.push_back({t.offset, t.numel, s.adamw_total, gc.lr_scale, wd});
    s.adamw_total += t.numel;
  }
  s.shard = (s.adamw_total + std::size_t(world) - 1) / std::size_t(world);

  // Owners: largest Newton-Schulz cost first, each to the least-loaded rank (ties: lowest rank,
  // then layout order), so every rank derives the same assignment.
  std::vector<std::size_t> order(s.muon.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    return ns_cost(s.muon[a].rows, s.muon[a].cols) > ns_cost(s.muon[b].rows, s.muon[b].cols);
  });
  std::vector<double> load(std::size_t(world), 0.0);
  std::vector<std::size_t> fill(std::size_t(world), 0);
  for (std::size_t i : order) {
    const int r = int(std::min_element(load.begin(), load.end()) - load.begin());
    s.muon[i].owner = r;
    load[std::size_t(r)] += ns_cost(s.muon[i].rows, s.muon[i].cols);
  }
  // Slots in layout order within each owner's partition.
  std::map<std::pair<int, int>, std::size_t> group_of;
  for (std::size_t i = 0; i < s.muon.size(); ++i) {
    MuonMatrix& mt = s.muon[i];
    const std::size_t elems = std::size_t(mt.rows) * mt.cols;
    mt.slot = fill[std::size_t(mt.owner)];
    fill[std::size_t(mt.owner)] += elems;
    if (mt.owner != rank) continue;
    s.own_elems += elems;
    ++s.own_matrices;
    const auto key = std::pair{mt.rows, mt.cols};
    auto it = group_of.find(key);
    if (it == group_of.end()) {
      it = group_of.emplace(key, s.own_groups.size()).first;
      s.own_groups.push_back({mt.rows, mt.cols, {}});
    }
    s.own_groups[it->second].mats.push_back(i);
  }
  s.part = s.muon.empty() ? 0 : *std::max_element(fill.begin(), fill.end());

  std::size_t max_ws = 0, max_s = 0;
  for (const MuonGroup& g : s.own_groups) {
    const std::size_t elems = std::size_t(g.rows) * g.cols;
    const std::size_t small = std::size_t(std::min(g.rows, g.cols));
    const std::size_t batch = std::min<std::size_t>(g.mats.size(), kMaxBatch);
    max_ws = std::max(max_ws, elems * batch);
    max_s = std::max(max_s, small * small * batch);
  }
  s.m = s.alloc(s.shard);
  s.v = s.alloc(s.shard);
  s.momentum = s.alloc(s.own_elems);
  s.flat_grad = s.alloc(s.shard * std::size_t(world));
  s.flat_param = s.alloc(s.shard * std::size_t(world));
  s.shard_grad = s.alloc(s.shard);
  s.muon_send = s.alloc(s.part * std::size_t(world));
  s.muon_recv = s.alloc(s.part);
  s.muon_gather = s.alloc(s.part * std::size_t(world));
  s.ws_u = s.alloc(max_ws);
  s.ws_x = s.alloc(max_ws);
  s.ws_y = s.alloc(max_ws);
  s.ws_s = s.alloc(max_s);
  s.ws_s2 = s.alloc(max_s);
}

template <typename T>
Optimizer<T>::~Optimizer() = default;

template <typename T>
std::size_t Optimizer<T>::state_bytes() const {
  return (2 * impl_->shard + impl_->own_elems) * sizeof(T);
}

template <typename T>
int Optimizer<T>::owned_matrices() const {
  return impl_->own_matrices;
}

template <typename T>
int Optimizer<T>::orthogonalised_last_step() const {
  return impl_->orthogonalised;
}

template <typename T>
std::vector<std::string> Optimizer<T>::owned_matrix_names() const {
  std::vector<std::string> out;
  for (const MuonMatrix& mt : impl_->muon)
    if (mt.owner == impl_->comm->rank()) out.push_back(mt.name);
  return out;
}

// Momentum, Newton-Schulz and the update for `count` of this rank's same-shape matrices,
// starting at index `first` of the group. Gradients come from the received partition.
// Returns the sum of squares of s*O over them.
template <typename T>
double Optimizer<T>::Impl::muon_batch(const MuonGroup& g, std::size_t first, int count, T* params,
                                      double lr) {
  const OptimConfig& o = cfg.optim;
  const int A = g.rows, B = g.cols;
  const std::size_t elems = std::size_t(A) * B;
  const bool transposed = A > B;  // work on the wide orientation: X is [m, n], m <= n
  const int rows = transposed ? B : A, cols = transposed ? A : B;
  const std::size_t mm = std::size_t(rows) * rows;
  orthogonalised += count;

  // Momentum per matrix (its state sits at its slot of the own partition); U contiguous.
  for (int i = 0; i < count; ++i) {
    const MuonMatrix& mt = muon[g.mats[first + std::size_t(i)]];
    be.muon_momentum(momentum + mt.slot, ws_u + std::size_t(i) * elems, muon_recv + mt.slot, elems,
                     o.momentum, o.nesterov);
  }
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
    sq += be.muon_update(params + muon[g.mats[first + std::size_t(i)]].offset,
                         O + std::size_t(i) * elems, elems, lr * o.muon_group.lr_scale, scale,
                         o.muon_group.weight_decay);
  return sq;
}

// Per-head QK-clip (MuonClip) on one owned matrix: gamma_h = min(1, tau / S_max[l][h]); q rows
// of head h scaled by gamma_h^alpha; k rows of kv head g by (min over its query heads of
// gamma_h)^(1-alpha). Returns the clipped query heads counted on q matrices.
template <typename T>
int Optimizer<T>::Impl::qk_clip(const MuonMatrix& mt, T* params,
                                const std::vector<std::vector<double>>& smax) {
  if (mt.role != ParamRole::AttnQ && mt.role != ParamRole::AttnK) return 0;
  const ModelConfig& mc = cfg.model;
  const double tau = cfg.optim.qk_clip_tau, alpha = cfg.optim.qk_clip_alpha;
  const int group = mc.n_heads / mc.n_kv_heads;
  const std::size_t head_elems = std::size_t(mc.head_dim) * mc.d_model;
  const auto& s = smax[std::size_t(mt.layer)];
  int clipped = 0;
  for (int g = 0; g < mc.n_kv_heads; ++g) {
    double gmin = 1.0;
    for (int h = g * group; h < (g + 1) * group; ++h) {
      if (!(s[std::size_t(h)] > tau)) continue;
      const double gamma = tau / s[std::size_t(h)];
      gmin = std::min(gmin, gamma);
      if (mt.role == ParamRole::AttnQ) {
        ++clipped;
        be.scale(params + mt.offset + std::size_t(h) * head_elems, head_elems,
                 std::pow(gamma, alpha));
      }
    }
    if (mt.role == ParamRole::AttnK && gmin < 1.0)
      be.scale(params + mt.offset + std::size_t(g) * head_elems, head_elems,
               std::pow(gmin, 1.0 - alpha));
  }
  return clipped;
}

template <typename T>
OptimizerStats Optimizer<T>::step(T* params, const T* grads, double lr,
                                  const std::vector<std::vector<double>>& smax) {
  Impl& s = *impl_;
  const OptimConfig& o = s.cfg.optim;
  Communicator& comm = *s.comm;
  const int world = comm.world(), rank = comm.rank();
  const std::size_t shard0 = s.shard * std::size_t(rank);
  OptimizerStats st;
  if (s.use_clip && (smax.size() != std::size_t(s.cfg.model.n_layers) ||
                     std::any_of(smax.begin(), smax.end(), [&](const std::vector<double>& h) {
                       return h.size() != std::size_t(s.cfg.model.n_heads);
                     })))
    throw std::invalid_argument("Optimizer::step: smax must be [n_layers][n_heads] for QK-clip");

  // 1. Pack gradients: the AdamW group into one flat vector, each Muon matrix into its owner's
  //    partition; reduce-scatter both and average over ranks.
  for (const AdamWEntry& e : s.adamw)
    s.be.copy(s.flat_grad + e.flat, grads + e.offset, e.numel * sizeof(T));
  for (const MuonMatrix& mt : s.muon)
    s.be.copy(s.muon_send + std::size_t(mt.owner) * s.part + mt.slot, grads + mt.offset,
              std::size_t(mt.rows) * mt.cols * sizeof(T));
  if (s.shard) comm.reduce_scatter(s.flat_grad, s.shard_grad, s.shard, ReduceOp::Sum);
  if (s.part) comm.reduce_scatter(s.muon_send, s.muon_recv, s.part, ReduceOp::Sum);
  if (world > 1) {
    s.be.scale(s.shard_grad, s.shard, 1.0 / world);
    s.be.scale(s.muon_recv, s.part, 1.0 / world);
  }

  // 2. Global gradient norm from the shards (padding is zero), then clipping.
  double sq[3] = {s.be.sum_squares(s.shard_grad, s.shard) + s.be.sum_squares(s.muon_recv, s.part),
                  0, 0};
  comm.all_reduce(sq, 1, ReduceOp::Sum);
  st.grad_norm = std::sqrt(sq[0]);
  if (!std::isfinite(st.grad_norm))
    throw std::runtime_error("non-finite gradient norm (" + std::to_string(st.grad_norm) +
                             ") at optimizer step " + std::to_string(t_ + 1) +
                             "; no parameter was updated");
  if (o.grad_clip > 0) {
    const double coef = o.grad_clip / (st.grad_norm + 1e-6);
    if (coef < 1.0) {
      s.be.scale(s.shard_grad, s.shard, coef);
      s.be.scale(s.muon_recv, s.part, coef);
    }
  }
  ++t_;

  // 3. AdamW on this rank's shard of the packed vector, then all-gather the parameters.
  for (const AdamWEntry& e : s.adamw)
    s.be.copy(s.flat_param + e.flat, params + e.offset, e.numel * sizeof(T));
  for (const AdamWEntry& e : s.adamw) {
    const std::size_t lo = std::max(e.flat, shard0),
                      hi = std::min(e.flat + e.numel, shard0 + s.shard);
    if (lo >= hi) continue;
    sq[1] += s.be.adamw_update(s.flat_param + lo, s.shard_grad + (lo - shard0), s.m + (lo - shard0),
                               s.v + (lo - shard0), hi - lo, lr * e.lr_scale, o.beta1, o.beta2,
                               o.eps, e.weight_decay, t_);
  }
  if (s.shard) {
    // All-gather from a copy of the own shard: MPI forbids overlapping send and receive buffers.
    s.be.copy(s.shard_grad, s.flat_param + shard0, s.shard * sizeof(T));
    comm.all_gather(s.shard_grad, s.flat_param, s.shard);
  }
  for (const AdamWEntry& e : s.adamw)
    s.be.copy(params + e.offset, s.flat_param + e.flat, e.numel * sizeof(T));

  // 4. Muon on the matrices this rank owns (QK-clip included), then all-gather them.
  s.orthogonalised = 0;
  for (const MuonGroup& g : s.own_groups)
    for (std::size_t first = 0; first < g.mats.size(); first += kMaxBatch)
      sq[2] += s.muon_batch(g, first, int(std::min<std::size_t>(kMaxBatch, g.mats.size() - first)),
                            params, lr);
  double clipped = 0;
  if (s.use_clip)
    for (const MuonMatrix& mt : s.muon)
      if (mt.owner == rank) clipped += s.qk_clip(mt, params, smax);
  if (s.part) {
    for (const MuonMatrix& mt : s.muon)
      if (mt.owner == rank)
        s.be.copy(s.muon_recv + mt.slot, params + mt.offset,
                  std::size_t(mt.rows) * mt.cols * sizeof(T));
    comm.all_gather(s.muon_recv, s.muon_gather, s.part);
    for (const MuonMatrix& mt : s.muon)
      s.be.copy(params + mt.offset, s.muon_gather + std::size_t(mt.owner) * s.part + mt.slot,
                std::size_t(mt.rows) * mt.cols * sizeof(T));
  }

  double totals[3] = {sq[1], sq[2], clipped};
  comm.all_reduce(totals, 3, ReduceOp::Sum);
  std::size_t muon_elems = 0;
  for (const MuonMatrix& mt : s.muon) muon_elems += std::size_t(mt.rows) * mt.cols;
  st.update_rms_adamw = s.adamw_total ? std::sqrt(totals[0] / double(s.adamw_total)) : 0.0;
  st.update_rms_muon = muon_elems ? std::sqrt(totals[1] / double(muon_elems)) : 0.0;
  st.clipped_heads = int(totals[2]);
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
  // The AdamW shard is a slice of the packed group, so it is stored as one flat tensor.
  put("adamw.m", s.m, s.shard, {std::int64_t(s.shard)});
  put("adamw.v", s.v, s.shard, {std::int64_t(s.shard)});
  for (const MuonGroup& g : s.own_groups)
    for (std::size_t i : g.mats) {
      const MuonMatrix& mt = s.muon[i];
      put("muon.momentum." + mt.name, s.momentum + mt.slot, std::size_t(mt.rows) * mt.cols,
          {mt.rows, mt.cols});
    }
  const std::int64_t meta[3] = {t_, s.comm->world(), s.comm->rank()};
  out["step"] = HostTensor::i64({1}, &meta[0]);
  out["world_rank"] = HostTensor::i64({2}, &meta[1]);
  return out;
}

template <typename T>
void Optimizer<T>::load_state(const TensorMap& st, const std::string& source) {
  Impl& s = *impl_;
  // Everything is checked before anything is loaded, so a bad file leaves the state as it was.
  auto find = [&](const std::string& name, bool floating) -> const HostTensor& {
    const auto it = st.find(name);
    if (it == st.end())
      throw std::runtime_error(source + ": optimizer state lacks '" + name +
                               "' (saved with another optimizer, model or number of ranks?)");
    const std::string& dt = it->second.dtype;
    const bool ok = floating ? (dt == "F32" || dt == "F64") : (dt == "I32" || dt == "I64");
    if (!ok)
      throw std::runtime_error(source + ": optimizer state '" + name + "' has dtype " + dt +
                               (floating ? ", expected F32 or F64" : ", expected I32 or I64"));
    return it->second;
  };
  const auto wr = find("world_rank", false).to_i64();
  if (wr.size() != 2 || wr[0] != s.comm->world() || wr[1] != s.comm->rank())
    throw std::runtime_error(
        source + ": optimizer shard of rank " + (wr.size() == 2 ? std::to_string(wr[1]) : "?") +
        " of " + (wr.size() == 2 ? std::to_string(wr[0]) : "?") + " ranks, loaded by rank " +
        std::to_string(s.comm->rank()) + " of " + std::to_string(s.comm->world()));
  const auto step = find("step", false).to_i64();
  if (step.size() != 1) throw std::runtime_error(source + ": optimizer state 'step' malformed");

  std::vector<std::tuple<const HostTensor*, T*, std::size_t>> loads;
  auto plan = [&](const std::string& name, T* dst, std::size_t n) {
    const HostTensor& t = find(name, true);
    if (t.numel() != n)
      throw std::runtime_error(source + ": optimizer state '" + name + "' has " +
                               std::to_string(t.numel()) + " elements, expected " +
                               std::to_string(n));
    loads.emplace_back(&t, dst, n);
  };
  plan("adamw.m", s.m, s.shard);
  plan("adamw.v", s.v, s.shard);
  for (const MuonGroup& g : s.own_groups)
    for (std::size_t i : g.mats) {
      const MuonMatrix& mt = s.muon[i];
      plan("muon.momentum." + mt.name, s.momentum + mt.slot, std::size_t(mt.rows) * mt.cols);
    }
  for (const auto& [t, dst, n] : loads) {
    const std::vector<double> v = t->to_f64();
    std::vector<T> host(v.begin(), v.end());
    if (n) s.be.upload(dst, host.data(), n * sizeof(T));
  }
  t_ = step[0];
}

template class Optimizer<float>;
template class Optimizer<double>;

}  // namespace moetrain
