// The three implementations of exp_shifted_sum. The vector ones are compiled for their
// instruction set by target attributes, not by the build's flags, and only called after
// simd_supported() said the CPU runs them.
#include "backend/cpu/vector_exp.hpp"

#include <immintrin.h>

#include <bit>
#include <cmath>
#include <cstdint>

namespace moetrain::cpu {

namespace {

constexpr float kLo = -87.3365478515625f;  // ~ln(2^-126): below it the result is 0
constexpr float kHi = 88.3762626647949f;   // ~ln(2^127.5): keeps 2^n a normal float
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;  // ln 2 = kLn2Hi + kLn2Lo, kLn2Hi exact in few bits
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kP0 = 1.9875691500e-4f, kP1 = 1.3981999507e-3f, kP2 = 8.3334519073e-3f,
                kP3 = 4.1665795894e-2f, kP4 = 1.6666665459e-1f, kP5 = 5.0000001201e-1f;

// The reference element: every vector lane below does exactly these operations.
float exp_one(float x) {
  if (std::isnan(x)) return x;
  if (x < kLo) return 0.0f;
  const float xc = x > kHi ? kHi : x;
  const float n = std::nearbyint(xc * kLog2e);  // round to nearest even, as the vector paths
  float r = std::fma(-n, kLn2Hi, xc);
  r = std::fma(-n, kLn2Lo, r);
  float p = std::fma(kP0, r, kP1);
  p = std::fma(p, r, kP2);
  p = std::fma(p, r, kP3);
  p = std::fma(p, r, kP4);
  p = std::fma(p, r, kP5);
  const float r2 = r * r;
  const float y = std::fma(p, r2, r) + 1.0f;
  const float two_n = std::bit_cast<float>(std::int32_t((std::int32_t(n) + 127) << 23));
  return y * two_n;
}

float exp_scalar(float* x, int from, int n, float shift) {
  float sum = 0;
  for (int i = from; i < n; ++i) {
    x[i] = exp_one(x[i] - shift);
    sum += x[i];
  }
  return sum;
}

#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) float exp_avx2(float* x, int n, float shift) {
  const __m256 lo = _mm256_set1_ps(kLo), hi = _mm256_set1_ps(kHi), log2e = _mm256_set1_ps(kLog2e),
               ln2hi = _mm256_set1_ps(kLn2Hi), ln2lo = _mm256_set1_ps(kLn2Lo),
               one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps(), s = _mm256_set1_ps(shift);
  __m256 acc = _mm256_setzero_ps();
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_sub_ps(_mm256_loadu_ps(x + i), s);
    const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    const __m256 under = _mm256_cmp_ps(v, lo, _CMP_LT_OQ);
    const __m256 xc = _mm256_min_ps(v, hi);
    const __m256 k =
        _mm256_round_ps(_mm256_mul_ps(xc, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(k, ln2hi, xc);
    r = _mm256_fnmadd_ps(k, ln2lo, r);
    __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(kP0), r, _mm256_set1_ps(kP1));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP5));
    const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), one);
    const __m256i e =
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
    __m256 res = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
    res = _mm256_blendv_ps(res, zero, under);
    res = _mm256_blendv_ps(res, v, nan);
    _mm256_storeu_ps(x + i, res);
    acc = _mm256_add_ps(acc, res);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  float sum = 0;
  for (float l : lanes) sum += l;
  return sum + exp_scalar(x, i, n, shift);
}

// GCC 12's AVX-512 headers initialise their "undefined" vectors from themselves, which
// -Wmaybe-uninitialized reports once the intrinsics are inlined here.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
__attribute__((target("avx512f"))) float exp_avx512(float* x, int n, float shift) {
  const __m512 lo = _mm512_set1_ps(kLo), hi = _mm512_set1_ps(kHi), log2e = _mm512_set1_ps(kLog2e),
               ln2hi = _mm512_set1_ps(kLn2Hi), ln2lo = _mm512_set1_ps(kLn2Lo),
               one = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps(), s = _mm512_set1_ps(shift);
  __m512 acc = _mm512_setzero_ps();
  int i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_sub_ps(_mm512_loadu_ps(x + i), s);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    const __mmask16 under = _mm512_cmp_ps_mask(v, lo, _CMP_LT_OQ);
    const __m512 xc = _mm512_min_ps(v, hi);
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(xc, log2e),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(k, ln2hi, xc);
    r = _mm512_fnmadd_ps(k, ln2lo, r);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(kP0), r, _mm512_set1_ps(kP1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP5));
    const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), one);
    const __m512i e =
        _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(k), _mm512_set1_epi32(127)), 23);
    __m512 res = _mm512_mul_ps(y, _mm512_castsi512_ps(e));
    res = _mm512_mask_blend_ps(under, res, zero);
    res = _mm512_mask_blend_ps(nan, res, v);
    _mm512_storeu_ps(x + i, res);
    acc = _mm512_add_ps(acc, res);
  }
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, acc);
  float sum = 0;
  for (float l : lanes) sum += l;
  return sum + exp_scalar(x, i, n, shift);
}
#pragma GCC diagnostic pop
#endif

}  // namespace

float exp_shifted_sum(float* x, int n, float shift, SimdLevel level) {
  require_simd(level);
  switch (level) {
#if defined(__x86_64__)
    case SimdLevel::Avx512:
      return exp_avx512(x, n, shift);
    case SimdLevel::Avx2:
      return exp_avx2(x, n, shift);
#endif
    default:
      return exp_scalar(x, 0, n, shift);
  }
}

double exp_shifted_sum(double* x, int n, double shift) {
  double sum = 0;
  for (int i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - shift);
    sum += x[i];
  }
  return sum;
}

}  // namespace moetrain::cpu
