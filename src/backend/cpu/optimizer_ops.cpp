// The elementwise and reduction steps of AdamW, Muon, NorMuon, AdaMuon and SOAP. Reductions
// accumulate in double over fixed per-thread ranges, added in thread order: deterministic for a
// fixed thread count.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "backend/cpu/lane_reduce.hpp"
#include "backend/cpu/ops.hpp"

namespace moetrain::cpu {

namespace {
// Below this many elements a loop runs on one thread: a parallel region costs more than the work,
// and far more when another process shares the cores.
constexpr std::size_t kParallelMin = std::size_t(1) << 18;

template <typename F>
double range_sum(std::size_t b, std::size_t e, F f) {
  return lane_sum<double>(b, e, f);
}

// Sum over i < n of f(i), parallel over fixed ranges, deterministic for a given n.
template <typename F>
double reduce_sum(std::size_t n, F f) {
  if (n < kParallelMin) return range_sum(0, n, f);
  const int nt = omp_get_max_threads();
  std::vector<double> part(std::size_t(nt), 0.0);
#pragma omp parallel
  {
    const int id = omp_get_thread_num(), k = omp_get_num_threads();
    const std::size_t b = n * std::size_t(id) / std::size_t(k);
    const std::size_t e = n * std::size_t(id + 1) / std::size_t(k);
    part[std::size_t(id)] = range_sum(b, e, f);
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

// One matrix per thread at a time; each norm is one thread's range_sum, so the result is
// deterministic.
template <typename T>
void frobenius_normalize(T* x, int batch, std::size_t elems, double norm_scale, double eps) {
#pragma omp parallel for schedule(static) if (batch > 1)
  for (int b = 0; b < batch; ++b) {
    T* xb = x + std::size_t(b) * elems;
    const double ss = range_sum(0, elems, [xb](std::size_t i) { return double(xb[i]) * xb[i]; });
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

template <typename T>
void sign_inplace(T* x, std::size_t n) {
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (std::size_t i = 0; i < n; ++i) x[i] = T((x[i] > T(0)) - (x[i] < T(0)));
}

// One matrix per thread at a time, every sum serial: deterministic.
template <typename T>
void second_moment_normalize(T* O, T* v, int batch, int rows, int cols, bool per_row, double beta,
                             double eps, double target_norm, const double* gate) {
  const bool skip = skipped(gate);
  const std::size_t R = std::size_t(rows), C = std::size_t(cols), elems = R * C;
#pragma omp parallel for schedule(static) if (batch > 1)
  for (int b = 0; b < batch; ++b) {
    T* o = O + std::size_t(b) * elems;
    T* vb = v + std::size_t(b) * (per_row ? R : elems);
    double in_sq = 0, out_sq = 0;
    for (std::size_t r = 0; r < R; ++r) {
      T* row = o + r * C;
      double row_sq = 0;
      for (std::size_t c = 0; c < C; ++c) row_sq += double(row[c]) * row[c];
      in_sq += row_sq;
      if (per_row) {
        const double vr = beta * vb[r] + (1 - beta) * (row_sq / double(C));
        if (!skip) vb[r] = T(vr);
        const double f = 1.0 / (std::sqrt(double(T(vr))) + eps);
        for (std::size_t c = 0; c < C; ++c) row[c] = T(row[c] * f);
      } else {
        for (std::size_t c = 0; c < C; ++c) {
          const double x = row[c];
          const T vi = T(beta * vb[r * C + c] + (1 - beta) * x * x);
          if (!skip) vb[r * C + c] = vi;
          row[c] = T(x / (std::sqrt(double(vi)) + eps));
        }
      }
      for (std::size_t c = 0; c < C; ++c) out_sq += double(row[c]) * row[c];
    }
    const double target = target_norm > 0 ? target_norm : std::sqrt(in_sq);
    const T f = T(target / (std::sqrt(out_sq) + eps));
    for (std::size_t i = 0; i < elems; ++i) o[i] *= f;
  }
}

template <typename T>
void lerp_update(T* x, const T* y, std::size_t n, double beta, const double* gate) {
  if (skipped(gate)) return;
  if (beta == 0) {
    std::copy_n(y, n, x);
    return;
  }
  const T b = T(beta), a = T(1 - beta);
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (std::size_t i = 0; i < n; ++i) x[i] = b * x[i] + a * y[i];
}

template <typename T>
void soap_precondition(T* D, T* v, const T* m, const T* g, std::size_t n, double beta2, double eps,
                       const double* gate) {
  const bool skip = skipped(gate);
  const T b = T(beta2), a = T(1 - beta2), e = T(eps);
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (std::size_t i = 0; i < n; ++i) {
    const T vi = b * v[i] + a * g[i] * g[i];
    if (!skip) v[i] = vi;
    D[i] = m[i] / (std::sqrt(vi) + e);
  }
}

MOETRAIN_CPU_INSTANTIATE(MOETRAIN_OPS_OPTIMIZER)

}  // namespace moetrain::cpu
