// kernels/elementwise.cuh — elementwise ops and precision conversions
// (elementwise.cu). CPU references: src/backend/cpu/elementwise.cpp (add_inplace) and
// optimizer_ops.cpp (scale, axpby).
//
// Host-side launchers in namespace moetrain::kernels, all pointers device pointers; T is float or
// __nv_bfloat16 (math in fp32, bf16 results rounded to nearest even). Empty sizes launch nothing.
//
//   add_inplace          x += y.
//   scale                x *= s.
//   axpby                y = a x + b y.
//   scale_matrix         x[r, c] *= s over a strided row-major [rows, cols] matrix (row r at
//                        x + r * ld); s = 0 writes zeros without reading x (GEMM beta = 0
//                        semantics); the padding columns are untouched.
//   convert_to_bf16      out[r, c] = bf16(in[r, c]) for a strided row-major [rows, cols] matrix,
//                        round to nearest even (float_to_bf16); out's padding columns are
//                        untouched.
//   convert_to_bf16_stochastic
//                        out[i] = float_to_bf16_stochastic(in[i], random_u32(seed, i)): unbiased,
//                        and the same for a seed whatever the launch configuration.
//   convert_from_bf16    out[i] = float(in[i]) (exact).
#pragma once

#include <cstddef>
#include <cstdint>

#include "common.cuh"

namespace moetrain::kernels {

template <typename T>
void add_inplace(T* x, const T* y, std::size_t n, cudaStream_t stream);

template <typename T>
void scale(T* x, std::size_t n, float s, cudaStream_t stream);

template <typename T>
void scale_matrix(T* x, int ld, int rows, int cols, float s, cudaStream_t stream);

template <typename T>
void axpby(T* y, const T* x, std::size_t n, float a, float b, cudaStream_t stream);

void convert_to_bf16(__nv_bfloat16* out, int ld_out, const float* in, int ld_in, int rows, int cols,
                     cudaStream_t stream);

void convert_to_bf16_stochastic(__nv_bfloat16* out, const float* in, std::size_t n,
                                std::uint64_t seed, cudaStream_t stream);

void convert_from_bf16(float* out, const __nv_bfloat16* in, std::size_t n, cudaStream_t stream);

}  // namespace moetrain::kernels
