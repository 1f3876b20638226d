// tests/simt/cuda_link_check.cpp — CUDA build only: an executable that links every object of
// moetrain_kernels_cuda (whole archive) and the simulator's test kernels against cudart, so an
// unresolved launcher or device symbol fails the build. It launches nothing (CI has no GPU); run
// by hand it reports the devices it sees.
#include <cstdio>

#include "mma_test_kernels.hpp"
#include "test_kernels.hpp"

int main() {
  using namespace moetrain::simt_test;
  // Taking the launchers' addresses makes the linker resolve them.
  const void* launchers[] = {
      reinterpret_cast<const void*>(&tree_sum_f32),
      reinterpret_cast<const void*>(&tree_sum_i32),
      reinterpret_cast<const void*>(&block_reduce_f32),
      reinterpret_cast<const void*>(&block_sum_i64),
      reinterpret_cast<const void*>(&shuffles),
      reinterpret_cast<const void*>(&vote),
      reinterpret_cast<const void*>(&barrier_votes),
      reinterpret_cast<const void*>(&atomics),
      reinterpret_cast<const void*>(&reverse_vec),
      reinterpret_cast<const void*>(&bf16_convert),
      reinterpret_cast<const void*>(&write_even),
      reinterpret_cast<const void*>(&stale_shared),
      reinterpret_cast<const void*>(&sync_heavy),
      reinterpret_cast<const void*>(&write_per_thread),
      reinterpret_cast<const void*>(&moetrain::mma_test::mma_fragments),
      reinterpret_cast<const void*>(&moetrain::mma_test::ldmatrix_fragments),
      reinterpret_cast<const void*>(&moetrain::mma_test::gemm_bf16),
      reinterpret_cast<const void*>(&moetrain::mma_test::mma_bug),
  };
  int devices = 0;
  const cudaError_t status = cudaGetDeviceCount(&devices);
  std::printf("moetrain_cuda_link_check: %zu launchers linked; CUDA devices: %d (%s)\n",
              sizeof launchers / sizeof launchers[0], status == cudaSuccess ? devices : 0,
              cudaGetErrorString(status));
  return 0;
}
