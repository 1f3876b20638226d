// MoE router: scores, top-k selection, gate weights, the Switch load-balancing loss and the
// router z-loss (forward), and the gradient of all of them with respect to the router logits.
//
// softmax_topk: p = softmax(l); top-k of p; gates = chosen p renormalised.
// sigmoid_bias: s = sigmoid(l); top-k of s + bias; gates = route_scale * chosen s / their sum.
// L_aux = E * sum_e f_e P_e with f_e = counts_e / (N k) (held constant) and P_e the mean over
// tokens of the full distribution q (p, or s normalised to sum 1). L_z = mean_t logsumexp(l_t)^2.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "backend/cpu/ops.hpp"

namespace moetrain::cpu {

namespace {

template <typename T>
double log_sum_exp(const T* l, int E) {
  double mx = l[0];
  for (int e = 1; e < E; ++e) mx = std::max(mx, double(l[e]));
  double s = 0;
  for (int e = 0; e < E; ++e) s += std::exp(double(l[e]) - mx);
  return mx + std::log(s);
}

// log sigmoid(x) = -log(1 + e^-x), finite for every finite x.
double log_sigmoid(double x) {
  return std::min(x, 0.0) - std::log1p(std::exp(-std::abs(x)));
}

// The router distribution q of one token: the softmax probabilities, or the sigmoid scores
// normalised to sum 1. The sigmoid case is normalised in the log domain, relative to the largest
// score (log sigmoid is monotone, so that is the largest logit's), so that a token whose scores all
// underflow still has a distribution.
template <typename T>
void distribution(double* q, const T* scores, const T* l, int E, RouterType type) {
  if (type == RouterType::SoftmaxTopK) {
    for (int e = 0; e < E; ++e) q[e] = scores[e];
    return;
  }
  double lmax = l[0];
  for (int e = 1; e < E; ++e) lmax = std::max(lmax, double(l[e]));
  const double top = log_sigmoid(lmax);
  double z = 0;
  for (int e = 0; e < E; ++e) z += q[e] = std::exp(log_sigmoid(l[e]) - top);
  for (int e = 0; e < E; ++e) q[e] /= z;
}

// The chosen sigmoid scores normalised to sum 1 (nu_j = s_j / sum of chosen s, in slot order),
// in the log domain for the same reason.
template <typename T>
void chosen_share(double* nu, const T* l, const int32_t* sel, int K) {
  double top = log_sigmoid(l[sel[0]]);
  for (int j = 1; j < K; ++j) top = std::max(top, log_sigmoid(l[sel[j]]));
  double z = 0;
  for (int j = 0; j < K; ++j) z += nu[j] = std::exp(log_sigmoid(l[sel[j]]) - top);
  for (int j = 0; j < K; ++j) nu[j] /= z;
}

}  // namespace

template <typename T>
void router_forward(T* scores, int32_t* topk, T* gates, int32_t* counts, T* stats, const T* logits,
                    const T* bias, const RouterShape& s) {
  const int N = s.tokens, E = s.n_experts, K = s.top_k;
  const bool sigmoid = s.type == RouterType::SigmoidBias;
  const int nt = omp_get_max_threads();
  std::vector<double> partial(std::size_t(nt) * (E + 2), 0.0);  // per thread: sum q_e, z, entropy

#pragma omp parallel
  {
    double* acc = partial.data() + std::size_t(omp_get_thread_num()) * (E + 2);
    std::vector<double> q(static_cast<std::size_t>(E)), key(static_cast<std::size_t>(E)),
        nu(static_cast<std::size_t>(K));
#pragma omp for schedule(static)
    for (int t = 0; t < N; ++t) {
      const T* l = logits + std::size_t(t) * E;
      T* sc = scores + std::size_t(t) * E;
      const double lse = log_sum_exp(l, E);
      for (int e = 0; e < E; ++e)
        sc[e] = sigmoid ? T(1.0 / (1.0 + std::exp(-double(l[e])))) : T(std::exp(l[e] - lse));
      for (int e = 0; e < E; ++e) key[e] = double(sc[e]) + (sigmoid && bias ? double(bias[e]) : 0);

      // Top-k by insertion; a later expert displaces an earlier one only if strictly larger, so
      // ties go to the lower index.
      int32_t* sel = topk + std::size_t(t) * K;
      int n = 0;
      for (int e = 0; e < E; ++e) {
        if (n == K && !(key[e] > key[sel[K - 1]])) continue;
        int p = n < K ? n++ : K - 1;
        while (p > 0 && key[e] > key[sel[p - 1]]) {
          sel[p] = sel[p - 1];
          --p;
        }
        sel[p] = e;
      }
      if (sigmoid) {
        chosen_share(nu.data(), l, sel, K);
        for (int j = 0; j < K; ++j) gates[std::size_t(t) * K + j] = T(s.route_scale * nu[j]);
      } else {
        double zsel = 0;
        for (int j = 0; j < K; ++j) zsel += sc[sel[j]];
        for (int j = 0; j < K; ++j) gates[std::size_t(t) * K + j] = T(sc[sel[j]] / zsel);
      }

      distribution(q.data(), sc, l, E, s.type);
      double ent = 0;
      for (int e = 0; e < E; ++e) {
        acc[e] += q[e];
        if (q[e] > 0) ent -= q[e] * std::log(q[e]);
      }
      acc[E] += lse * lse;
      acc[E + 1] += ent;
    }
  }

  for (int e = 0; e < E; ++e) counts[e] = 0;
  for (int a = 0; a < N * K; ++a) ++counts[topk[a]];
  std::vector<double> total(std::size_t(E + 2), 0.0);
  for (int th = 0; th < nt; ++th)
    for (int i = 0; i < E + 2; ++i) total[i] += partial[std::size_t(th) * (E + 2) + i];
  double aux = 0;
  for (int e = 0; e < E; ++e) aux += double(counts[e]) / (double(N) * K) * (total[e] / N);
  stats[0] = T(aux * E);
  stats[1] = T(total[E] / N);
  stats[2] = T(total[E + 1] / N);
}

template <typename T>
void router_backward(T* dlogits, const T* dgates, const T* logits, const T* scores,
                     const int32_t* topk, const T* gates, const int32_t* counts,
                     const RouterShape& s, double aux_coef, double z_coef, double grad_scale) {
  const int N = s.tokens, E = s.n_experts, K = s.top_k;
  const bool sigmoid = s.type == RouterType::SigmoidBias;
  // dL_aux/dq_te = aux_coef * E * f_e / N, the same for every token.
  std::vector<double> c(static_cast<std::size_t>(E));
  for (int e = 0; e < E; ++e) c[e] = aux_coef * E * (double(counts[e]) / (double(N) * K)) / N;

#pragma omp parallel
  {
    std::vector<double> dsc(static_cast<std::size_t>(E)), q(static_cast<std::size_t>(E)),
        nu(static_cast<std::size_t>(K));
#pragma omp for schedule(static)
    for (int t = 0; t < N; ++t) {
      const T* l = logits + std::size_t(t) * E;
      const T* sc = scores + std::size_t(t) * E;
      const int32_t* sel = topk + std::size_t(t) * K;
      const T* w = gates + std::size_t(t) * K;
      const T* dw = dgates + std::size_t(t) * K;
      T* dl = dlogits + std::size_t(t) * E;
      std::fill(dsc.begin(), dsc.end(), 0.0);
      double wdw = 0;
      for (int j = 0; j < K; ++j) wdw += double(w[j]) * dw[j];

      // Aux loss through the distribution q.
      distribution(q.data(), sc, l, E, s.type);
      double qc = 0;
      for (int e = 0; e < E; ++e) qc += q[e] * c[e];

      if (!sigmoid) {
        // Gates are the softmax of the chosen logits: dl_j = w_j (dw_j - sum_i w_i dw_i).
        // Aux: softmax backward of c.
        for (int e = 0; e < E; ++e) dl[e] = T(grad_scale * q[e] * (c[e] - qc));
        for (int j = 0; j < K; ++j) dl[sel[j]] += T(w[j] * (dw[j] - wdw));
      } else {
        // w_j = r nu_j with nu_j = s_j / Z (Z = sum of chosen s), and q = s / sum(s); through
        // ds/dl = s (1 - s) the s cancels into nu and q:
        // dl_j = (1 - s_j) [nu_j (r dw_j - sum_i w_i dw_i) + grad_scale q_j (c_j - qc)].
        chosen_share(nu.data(), l, sel, K);
        for (int j = 0; j < K; ++j) dsc[sel[j]] += nu[j] * (s.route_scale * dw[j] - wdw);
        for (int e = 0; e < E; ++e) {
          dsc[e] += grad_scale * q[e] * (c[e] - qc);
          dl[e] = T(dsc[e] / (1.0 + std::exp(double(l[e]))));  // 1 - s_e = sigmoid(-l_e)
        }
      }
      if (z_coef != 0) {
        const double lse = log_sum_exp(l, E);
        for (int e = 0; e < E; ++e)
          dl[e] += T(grad_scale * z_coef * 2.0 * lse * std::exp(double(l[e]) - lse) / N);
      }
    }
  }
}

MOETRAIN_CPU_INSTANTIATE(MOETRAIN_OPS_ROUTER)

}  // namespace moetrain::cpu
