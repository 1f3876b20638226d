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

// A product's layout and scalars, all but M: the rows are a run-time dimension of the primitive
// (the experts' products change M every step), so each distinct (N, K, layout, alpha, beta) gets
// its primitive once and keeps it.
struct Key {
  int N, K, lda, ldb, ldc;
  bool ta, tb;
  float alpha, beta;
  bool operator==(const Key&) const = default;
};
struct KeyHash {
  std::size_t operator()(const Key& k) const {
    std::size_t h = 0;
    auto mix = [&h](std::size_t v) { h ^= v + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2); };
    for (int v : {k.N, k.K, k.lda, k.ldb, k.ldc}) mix(std::hash<int>()(v));
    mix(std::size_t(k.ta) | std::size_t(k.tb) << 1);
    mix(std::hash<float>()(k.alpha));
    mix(std::hash<float>()(k.beta));
    return h;
  }
};

// Strides of the logical [rows, cols] view of op(X) stored row-major with leading dimension ld.
memory::dims strides_of(bool trans, int ld) {
  return trans ? memory::dims{1, ld} : memory::dims{ld, 1};
}

// Round to nearest even (NaN stays NaN), as the GPU's bf16 conversion does.
std::uint16_t to_bf16(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return std::uint16_t((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return std::uint16_t(u >> 16);
}

// op(X)[rows, cols] (stored with leading dimension ld) into a dense row-major bf16 [rows, cols].
void pack_bf16(std::uint16_t* out, const float* x, bool trans, int rows, int cols, int ld) {
#pragma omp parallel for schedule(static) if (std::size_t(rows) * cols >= (1u << 16))
  for (int r = 0; r < rows; ++r) {
    std::uint16_t* o = out + std::size_t(r) * cols;
    if (trans)
      for (int c = 0; c < cols; ++c) o[c] = to_bf16(x[std::size_t(c) * ld + r]);
    else
      for (int c = 0; c < cols; ++c) o[c] = to_bf16(x[std::size_t(r) * ld + c]);
  }
}
}  // namespace

struct OnednnMatmul::Impl {
  dnnl::engine engine{dnnl::engine::kind::cpu, 0};
  dnnl::stream stream{engine};
  std::unordered_map<Key, dnnl::matmul, KeyHash> cache;
  std::vector<std::uint16_t> a_bf16, b_bf16;  // the operands rounded and packed (bf16 mode)
  std::mutex mutex;

  // The operands' descriptors for M rows: the caller's fp32 layout, or the packed bf16 copies
  // (row-major [M, K] and [K, N]).
  static memory::desc a_desc(const Key& k, memory::dim M, bool bf16) {
    return bf16 ? memory::desc({M, k.K}, dt::bf16, memory::dims{k.K, 1})
                : memory::desc({M, k.K}, dt::f32, strides_of(k.ta, k.lda));
  }
  static memory::desc b_desc(const Key& k, bool bf16) {
    return bf16 ? memory::desc({k.K, k.N}, dt::bf16, memory::dims{k.N, 1})
                : memory::desc({k.K, k.N}, dt::f32, strides_of(k.tb, k.ldb));
  }
  static memory::desc c_desc(const Key& k, memory::dim M) {
    return memory::desc({M, k.N}, dt::f32, memory::dims{k.ldc, 1});
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
    const memory::dim M = DNNL_RUNTIME_DIM_VAL;
    const dnnl::matmul::desc d(a_desc(k, M, bf16), b_desc(k, bf16), c_desc(k, M));
    return cache.emplace(k, dnnl::matmul(dnnl::matmul::primitive_desc(d, attr, engine)))
        .first->second;
  }
};

OnednnMatmul::OnednnMatmul(bool bf16) : bf16_(bf16), impl_(std::make_unique<Impl>()) {}
OnednnMatmul::~OnednnMatmul() = default;

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
  const Key key{N, K, lda, ldb, ldc, ta, tb, alpha, beta};
  std::lock_guard lock(impl_->mutex);
  try {
    auto& mm = impl_->matmul(key, bf16_);
    const void* a = A;
    const void* b = B;
    if (bf16_) {
      impl_->a_bf16.resize(std::size_t(M) * K);
      impl_->b_bf16.resize(std::size_t(K) * N);
      pack_bf16(impl_->a_bf16.data(), A, ta, M, K, lda);
      pack_bf16(impl_->b_bf16.data(), B, tb, K, N, ldb);
      a = impl_->a_bf16.data();
      b = impl_->b_bf16.data();
    }
    auto& eng = impl_->engine;
    const memory am(Impl::a_desc(key, M, bf16_), eng, const_cast<void*>(a));
    const memory bm(Impl::b_desc(key, bf16_), eng, const_cast<void*>(b));
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
