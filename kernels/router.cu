// kernels/router.cu — MoE router forward and backward (contract: router.cuh, CPU reference
// src/backend/cpu/router.cpp).
//
// Forward: one warp per token. The lanes own experts e = lane + 32 i (i < ceil(E / 32) <= 32):
//   1. logsumexp of the token's logits (warp max, warp sum of exp in double),
//   2. scores (softmax p = exp(l - lse), or sigmoid), computed in double and stored as fp32
//      exactly as the CPU reference rounds them, so top-k ids agree bit for bit,
//   3. top-k by k rounds of a warp arg-max over the not yet taken experts, key = score (+ bias) in
//      double; equal keys go to the lower expert index (the CPU's stable insertion order),
//   4. gates (chosen scores / their sum, in slot order), counts (shared-memory integer atomics),
//   5. the per-token statistics: router distribution q (p, or s / sum s) added into a per-warp
//      shared accumulator of sum_t q_te, lse^2 and the entropy.
// Each block owns a fixed contiguous range of tokens and writes its partials (double) and counts to
// the workspace; a one-block finalize kernel adds them in block order and forms L_aux, L_z, the
// entropy and the counts. The grid depends only on the token count: the result is deterministic.
//
// Backward: one warp per token, dlogits overwritten; aux constants c_e = aux_coef E f_e / N in
// shared memory per block; all per-token sums (sum_j w_j dw_j, sum_e q_e c_e, sum s, lse) in
// double. dgates already carry the caller's loss scale: grad_scale multiplies only the aux and z
// terms.
#include "router.cuh"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace moetrain::kernels {

namespace {

constexpr int kRouterWarps = 4;
constexpr int kRouterThreads = 32 * kRouterWarps;
constexpr int kRouterTokensPerBlock = 64;  // forward: tokens per block (16 per warp)
constexpr int kRouterMaxBlocks = 256;      // forward: caps the partials the finalize kernel adds
constexpr int kRouterFinalizeThreads = 256;
constexpr int kRouterBackwardTokensPerWarp = 4;

int router_forward_blocks(int tokens) {
  return std::max(1, std::min(ceil_div(tokens, kRouterTokensPerBlock), kRouterMaxBlocks));
}

std::size_t router_forward_smem_bytes(int E, int K) {
  return sizeof(double) * std::size_t(kRouterWarps) * (E + 2)  // per-warp accumulators
         + sizeof(float) * std::size_t(kRouterWarps) * E       // per-warp scores of the token
         + sizeof(float) * std::size_t(E)                      // bias
         + sizeof(int) * std::size_t(E)                        // block counts
         + sizeof(int) * std::size_t(kRouterWarps) * K;        // per-warp selected experts
}

void check_dims(const RouterDims& d) {
  if (d.tokens < 1 || d.n_experts < 1 || d.n_experts > kRouterMaxExperts || d.top_k < 1 ||
      d.top_k > d.n_experts)
    throw std::invalid_argument(
        "router kernels: need tokens >= 1 and 1 <= top_k <= n_experts <= " +
        std::to_string(kRouterMaxExperts) + " (tokens " + std::to_string(d.tokens) +
        ", n_experts " + std::to_string(d.n_experts) + ", top_k " + std::to_string(d.top_k) + ")");
}

// Log-sum-exp of one token's logits over the warp (every lane gets it): the max in fp32 (exact),
// the sum of exponentials in double, as the CPU reference.
__device__ __forceinline__ double warp_logsumexp(const float* __restrict__ l, int E,
                                                 unsigned lane) {
  float mx = -INFINITY;
  for (int e = static_cast<int>(lane); e < E; e += 32) mx = fmaxf(mx, l[e]);
  mx = warp_max(mx);
  double s = 0.0;
  for (int e = static_cast<int>(lane); e < E; e += 32)
    s += exp(static_cast<double>(l[e]) - static_cast<double>(mx));
  s = warp_sum(s);
  return static_cast<double>(mx) + log(s);
}

// log sigmoid(x) = -log(1 + e^-x), finite for every finite x. The sigmoid router normalises its
// scores in the log domain (relative to the largest), so that a token whose scores all underflow
// still has gates and a distribution (the CPU reference does the same).
__device__ __forceinline__ double log_sigmoid(double x) {
  return fmin(x, 0.0) - log1p(exp(-fabs(x)));
}

// The largest log score of the chosen experts and the sum of their scores relative to it, in slot
// order (every lane computes the same): nu_j = exp(log_sigmoid(l_j) - top) / z.
struct ChosenShare {
  double top, z;
};
__device__ __forceinline__ ChosenShare chosen_share(const float* __restrict__ l, const int32_t* sel,
                                                    int K) {
  ChosenShare c{log_sigmoid(l[sel[0]]), 0.0};
  for (int j = 1; j < K; ++j) c.top = fmax(c.top, log_sigmoid(l[sel[j]]));
  for (int j = 0; j < K; ++j) c.z += exp(log_sigmoid(l[sel[j]]) - c.top);
  return c;
}

// The sigmoid router's distribution q_e = s_e / sum(s) = exp(log_sigmoid(l_e) - top) * inv: top is
// the largest logit's log score, inv the reciprocal warp sum (every lane gets both).
struct SigmoidDistribution {
  double top, inv;
};
__device__ __forceinline__ SigmoidDistribution sigmoid_distribution(const float* __restrict__ l,
                                                                    int E, unsigned lane) {
  float mx = -INFINITY;
  for (int e = static_cast<int>(lane); e < E; e += 32) mx = fmaxf(mx, l[e]);
  const double top = log_sigmoid(static_cast<double>(warp_max(mx)));
  double z = 0.0;
  for (int e = static_cast<int>(lane); e < E; e += 32)
    z += exp(log_sigmoid(static_cast<double>(l[e])) - top);
  return {top, 1.0 / warp_sum(z)};
}

__global__ void __launch_bounds__(kRouterThreads)
    router_forward_kernel(float* __restrict__ scores, int32_t* __restrict__ topk,
                          float* __restrict__ gates, const float* __restrict__ logits,
                          const float* __restrict__ bias, RouterDims dims,
                          double* __restrict__ part_acc, int32_t* __restrict__ part_counts) {
  const int E = dims.n_experts, K = dims.top_k, N = dims.tokens;
  const bool sigmoid = dims.sigmoid;
  double* acc_all = dynamic_smem<double>();
  float* sc_all = reinterpret_cast<float*>(acc_all + kRouterWarps * (E + 2));
  float* sbias = sc_all + kRouterWarps * E;
  int* scount = reinterpret_cast<int*>(sbias + E);
  int* sel_all = scount + E;

  const int tid = static_cast<int>(thread_rank()), nthreads = static_cast<int>(block_threads());
  const unsigned lane = lane_id(), warp = warp_id();
  for (int i = tid; i < kRouterWarps * (E + 2); i += nthreads) acc_all[i] = 0.0;
  for (int e = tid; e < E; e += nthreads) {
    sbias[e] = (sigmoid && bias != nullptr) ? bias[e] : 0.0f;
    scount[e] = 0;
  }
  __syncthreads();

  double* acc = acc_all + warp * (E + 2);
  float* sc = sc_all + warp * E;
  int* sel = sel_all + warp * K;
  const int per_block = ceil_div(N, static_cast<int>(gridDim.x));
  const int t_begin = static_cast<int>(blockIdx.x) * per_block;
  const int t_end = min(N, t_begin + per_block);

  for (int t = t_begin + static_cast<int>(warp); t < t_end; t += kRouterWarps) {
    const float* l = logits + static_cast<std::size_t>(t) * E;
    float* out_sc = scores + static_cast<std::size_t>(t) * E;
    const double lse = warp_logsumexp(l, E, lane);

    for (int e = static_cast<int>(lane); e < E; e += 32) {
      const double le = l[e];
      const float v =
          sigmoid ? static_cast<float>(1.0 / (1.0 + exp(-le))) : static_cast<float>(exp(le - lse));
      sc[e] = v;
      out_sc[e] = v;
    }

    // Top-k: k rounds of a warp arg-max over the experts not yet taken (bit i of `taken` is expert
    // lane + 32 i). Ties go to the lower expert index; a lane without candidates reports -1.
    unsigned taken = 0;
    for (int j = 0; j < K; ++j) {
      double best = -static_cast<double>(INFINITY);
      int bi = -1;
      int i = 0;
      for (int e = static_cast<int>(lane); e < E; e += 32, ++i) {
        if ((taken >> i) & 1u) continue;
        const double key = static_cast<double>(sc[e]) + static_cast<double>(sbias[e]);
        if (bi < 0 || key > best) {
          best = key;
          bi = e;
        }
      }
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) {
        const double ob = __shfl_xor_sync(kFullMask, best, offset);
        const int oi = __shfl_xor_sync(kFullMask, bi, offset);
        if (oi >= 0 && (bi < 0 || ob > best || (ob == best && oi < bi))) {
          best = ob;
          bi = oi;
        }
      }
      if ((bi & 31) == static_cast<int>(lane)) taken |= 1u << (bi >> 5);
      if (lane == 0) sel[j] = bi;
    }
    __syncwarp();  // sel and sc of every lane are visible to the whole warp

    // Gates: softmax p_j / sum of chosen p, or r s_j / sum of chosen s (slot order, as the CPU).
    ChosenShare share{0.0, 0.0};
    if (sigmoid) {
      share = chosen_share(l, sel, K);
    } else {
      for (int j = 0; j < K; ++j) share.z += static_cast<double>(sc[sel[j]]);
    }
    for (int j = static_cast<int>(lane); j < K; j += 32) {
      const int e = sel[j];
      topk[static_cast<std::size_t>(t) * K + j] = e;
      gates[static_cast<std::size_t>(t) * K + j] = static_cast<float>(
          sigmoid ? dims.route_scale * (exp(log_sigmoid(l[e]) - share.top) / share.z)
                  : static_cast<double>(sc[e]) / share.z);
      atomicAdd(&scount[e], 1);
    }

    // Router distribution q, its entropy, and the z statistic.
    SigmoidDistribution dist{0.0, 1.0};
    if (sigmoid) dist = sigmoid_distribution(l, E, lane);
    double ent = 0.0;
    for (int e = static_cast<int>(lane); e < E; e += 32) {
      const double q =
          sigmoid ? exp(log_sigmoid(l[e]) - dist.top) * dist.inv : static_cast<double>(sc[e]);
      acc[e] += q;
      if (q > 0.0) ent -= q * log(q);
    }
    ent = warp_sum(ent);
    if (lane == 0) {
      acc[E] += lse * lse;
      acc[E + 1] += ent;
    }
    __syncwarp();  // the next token overwrites sc and sel
  }
  __syncthreads();

  // Block partials: the warps' accumulators added in warp order.
  for (int i = tid; i < E + 2; i += nthreads) {
    double v = 0.0;
    for (int w = 0; w < kRouterWarps; ++w) v += acc_all[w * (E + 2) + i];
    part_acc[static_cast<std::size_t>(blockIdx.x) * (E + 2) + i] = v;
  }
  for (int e = tid; e < E; e += nthreads)
    part_counts[static_cast<std::size_t>(blockIdx.x) * E + e] = scount[e];
}

__global__ void __launch_bounds__(kRouterFinalizeThreads)
    router_finalize_kernel(int32_t* __restrict__ counts, float* __restrict__ stats,
                           const double* __restrict__ part_acc,
                           const int32_t* __restrict__ part_counts, int blocks, RouterDims dims) {
  const int E = dims.n_experts, N = dims.tokens;
  const double assignments = static_cast<double>(N) * dims.top_k;
  const int tid = static_cast<int>(thread_rank()), nthreads = static_cast<int>(block_threads());
  double aux = 0.0, z = 0.0, ent = 0.0;
  for (int i = tid; i < E + 2; i += nthreads) {
    double v = 0.0;
    for (int b = 0; b < blocks; ++b) v += part_acc[static_cast<std::size_t>(b) * (E + 2) + i];
    if (i < E) {
      int c = 0;
      for (int b = 0; b < blocks; ++b) c += part_counts[static_cast<std::size_t>(b) * E + i];
      counts[i] = c;
      aux += static_cast<double>(c) / assignments * (v / N);
    } else if (i == E) {
      z = v;
    } else {
      ent = v;
    }
  }
  aux = block_sum(aux);
  z = block_sum(z);
  ent = block_sum(ent);
  if (tid == 0) {
    stats[0] = static_cast<float>(aux * E);
    stats[1] = static_cast<float>(z / N);
    stats[2] = static_cast<float>(ent / N);
  }
}

__global__ void __launch_bounds__(kRouterThreads)
    router_backward_kernel(float* __restrict__ dlogits, const float* __restrict__ dgates,
                           const float* __restrict__ logits, const float* __restrict__ scores,
                           const int32_t* __restrict__ topk, const float* __restrict__ gates,
                           const int32_t* __restrict__ counts, RouterDims dims, double aux_coef,
                           double z_coef, double grad_scale) {
  const int E = dims.n_experts, K = dims.top_k, N = dims.tokens;
  const bool sigmoid = dims.sigmoid;
  double* c = dynamic_smem<double>();  // dL_aux / dq_te, the same for every token
  const int tid = static_cast<int>(thread_rank()), nthreads = static_cast<int>(block_threads());
  for (int e = tid; e < E; e += nthreads)
    c[e] = aux_coef * E * (static_cast<double>(counts[e]) / (static_cast<double>(N) * K)) / N;
  __syncthreads();

  const unsigned lane = lane_id();
  const int first = static_cast<int>(blockIdx.x * kRouterWarps + warp_id());
  const int stride = static_cast<int>(gridDim.x) * kRouterWarps;
  for (int t = first; t < N; t += stride) {
    const std::size_t row = static_cast<std::size_t>(t) * E;
    const float* l = logits + row;
    const float* sc = scores + row;
    const int32_t* sel = topk + static_cast<std::size_t>(t) * K;
    const float* w = gates + static_cast<std::size_t>(t) * K;
    const float* dw = dgates + static_cast<std::size_t>(t) * K;
    float* dl = dlogits + row;

    double wdw = 0.0;
    for (int j = 0; j < K; ++j) wdw += static_cast<double>(w[j]) * dw[j];
    ChosenShare share{0.0, 1.0};
    SigmoidDistribution dist{0.0, 1.0};
    if (sigmoid) {
      share = chosen_share(l, sel, K);
      dist = sigmoid_distribution(l, E, lane);
    }
    // q_e: the softmax p, or s_e / sum(s) from the logits as in the forward.
    auto q_of = [&](int e) {
      return sigmoid ? exp(log_sigmoid(l[e]) - dist.top) * dist.inv : static_cast<double>(sc[e]);
    };
    double qc = 0.0;
    for (int e = static_cast<int>(lane); e < E; e += 32) qc += q_of(e) * c[e];
    qc = warp_sum(qc);
    const double lse = z_coef != 0.0 ? warp_logsumexp(l, E, lane) : 0.0;

    for (int e = static_cast<int>(lane); e < E; e += 32) {
      int slot = -1;
      for (int j = 0; j < K; ++j)
        if (sel[j] == e) {
          slot = j;
          break;
        }
      float out;
      if (!sigmoid) {
        // Aux: softmax backward of c. Gates = softmax of the chosen logits.
        out = static_cast<float>(grad_scale * static_cast<double>(sc[e]) * (c[e] - qc));
        if (slot >= 0) out += static_cast<float>(w[slot] * (dw[slot] - wdw));
      } else {
        // w_j = r nu_j (nu_j = s_j / sum of chosen s), q = s / sum(s); through ds/dl = s (1 - s)
        // the s cancels into nu and q, and 1 - s_e = sigmoid(-l_e).
        double dsc = grad_scale * q_of(e) * (c[e] - qc);
        if (slot >= 0)
          dsc += exp(log_sigmoid(l[e]) - share.top) / share.z * (dims.route_scale * dw[slot] - wdw);
        out = static_cast<float>(dsc / (1.0 + exp(static_cast<double>(l[e]))));
      }
      if (z_coef != 0.0)
        out += static_cast<float>(grad_scale * z_coef * 2.0 * lse *
                                  exp(static_cast<double>(l[e]) - lse) / N);
      dl[e] = out;
    }
  }
}

}  // namespace

std::size_t router_forward_workspace_bytes(int tokens, int n_experts) {
  const std::size_t blocks = static_cast<std::size_t>(router_forward_blocks(tokens));
  return blocks * (n_experts + 2) * sizeof(double) + blocks * n_experts * sizeof(int32_t);
}

void router_forward(float* scores, int32_t* topk, float* gates, int32_t* counts, float* stats,
                    const float* logits, const float* bias, const RouterDims& dims, void* workspace,
                    cudaStream_t stream) {
  check_dims(dims);
  const int blocks = router_forward_blocks(dims.tokens);
  double* part_acc = static_cast<double*>(workspace);
  int32_t* part_counts = reinterpret_cast<int32_t*>(part_acc + static_cast<std::size_t>(blocks) *
                                                                   (dims.n_experts + 2));
  launch(router_forward_kernel, dim3(blocks), dim3(kRouterThreads),
         router_forward_smem_bytes(dims.n_experts, dims.top_k), stream, scores, topk, gates, logits,
         bias, dims, part_acc, part_counts);
  launch(router_finalize_kernel, dim3(1), dim3(kRouterFinalizeThreads), 0, stream, counts, stats,
         static_cast<const double*>(part_acc), static_cast<const int32_t*>(part_counts), blocks,
         dims);
}

void router_backward(float* dlogits, const float* dgates, const float* logits, const float* scores,
                     const int32_t* topk, const float* gates, const int32_t* counts,
                     const RouterDims& dims, double aux_coef, double z_coef, double grad_scale,
                     cudaStream_t stream) {
  check_dims(dims);
  const int blocks =
      std::min(ceil_div(dims.tokens, kRouterWarps * kRouterBackwardTokensPerWarp), 65535);
  launch(router_backward_kernel, dim3(blocks), dim3(kRouterThreads),
         sizeof(double) * dims.n_experts, stream, dlogits, dgates, logits, scores, topk, gates,
         counts, dims, aux_coef, z_coef, grad_scale);
}

}  // namespace moetrain::kernels
