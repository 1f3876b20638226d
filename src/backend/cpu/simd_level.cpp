#include "backend/cpu/simd_level.hpp"

#include <stdexcept>
#include <string>

namespace moetrain::cpu {

namespace {
SimdLevel detect() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  // libgcc's cpuid check includes the OS's XSAVE state (XGETBV), so a kernel that does not
  // save the zmm registers reports no avx512f.
  if (__builtin_cpu_supports("avx512f")) return SimdLevel::Avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return SimdLevel::Avx2;
#endif
  return SimdLevel::Scalar;
}
}  // namespace

SimdLevel simd_supported() {
  static const SimdLevel level = detect();
  return level;
}

const char* simd_name(SimdLevel level) {
  switch (level) {
    case SimdLevel::Scalar:
      return "scalar";
    case SimdLevel::Avx2:
      return "avx2";
    case SimdLevel::Avx512:
      return "avx512";
  }
  return "unknown";
}

void require_simd(SimdLevel level) {
  if (int(level) > int(simd_supported()))
    throw std::invalid_argument(std::string("cpu: SIMD level ") + simd_name(level) +
                                " is not supported by this CPU (it runs " +
                                simd_name(simd_supported()) + ")");
}

}  // namespace moetrain::cpu
