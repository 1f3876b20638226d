// The vector instruction sets the CPU backend's hand-vectorised loops choose between at run time,
// so one binary (built with or without -march=native) uses AVX-512 where the CPU has it and still
// runs where it does not.
#pragma once

namespace moetrain::cpu {

enum class SimdLevel { Scalar = 0, Avx2 = 1, Avx512 = 2 };

// The widest level this CPU and OS run (cpuid and the OS-enabled register state), found once.
SimdLevel simd_supported();
const char* simd_name(SimdLevel level);
// Throws std::invalid_argument naming `level` when this CPU cannot run it (a caller asking for a
// level explicitly, as the tests do, would otherwise die of an illegal instruction).
void require_simd(SimdLevel level);

}  // namespace moetrain::cpu
