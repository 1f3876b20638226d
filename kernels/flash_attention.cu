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

#include <cmath>
#include <stdexcept>
#include <string>

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
      // p's accumulator fragments of key tiles 2 kk and 2 kk + 1 are an A fragment of keys 16 kk..
      const uint32_t pa[4] = {pack_bf16(sc[2 * kk][0], sc[2 * kk][1]),
                              pack_bf16(sc[2 * kk][2], sc[2 * kk][3]),
                              pack_bf16(sc[2 * kk + 1][0], sc[2 * kk + 1][1]),
                              pack_bf16(sc[2 * kk + 1][2], sc[2 * kk + 1][3])};
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

int query_blocks(const FlashShape& s) {
  return ceil_div(s.seq, kBlockM);
}

}  // namespace flash_detail

std::size_t flash_attention_workspace_bytes(const FlashShape& s) {
  return static_cast<std::size_t>(s.batch) * s.n_heads * flash_detail::query_blocks(s) *
         sizeof(float);
}

void flash_attention_forward(__nv_bfloat16* out, float* lse, float* smax, const __nv_bfloat16* qkv,
                             const FlashShape& s, void* workspace, cudaStream_t stream) {
  using namespace flash_detail;
  if (s.batch <= 0 || s.seq <= 0 || s.n_heads <= 0) return;
  if (s.n_kv_heads <= 0 || s.n_heads % s.n_kv_heads != 0)
    throw std::invalid_argument("flash_attention_forward: n_heads " + std::to_string(s.n_heads) +
                                " is not a multiple of n_kv_heads " + std::to_string(s.n_kv_heads));
  if (s.n_heads > 65535 || s.batch > 65535)
    throw std::invalid_argument("flash_attention_forward: more than 65535 heads or sequences");
  const dim3 grid(static_cast<unsigned>(query_blocks(s)), static_cast<unsigned>(s.n_heads),
                  static_cast<unsigned>(s.batch));
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(s.head_dim)));
  auto* partial = static_cast<float*>(workspace);
  switch (s.head_dim) {
    case 64:
      launch(flash_forward_kernel<64>, grid, dim3(kThreads), smem_bytes<64>(), stream, out, lse,
             partial, qkv, s, scale);
      break;
    case 128:
      launch(flash_forward_kernel<128>, grid, dim3(kThreads), smem_bytes<128>(), stream, out, lse,
             partial, qkv, s, scale);
      break;
    default:
      throw std::invalid_argument("flash_attention_forward: head_dim " +
                                  std::to_string(s.head_dim) + " (64 or 128)");
  }
  launch(flash_smax_kernel, dim3(static_cast<unsigned>(s.n_heads)), dim3(kWarpSize), 0, stream,
         smax, partial, s.batch, s.n_heads, query_blocks(s));
}

}  // namespace moetrain::kernels
