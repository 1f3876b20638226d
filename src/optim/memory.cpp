// optimizer_memory_bytes: what Optimizer<float> allocates per rank, from the config alone. It
// walks the matrices as ParamLayout orders them and assigns owners with the plan's own function,
// so the ZeRO-1 partition, the matrix optimizer's state and its workspace come out as the plan and
// the optimizers (Muon, NorMuon, AdaMuon, SOAP) size them.
#include <algorithm>
#include <map>
#include <utility>

#include "moetrain/optimizer.hpp"
#include "optim/newton_schulz.hpp"
#include "optim/soap.hpp"
#include "optim/step_stats.hpp"
#include "optim/zero1.hpp"

namespace moetrain {

namespace {

// Matrices in one layer's layout order: (rows, cols, q or k projection).
struct MatrixKind {
  int rows, cols;
  bool qk;
};

std::vector<MatrixKind> layer_matrices(const ModelConfig& c, bool moe) {
  const int d = c.d_model, q = c.n_heads * c.head_dim, kv = c.n_kv_heads * c.head_dim;
  std::vector<MatrixKind> out = {{q, d, true}, {kv, d, true}, {kv, d, false}, {d, q, false}};
  const auto swiglu = [&](int ff, int n) {
    for (int i = 0; i < n; ++i)
      out.insert(out.end(), {{ff, d, false}, {ff, d, false}, {d, ff, false}});
  };
  if (moe) {
    swiglu(c.moe.expert_ff, c.moe.n_experts);
    swiglu(c.moe.shared_ff, c.moe.n_shared_experts);
  } else {
    swiglu(c.dense_ff, 1);
  }
  return out;
}

std::size_t buffer_bytes(std::size_t elems) {  // an allocation of elems floats (64-byte rounded)
  return elems ? (elems * sizeof(float) + 63) / 64 * 64 : 0;
}

// Per rank: the elements of its matrices, and per shape the number of them.
struct RankShare {
  std::size_t elems = 0, qk = 0, soap_state = 0;
  std::map<std::pair<int, int>, std::size_t> groups;
};

}  // namespace

std::size_t optimizer_memory_bytes(const Config& cfg, int world) {
  const ModelConfig& c = cfg.model;
  const bool matrix_group = cfg.optim.name != OptimizerName::AdamW;
  const std::size_t R = std::size_t(std::max(world, 1));
  const std::size_t n_dense = std::size_t(c.dense_layers),
                    n_moe = std::size_t(c.n_layers) - n_dense;
  const std::vector<MatrixKind> dense = layer_matrices(c, false), moe = layer_matrices(c, true);
  const auto elems_of = [](const std::vector<MatrixKind>& v) {
    std::size_t n = 0;
    for (const MatrixKind& m : v) n += std::size_t(m.rows) * std::size_t(m.cols);
    return n;
  };
  std::size_t total = 0;  // of the parameters
  {
    const std::size_t d = std::size_t(c.d_model), V = std::size_t(c.vocab_size);
    const std::size_t router = std::size_t(c.moe.n_experts) * d;
    total = (c.tie_embeddings ? 1 : 2) * V * d + d + n_dense * (elems_of(dense) + 2 * d) +
            n_moe * (elems_of(moe) + 2 * d + router);
  }
  const std::size_t matrix_elems =
      matrix_group ? n_dense * elems_of(dense) + n_moe * elems_of(moe) : 0;
  const std::size_t adamw = total - matrix_elems, shard = (adamw + R - 1) / R;
  // AdamW m and v, and the staging: flat gradients and parameters [R * shard], the shard's
  // gradient [shard].
  std::size_t bytes = 2 * buffer_bytes(shard) + 2 * buffer_bytes(R * shard) + buffer_bytes(shard);
  // The optimizer's own stats block (a trainer shares its model's instead: a few bytes apart).
  DeviceStats<float> sizing;
  reserve_optimizer_stats(sizing, cfg, world);
  bytes += (sizing.bytes() + 63) / 64 * 64;
  const std::size_t heads = std::size_t(std::max(c.n_heads, c.n_kv_heads));
  if (!matrix_group) {
    // QK-clip on AdamW's q and k (every rank clips its copy): factors [2 L, heads], the matrix
    // list [2 L, 2] (int32, the size of a float), and a rank's uncounted sum (a double).
    if (qk_clip_enabled(cfg.optim)) {
      const std::size_t qk = 2 * std::size_t(c.n_layers);
      bytes += buffer_bytes(qk * heads) + buffer_bytes(2 * qk) + buffer_bytes(2);
    }
    return bytes;
  }

  const std::size_t count = n_dense * dense.size() + n_moe * moe.size();
  std::vector<RankShare> ranks(R);
  constexpr std::size_t kExactLimit = std::size_t(1) << 22;
  if (count <= kExactLimit) {
    std::vector<MatrixKind> all;
    for (int l = 0; l < c.n_layers; ++l) {
      const auto& v = is_moe_layer(c, l) ? moe : dense;
      all.insert(all.end(), v.begin(), v.end());
    }
    std::vector<std::pair<int, int>> shapes;
    for (const MatrixKind& m : all) shapes.emplace_back(m.rows, m.cols);
    const std::vector<int> owner = assign_matrix_owners(shapes, world);
    for (std::size_t i = 0; i < all.size(); ++i) {
      RankShare& r = ranks[std::size_t(owner[i])];
      r.elems += std::size_t(all[i].rows) * std::size_t(all[i].cols);
      r.qk += all[i].qk;
      r.soap_state += soap_sizes(cfg.optim, all[i].rows, all[i].cols, 1).state;
      ++r.groups[shapes[i]];
    }
  } else {
    // Too many matrices to walk: bound every rank by an even share plus the largest matrix, with
    // the workspace of a rank owning every shape.
    std::size_t largest = 0, qk = 0, soap_largest = 0, soap_total = 0;
    RankShare& r = ranks[0];
    for (const auto* v : {&dense, &moe})
      for (const MatrixKind& m : *v) {
        largest = std::max(largest, std::size_t(m.rows) * std::size_t(m.cols));
        const std::size_t soap = soap_sizes(cfg.optim, m.rows, m.cols, 1).state;
        soap_largest = std::max(soap_largest, soap);
        soap_total += soap * (v == &dense ? n_dense : n_moe);
        qk += m.qk;
        r.groups[{m.rows, m.cols}] = kExactLimit;
      }
    r.elems = (matrix_elems + R - 1) / R + largest;
    r.soap_state = (soap_total + R - 1) / R + soap_largest;
    r.qk = (qk * std::size_t(c.n_layers) + R - 1) / R + 1;
    ranks.resize(1);
  }
  std::size_t part = 0, worst = 0;
  for (const RankShare& r : ranks) part = std::max(part, r.elems);
  const OptimizerName name = cfg.optim.name;
  for (const RankShare& r : ranks) {
    std::size_t b = 0;
    if (name == OptimizerName::Soap) {
      // Its state in one buffer; four [batch, A, B] and two [batch, n, n] workspaces.
      std::size_t ab = 0, sq = 0;
      for (const auto& [shape, n] : r.groups) {
        const SoapSizes z = soap_sizes(cfg.optim, shape.first, shape.second, n);
        ab = std::max(ab, z.workspace_ab);
        sq = std::max(sq, z.workspace_sq);
      }
      b = buffer_bytes(r.soap_state) + 4 * buffer_bytes(ab) + 2 * buffer_bytes(sq);
    } else {
      // The momentum, NorMuon's per-row or AdaMuon's per-element second moment, and the
      // Newton-Schulz workspace.
      std::size_t ws = 0, s = 0, rows = 0;
      for (const auto& [shape, n] : r.groups) {
        const NewtonSchulzWorkspace w = newton_schulz_workspace(shape.first, shape.second, n);
        ws = std::max(ws, w.ws);
        s = std::max(s, w.s);
        rows += n * std::size_t(shape.first);
      }
      b = buffer_bytes(r.elems) + 2 * buffer_bytes(ws) + 2 * buffer_bytes(s);
      if (name == OptimizerName::NorMuon) b += buffer_bytes(rows);
      if (name == OptimizerName::AdaMuon) b += buffer_bytes(r.elems);
    }
    // QK-clip's factors [qk, heads] and its matrix list [qk, 2] (int32, the size of a float).
    if (qk_clip_enabled(cfg.optim)) b += buffer_bytes(r.qk * heads) + buffer_bytes(2 * r.qk);
    worst = std::max(worst, b);
  }
  // The matrix staging: send and gather [R * part], receive [part].
  return bytes + worst + 2 * buffer_bytes(R * part) + buffer_bytes(part);
}

}  // namespace moetrain
