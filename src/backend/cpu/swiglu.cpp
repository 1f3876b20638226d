// SwiGLU activation on the fused expert hidden h = [w1 x | w3 x]: out = silu(h1) * h3. The
// exp(-h1) of a row comes from vector_exp into a per-thread row; the rest are plain loops the
// compiler vectorises.
#include <vector>

#include "backend/cpu/ops.hpp"
#include "backend/cpu/vector_exp.hpp"

namespace moetrain::cpu {

namespace {
// Calls fn(r, a, b, e) for every row r of h [rows, 2*ff] in parallel, with a = h1 and b = h3 of the
// row and e[i] = exp(-a[i]) in a buffer (of the math type T) each thread owns.
template <typename T, typename A, typename Fn>
void for_rows_with_exp(const A* h, int rows, int ff, Fn fn) {
#pragma omp parallel
  {
    std::vector<T> e(static_cast<std::size_t>(ff));
#pragma omp for schedule(static)
    for (int r = 0; r < rows; ++r) {
      const A* a = h + std::size_t(r) * 2 * ff;
      for (int i = 0; i < ff; ++i) e[i] = -T(a[i]);
      exp_shifted_sum(e.data(), ff, T(0));
      fn(r, a, a + ff, e.data());
    }
  }
}
}  // namespace

template <typename T, typename A>
void swiglu_forward(A* out, const A* h, int rows, int ff) {
  for_rows_with_exp<T>(h, rows, ff, [&](int r, const A* a, const A* b, const T* e) {
    A* o = out + std::size_t(r) * ff;
    for (int i = 0; i < ff; ++i) o[i] = A(T(a[i]) / (T(1) + e[i]) * T(b[i]));
  });
}

// silu'(a) = sig(a) * (1 + a * (1 - sig(a)))
template <typename T, typename A>
void swiglu_backward(A* dh, const A* dout, const A* h, int rows, int ff) {
  for_rows_with_exp<T>(h, rows, ff, [&](int r, const A* a, const A* b, const T* e) {
    const A* g = dout + std::size_t(r) * ff;
    A* da = dh + std::size_t(r) * 2 * ff;
    A* db = da + ff;
    for (int i = 0; i < ff; ++i) {
      const T sig = T(1) / (T(1) + e[i]), ai = a[i], gi = g[i];
      db[i] = A(gi * ai * sig);
      da[i] = A(gi * T(b[i]) * sig * (T(1) + ai * (T(1) - sig)));
    }
  });
}

MOETRAIN_CPU_INSTANTIATE_ACT(MOETRAIN_OPS_SWIGLU)

}  // namespace moetrain::cpu
