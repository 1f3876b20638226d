// CudaBackend::run_repeated as CUDA graphs. A key's first call runs its ops eagerly: that sizes the
// scratch buffers and builds the GEMM plans, so the capture allocates nothing. The second call
// captures the ops on the backend's stream into a graph (nothing runs while capturing) and launches
// it; later calls launch the same graph: one launch per micro-batch instead of thousands. A graph
// holds the addresses of its buffers, so anything that frees or moves device memory (free_bytes, a
// scratch buffer's growth, set_weights) drops every recording; a key then warms up again.
//
// Inside a capture every host transfer, allocation or synchronisation is refused with an error
// naming it (refuse_in_capture); the capture is then ended and thrown away, so the stream stays
// usable.
#include <stdexcept>
#include <string>
#include <vector>

#include "backend/cuda/cuda_backend.hpp"

namespace moetrain {

void CudaBackend::refuse_in_capture(const char* what) const {
  if (!capturing_) return;
  throw std::logic_error(std::string("CudaBackend: ") + what +
                         " inside run_repeated's CUDA graph capture: repeated work may only "
                         "enqueue device work (a host transfer, allocation or synchronisation "
                         "would not be replayed)");
}

void CudaBackend::drop_recordings() {
  for (Recording& r : recordings_)
    if (r.exec) cudaGraphExecDestroy(r.exec);
  recordings_.clear();
}

void CudaBackend::run_repeated(const RepeatKey& key, const std::function<void()>& work) {
  if (!graphs_ || capturing_) return work();  // a nested region is part of the outer capture
  Recording* rec = nullptr;
  for (Recording& r : recordings_)
    if (r.key == key) rec = &r;
  if (!rec) rec = &recordings_.emplace_back(Recording{key, 0, nullptr});
  if (++rec->calls == 1) return work();  // the warm-up
  // The bf16 weight copy is refreshed outside the graph: a replay must not depend on whether the
  // copy was stale when the graph was captured.
  weight_copy();
  if (!rec->exec) {
    MOETRAIN_CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeGlobal));
    capturing_ = true;
    cudaGraph_t graph = nullptr;
    try {
      work();
    } catch (...) {
      capturing_ = false;
      cudaStreamEndCapture(stream_, &graph);
      if (graph) cudaGraphDestroy(graph);
      cudaGetLastError();
      std::erase_if(recordings_, [&](const Recording& r) { return r.key == key; });
      throw;
    }
    capturing_ = false;
    MOETRAIN_CUDA_CHECK(cudaStreamEndCapture(stream_, &graph));
    const cudaError_t rc = cudaGraphInstantiate(&rec->exec, graph, 0);
    cudaGraphDestroy(graph);
    MOETRAIN_CUDA_CHECK(rc);
    ++graph_stats_.captures;
  } else {
    ++graph_stats_.replays;
  }
  MOETRAIN_CUDA_CHECK(cudaGraphLaunch(rec->exec, stream_));
  ++kernels::host_launch_count();
}

}  // namespace moetrain
