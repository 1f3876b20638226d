#include "backend/cpu/onednn_matmul.hpp"

#include <cstring>
#include <mutex>
#include <oneapi/dnnl/dnnl.hpp>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "backend/cpu/grouped_gemm.hpp"

namespace moetrain::cpu {

namespace {
using dnnl::memory;
using dt = memory::data_type;

// A product's layout and scalars, all but M and K: they are run-time dimensions of the primitive
// (the experts' products change M every step, their weight gradients K), so each distinct (N,
// layout, alpha, beta) gets its primitive once and keeps it. In bf16 an operand is either read in
// place from the weights' bf16 copy (the caller's layout) or packed densely from fp32 data in its
// stored orientation: `a_packed`, `b_packed`.
struct Key {
  int N, lda, ldb, ldc;
  bool ta, tb, a_packed, b_packed;
  float alpha, beta;
  bool operator==(const Key&) const = default;
};
struct KeyHash {
  std::size_t operator()(const Key& k) const {
    std::size_t h = 0;
    auto mix = [&h](std::size_t v) { h ^= v + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2); };
    for (int v : {k.N, k.lda, k.ldb, k.ldc}) mix(std::hash<int>()(v));
    mix(std::size_t(k.ta) | std::size_t(k.tb) << 1 | std::size_t(k.a_packed) << 2 |
        std::size_t(k.b_packed) << 3);
    mix(std::hash<float>()(k.alpha));
    mix(std::hash<float>()(k.beta));
    return h;
  }
};

// Strides of the logical [rows, cols] view of op(X) stored row-major with leading dimension ld.
memory::dims strides_of(bool trans, int ld) {
  return trans ? memory::dims{1, ld} : memory::dims{ld, 1};
}

// Round to nearest even (NaN stays NaN), as the GPU's bf16 conversion does. Branch-free, so the
// loops over it vectorise.
std::uint16_t to_bf16(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const std::uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const std::uint32_t quiet_nan = (u >> 16) | 0x40u;
  return std::uint16_t((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

// op(X)[rows, cols], stored [rows, cols] (or [cols, rows] when trans) with leading dimension ld,
// into a dense bf16 copy in the same orientation: contiguous reads and writes.
void pack_bf16(std::uint16_t* out, const float* x, bool trans, int rows, int cols, int ld) {
  const int srows = trans ? cols : rows, scols = trans ? rows : cols;
#pragma omp parallel for schedule(static) if (std::size_t(srows) * scols >= (1u << 16))
  for (int r = 0; r < srows; ++r) {
    std::uint16_t* o = out + std::size_t(r) * scols;
    const float* xr = x + std::size_t(r) * ld;
    for (int c = 0; c < scols; ++c) o[c] = to_bf16(xr[c]);
  }
}

// The strides of op(X)[rows, cols] packed by pack_bf16.
memory::dims packed_strides(bool trans, memory::dim rows, memory::dim cols) {
  return trans ? memory::dims{1, rows} : memory::dims{cols, 1};
}
}  // namespace

struct OnednnMatmul::Impl {
  dnnl::engine engine{dnnl::engine::kind::cpu, 0};
  dnnl::stream stream{engine};
  std::unordered_map<Key, dnnl::matmul, KeyHash> cache;
  std::vector<std::uint16_t> a_bf16, b_bf16;  // operands rounded and packed (bf16 mode)
  // bf16: the weights' copy, rewritten whole before a product reads it after a write.
  const float* weights = nullptr;
  std::size_t weight_count = 0;
  std::vector<std::uint16_t> weight_copy;
  bool weight_copy_stale = true;
  std::mutex mutex;

  // The operands' descriptors for M rows and K columns (DNNL_RUNTIME_DIM_VAL in the primitive):
  // fp32 in the caller's layout; bf16 in the caller's layout (the weights' copy) or packed.
  static memory::desc a_desc(const Key& k, memory::dim M, memory::dim K, bool bf16) {
    if (!bf16) return memory::desc({M, K}, dt::f32, strides_of(k.ta, k.lda));
    return memory::desc({M, K}, dt::bf16,
                        k.a_packed ? packed_strides(k.ta, M, K) : strides_of(k.ta, k.lda));
  }
  static memory::desc b_desc(const Key& k, memory::dim K, bool bf16) {
    if (!bf16) return memory::desc({K, k.N}, dt::f32, strides_of(k.tb, k.ldb));
    return memory::desc({K, k.N}, dt::bf16,
                        k.b_packed ? packed_strides(k.tb, K, k.N) : strides_of(k.tb, k.ldb));
  }
  static memory::desc c_desc(const Key& k, memory::dim M) {
    return memory::desc({M, k.N}, dt::f32, memory::dims{k.ldc, 1});
  }

  bool in_weights(const float* x) const {
    return weights && x >= weights && x < weights + weight_count;
  }
  const std::uint16_t* copy_of(const float* x) {
    if (weight_copy_stale) {
      weight_copy.resize(weight_count);
      const std::size_t n = weight_count;
#pragma omp parallel for schedule(static)
      for (std::size_t i = 0; i < n; ++i) weight_copy[i] = to_bf16(weights[i]);
      weight_copy_stale = false;
    }
    return weight_copy.data() + (x - weights);
  }

  dnnl::matmul& matmul(const Key& k, bool bf16) {
    auto it = cache.find(k);
    if (it != cache.end()) return it->second;
    dnnl::primitive_attr attr;
    if (k.alpha != 1.0f) attr.set_output_scales(0, {k.alpha});
    if (k.beta != 0.0f) {
      dnnl::post_ops ops;
      ops.append_sum(k.beta);
      attr.set_post_ops(ops);
    }
    const memory::dim rt = DNNL_RUNTIME_DIM_VAL;
    const dnnl::matmul::desc d(a_desc(k, rt, rt, bf16), b_desc(k, rt, bf16), c_desc(k, rt));
    return cache.emplace(k, dnnl::matmul(dnnl::matmul::primitive_desc(d, attr, engine)))
        .first->second;
  }
};

OnednnMatmul::OnednnMatmul(bool bf16) : bf16_(bf16), impl_(std::make_unique<Impl>()) {}
OnednnMatmul::~OnednnMatmul() = default;

void OnednnMatmul::set_weights(const float* weights, std::size_t count) {
  std::lock_guard lock(impl_->mutex);
  impl_->weights = weights;
  impl_->weight_count = count;
  impl_->weight_copy_stale = true;
}

void OnednnMatmul::wrote(const void* dst, std::size_t bytes) {
  std::lock_guard lock(impl_->mutex);
  const Impl& im = *impl_;
  if (!im.weights || !bytes) return;
  const auto* lo = static_cast<const char*>(dst);
  const auto* w = reinterpret_cast<const char*>(im.weights);
  if (lo < w + im.weight_count * sizeof(float) && w < lo + bytes) impl_->weight_copy_stale = true;
}

void OnednnMatmul::gemm(bool ta, bool tb, int M, int N, int K, float alpha, const float* A, int lda,
                        const float* B, int ldb, float beta, float* C, int ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {  // an empty sum: C = beta * C
    for (int i = 0; i < M; ++i) {
      float* c = C + std::size_t(i) * ldc;
      for (int j = 0; j < N; ++j) c[j] = beta == 0.0f ? 0.0f : beta * c[j];
    }
    return;
  }
  std::lock_guard lock(impl_->mutex);
  Impl& im = *impl_;
  const bool a_copy = bf16_ && im.in_weights(A), b_copy = bf16_ && im.in_weights(B);
  const Key key{N, lda, ldb, ldc, ta, tb, bf16_ && !a_copy, bf16_ && !b_copy, alpha, beta};
  try {
    auto& mm = im.matmul(key, bf16_);
    const void* a = A;
    const void* b = B;
    if (bf16_) {
      if (a_copy) {
        a = im.copy_of(A);
      } else {
        im.a_bf16.resize(std::size_t(M) * K);
        pack_bf16(im.a_bf16.data(), A, ta, M, K, lda);
        a = im.a_bf16.data();
      }
      if (b_copy) {
        b = im.copy_of(B);
      } else {
        im.b_bf16.resize(std::size_t(K) * N);
        pack_bf16(im.b_bf16.data(), B, tb, K, N, ldb);
        b = im.b_bf16.data();
      }
    }
    auto& eng = impl_->engine;
    const memory am(Impl::a_desc(key, M, K, bf16_), eng, const_cast<void*>(a));
    const memory bm(Impl::b_desc(key, K, bf16_), eng, const_cast<void*>(b));
    const memory cm(Impl::c_desc(key, M), eng, C);
    mm.execute(impl_->stream, {{DNNL_ARG_SRC, am}, {DNNL_ARG_WEIGHTS, bm}, {DNNL_ARG_DST, cm}});
    impl_->stream.wait();
  } catch (const dnnl::error& err) {
    throw std::runtime_error("oneDNN matmul " + std::to_string(M) + "x" + std::to_string(N) + "x" +
                             std::to_string(K) + (bf16_ ? " (bf16)" : " (fp32)") +
                             " failed: " + err.what());
  }
}

void OnednnMatmul::grouped_gemm(bool trans_b, int rows, int N, int K, float alpha, const float* A,
                                int lda, const float* B, int ldb, std::size_t stride_b, float beta,
                                float* C, int ldc, const std::int32_t* offsets, int groups) {
  grouped_gemm_with<float>([this](auto... args) { gemm(args...); }, trans_b, rows, N, K, alpha, A,
                           lda, B, ldb, stride_b, beta, C, ldc, offsets, groups);
}

void OnednnMatmul::grouped_gemm_wgrad(int rows, int M, int N, float alpha, const float* A, int lda,
                                      const float* B, int ldb, float* C, int ldc,
                                      std::size_t stride_c, const std::int32_t* offsets,
                                      int groups) {
  grouped_gemm_wgrad_with<float>([this](auto... args) { gemm(args...); }, rows, M, N, alpha, A, lda,
                                 B, ldb, C, ldc, stride_c, offsets, groups);
}

}  // namespace moetrain::cpu
