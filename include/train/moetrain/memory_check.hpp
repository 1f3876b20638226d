// The start-up memory check (docs/design.md §2.2): the estimate of what a run allocates per rank
// (parameters, gradients, optimizer state, activations, the bf16 weight copy) against what the
// backend's device has available, before anything is allocated.
#pragma once

#include <string>

#include "moetrain/backend.hpp"
#include "moetrain/config.hpp"
#include "moetrain/memory_estimate.hpp"

namespace moetrain {

// The estimate for micro-batches of data.batch_size sequences on `backend` (which sizes the
// attention's saved buffer and, CUDA in bf16, adds the weight copy) with `world` ranks sharding
// the optimizer state. Throws SizeTooLarge when a size does not fit in 64 bits.
MemoryEstimate estimate_memory(const Config& cfg, const Backend<float>& backend, int world);

// "12.3 GiB available on cpu-fp32", or "unknown" availability.
std::string describe_available(const Backend<float>& backend);

// Logs the estimate and the available memory (one line, when `log`) and throws ConfigError,
// with both in the message, when the run cannot fit (or its sizes cannot be represented).
void check_memory_fits(const Config& cfg, const Backend<float>& backend, int world,
                       bool log = true);

}  // namespace moetrain
