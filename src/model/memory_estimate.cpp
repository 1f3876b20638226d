#include "moetrain/memory_estimate.hpp"

#include <cstdio>

#include "model/arena.hpp"
#include "moetrain/model.hpp"

namespace moetrain {

namespace {

// a * b, or SizeTooLarge naming what was multiplied.
std::size_t mul(std::size_t a, std::size_t b, const char* what) {
  std::size_t r = 0;
  if (__builtin_mul_overflow(a, b, &r))
    throw SizeTooLarge(std::string("too large: ") + what + " does not fit in 64 bits");
  return r;
}
std::size_t add(std::size_t a, std::size_t b, const char* what) {
  std::size_t r = 0;
  if (__builtin_add_overflow(a, b, &r))
    throw SizeTooLarge(std::string("too large: ") + what + " does not fit in 64 bits");
  return r;
}

}  // namespace

std::size_t param_count(const ModelConfig& c) {
  const char* what =
      "the parameter count (model.vocab_size, model.d_model, model.n_layers, "
      "model.n_heads, model.head_dim, model.dense_ff, model.moe.*)";
  const std::size_t d = std::size_t(c.d_model), hd = std::size_t(c.head_dim);
  const std::size_t H = std::size_t(c.n_heads), Hkv = std::size_t(c.n_kv_heads);
  const auto swiglu = [&](std::size_t ff) { return mul(mul(3, ff, what), d, what); };
  // Per layer: the two norm gains, q, k, v and o, then the FFN.
  const std::size_t attn =
      add(mul(2, d, what),
          mul(mul(add(mul(2, H, what), mul(2, Hkv, what), what), hd, what), d, what), what);
  const std::size_t dense = add(attn, swiglu(std::size_t(c.dense_ff)), what);
  const MoeConfig& m = c.moe;
  std::size_t moe = add(attn, mul(std::size_t(m.n_experts), d, what), what);  // + the router
  moe = add(moe, mul(std::size_t(m.n_experts), swiglu(std::size_t(m.expert_ff)), what), what);
  moe =
      add(moe, mul(std::size_t(m.n_shared_experts), swiglu(std::size_t(m.shared_ff)), what), what);
  const std::size_t n_dense = std::size_t(c.dense_layers);
  const std::size_t n_moe = std::size_t(c.n_layers) - n_dense;
  std::size_t n = mul(mul(c.tie_embeddings ? 1 : 2, std::size_t(c.vocab_size), what), d, what);
  n = add(n, d, what);  // the final norm
  n = add(n, mul(n_dense, dense, what), what);
  return add(n, mul(n_moe, moe, what), what);
}

std::size_t MemoryEstimate::total() const {
  const char* what = "the memory estimate";
  return add(add(add(add(params, grads, what), optimizer, what), activations, what), weight_copy,
             what);
}

MemoryEstimate estimate_model_memory(const ModelConfig& cfg, std::size_t batch,
                                     std::size_t attention_saved_elems, int head_chunk_rows,
                                     Storage activations, bool bf16_weight_copy) {
  MemoryEstimate e;
  e.param_count = param_count(cfg);
  const char* what = "the parameter bytes (model.*)";
  e.params = mul(e.param_count, sizeof(float), what);
  e.grads = e.params;
  if (bf16_weight_copy) e.weight_copy = mul(e.param_count, 2, what);
  try {
    e.activations = Model<float>::activation_bytes(cfg, batch, attention_saved_elems,
                                                   head_chunk_rows, activations);
  } catch (const SizeOverflow&) {
    throw SizeTooLarge(
        "too large: the activations (data.batch_size * model.seq_len tokens times model.d_model, "
        "model.vocab_size, model.n_heads * model.seq_len, model.moe.*) do not fit in 64 bits");
  }
  return e;
}

std::string format_bytes(std::size_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  double v = double(bytes);
  int u = 0;
  while (v >= 1024 && u < 6) {
    v /= 1024;
    ++u;
  }
  char buf[32];
  if (u == 0)
    std::snprintf(buf, sizeof buf, "%zu B", bytes);
  else
    std::snprintf(buf, sizeof buf, "%.*f %s", v < 10 ? 2 : (v < 100 ? 1 : 0), v, units[u]);
  return buf;
}

std::string describe(const MemoryEstimate& e) {
  std::string s = "parameters " + format_bytes(e.params) + " (" + std::to_string(e.param_count) +
                  "), gradients " + format_bytes(e.grads) + ", optimizer state " +
                  format_bytes(e.optimizer) +
                  (e.world > 1 ? " per rank of " + std::to_string(e.world) : std::string()) +
                  ", activations " + format_bytes(e.activations);
  if (e.weight_copy) s += ", bf16 weight copy " + format_bytes(e.weight_copy);
  return s + ": total " + format_bytes(e.total());
}

}  // namespace moetrain
