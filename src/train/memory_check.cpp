#include "moetrain/memory_check.hpp"

#include <limits>
#include <string_view>

#include <spdlog/spdlog.h>

#include "moetrain/optimizer.hpp"

namespace moetrain {

MemoryEstimate estimate_memory(const Config& cfg, const Backend<float>& backend, int world) {
  const ModelConfig& m = cfg.model;
  const AttentionShape att{cfg.data.batch_size, m.seq_len, m.n_heads, m.n_kv_heads, m.head_dim};
  const bool weight_copy =
      std::string_view(backend.name()).rfind("cuda", 0) == 0 && bf16_gemms(cfg.train, true);
  // The head's chunk for the micro-batch's tokens (an int count; a larger batch is refused as too
  // large by the estimate itself).
  const long long tokens = std::min<long long>((long long)cfg.data.batch_size * m.seq_len,
                                               std::numeric_limits<int>::max());
  MemoryEstimate e =
      estimate_model_memory(m, std::size_t(cfg.data.batch_size), backend.attention_saved_elems(att),
                            backend.head_chunk_rows(int(tokens), m.vocab_size),
                            backend.activation_storage(), weight_copy);
  e.world = world;
  e.optimizer = optimizer_memory_bytes(cfg, world);
  e.total();  // checks that the sum fits
  return e;
}

std::string describe_available(const Backend<float>& backend) {
  const std::size_t avail = backend.available_memory_bytes();
  if (avail == std::numeric_limits<std::size_t>::max())
    return std::string("unknown memory available on ") + backend.name();
  return format_bytes(avail) + " available on " + backend.name();
}

void check_memory_fits(const Config& cfg, const Backend<float>& backend, int world, bool log) {
  MemoryEstimate e;
  try {
    e = estimate_memory(cfg, backend, world);
  } catch (const SizeTooLarge& err) {
    throw ConfigError(std::string(err.what()) + " (" + describe_available(backend) + ")");
  }
  const std::string line =
      "memory estimate per rank: " + describe(e) + " (" + describe_available(backend) + ")";
  if (log) spdlog::info("{}", line);
  const std::size_t avail = backend.available_memory_bytes();
  if (e.total() > avail)
    throw ConfigError("the run does not fit in memory: " + line +
                      "; make the model (model.*), data.batch_size or model.seq_len smaller" +
                      (world == 1 ? std::string(", or shard the optimizer state over more ranks")
                                  : std::string()));
}

}  // namespace moetrain
