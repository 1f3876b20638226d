#include "backend/cpu/onednn_matmul.hpp"

#include <cstring>
#include <mutex>
#include <oneapi/dnnl/dnnl.hpp>
#include <stdexcept>
#include <string>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

#include "backend/cpu/bf16.hpp"
#include "backend/cpu/gram.hpp"
#include "backend/cpu/grouped_gemm.hpp"

namespace moetrain::cpu {

namespace {
using dnnl::memory;
using dt = memory::data_type;

// How a product reads an operand: fp32 in the caller's layout (fp32 mode); bf16 in the caller's
// layout (bf16 activations, or the weights' bf16 copy); or bf16 packed densely from fp32 data in
// its stored orientation (other fp32 operands in bf16 mode).
enum class Read : std::uint8_t { F32, BF16, Packed };

// A product's layout, storage and scalars, all but M and K: they are run-time dimensions of the
// primitive (the experts' products change M every step, their weight gradients K), so each
// distinct (N, layout, storage, alpha, beta) gets its primitive once and keeps it.
// Batched products (batch > 1) also key on the batch and the caller's matrix strides.
struct Key {
  int N, lda, ldb, ldc, batch;
  std::size_t sa, sb, sc;
  bool ta, tb;
  Read a, b;
  bool c_bf16;
  float alpha, beta;
  bool operator==(const Key&) const = default;
};
struct KeyHash {
  std::size_t operator()(const Key& k) const {
    std::size_t h = 0;
    auto mix = [&h](std::size_t v) { h ^= v + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2); };
    for (int v : {k.N, k.lda, k.ldb, k.ldc, k.batch}) mix(std::hash<int>()(v));
    for (std::size_t v : {k.sa, k.sb, k.sc}) mix(v);
    mix(std::size_t(k.ta) | std::size_t(k.tb) << 1 | std::size_t(k.a) << 2 | std::size_t(k.b) << 4 |
        std::size_t(k.c_bf16) << 6);
    mix(std::hash<float>()(k.alpha));
    mix(std::hash<float>()(k.beta));
    return h;
  }
};

// Strides of the logical [rows, cols] view of op(X) stored row-major with leading dimension ld.
memory::dims strides_of(bool trans, int ld) {
  return trans ? memory::dims{1, ld} : memory::dims{ld, 1};
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

constexpr memory::dim kRuntime = DNNL_RUNTIME_DIM_VAL;

// A [batch, rows, cols] descriptor: matrix strides `inner`, matrix i at i * `outer` elements.
// rows and cols may be kRuntime (the primitive's) or actual (an execution's).
memory::desc desc3(dt type, int batch, memory::dim rows, memory::dim cols, memory::dim outer,
                   const memory::dims& inner) {
  return memory::desc({batch, rows, cols}, type, {batch > 1 ? outer : 1, inner[0], inner[1]});
}
// The caller's layout of op(X)[rows, cols]: leading dimension ld, matrices `stride` apart.
memory::desc caller_desc(dt type, int batch, memory::dim rows, memory::dim cols, bool trans, int ld,
                         std::size_t stride) {
  return desc3(type, batch, rows, cols, memory::dim(stride), strides_of(trans, ld));
}
// op(X)[rows, cols] as pack_bf16 writes it, matrix after matrix.
memory::desc packed_desc(int batch, memory::dim rows, memory::dim cols, bool trans) {
  const memory::dim size = rows == kRuntime || cols == kRuntime ? kRuntime : rows * cols;
  return desc3(dt::bf16, batch, rows, cols, size,
               trans ? memory::dims{1, rows} : memory::dims{cols, 1});
}

// bf16: an fp32 operand rounded and packed (pack_bf16's layout), with what it was packed from:
// the source in its stored orientation, `batch` matrices `stride` apart, and the source's bytes
// [lo, hi) for the overlap test of a write.
struct Packed {
  const float* src = nullptr;
  int rows = 0, cols = 0, ld = 0, batch = 0;
  std::size_t stride = 0;
  const char *lo = nullptr, *hi = nullptr;
  bool valid = false;
  std::uint64_t used = 0;  // the product that last read it, for least-recently-used reuse
  std::vector<std::uint16_t> data;
  bool holds(const float* x, int r, int c, int l, int b, std::size_t st) const {
    return valid && src == x && rows == r && cols == c && ld == l && batch == b && stride == st;
  }
};
// Enough for the experts' backward: a layer's groups' dy (then dh) slices all stay packed between
// the dx products and the weight-gradient products that follow them.
constexpr std::size_t kPackedSlots = 40;

// Bytes [lo, hi) of `batch` matrices of `rows` x `cols` elements at leading dimension ld.
std::pair<const char*, const char*> extent(CDevPtr x, int rows, int cols, int ld, int batch,
                                           std::size_t stride) {
  const std::size_t last = std::size_t(batch - 1) * stride + std::size_t(rows - 1) * ld + cols;
  return {static_cast<const char*>(x.get()), static_cast<const char*>((x + last).get())};
}

// C = beta * C over M x N (an empty sum), in C's storage.
template <typename E>
void scale_c(E* C, int M, int N, int ldc, std::size_t sc, int batch, float beta) {
  for (int b = 0; b < batch; ++b)
    for (int i = 0; i < M; ++i) {
      E* c = C + sc * std::size_t(b) + std::size_t(i) * ldc;
      for (int j = 0; j < N; ++j) c[j] = E(beta == 0.0f ? 0.0f : beta * float(c[j]));
    }
}
}  // namespace

struct OnednnMatmul::Impl {
  dnnl::engine engine{dnnl::engine::kind::cpu, 0};
  dnnl::stream stream{engine};
  std::unordered_map<Key, dnnl::matmul, KeyHash> cache;
  std::vector<std::unique_ptr<Packed>> packed;  // at most kPackedSlots, addresses stable
  std::uint64_t products = 0;                   // products run, the clock of Packed::used
  // bf16: the weights' copy, rewritten whole before a product reads it after a write.
  const float* weights = nullptr;
  std::size_t weight_count = 0;
  std::vector<std::uint16_t> weight_copy;
  bool weight_copy_stale = true;
  std::mutex mutex;

  // The operands' descriptors for M rows and K columns (kRuntime in the primitive), as Read says.
  static memory::desc a_desc(const Key& k, memory::dim M, memory::dim K) {
    if (k.a == Read::Packed) return packed_desc(k.batch, M, K, k.ta);
    return caller_desc(k.a == Read::BF16 ? dt::bf16 : dt::f32, k.batch, M, K, k.ta, k.lda, k.sa);
  }
  static memory::desc b_desc(const Key& k, memory::dim K) {
    if (k.b == Read::Packed) return packed_desc(k.batch, K, k.N, k.tb);
    return caller_desc(k.b == Read::BF16 ? dt::bf16 : dt::f32, k.batch, K, k.N, k.tb, k.ldb, k.sb);
  }
  static memory::desc c_desc(const Key& k, memory::dim M) {
    return caller_desc(k.c_bf16 ? dt::bf16 : dt::f32, k.batch, M, k.N, false, k.ldc, k.sc);
  }

  bool in_weights(const float* x) const {
    return weights && x >= weights && x < weights + weight_count;
  }
  void invalidate(const char* lo, const char* hi) {
    for (auto& p : packed)
      if (p->valid && p->lo < hi && lo < p->hi) p->valid = false;
    const auto* w = reinterpret_cast<const char*>(weights);
    if (weights && lo < w + weight_count * sizeof(float) && w < hi) weight_copy_stale = true;
  }
  // A product's C is a write like any other: packed copies of it, or the weights, are stale.
  void invalidate_c(CDevPtr C, int M, int N, int ldc, int batch, std::size_t sc) {
    const auto [lo, hi] = extent(C, M, N, ldc, batch, sc);
    invalidate(lo, hi);
  }
  void wrote_c(CDevPtr C, int M, int N, int ldc, int batch, std::size_t sc) {
    std::lock_guard lock(mutex);
    invalidate_c(C, M, N, ldc, batch, sc);
  }
  // op(X)[rows, cols] (stored [rows, cols], or [cols, rows] when trans), `batch` matrices `stride`
  // apart, packed: an existing copy of the same source, or a slot rewritten from it. `keep` (the
  // product's other operand) is never the slot chosen.
  const Packed* pack(const float* x, bool trans, int rows, int cols, int ld, std::size_t stride,
                     int batch, const Packed* keep) {
    const int srows = trans ? cols : rows, scols = trans ? rows : cols;
    for (auto& p : packed)
      if (p->holds(x, srows, scols, ld, batch, stride)) {
        p->used = products;
        return p.get();
      }
    const std::size_t size = std::size_t(rows) * cols;
    const std::size_t need = size * std::size_t(batch);
    // A dropped copy whose buffer fits best (the smallest that holds `need`, else the largest), so
    // the slots' memory stays near the largest set of copies valid at once; else a new slot; else
    // the least recently used copy.
    Packed* slot = nullptr;
    for (auto& p : packed) {
      if (p->valid || p.get() == keep) continue;
      const std::size_t have = p->data.capacity(), best = slot ? slot->data.capacity() : 0;
      if (!slot || (have >= need ? best < need || have < best : best < need && have > best))
        slot = p.get();
    }
    if (!slot && packed.size() < kPackedSlots) {
      packed.push_back(std::make_unique<Packed>());
      slot = packed.back().get();
    }
    if (!slot)
      for (auto& p : packed)
        if (p.get() != keep && (!slot || p->used < slot->used)) slot = p.get();
    slot->data.resize(need);
    for (int i = 0; i < batch; ++i)
      pack_bf16(slot->data.data() + size * std::size_t(i), x + stride * std::size_t(i), trans, rows,
                cols, ld);
    std::tie(slot->lo, slot->hi) = extent(x, srows, scols, ld, batch, stride);
    slot->src = x;
    slot->rows = srows;
    slot->cols = scols;
    slot->ld = ld;
    slot->batch = batch;
    slot->stride = stride;
    slot->valid = true;
    slot->used = products;
    return slot;
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

  dnnl::matmul& matmul(const Key& k) {
    auto it = cache.find(k);
    if (it != cache.end()) return it->second;
    dnnl::primitive_attr attr;
    if (k.alpha != 1.0f) attr.set_output_scales(0, {k.alpha});
    if (k.beta != 0.0f) {
      dnnl::post_ops ops;
      ops.append_sum(k.beta);
      attr.set_post_ops(ops);
    }
    const dnnl::matmul::desc d(a_desc(k, kRuntime, kRuntime), b_desc(k, kRuntime),
                               c_desc(k, kRuntime));
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
  if (!bytes) return;
  std::lock_guard lock(impl_->mutex);
  const auto* lo = static_cast<const char*>(dst);
  impl_->invalidate(lo, lo + bytes);
}

// The parameter buffer is an allocation of its own, so an output that starts outside it never
// reaches it; an output's end is unknown, so every packed copy is dropped.
void OnednnMatmul::op_wrote(const void* dst) {
  std::lock_guard lock(impl_->mutex);
  Impl& im = *impl_;
  for (auto& p : im.packed) p->valid = false;
  if (im.in_weights(static_cast<const float*>(dst))) im.weight_copy_stale = true;
}

void OnednnMatmul::gemm(bool ta, bool tb, int M, int N, int K, float alpha, CDevPtr A, int lda,
                        CDevPtr B, int ldb, float beta, DevPtr C, int ldc) {
  gemm_batched(ta, tb, M, N, K, alpha, A, lda, 0, B, ldb, 0, beta, C, ldc, 0, 1);
}

void OnednnMatmul::gemm_batched(bool ta, bool tb, int M, int N, int K, float alpha, CDevPtr A,
                                int lda, std::size_t sa, CDevPtr B, int ldb, std::size_t sb,
                                float beta, DevPtr C, int ldc, std::size_t sc, int batch) {
  if (M <= 0 || N <= 0 || batch <= 0) return;
  for (const CDevPtr x : {A, B, CDevPtr(C)})
    if (x.storage() != Storage::F32 && (!bf16_ || x.storage() != Storage::BF16))
      throw std::logic_error(std::string("oneDNN matmul (") + (bf16_ ? "bf16" : "fp32") +
                             "): an operand of storage " + to_string(x.storage()));
  if (batch == 1) sa = sb = sc = 0;  // one matrix: its stride means nothing, and keys alike
  const bool c_bf16 = C.storage() == Storage::BF16;
  if (K <= 0) {  // an empty sum: C = beta * C
    if (bf16_) impl_->wrote_c(C, M, N, ldc, batch, sc);
    if (c_bf16)
      scale_c(static_cast<bf16*>(C.get()), M, N, ldc, sc, batch, beta);
    else
      scale_c(C.as<float>(), M, N, ldc, sc, batch, beta);
    return;
  }
  std::lock_guard lock(impl_->mutex);
  Impl& im = *impl_;
  // bf16: a bf16 operand is read in place, an fp32 one from the weights' copy or packed.
  const auto read_of = [&](CDevPtr x) {
    if (!bf16_) return Read::F32;
    if (x.storage() == Storage::BF16 || im.in_weights(x.as<const float>())) return Read::BF16;
    return Read::Packed;
  };
  const Key key{N,  lda, ldb,        ldc,        batch,  sa,    sb,  sc,
                ta, tb,  read_of(A), read_of(B), c_bf16, alpha, beta};
  try {
    auto& mm = im.matmul(key);
    const void* a = A.get();
    const void* b = B.get();
    if (bf16_) {
      ++im.products;
      const Packed* a_slot = nullptr;
      if (key.a == Read::Packed)
        a_slot = im.pack(A.as<const float>(), ta, M, K, lda, sa, batch, nullptr),
        a = a_slot->data.data();
      else if (A.storage() == Storage::F32)
        a = im.copy_of(A.as<const float>());
      if (key.b == Read::Packed)
        b = im.pack(B.as<const float>(), tb, K, N, ldb, sb, batch, a_slot)->data.data();
      else if (B.storage() == Storage::F32)
        b = im.copy_of(B.as<const float>());
    }
    auto& eng = impl_->engine;
    const memory am(Impl::a_desc(key, M, K), eng, const_cast<void*>(a));
    const memory bm(Impl::b_desc(key, K), eng, const_cast<void*>(b));
    const memory cm(Impl::c_desc(key, M), eng, C.get());
    mm.execute(impl_->stream, {{DNNL_ARG_SRC, am}, {DNNL_ARG_WEIGHTS, bm}, {DNNL_ARG_DST, cm}});
    impl_->stream.wait();
    if (bf16_) im.invalidate_c(C, M, N, ldc, batch, sc);
  } catch (const dnnl::error& err) {
    throw std::runtime_error("oneDNN matmul " + std::to_string(batch) + " x " + std::to_string(M) +
                             "x" + std::to_string(N) + "x" + std::to_string(K) +
                             (bf16_ ? " (bf16)" : " (fp32)") + " failed: " + err.what());
  }
}

// A Gram product as a full product of op(X) with its transpose: on this CPU oneDNN's general
// kernels do the 2x multiply-adds faster than OpenBLAS's ssyrk does half of them (about 1.3x in
// fp32 for Newton-Schulz's shapes; bf16 2x more). The upper triangle is then mirrored, so D is
// exactly symmetric whatever the kernel's summation order.
void OnednnMatmul::symmetric_gemm_batched(bool trans, int n, int k, float alpha, const float* X,
                                          int ldx, std::size_t stride_x, float beta, const float* C,
                                          int ldc, std::size_t stride_c, float shift, float* D,
                                          int ldd, std::size_t stride_d, int batch) {
  if (n <= 0 || batch <= 0) return;
  check_gram_sum(k);
  if (beta != 0.0f && C != D) {  // D = C's upper triangle, to be summed into
#pragma omp parallel for schedule(static)
    for (int b = 0; b < batch; ++b)
      copy_upper(D + stride_d * std::size_t(b), ldd, C + stride_c * std::size_t(b), ldc, n);
  }
  // op(X) [n, k] times op(X)^T: the same storage read with the other orientation. Below the
  // diagonal C's garbage may enter D (beta != 0); the mirror below overwrites it.
  gemm_batched(trans, !trans, n, n, k, alpha, X, ldx, stride_x, X, ldx, stride_x, beta, D, ldd,
               stride_d, batch);
#pragma omp parallel for schedule(static)
  for (int b = 0; b < batch; ++b)
    shift_and_mirror_upper(D + stride_d * std::size_t(b), ldd, n, shift);
}

void OnednnMatmul::grouped_gemm(bool trans_b, int rows, int N, int K, float alpha, CDevPtr A,
                                int lda, CDevPtr B, int ldb, std::size_t stride_b, float beta,
                                DevPtr C, int ldc, const std::int32_t* offsets, int groups) {
  grouped_gemm_with<float>([this](auto... args) { gemm(args...); }, trans_b, rows, N, K, alpha, A,
                           lda, B, ldb, stride_b, beta, C, ldc, offsets, groups);
}

void OnednnMatmul::grouped_gemm_wgrad(int rows, int M, int N, float alpha, CDevPtr A, int lda,
                                      CDevPtr B, int ldb, DevPtr C, int ldc, std::size_t stride_c,
                                      const std::int32_t* offsets, int groups) {
  grouped_gemm_wgrad_with<float>([this](auto... args) { gemm(args...); }, rows, M, N, alpha, A, lda,
                                 B, ldb, C, ldc, stride_c, offsets, groups);
}

}  // namespace moetrain::cpu
