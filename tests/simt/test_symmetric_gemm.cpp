// tests/simt/test_symmetric_gemm.cpp — kernels/symmetric_gemm.cu (the batched Gram GEMM of
// Newton–Schulz on mma.sync: upper tiles only, each value stored twice) in the SIMT simulator
// against a double-precision reference on the same bf16-rounded inputs, within fp32-accumulation
// error of the sum of |terms| (plus the bf16 rounding of a bf16 output): n of one element, under,
// at and over a tile and several tiles, k of one element and not a multiple of 32, X X^T and
// X^T X, a batch of 3 with strides past the matrices and row strides past the widths, beta and
// shift nonzero, in place (C = D), beta = 0 with C all NaN and with C null, fp32 and bf16 inputs
// and outputs. C's lower triangle and X's padding hold NaN (never read); D's padding columns and
// the gaps between matrices hold a sentinel (never written); D is bitwise symmetric. Every case
// runs under every schedule (the simulator takes well under a second for all of them).
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "kernel_test_util.hpp"
#include "symmetric_gemm.cuh"

namespace {

using namespace kernel_test;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kSentinel = 3.25f;  // exact in bf16

// Where C comes from: its own matrices, D's (in place), or none (beta = 0 only).
enum class CSource { kSeparate, kInPlace, kNull };

struct Case {
  bool trans;
  int n, k, batch;
  float alpha, beta, shift;
  CSource c_source;
};

template <typename T>
uint32_t storage_bits(T v) {
  if constexpr (std::is_same_v<T, float>) {
    return bits_of(v);
  } else {
    return mk::bf16_bits(v);
  }
}

template <typename T>
const char* type_name() {
  return std::is_same_v<T, float> ? "fp32" : "bf16";
}

template <typename TX, typename TD>
void run_case(const Case& c, const std::vector<Schedule>& scheds, unsigned seed) {
  const int n = c.n, k = c.k, batch = c.batch;
  const int x_rows = c.trans ? k : n, x_width = c.trans ? n : k;
  const int ldx = x_width + 3, ldd = n + 2;
  const size_t stride_x = size_t(x_rows) * ldx + 5, stride_d = size_t(n) * ldd + 4;
  const bool in_place = c.c_source == CSource::kInPlace;
  const int ldc = in_place ? ldd : n + 1;
  const size_t stride_c = in_place ? stride_d : size_t(n) * ldc + 3;
  REQUIRE((c.c_source != CSource::kNull || c.beta == 0.0f));
  std::mt19937 rng(seed);

  // X: random fp32 values (rounded to bf16 by the kernel when TX is float), NaN in the padding.
  std::vector<float> Xf = random_floats(stride_x * batch, rng);
  for (size_t i = 0; i < Xf.size(); ++i) {
    const size_t off = i % stride_x;
    if (off >= size_t(x_rows) * ldx || int(off % ldx) >= x_width) Xf[i] = kNaN;
  }
  if constexpr (!std::is_same_v<TX, float>) Xf = representable<TX>(Xf);
  const std::vector<float> Xr = representable<bf16>(Xf);  // what the tensor cores multiply
  auto x_at = [&](int b, int r, int kk) {                 // op(X_b)[r, kk]
    const size_t base = size_t(b) * stride_x;
    return double(c.trans ? Xr[base + size_t(kk) * ldx + r] : Xr[base + size_t(r) * ldx + kk]);
  };

  // C: its upper triangle random; its lower triangle NaN; with beta = 0 all NaN. In place, C is
  // D's initial contents; D's padding holds the sentinel.
  std::vector<float> Cf(stride_c * batch, kNaN);
  if (c.beta != 0.0f)
    for (int b = 0; b < batch; ++b)
      for (int r = 0; r < n; ++r)
        for (int col = r; col < n; ++col)
          Cf[size_t(b) * stride_c + size_t(r) * ldc + col] = std::normal_distribution<float>()(rng);
  Cf = representable<TD>(Cf);
  auto in_matrix = [&](size_t i) {  // element i of D's buffer is inside a matrix
    const size_t off = i % stride_d;
    return off < size_t(n) * ldd && int(off % ldd) < n;
  };
  std::vector<float> D0(stride_d * batch, kSentinel);
  if (in_place) {
    for (size_t i = 0; i < D0.size(); ++i)
      if (in_matrix(i)) D0[i] = Cf[i];
  } else {
    for (size_t i = 0; i < D0.size(); ++i)
      if (in_matrix(i)) D0[i] = kNaN;  // never read
  }
  const std::vector<TD> D0s = to_storage<TD>(D0);

  // Reference in double and the bound of its terms: |alpha| sum |x_rk x_ck| + |beta C| + |shift|.
  std::vector<double> ref(size_t(batch) * n * n), bound(ref.size());
  for (int b = 0; b < batch; ++b)
    for (int r = 0; r < n; ++r)
      for (int col = r; col < n; ++col) {
        double s = 0, s_abs = 0;
        for (int kk = 0; kk < k; ++kk) {
          const double p = x_at(b, r, kk) * x_at(b, col, kk);
          s += p;
          s_abs += std::fabs(p);
        }
        double v = double(c.alpha) * s, v_abs = std::fabs(double(c.alpha)) * s_abs;
        if (c.beta != 0.0f) {
          const double cv = Cf[size_t(b) * stride_c + size_t(r) * ldc + col];
          v += double(c.beta) * cv;
          v_abs += std::fabs(double(c.beta) * cv);
        }
        if (r == col) {
          v += c.shift;
          v_abs += std::fabs(double(c.shift));
        }
        const size_t i = (size_t(b) * n + r) * n + col;
        ref[i] = v;
        bound[i] = v_abs;
      }

  DeviceBuffer<TX> d_X(to_storage<TX>(Xf));
  DeviceBuffer<TD> d_C(c.c_source == CSource::kSeparate ? to_storage<TD>(Cf) : std::vector<TD>{});
  DeviceBuffer<TD> d_D(D0s);
  const TD* C_ptr = c.c_source == CSource::kSeparate ? d_C.ptr : in_place ? d_D.ptr : nullptr;
  const double rel = 1e-5, rel_out = std::is_same_v<TD, float> ? 0.0 : 1.0 / 256;
  for (const Schedule& s : scheds) {
    ScopedSchedule scope(s);
    INFO("n " << n << " k " << k << " trans " << c.trans << " batch " << batch << " alpha "
              << c.alpha << " beta " << c.beta << " shift " << c.shift << " C "
              << (in_place                       ? "in place"
                  : c.c_source == CSource::kNull ? "null"
                                                 : "separate")
              << " X " << type_name<TX>() << " D " << type_name<TD>() << " schedule " << s.name());
    d_D.upload(D0s);
    mk::symmetric_gemm_batched<TX, TD>(c.trans, n, k, c.alpha, d_X.ptr, ldx, stride_x, c.beta,
                                       C_ptr, ldc, stride_c, c.shift, d_D.ptr, ldd, stride_d, batch,
                                       nullptr);
    const std::vector<TD> Ds = d_D.download();
    const std::vector<float> D = to_float(Ds);
    int bad_padding = 0, asymmetric = 0, nans = 0, out_of_tolerance = 0;
    double worst = 0;  // the largest error in units of its tolerance
    for (size_t i = 0; i < Ds.size(); ++i)
      if (!in_matrix(i) && storage_bits(Ds[i]) != storage_bits(D0s[i])) ++bad_padding;
    for (int b = 0; b < batch; ++b)
      for (int r = 0; r < n; ++r)
        for (int col = 0; col < n; ++col) {
          const size_t base = size_t(b) * stride_d, at = base + size_t(r) * ldd + col;
          if (std::isnan(D[at])) ++nans;
          if (storage_bits(Ds[at]) != storage_bits(Ds[base + size_t(col) * ldd + r])) ++asymmetric;
          if (col < r) continue;
          const size_t i = (size_t(b) * n + r) * n + col;
          const double err = std::fabs(double(D[at]) - ref[i]);
          // fp32 sums within rel of the terms, then (bf16 D) rounded to within 2^-8 of the sum.
          const double sum_tol = rel * bound[i];
          const double tol = sum_tol + rel_out * (std::fabs(ref[i]) + sum_tol) + 1e-30;
          if (!(err <= tol)) ++out_of_tolerance;
          if (err / tol > worst) worst = err / tol;
        }
    INFO("worst error / tolerance " << worst);
    CHECK(bad_padding == 0);
    CHECK(nans == 0);
    CHECK(asymmetric == 0);
    CHECK(out_of_tolerance == 0);
  }
}

}  // namespace

TEST_CASE("symmetric GEMM matches a double reference: chosen cases", "[simt][kernels][symmetric]") {
  const std::vector<Schedule> all = test_schedules();
  // Several tiles with partial ones, a k tail, beta and shift, in place and separate C.
  run_case<float, float>({false, 65, 31, 3, 0.75f, -0.5f, 2.0f, CSource::kSeparate}, all, 1);
  run_case<bf16, bf16>({true, 130, 100, 1, 1.0f, 0.5f, -1.5f, CSource::kInPlace}, all, 2);
  run_case<float, bf16>({true, 17, 16, 3, -2.0f, 0.0f, 1.0f, CSource::kSeparate}, all, 3);
  run_case<bf16, float>({false, 64, 100, 2, 0.5f, 0.0f, 0.0f, CSource::kNull}, all, 4);
  // 5 x 5 tiles, 15 above the diagonal: the block-to-tile map past the first columns.
  run_case<float, float>({true, 257, 65, 2, 1.0f, 1.0f, 0.5f, CSource::kInPlace}, all, 5);
}

TEST_CASE("symmetric GEMM matches a double reference over sizes, layouts and types",
          "[simt][kernels][symmetric]") {
  const std::vector<Schedule> all = test_schedules();
  const CSource sources[] = {CSource::kSeparate, CSource::kInPlace, CSource::kNull};
  unsigned i = 0;
  for (const int n : {1, 17, 64, 65, 130})
    for (const int k : {1, 16, 31, 100})
      for (const bool trans : {false, true}) {
        // Cycle C's source and the four type pairs so that each meets both layouts.
        const CSource src = sources[i % 3];
        const float beta = src == CSource::kNull ? 0.0f : 1.25f;
        const Case c{trans, n, k, 2, 0.875f, beta, 0.25f, src};
        switch ((i + i / 2) % 4) {
          case 0:
            run_case<float, float>(c, all, 100 + i);
            break;
          case 1:
            run_case<bf16, bf16>(c, all, 100 + i);
            break;
          case 2:
            run_case<float, bf16>(c, all, 100 + i);
            break;
          default:
            run_case<bf16, float>(c, all, 100 + i);
            break;
        }
        ++i;
      }
}

TEST_CASE(
    "symmetric GEMM refuses an empty sum and what the grid cannot hold, and does nothing when "
    "empty",
    "[simt][kernels][symmetric]") {
  float* none = nullptr;
  auto call = [&](int n, int k, float beta, int batch) {
    mk::symmetric_gemm_batched<float, float>(false, n, k, 1.0f, none, 1, 0, beta, none, 1, 0, 0.0f,
                                             none, 1, 0, batch, nullptr);
  };
  CHECK_THROWS_AS(call(4, 0, 0.0f, 1), std::invalid_argument);
  CHECK_THROWS_WITH(call(4, 0, 0.0f, 1), Catch::Contains("k = 0"));
  CHECK_THROWS_WITH(call(4, -1, 0.0f, 1), Catch::Contains("k = -1"));
  CHECK_THROWS_WITH(call(4, 8, 1.0f, 1), Catch::Contains("without C"));
  CHECK_THROWS_WITH(call(2147483647, 8, 0.0f, 1), Catch::Contains("n = 2147483647"));
  CHECK_THROWS_WITH(call(4, 8, 0.0f, 65536), Catch::Contains("batch = 65536"));
  CHECK_NOTHROW(call(0, 8, 0.0f, 1));  // nothing to do: no launch, no check of k
  CHECK_NOTHROW(call(4, 0, 0.0f, 0));
  CHECK_NOTHROW(call(-3, 8, 0.0f, 1));
}
