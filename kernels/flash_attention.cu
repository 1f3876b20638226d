// kernels/flash_attention.cu — causal flash attention forward on mma.sync (contract:
// flash_attention.cuh).
//
// One block of 4 warps per (query block of 64 rows, head, sequence); warp w owns query rows
// 16 w .. 16 w + 15 of the block and keeps them in registers: its q fragments, its 16 x hd output
// accumulator, and per row the running max m and (per-lane partial) sum l of the online softmax.
// The block walks the key blocks kb = 0 .. qb (64 keys each; the blocks above the diagonal are
// fully masked and skipped), staging k and v in shared memory:
//   S = q k^T (mma m16n8k16, fp32)  ->  s * scale, masked (j > i or j >= seq) to -inf
//   m' = max(m, rowmax s);  p = exp(s - m');  l = l e^(m - m') + rowsum p;  o = o e^(m - m') + p v
// with p rounded to bf16 for the p v product (its row sum stays fp32). The accumulator layout of S
// (thread 4g + t holds rows g, g + 8, columns 2t, 2t + 1 of each n8 tile) is the A-operand layout
// of the next mma, so p goes from registers to registers. At the end o / l is written as bf16, and
// lse = m + log l. m is the exact row max of the scaled scores over j <= i: its max over the
// block's rows is this block's S_max partial, reduced over blocks and the batch by a second kernel.
#include "flash_attention.cuh"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "mma.cuh"

namespace moetrain::kernels {
namespace flash_detail {

constexpr int kBlockM = 64, kBlockN = 64, kWarps = 4, kThreads = kWarps * kWarpSize;

// Shared-memory row stride in elements: 8 more than hd keeps each row 16-byte aligned and moves
// consecutive rows to different banks for ldmatrix.
template <int HD>
constexpr int kRowLd = HD + 8;
template <int HD>
constexpr std::size_t smem_bytes() {
  return 3 * std::size_t(kBlockM) * kRowLd<HD> * sizeof(__nv_bfloat16);  // q, k, v tiles
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  return uint32_t(bf16_bits(float_to_bf16(lo))) | uint32_t(bf16_bits(float_to_bf16(hi))) << 16;
}

// The accumulator fragments of n8 tiles 2 kk and 2 kk + 1 (a 16 x 16 block of a 16 x 64 product,
// e.g. P) rounded to bf16 as the A fragment of keys 16 kk .. 16 kk + 15 of the next product: the
// accumulator layout (rows g, g + 8; columns 2 t, 2 t + 1) is the A layout, register for register.
template <int kTiles>
__device__ __forceinline__ void a_fragment(uint32_t (&a)[4], const float (&acc)[kTiles][4],
                                           int kk) {
  a[0] = pack_bf16(acc[2 * kk][0], acc[2 * kk][1]);
  a[1] = pack_bf16(acc[2 * kk][2], acc[2 * kk][3]);
  a[2] = pack_bf16(acc[2 * kk + 1][0], acc[2 * kk + 1][1]);
  a[3] = pack_bf16(acc[2 * kk + 1][2], acc[2 * kk + 1][3]);
}

// Rows [row0, row0 + 64) of one head's hd columns of qkv (row stride ld) into a shared tile;
// rows at or past `rows` are zero. 16-byte chunks, all threads of the block.
template <int HD>
__device__ __forceinline__ void load_tile(__nv_bfloat16* tile, const __nv_bfloat16* src,
                                          std::size_t ld, int row0, int rows) {
  constexpr int kChunks = HD / 8;  // 8 bf16 per 16 bytes
  for (int c = static_cast<int>(threadIdx.x); c < kBlockM * kChunks; c += kThreads) {
    const int r = c / kChunks, k = c % kChunks;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (row0 + r < rows)
      v = *reinterpret_cast<const uint4*>(src + static_cast<std::size_t>(row0 + r) * ld + k * 8);
    *reinterpret_cast<uint4*>(tile + r * kRowLd<HD> + k * 8) = v;
  }
}

template <int HD>
__global__ void __launch_bounds__(kThreads)
    flash_forward_kernel(__nv_bfloat16* __restrict__ out, float* __restrict__ lse,
                         float* __restrict__ partial, const __nv_bfloat16* __restrict__ qkv,
                         FlashShape s, float scale) {
  constexpr int LD = kRowLd<HD>, kSteps = HD / 16, kDTiles = HD / 8, kNTiles = kBlockN / 8;
  const int qb = static_cast<int>(blockIdx.x), h = static_cast<int>(blockIdx.y),
            b = static_cast<int>(blockIdx.z);
  const int T = s.seq, H = s.n_heads, kv = h / (s.n_heads / s.n_kv_heads);
  const std::size_t W = static_cast<std::size_t>(H + 2 * s.n_kv_heads) * HD;
  const __nv_bfloat16* base = qkv + static_cast<std::size_t>(b) * T * W;
  const __nv_bfloat16* q = base + static_cast<std::size_t>(h) * HD;
  const __nv_bfloat16* k = base + static_cast<std::size_t>(H + kv) * HD;
  const __nv_bfloat16* v = base + static_cast<std::size_t>(H + s.n_kv_heads + kv) * HD;
  __nv_bfloat16* qs = dynamic_smem<__nv_bfloat16>();  // [64][LD] each
  __nv_bfloat16* ks = qs + kBlockM * LD;
  __nv_bfloat16* vs = ks + kBlockN * LD;
  __shared__ float warp_max_row[kWarps];

  const int warp = static_cast<int>(warp_id()), lane = static_cast<int>(lane_id());
  const int g = lane / 4, t = lane % 4;
  const int row_a = qb * kBlockM + warp * 16 + g, row_b = row_a + 8;  // this lane's two rows

  load_tile<HD>(qs, q, W, qb * kBlockM, T);
  __syncthreads();
  uint32_t qa[kSteps][4];  // the warp's 16 x hd queries as A fragments, one per 16 columns
  for (int kk = 0; kk < kSteps; ++kk)
    ldmatrix_x4(qa[kk], qs + (warp * 16 + lane % 16) * LD + kk * 16 + lane / 16 * 8);

  float o[kDTiles][4];  // 16 x hd accumulator: rows g (o[.][0..1]) and g + 8 (o[.][2..3])
  for (int d = 0; d < kDTiles; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.0f;
  float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.0f, l_b = 0.0f;

  for (int kb = 0; kb <= qb; ++kb) {
    __syncthreads();  // the previous block's k and v are no longer read
    load_tile<HD>(ks, k, W, kb * kBlockN, T);
    load_tile<HD>(vs, v, W, kb * kBlockN, T);
    __syncthreads();
    float sc[kNTiles][4];  // S for this warp's 16 rows x 64 keys
    for (int n = 0; n < kNTiles; ++n) {
      sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.0f;
      for (int kk = 0; kk < kSteps; ++kk) {
        uint32_t kf[2];  // k stored [key][d]: the transposed B operand, read row by row
        ldmatrix_x2(kf, ks + (n * 8 + lane % 8) * LD + kk * 16 + lane / 8 % 2 * 8);
        mma_m16n8k16_bf16(sc[n], qa[kk], kf, sc[n]);
      }
    }
    float mx_a = -INFINITY, mx_b = -INFINITY;
    for (int n = 0; n < kNTiles; ++n)
      for (int e = 0; e < 4; ++e) {
        const int j = kb * kBlockN + n * 8 + 2 * t + (e & 1), i = e < 2 ? row_a : row_b;
        const float x = (j > i || j >= T) ? -INFINITY : sc[n][e] * scale;
        sc[n][e] = x;
        if (e < 2)
          mx_a = fmaxf(mx_a, x);
        else
          mx_b = fmaxf(mx_b, x);
      }
    // The four lanes of a group share their rows.
    for (int off = 1; off < 4; off <<= 1) {
      mx_a = fmaxf(mx_a, __shfl_xor_sync(kFullMask, mx_a, off));
      mx_b = fmaxf(mx_b, __shfl_xor_sync(kFullMask, mx_b, off));
    }
    const float new_a = fmaxf(m_a, mx_a), new_b = fmaxf(m_b, mx_b);
    // A row with no key yet (only rows past the sequence can be) keeps exponents finite.
    const float ref_a = new_a == -INFINITY ? 0.0f : new_a,
                ref_b = new_b == -INFINITY ? 0.0f : new_b;
    const float alpha_a = expf(m_a - ref_a), alpha_b = expf(m_b - ref_b);
    m_a = new_a;
    m_b = new_b;
    l_a *= alpha_a;
    l_b *= alpha_b;
    for (int d = 0; d < kDTiles; ++d) {
      o[d][0] *= alpha_a;
      o[d][1] *= alpha_a;
      o[d][2] *= alpha_b;
      o[d][3] *= alpha_b;
    }
    for (int n = 0; n < kNTiles; ++n) {
      sc[n][0] = expf(sc[n][0] - ref_a);
      sc[n][1] = expf(sc[n][1] - ref_a);
      sc[n][2] = expf(sc[n][2] - ref_b);
      sc[n][3] = expf(sc[n][3] - ref_b);
      l_a += sc[n][0] + sc[n][1];
      l_b += sc[n][2] + sc[n][3];
    }
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t pa[4];
      a_fragment(pa, sc, kk);
      for (int d = 0; d < kDTiles; ++d) {
        uint32_t vf[2];  // v stored [key][d]: the row-major B operand, transposed by ldmatrix
        ldmatrix_x2_trans(vf, vs + (kk * 16 + lane % 16) * LD + d * 8);
        mma_m16n8k16_bf16(o[d], pa, vf, o[d]);
      }
    }
  }

  for (int off = 1; off < 4; off <<= 1) {
    l_a += __shfl_xor_sync(kFullMask, l_a, off);
    l_b += __shfl_xor_sync(kFullMask, l_b, off);
  }
  const std::size_t Wo = static_cast<std::size_t>(H) * HD;
  for (int half = 0; half < 2; ++half) {
    const int row = half ? row_b : row_a;
    if (row >= T) continue;
    const float inv = 1.0f / (half ? l_b : l_a);
    __nv_bfloat16* dst = out + (static_cast<std::size_t>(b) * T + row) * Wo +
                         static_cast<std::size_t>(h) * HD + 2 * t;
    for (int d = 0; d < kDTiles; ++d)
      *reinterpret_cast<uint32_t*>(dst + d * 8) =
          pack_bf16(o[d][2 * half] * inv, o[d][2 * half + 1] * inv);
    if (t == 0)
      lse[(static_cast<std::size_t>(b) * H + h) * T + row] =
          (half ? m_b : m_a) + logf(half ? l_b : l_a);
  }
  // This block's S_max partial: the max of its rows' maxima (rows past the sequence excluded).
  float mine = fmaxf(row_a < T ? m_a : -INFINITY, row_b < T ? m_b : -INFINITY);
  mine = warp_max(mine);
  if (lane == 0) warp_max_row[warp] = mine;
  __syncthreads();
  if (threadIdx.x == 0) {
    float mx = warp_max_row[0];
    for (int w = 1; w < kWarps; ++w) mx = fmaxf(mx, warp_max_row[w]);
    partial[(static_cast<std::size_t>(b) * H + h) * gridDim.x + qb] = mx;
  }
}

// smax[h] = max over the batch and the query blocks of the partials; one warp per head.
__global__ void __launch_bounds__(kWarpSize)
    flash_smax_kernel(float* __restrict__ smax, const float* __restrict__ partial, int batch,
                      int heads, int blocks) {
  const int h = static_cast<int>(blockIdx.x);
  float mx = -INFINITY;
  for (int i = static_cast<int>(lane_id()); i < batch * blocks; i += kWarpSize)
    mx = fmaxf(mx,
               partial[(static_cast<std::size_t>(i / blocks) * heads + h) * blocks + i % blocks]);
  mx = warp_max(mx);
  if (lane_id() == 0) smax[h] = mx;
}

// ---- backward
// ------------------------------------------------------------------------------------ Delta[b, h,
// i] = sum_d dO[i, d] O[i, d] (fp32 from bf16): the softmax backward's row term. One warp per row.
template <int HD>
__global__ void __launch_bounds__(kThreads)
    flash_delta_kernel(float* __restrict__ delta, const __nv_bfloat16* __restrict__ out,
                       const __nv_bfloat16* __restrict__ dout, FlashShape s) {
  const int rows = s.batch * s.n_heads * s.seq;
  const std::size_t Wo = static_cast<std::size_t>(s.n_heads) * HD;
  for (int r = static_cast<int>(blockIdx.x) * kWarps + static_cast<int>(warp_id()); r < rows;
       r += static_cast<int>(gridDim.x) * kWarps) {
    const int i = r % s.seq, h = r / s.seq % s.n_heads, b = r / (s.seq * s.n_heads);
    const std::size_t off =
        (static_cast<std::size_t>(b) * s.seq + i) * Wo + static_cast<std::size_t>(h) * HD;
    float acc = 0.0f;
    for (int d = static_cast<int>(lane_id()); d < HD; d += kWarpSize)
      acc += bf16_to_float(out[off + d]) * bf16_to_float(dout[off + d]);
    acc = warp_sum(acc);
    if (lane_id() == 0) delta[r] = acc;  // r = (b * H + h) * seq + i
  }
}

// dK and dV of one block of 64 keys of kv head `kv` (grid: key blocks, kv heads, sequences). Warp
// w owns keys 16 w .. 16 w + 15 and keeps their k and v as A fragments; for each query head of
// the group in order, and each query block at or below the diagonal, it forms the transposed
// products directly (rows = keys): S^T = k q^T, P^T = exp(S^T scale - lse), dP^T = v dO^T,
// dS^T = P^T (dP^T - Delta), then dV += P^T dO and dK += dS^T q. The sums over queries and over
// the group's heads run in that fixed order in registers: no atomics, the same bits every run.
template <int HD>
__global__ void __launch_bounds__(kThreads)
    flash_dkdv_kernel(__nv_bfloat16* __restrict__ dqkv, const __nv_bfloat16* __restrict__ qkv,
                      const __nv_bfloat16* __restrict__ dout, const float* __restrict__ lse,
                      const float* __restrict__ delta, FlashShape s, float scale) {
  constexpr int LD = kRowLd<HD>, kSteps = HD / 16, kDTiles = HD / 8, kNTiles = kBlockM / 8;
  const int kb = static_cast<int>(blockIdx.x), kv = static_cast<int>(blockIdx.y),
            b = static_cast<int>(blockIdx.z);
  const int T = s.seq, H = s.n_heads, KV = s.n_kv_heads, group = H / KV;
  const std::size_t W = static_cast<std::size_t>(H + 2 * KV) * HD,
                    Wo = static_cast<std::size_t>(H) * HD;
  const __nv_bfloat16* base = qkv + static_cast<std::size_t>(b) * T * W;
  const __nv_bfloat16* dbase = dout + static_cast<std::size_t>(b) * T * Wo;
  __nv_bfloat16* ks = dynamic_smem<__nv_bfloat16>();  // [64][LD] each: k, v, then q and dO
  __nv_bfloat16* vs = ks + kBlockN * LD;
  __nv_bfloat16* qs = vs + kBlockN * LD;
  __nv_bfloat16* dos = qs + kBlockM * LD;
  __shared__ float lse_s[kBlockM], delta_s[kBlockM];

  const int warp = static_cast<int>(warp_id()), lane = static_cast<int>(lane_id());
  const int g = lane / 4, t = lane % 4;
  const int key_a = kb * kBlockN + warp * 16 + g, key_b = key_a + 8;  // this lane's two keys

  load_tile<HD>(ks, base + static_cast<std::size_t>(H + kv) * HD, W, kb * kBlockN, T);
  load_tile<HD>(vs, base + static_cast<std::size_t>(H + KV + kv) * HD, W, kb * kBlockN, T);
  __syncthreads();
  // This warp's 16 rows of k and v as A fragments are re-read from shared memory where they are
  // used: with them in registers next to dK, dV and the 16 x 64 P^T and dS^T, hd 128 would spill.
  const __nv_bfloat16* k_rows = ks + (warp * 16 + lane % 16) * LD + lane / 16 * 8;
  const __nv_bfloat16* v_rows = vs + (warp * 16 + lane % 16) * LD + lane / 16 * 8;
  float dk[kDTiles][4], dv[kDTiles][4];
  for (int d = 0; d < kDTiles; ++d)
    for (int e = 0; e < 4; ++e) dk[d][e] = dv[d][e] = 0.0f;

  const int q_blocks = ceil_div(T, kBlockM);
  for (int hi = 0; hi < group; ++hi) {
    const int h = kv * group + hi;
    for (int qb = kb; qb < q_blocks; ++qb) {
      __syncthreads();  // the previous query block is no longer read
      load_tile<HD>(qs, base + static_cast<std::size_t>(h) * HD, W, qb * kBlockM, T);
      load_tile<HD>(dos, dbase + static_cast<std::size_t>(h) * HD, Wo, qb * kBlockM, T);
      for (int r = static_cast<int>(threadIdx.x); r < kBlockM; r += kThreads) {
        const int i = qb * kBlockM + r;
        const std::size_t at = (static_cast<std::size_t>(b) * H + h) * T + i;
        lse_s[r] = i < T ? lse[at] : INFINITY;  // a row past the sequence: P = 0
        delta_s[r] = i < T ? delta[at] : 0.0f;
      }
      __syncthreads();
      float pt[kNTiles][4], dst[kNTiles][4];  // P^T and dS^T: 16 keys x 64 queries
      for (int n = 0; n < kNTiles; ++n) {
        float st[4] = {0.0f, 0.0f, 0.0f, 0.0f}, dpt[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int kk = 0; kk < kSteps; ++kk) {
          uint32_t qf[2], df[2];  // q and dO stored [query][d]: transposed B operands
          ldmatrix_x2(qf, qs + (n * 8 + lane % 8) * LD + kk * 16 + lane / 8 % 2 * 8);
          ldmatrix_x2(df, dos + (n * 8 + lane % 8) * LD + kk * 16 + lane / 8 % 2 * 8);
          uint32_t ka[4], va[4];
          ldmatrix_x4(ka, k_rows + kk * 16);
          ldmatrix_x4(va, v_rows + kk * 16);
          mma_m16n8k16_bf16(st, ka, qf, st);
          mma_m16n8k16_bf16(dpt, va, df, dpt);
        }
        for (int e = 0; e < 4; ++e) {
          const int r = n * 8 + 2 * t + (e & 1), i = qb * kBlockM + r;
          const int j = e < 2 ? key_a : key_b;
          const float p = (j <= i && i < T && j < T) ? expf(st[e] * scale - lse_s[r]) : 0.0f;
          pt[n][e] = p;
          dst[n][e] = p * (dpt[e] - delta_s[r]);
        }
      }
      for (int kq = 0; kq < kBlockM / 16; ++kq) {
        uint32_t pa[4];
        a_fragment(pa, pt, kq);
        uint32_t sa[4];
        a_fragment(sa, dst, kq);
        for (int d = 0; d < kDTiles; ++d) {
          uint32_t df[2], qf[2];  // dO and q stored [query][d]: row-major B operands
          ldmatrix_x2_trans(df, dos + (kq * 16 + lane % 16) * LD + d * 8);
          ldmatrix_x2_trans(qf, qs + (kq * 16 + lane % 16) * LD + d * 8);
          mma_m16n8k16_bf16(dv[d], pa, df, dv[d]);
          mma_m16n8k16_bf16(dk[d], sa, qf, dk[d]);
        }
      }
    }
  }
  for (int half = 0; half < 2; ++half) {
    const int j = half ? key_b : key_a;
    if (j >= T) continue;
    __nv_bfloat16* row = dqkv + (static_cast<std::size_t>(b) * T + j) * W + 2 * t;
    __nv_bfloat16* dk_row = row + static_cast<std::size_t>(H + kv) * HD;
    __nv_bfloat16* dv_row = row + static_cast<std::size_t>(H + KV + kv) * HD;
    for (int d = 0; d < kDTiles; ++d) {
      *reinterpret_cast<uint32_t*>(dk_row + d * 8) =
          pack_bf16(dk[d][2 * half] * scale, dk[d][2 * half + 1] * scale);
      *reinterpret_cast<uint32_t*>(dv_row + d * 8) =
          pack_bf16(dv[d][2 * half], dv[d][2 * half + 1]);
    }
  }
}

// dQ of one block of 64 queries of head h (grid: query blocks, heads, sequences), walking the key
// blocks as the forward does: P from the saved logsumexp, dP = dO v^T, dS = P (dP - Delta),
// dQ += dS k, summed over the key blocks in order in registers.
template <int HD>
__global__ void __launch_bounds__(kThreads)
    flash_dq_kernel(__nv_bfloat16* __restrict__ dqkv, const __nv_bfloat16* __restrict__ qkv,
                    const __nv_bfloat16* __restrict__ dout, const float* __restrict__ lse,
                    const float* __restrict__ delta, FlashShape s, float scale) {
  constexpr int LD = kRowLd<HD>, kSteps = HD / 16, kDTiles = HD / 8, kNTiles = kBlockN / 8;
  const int qb = static_cast<int>(blockIdx.x), h = static_cast<int>(blockIdx.y),
            b = static_cast<int>(blockIdx.z);
  const int T = s.seq, H = s.n_heads, KV = s.n_kv_heads, kv = h / (H / KV);
  const std::size_t W = static_cast<std::size_t>(H + 2 * KV) * HD,
                    Wo = static_cast<std::size_t>(H) * HD;
  const __nv_bfloat16* base = qkv + static_cast<std::size_t>(b) * T * W;
  __nv_bfloat16* qs = dynamic_smem<__nv_bfloat16>();  // [64][LD] each: q, dO, then k and v
  __nv_bfloat16* dos = qs + kBlockM * LD;
  __nv_bfloat16* ks = dos + kBlockM * LD;
  __nv_bfloat16* vs = ks + kBlockN * LD;

  const int warp = static_cast<int>(warp_id()), lane = static_cast<int>(lane_id());
  const int g = lane / 4, t = lane % 4;
  const int row_a = qb * kBlockM + warp * 16 + g, row_b = row_a + 8;

  load_tile<HD>(qs, base + static_cast<std::size_t>(h) * HD, W, qb * kBlockM, T);
  load_tile<HD>(dos, dout + static_cast<std::size_t>(b) * T * Wo + static_cast<std::size_t>(h) * HD,
                Wo, qb * kBlockM, T);
  __syncthreads();
  uint32_t qa[kSteps][4], da[kSteps][4];
  for (int kk = 0; kk < kSteps; ++kk) {
    ldmatrix_x4(qa[kk], qs + (warp * 16 + lane % 16) * LD + kk * 16 + lane / 16 * 8);
    ldmatrix_x4(da[kk], dos + (warp * 16 + lane % 16) * LD + kk * 16 + lane / 16 * 8);
  }
  const std::size_t row0 = (static_cast<std::size_t>(b) * H + h) * T;
  const float lse_a = row_a < T ? lse[row0 + row_a] : INFINITY,
              lse_b = row_b < T ? lse[row0 + row_b] : INFINITY;
  const float delta_a = row_a < T ? delta[row0 + row_a] : 0.0f,
              delta_b = row_b < T ? delta[row0 + row_b] : 0.0f;
  float dq[kDTiles][4];
  for (int d = 0; d < kDTiles; ++d) dq[d][0] = dq[d][1] = dq[d][2] = dq[d][3] = 0.0f;

  for (int kb = 0; kb <= qb; ++kb) {
    __syncthreads();  // the previous key block is no longer read
    load_tile<HD>(ks, base + static_cast<std::size_t>(H + kv) * HD, W, kb * kBlockN, T);
    load_tile<HD>(vs, base + static_cast<std::size_t>(H + KV + kv) * HD, W, kb * kBlockN, T);
    __syncthreads();
    float ds[kNTiles][4];
    for (int n = 0; n < kNTiles; ++n) {
      float sc[4] = {0.0f, 0.0f, 0.0f, 0.0f}, dp[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      for (int kk = 0; kk < kSteps; ++kk) {
        uint32_t kf[2], vf[2];  // k and v stored [key][d]: transposed B operands
        ldmatrix_x2(kf, ks + (n * 8 + lane % 8) * LD + kk * 16 + lane / 8 % 2 * 8);
        ldmatrix_x2(vf, vs + (n * 8 + lane % 8) * LD + kk * 16 + lane / 8 % 2 * 8);
        mma_m16n8k16_bf16(sc, qa[kk], kf, sc);
        mma_m16n8k16_bf16(dp, da[kk], vf, dp);
      }
      for (int e = 0; e < 4; ++e) {
        const int j = kb * kBlockN + n * 8 + 2 * t + (e & 1), i = e < 2 ? row_a : row_b;
        const float p =
            (j <= i && j < T && i < T) ? expf(sc[e] * scale - (e < 2 ? lse_a : lse_b)) : 0.0f;
        ds[n][e] = p * (dp[e] - (e < 2 ? delta_a : delta_b));
      }
    }
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t sa[4];
      a_fragment(sa, ds, kk);
      for (int d = 0; d < kDTiles; ++d) {
        uint32_t kf[2];  // k stored [key][d]: the row-major B operand
        ldmatrix_x2_trans(kf, ks + (kk * 16 + lane % 16) * LD + d * 8);
        mma_m16n8k16_bf16(dq[d], sa, kf, dq[d]);
      }
    }
  }
  for (int half = 0; half < 2; ++half) {
    const int i = half ? row_b : row_a;
    if (i >= T) continue;
    __nv_bfloat16* dst =
        dqkv + (static_cast<std::size_t>(b) * T + i) * W + static_cast<std::size_t>(h) * HD + 2 * t;
    for (int d = 0; d < kDTiles; ++d)
      *reinterpret_cast<uint32_t*>(dst + d * 8) =
          pack_bf16(dq[d][2 * half] * scale, dq[d][2 * half + 1] * scale);
  }
}

int query_blocks(const FlashShape& s) {
  return ceil_div(s.seq, kBlockM);
}

// Calls f(std::integral_constant<int, hd>) for the head sizes the kernels are built for.
template <typename F>
void with_head_dim(int hd, const char* op, F&& f) {
  switch (hd) {
    case 16:
      return f(std::integral_constant<int, 16>{});
    case 32:
      return f(std::integral_constant<int, 32>{});
    case 64:
      return f(std::integral_constant<int, 64>{});
    case 128:
      return f(std::integral_constant<int, 128>{});
    default:
      throw std::invalid_argument(std::string(op) + ": head_dim " + std::to_string(hd) +
                                  " (16, 32, 64 or 128)");
  }
}

void check_shape(const FlashShape& s, const char* op) {
  with_head_dim(s.head_dim, op, [](auto) {});
  if (s.n_kv_heads <= 0 || s.n_heads % s.n_kv_heads != 0)
    throw std::invalid_argument(std::string(op) + ": n_heads " + std::to_string(s.n_heads) +
                                " is not a multiple of n_kv_heads " + std::to_string(s.n_kv_heads));
  if (s.n_heads > 65535 || s.batch > 65535)
    throw std::invalid_argument(std::string(op) + ": more than 65535 heads or sequences");
}

}  // namespace flash_detail

std::size_t flash_attention_workspace_bytes(const FlashShape& s) {
  return static_cast<std::size_t>(s.batch) * s.n_heads * flash_detail::query_blocks(s) *
         sizeof(float);
}

std::size_t flash_attention_backward_workspace_bytes(const FlashShape& s) {
  return static_cast<std::size_t>(s.batch) * s.n_heads * s.seq * sizeof(float);  // Delta
}

void flash_attention_forward(__nv_bfloat16* out, float* lse, float* smax, const __nv_bfloat16* qkv,
                             const FlashShape& s, void* workspace, cudaStream_t stream) {
  using namespace flash_detail;
  if (s.batch <= 0 || s.seq <= 0 || s.n_heads <= 0) return;
  check_shape(s, "flash_attention_forward");
  const dim3 grid(static_cast<unsigned>(query_blocks(s)), static_cast<unsigned>(s.n_heads),
                  static_cast<unsigned>(s.batch));
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(s.head_dim)));
  auto* partial = static_cast<float*>(workspace);
  with_head_dim(s.head_dim, "flash_attention_forward", [&](auto hd) {
    constexpr int HD = decltype(hd)::value;
    launch(flash_forward_kernel<HD>, grid, dim3(kThreads), smem_bytes<HD>(), stream, out, lse,
           partial, qkv, s, scale);
  });
  launch(flash_smax_kernel, dim3(static_cast<unsigned>(s.n_heads)), dim3(kWarpSize), 0, stream,
         smax, partial, s.batch, s.n_heads, query_blocks(s));
}

namespace {
template <int HD>
void backward_hd(__nv_bfloat16* dqkv, const __nv_bfloat16* dout, const __nv_bfloat16* qkv,
                 const __nv_bfloat16* out, const float* lse, const FlashShape& s, float* delta,
                 float scale, cudaStream_t stream) {
  using namespace flash_detail;
  const int rows = s.batch * s.n_heads * s.seq;
  launch(flash_delta_kernel<HD>,
         dim3(static_cast<unsigned>(std::min(ceil_div(rows, kWarps), 4096))), dim3(kThreads), 0,
         stream, delta, out, dout, s);
  const unsigned blocks = static_cast<unsigned>(query_blocks(s));
  const std::size_t smem = 4 * std::size_t(kBlockM) * kRowLd<HD> * sizeof(__nv_bfloat16);
  launch(flash_dkdv_kernel<HD>,
         dim3(blocks, static_cast<unsigned>(s.n_kv_heads), static_cast<unsigned>(s.batch)),
         dim3(kThreads), smem, stream, dqkv, qkv, dout, lse, delta, s, scale);
  launch(flash_dq_kernel<HD>,
         dim3(blocks, static_cast<unsigned>(s.n_heads), static_cast<unsigned>(s.batch)),
         dim3(kThreads), smem, stream, dqkv, qkv, dout, lse, delta, s, scale);
}
}  // namespace

void flash_attention_backward(__nv_bfloat16* dqkv, const __nv_bfloat16* dout,
                              const __nv_bfloat16* qkv, const __nv_bfloat16* out, const float* lse,
                              const FlashShape& s, void* workspace, cudaStream_t stream) {
  using namespace flash_detail;
  if (s.batch <= 0 || s.seq <= 0 || s.n_heads <= 0) return;
  check_shape(s, "flash_attention_backward");
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(s.head_dim)));
  auto* delta = static_cast<float*>(workspace);
  with_head_dim(s.head_dim, "flash_attention_backward", [&](auto hd) {
    backward_hd<decltype(hd)::value>(dqkv, dout, qkv, out, lse, s, delta, scale, stream);
  });
}

}  // namespace moetrain::kernels
