// Rotary position embedding, half-split ("rotate_half") convention of HF Llama: dimension i pairs
// with i + hd/2. The backward is the inverse rotation (the transpose of the forward).
#include "backend/cpu/ops.hpp"

namespace moetrain::cpu {

namespace {
template <typename T, typename A>
void rotate(A* x, int ld, int rows, int seq, int n_heads, int head_dim, const T* cos, const T* sin,
            T sign) {
  const int half = head_dim / 2;
#pragma omp parallel for schedule(static)
  for (int r = 0; r < rows; ++r) {
    const int pos = r % seq;
    const T* c = cos + std::size_t(pos) * half;
    const T* s = sin + std::size_t(pos) * half;
    for (int h = 0; h < n_heads; ++h) {
      A* v = x + std::size_t(r) * ld + std::size_t(h) * head_dim;
      for (int i = 0; i < half; ++i) {
        const T a = v[i], b = v[i + half], sn = sign * s[i];
        v[i] = A(a * c[i] - b * sn);
        v[i + half] = A(b * c[i] + a * sn);
      }
    }
  }
}
}  // namespace

template <typename T, typename A>
void rope_forward(A* x, int ld, int rows, int seq, int n_heads, int head_dim, const T* cos,
                  const T* sin) {
  rotate<T>(x, ld, rows, seq, n_heads, head_dim, cos, sin, T(1));
}

template <typename T, typename A>
void rope_backward(A* dx, int ld, int rows, int seq, int n_heads, int head_dim, const T* cos,
                   const T* sin) {
  rotate<T>(dx, ld, rows, seq, n_heads, head_dim, cos, sin, T(-1));
}

MOETRAIN_CPU_INSTANTIATE_ACT(MOETRAIN_OPS_ROPE)

}  // namespace moetrain::cpu
