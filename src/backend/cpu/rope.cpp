// Rotary position embedding, half-split ("rotate_half") convention of HF Llama: dimension i pairs
// with i + hd/2. The backward is the inverse rotation (the transpose of the forward).
#include "backend/cpu/ops.hpp"

namespace moetrain::cpu {

namespace {
template <typename T>
void rotate(T* x, int ld, int rows, int seq, int n_heads, int head_dim, const T* cos, const T* sin,
            T sign) {
  const int half = head_dim / 2;
#pragma omp parallel for schedule(static)
  for (int r = 0; r < rows; ++r) {
    const int pos = r % seq;
    const T* c = cos + std::size_t(pos) * half;
    const T* s = sin + std::size_t(pos) * half;
    for (int h = 0; h < n_heads; ++h) {
      T* v = x + std::size_t(r) * ld + std::size_t(h) * head_dim;
      for (int i = 0; i < half; ++i) {
        const T a = v[i], b = v[i + half], sn = sign * s[i];
        v[i] = a * c[i] - b * sn;
        v[i + half] = b * c[i] + a * sn;
      }
    }
  }
}
}  // namespace

template <typename T>
void rope_forward(T* x, int ld, int rows, int seq, int n_heads, int head_dim, const T* cos,
                  const T* sin) {
  rotate(x, ld, rows, seq, n_heads, head_dim, cos, sin, T(1));
}

template <typename T>
void rope_backward(T* dx, int ld, int rows, int seq, int n_heads, int head_dim, const T* cos,
                   const T* sin) {
  rotate(dx, ld, rows, seq, n_heads, head_dim, cos, sin, T(-1));
}

MOETRAIN_CPU_INSTANTIATE(MOETRAIN_OPS_ROPE)

}  // namespace moetrain::cpu
