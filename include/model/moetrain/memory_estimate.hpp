// The memory a training run needs per rank, estimated from the config before anything is
// allocated (docs/design.md §2.2): parameters, gradients, optimizer state (with its ZeRO-1 staging
// and workspaces), the activation arena (the model's own arena requests on a dry plan) and, on a
// bf16 GPU, the weights' bf16 copy. Every size is 64-bit with overflow checks; a size that does
// not fit is reported as too large, naming the config fields.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "moetrain/config.hpp"
#include "moetrain/dev_ptr.hpp"

namespace moetrain {

// The estimate could not be computed: a size overflows 64 bits (the message names the fields).
struct SizeTooLarge : ConfigError {
  using ConfigError::ConfigError;
};

struct MemoryEstimate {
  std::size_t param_count = 0;  // parameters of the model
  std::size_t params = 0;       // bytes of the fp32 parameters (every rank holds them all)
  std::size_t grads = 0;        // bytes of the gradients
  std::size_t optimizer = 0;    // optimizer state, staging and workspaces of one rank
  std::size_t activations = 0;  // the activation arena
  std::size_t weight_copy = 0;  // the bf16 copy of the weights (CUDA, bf16), else 0
  int world = 1;                // ranks the optimizer state is sharded over
  std::size_t total() const;    // the sum (checked)
};

// Parameters of the model in closed form (equal to ParamLayout(cfg).total()); throws SizeTooLarge.
std::size_t param_count(const ModelConfig& cfg);

// params, grads, activations and the weight copy (`bf16_weight_copy`) for micro-batches of
// `batch` sequences with activations of storage `activations`; `attention_saved_elems` and
// `head_chunk_rows` are the backend's queries for that shape. The optimizer part is the optim
// module's (optimizer_memory_bytes). Throws SizeTooLarge.
MemoryEstimate estimate_model_memory(const ModelConfig& cfg, std::size_t batch,
                                     std::size_t attention_saved_elems, int head_chunk_rows,
                                     Storage activations, bool bf16_weight_copy);

// "1.50 GiB", "12.0 MiB", "512 B".
std::string format_bytes(std::size_t bytes);

// One line: parameters, gradients, optimizer state per rank, activations, (bf16 copy,) total.
std::string describe(const MemoryEstimate& e);

}  // namespace moetrain
