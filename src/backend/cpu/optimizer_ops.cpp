// The elementwise and reduction steps of AdamW and Muon. Reductions accumulate in double over
// fixed per-thread ranges, added in thread order: deterministic for a fixed thread count.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "backend/cpu/ops.hpp"

namespace moetrain::cpu {

namespace {
// Below this many elements a loop runs on one thread: a parallel region costs more than the work,
// and far more when another process shares the cores.
constexpr std::size_t kParallelMin = std::size_t(1) << 18;

// Sum over i < n of f(i), parallel over fixed ranges, deterministic for a given n.
template <typename F>
double reduce_sum(std::size_t n, F f) {
  if (n < kParallelMin) {
    double s = 0;
    for (std::size_t i = 0; i < n; ++i) s += f(i);
    return s;
  }
  const int nt = omp_get_max_threads();
  std::vector<double> part(std::size_t(nt), 0.0);
#pragma omp parallel
  {
    const int id = omp_get_thread_num(), k = omp_get_num_threads();
    const std::size_t b = n * std::size_t(id) / std::size_t(k);
    const std::size_t e = n * std::size_t(id + 1) / std::size_t(k);
    double s = 0;
    for (std::size_t i = b; i < e; ++i) s += f(i);
    part[std::size_t(id)] = s;
  }
  double s = 0;
  for (double v : part) s += v;
  return s;
}

bool skipped(const double* gate) {
  return gate && gate[StepGate::kSkip] != 0;
}
}  // namespace

template <typename T>
void sum_squares(const T* x, std::size_t n, double* acc) {
  *acc += reduce_sum(n, [x](std::size_t i) { return double(x[i]) * double(x[i]); });
}

template <typename T>
void scale(T* x, std::size_t n, double s) {
  const T f = T(s);
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (std::size_t i = 0; i < n; ++i) x[i] *= f;
}

template <typename T>
void scale_by(T* x, std::size_t n, const double* factor) {
  if (*factor != 1.0) scale(x, n, *factor);
}

template <typename T>
void step_gate(double* gate, const double* rank_sums, int world, int per_rank, double max_norm) {
  double sum = 0;
  bool finite = true;
  for (int r = 0; r < world; ++r) {
    const double* own = rank_sums + std::size_t(r) * std::size_t(per_rank);
    sum += own[0];
    for (int i = 1; i < per_rank; ++i) finite = finite && std::isfinite(own[i]);
  }
  const double norm = std::sqrt(sum);
  const bool skip = !finite || !std::isfinite(norm);
  const double coef = max_norm / (norm + 1e-6);
  gate[StepGate::kGradSumSquares] = sum;
  gate[StepGate::kSkip] = skip ? 1.0 : 0.0;
  gate[StepGate::kClipCoef] = (!skip && max_norm > 0 && coef < 1.0) ? coef : 1.0;
}

template <typename T>
void axpby(T* y, const T* x, std::size_t n, double a, double b) {
  const T fa = T(a), fb = T(b);
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (std::size_t i = 0; i < n; ++i) y[i] = fa * x[i] + fb * y[i];
}

// One matrix per thread at a time; each norm is a serial sum, so the result is deterministic.
template <typename T>
void frobenius_normalize(T* x, int batch, std::size_t elems, double norm_scale, double eps) {
#pragma omp parallel for schedule(static) if (batch > 1)
  for (int b = 0; b < batch; ++b) {
    T* xb = x + std::size_t(b) * elems;
    double ss = 0;
    for (std::size_t i = 0; i < elems; ++i) ss += double(xb[i]) * xb[i];
    const T f = T(1.0 / (norm_scale * std::sqrt(ss) + eps));
    for (std::size_t i = 0; i < elems; ++i) xb[i] *= f;
  }
}

template <typename T>
void adamw_update(T* p, const T* g, T* m, T* v, std::size_t n, double lr, double beta1,
                  double beta2, double eps, double weight_decay, std::int64_t t, const double* gate,
                  double* acc) {
  if (skipped(gate)) return;
  const double bc1 = 1.0 - std::pow(beta1, double(t)), bc2 = 1.0 - std::pow(beta2, double(t));
  *acc += reduce_sum(n, [&](std::size_t i) {
    const double gi = g[i];
    const double mi = beta1 * m[i] + (1 - beta1) * gi;
    const double vi = beta2 * v[i] + (1 - beta2) * gi * gi;
    m[i] = T(mi);
    v[i] = T(vi);
    const double u = (mi / bc1) / (std::sqrt(vi / bc2) + eps);
    p[i] = T(p[i] - lr * (u + weight_decay * p[i]));
    return u * u;
  });
}

template <typename T>
void muon_momentum(T* M, T* U, const T* G, std::size_t n, double mu, bool nesterov,
                   const double* gate) {
  if (skipped(gate)) return;
  const T fmu = T(mu);
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (std::size_t i = 0; i < n; ++i) {
    M[i] = fmu * M[i] + G[i];
    U[i] = nesterov ? G[i] + fmu * M[i] : M[i];
  }
}

template <typename T>
void muon_update(T* W, const T* O, std::size_t n, double lr, double s, double weight_decay,
                 const double* gate, double* acc) {
  if (skipped(gate)) return;
  *acc += reduce_sum(n, [&](std::size_t i) {
    const double u = s * O[i];
    W[i] = T(W[i] - lr * (u + weight_decay * W[i]));
    return u * u;
  });
}

template <typename T>
void qk_clip_factors(T* factors, double* clipped, const T* smax, const std::int32_t* mats,
                     const QkClipShape& s, const double* gate) {
  std::fill_n(factors, std::size_t(s.matrices) * std::size_t(s.heads_ld), T(1));
  if (skipped(gate)) return;
  const int group = s.n_heads / s.n_kv_heads;
  const std::size_t layer_elems = std::size_t(s.n_layers) * std::size_t(s.n_heads);
  int count = 0;
  for (int m = 0; m < s.matrices; ++m) {
    const int layer = mats[2 * m];
    const bool is_q = mats[2 * m + 1] != 0;
    T* f = factors + std::size_t(m) * std::size_t(s.heads_ld);
    for (int g = 0; g < s.n_kv_heads; ++g) {
      double gmin = 1.0;
      for (int h = g * group; h < (g + 1) * group; ++h) {
        double mx = -HUGE_VAL;
        for (int slot = 0; slot < s.slots; ++slot)
          mx = std::max(mx,
                        double(smax[std::size_t(slot) * layer_elems +
                                    std::size_t(layer) * std::size_t(s.n_heads) + std::size_t(h)]));
        if (!(mx > s.tau)) continue;
        const double gamma = s.tau / mx;
        gmin = std::min(gmin, gamma);
        if (is_q) {
          ++count;
          f[h] = T(std::pow(gamma, s.alpha));
        }
      }
      if (!is_q && gmin < 1.0) f[g] = T(std::pow(gmin, 1.0 - s.alpha));
    }
  }
  *clipped += count;
}

// QK-clip's per-head scaling: the same product as scale() block by block, so a block scaled here
// and one scaled by scale() with the same factor agree bit for bit.
template <typename T>
void scale_row_blocks(T* x, int blocks, std::size_t block_elems, const T* factors) {
  for (int b = 0; b < blocks; ++b) {
    if (factors[b] == T(1)) continue;
    T* block = x + std::size_t(b) * block_elems;
    const T f = factors[b];
#pragma omp parallel for schedule(static) if (block_elems >= kParallelMin)
    for (std::size_t i = 0; i < block_elems; ++i) block[i] *= f;
  }
}

MOETRAIN_CPU_INSTANTIATE(MOETRAIN_OPS_OPTIMIZER)

}  // namespace moetrain::cpu
