// kernels/linalg.cu — layout changes for the solvers and SOAP's basis ordering (contract:
// linalg.cuh). The ordering is a rank per column (how many columns come before it), so it is
// parallel, deterministic and stable without a sort.
#include "linalg.cuh"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

namespace moetrain::kernels {

namespace {

constexpr int kThreads = 256;
constexpr int kTile = 32;

// Grid (tiles, tiles, batch), block (32, 8): a tile of out written row by row from a tile of in
// staged in shared memory, so both sides are coalesced.
__global__ void __launch_bounds__(kTile * 8)
    transpose_square_kernel(float* __restrict__ out, const float* __restrict__ in, int n,
                            bool reverse_columns) {
  __shared__ float tile[kTile][kTile + 1];
  const std::size_t nn = static_cast<std::size_t>(n) * n;
  const float* src = in + blockIdx.z * nn;
  float* dst = out + blockIdx.z * nn;
  const int r0 = static_cast<int>(blockIdx.y) * kTile, c0 = static_cast<int>(blockIdx.x) * kTile;
  // in[src(c), r] for the tile's columns c (rows of in) and rows r (columns of in).
  for (int i = static_cast<int>(threadIdx.y); i < kTile; i += 8) {
    const int c = c0 + i, r = r0 + static_cast<int>(threadIdx.x);
    if (c < n && r < n) {
      const int sc = reverse_columns ? n - 1 - c : c;
      tile[i][threadIdx.x] = src[static_cast<std::size_t>(sc) * n + r];
    }
  }
  __syncthreads();
  for (int i = static_cast<int>(threadIdx.y); i < kTile; i += 8) {
    const int r = r0 + i, c = c0 + static_cast<int>(threadIdx.x);
    if (r < n && c < n) dst[static_cast<std::size_t>(r) * n + c] = tile[threadIdx.x][i];
  }
}

// Grid (ceil(n / 256), batch): e_j over rows, coalesced along j; NaN becomes -inf (last).
__global__ void __launch_bounds__(kThreads)
    rayleigh_diagonal_kernel(double* __restrict__ e, const float* __restrict__ Q,
                             const float* __restrict__ PQ, int n) {
  const int j = static_cast<int>(blockIdx.x) * kThreads + static_cast<int>(threadIdx.x);
  if (j >= n) return;
  const std::size_t nn = static_cast<std::size_t>(n) * n, base = blockIdx.y * nn;
  double s = 0.0;
  for (int r = 0; r < n; ++r) {
    const std::size_t i = base + static_cast<std::size_t>(r) * n + j;
    s += static_cast<double>(Q[i]) * PQ[i];
  }
  e[blockIdx.y * static_cast<std::size_t>(n) + j] = isnan(s) ? -HUGE_VAL : s;
}

// Grid (ceil(n / 256), batch): column j goes to position rank_j = #{k : e_k > e_j, or e_k == e_j
// and k < j}; order[rank_j] = j.
__global__ void __launch_bounds__(kThreads)
    rank_kernel(std::int32_t* __restrict__ order, const double* __restrict__ e, int n) {
  const int j = static_cast<int>(blockIdx.x) * kThreads + static_cast<int>(threadIdx.x);
  if (j >= n) return;
  const double* eb = e + blockIdx.y * static_cast<std::size_t>(n);
  const double ej = eb[j];
  int rank = 0;
  for (int k = 0; k < n; ++k) rank += (eb[k] > ej) || (eb[k] == ej && k < j);
  order[blockIdx.y * static_cast<std::size_t>(n) + rank] = j;
}

// Grid-stride over batch * n * n (sorted) and batch * v_rows * v_cols (v_out).
__global__ void __launch_bounds__(kThreads)
    permute_kernel(float* __restrict__ sorted, float* __restrict__ v_out,
                   const float* __restrict__ PQ, const float* __restrict__ v,
                   const std::int32_t* __restrict__ order, int n, int batch, int v_rows, int v_cols,
                   bool v_rows_axis) {
  const std::size_t N = static_cast<std::size_t>(n), nn = N * N;
  const std::size_t VC = static_cast<std::size_t>(v_cols);
  const std::size_t ve = static_cast<std::size_t>(v_rows) * VC;
  const std::size_t total_s = nn * batch, total_v = ve * batch;
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  for (std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       i < total_s + total_v; i += stride) {
    if (i < total_s) {
      const std::size_t b = i / nn, rc = i % nn, r = rc / N, c = rc % N;
      sorted[i] = PQ[b * nn + r * N + static_cast<std::size_t>(order[b * N + c])];
    } else {
      const std::size_t k = i - total_s, b = k / ve, rc = k % ve, r = rc / VC, c = rc % VC;
      const std::int32_t* o = order + b * N;
      v_out[k] = v_rows_axis ? v[b * ve + static_cast<std::size_t>(o[r]) * VC + c]
                             : v[b * ve + r * VC + static_cast<std::size_t>(o[c])];
    }
  }
}

}  // namespace

void transpose_square(float* out, const float* in, int n, int batch, bool reverse_columns,
                      cudaStream_t stream) {
  if (n <= 0 || batch <= 0) return;
  if (batch > 65535)
    throw std::invalid_argument("transpose_square: batch " + std::to_string(batch) + " > 65535");
  const int tiles = ceil_div(n, kTile);
  launch(transpose_square_kernel, dim3(tiles, tiles, batch), dim3(kTile, 8), 0, stream, out, in, n,
         reverse_columns);
}

std::size_t sort_eigenbasis_workspace_bytes(int n, int batch) {
  const std::size_t elems = static_cast<std::size_t>(std::max(n, 0)) * std::max(batch, 0);
  return elems * (sizeof(double) + sizeof(std::int32_t));
}

void sort_eigenbasis(float* sorted, float* v_out, const float* Q, const float* PQ, const float* v,
                     int n, int batch, int v_rows, int v_cols, bool v_rows_axis, void* workspace,
                     cudaStream_t stream) {
  if (n <= 0 || batch <= 0) return;
  if ((v_rows_axis ? v_rows : v_cols) != n)
    throw std::invalid_argument("sort_eigenbasis: v's permuted side is not n = " +
                                std::to_string(n));
  if (batch > 65535)
    throw std::invalid_argument("sort_eigenbasis: batch " + std::to_string(batch) + " > 65535");
  auto* e = static_cast<double*>(workspace);
  auto* order = reinterpret_cast<std::int32_t*>(e + static_cast<std::size_t>(n) * batch);
  const dim3 grid(ceil_div(n, kThreads), batch);
  launch(rayleigh_diagonal_kernel, grid, dim3(kThreads), 0, stream, e, Q, PQ, n);
  launch(rank_kernel, grid, dim3(kThreads), 0, stream, order, static_cast<const double*>(e), n);
  const std::size_t total = (static_cast<std::size_t>(n) * n +
                             static_cast<std::size_t>(v_rows) * static_cast<std::size_t>(v_cols)) *
                            batch;
  const int blocks = static_cast<int>(
      std::clamp<std::size_t>(ceil_div<std::size_t>(total, kThreads * 4), 1, 4096));
  launch(permute_kernel, dim3(blocks), dim3(kThreads), 0, stream, sorted, v_out, PQ, v,
         static_cast<const std::int32_t*>(order), n, batch, v_rows, v_cols, v_rows_axis);
}

}  // namespace moetrain::kernels
