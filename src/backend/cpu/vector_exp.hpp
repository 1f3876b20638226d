// exp over a row, vectorised with the widest SIMD level the CPU runs (simd_level.hpp): the
// softmax inner loop of attention and cross-entropy, where std::exp one element at a time costs
// more than the GEMMs around it.
#pragma once

#include "backend/cpu/simd_level.hpp"

namespace moetrain::cpu {

// x[i] = exp(x[i] - shift) for i < n; returns the sum of the results. Every level computes each
// element with the same operations (Cephes' degree-6 polynomial on [-ln2/2, ln2/2] through fused
// multiply-adds), so the elements are the same bits under every level; only the order of the sum
// differs. Error <= 2 ulp against exp; exactly 0 where x - shift < -87.34 (exp below the normal
// range, -inf included); NaN stays NaN; arguments above 88.37 saturate at exp(88.37).
float exp_shifted_sum(float* x, int n, float shift, SimdLevel level);
inline float exp_shifted_sum(float* x, int n, float shift) {
  return exp_shifted_sum(x, n, shift, simd_supported());
}
// float64 (the finite-difference checks' precision): std::exp.
double exp_shifted_sum(double* x, int n, double shift);

}  // namespace moetrain::cpu
