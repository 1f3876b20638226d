// moetrain_gpu_tests' main (docs/design.md §6.4): the kernel tests and the
// CudaBackend-vs-CpuBackend comparison of tests/simt/, compiled by nvcc and run on a real GPU.
// Without a usable device it prints one line and exits 0, so a CUDA build without a GPU (CI) still
// builds and runs it.
//   moetrain_gpu_tests [Catch2 options]   the tests, after a line describing device 0
//   moetrain_gpu_tests --device-query     that line only (exit 1 without a device)
//   moetrain_gpu_tests --list-tests, -h   Catch2's listings and help, with or without a device
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cstdio>
#include <cstring>
#include <string>

#include <cuda_runtime_api.h>

namespace {

// Why there is no usable device, or "" when device 0 is there.
std::string no_device_reason() {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess)
    return std::string("cudaGetDeviceCount: ") + cudaGetErrorName(status) + ", " +
           cudaGetErrorString(status);
  if (count == 0) return "cudaGetDeviceCount: 0 devices";
  return "";
}

// One line: name, compute capability, SMs, memory, clocks, driver and runtime versions.
bool print_device() {
  cudaDeviceProp p{};
  const cudaError_t status = cudaGetDeviceProperties(&p, 0);
  if (status != cudaSuccess) {
    std::printf("moetrain_gpu_tests: cudaGetDeviceProperties: %s\n", cudaGetErrorString(status));
    return false;
  }
  int count = 0, driver = 0, runtime = 0;
  cudaGetDeviceCount(&count);
  cudaDriverGetVersion(&driver);
  cudaRuntimeGetVersion(&runtime);
  std::printf(
      "moetrain_gpu_tests: device 0 of %d: %s, sm_%d%d, %d SMs, %.1f GiB, %d KiB shared memory "
      "per block (opt-in), L2 %d MiB, driver %d.%d, runtime %d.%d\n",
      count, p.name, p.major, p.minor, p.multiProcessorCount,
      double(p.totalGlobalMem) / (1024.0 * 1024 * 1024), int(p.sharedMemPerBlockOptin / 1024),
      p.l2CacheSize / (1024 * 1024), driver / 1000, driver % 1000 / 10, runtime / 1000,
      runtime % 1000 / 10);
  std::fflush(stdout);
  return true;
}

// Catch2 options that run no test: no device needed.
bool lists_only(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a.rfind("--list", 0) == 0 || a == "-l" || a == "-t" || a == "-h" || a == "--help")
      return true;
  }
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  if (lists_only(argc, argv)) return Catch::Session().run(argc, argv);
  const bool query = argc == 2 && std::strcmp(argv[1], "--device-query") == 0;
  const std::string reason = no_device_reason();
  if (!reason.empty()) {
    std::printf("moetrain_gpu_tests: no CUDA device (%s); nothing run\n", reason.c_str());
    return query ? 1 : 0;
  }
  if (!print_device()) return 1;
  if (query) return 0;
  return Catch::Session().run(argc, argv);
}
