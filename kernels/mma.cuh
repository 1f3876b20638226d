// kernels/mma.cuh — warp-level tensor-core primitives (sm_80+): the bf16 mma.sync with fp32
// accumulators, and the ldmatrix loads that feed it from shared memory.
//
// Each function is one PTX instruction that the whole warp executes together. All 32 lanes must
// call it, from the same place: PTX's `.sync.aligned` forbids a lane-dependent branch around it,
// an exited lane and a partial warp (use block sizes that are multiples of 32). The simulator
// reports each of these (simt::Error); on a GPU they are undefined behaviour.
//
// Fragments (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"). A lane holds
// some elements of the warp's matrices in its registers. With lane = 4 * g + t (g = lane / 4 the
// group, t = lane % 4 the thread in the group), and a .b32 register holding two bf16 with the
// lower-indexed element in bits 0-15:
//   A     16x16 bf16 (M x K, "row"), uint32_t a[4]:
//           a[0] = A[g][2t, 2t+1]     a[1] = A[g+8][2t, 2t+1]
//           a[2] = A[g][2t+8, 2t+9]   a[3] = A[g+8][2t+8, 2t+9]
//   B     16x8 bf16 (K x N; "col": a register holds two consecutive k of one column),
//         uint32_t b[2]:
//           b[0] = B[2t, 2t+1][g]     b[1] = B[2t+8, 2t+9][g]
//   C, D  16x8 fp32 (M x N), float c[4]:
//           c[0] = C[g][2t]   c[1] = C[g][2t+1]   c[2] = C[g+8][2t]   c[3] = C[g+8][2t+1]
//
// API (namespace moetrain::kernels)
//   mma_m16n8k16_bf16(d, a, b, c)   D = A * B + C, fp32 accumulation; d may be c (accumulate in
//                                   place). mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32.
//   ldmatrix_x1(r, smem_row), ldmatrix_x2, ldmatrix_x4
//                                   load 1, 2 or 4 8x8 matrices of 16-bit elements from shared
//                                   memory, r[q] = this lane's fragment of matrix q.
//                                   ldmatrix.sync.aligned.m8n8.x{1,2,4}.shared.b16.
//   ldmatrix_x1_trans, ldmatrix_x2_trans, ldmatrix_x4_trans
//                                   the same, each matrix transposed (.trans).
//
// ldmatrix (PTX ISA, "Warp-level matrix load instruction: ldmatrix"). Row i of matrix q is 8
// contiguous 16-bit elements (16 bytes, 16-byte aligned, in shared memory) at the address that
// lane 8q + i passes; x1 uses the addresses of lanes 0-7, x2 of lanes 0-15 and ignores the
// others'. Rows need not be contiguous (padded and swizzled tiles work). Lane 4i + j receives in
// r[q] row i, columns 2j and 2j+1 of matrix q; with .trans, column i, rows 2j and 2j+1. So the
// fragments above come from tiles in shared memory as:
//   a  from a row-major A tile (M x K):  ldmatrix_x4(a, &A[m0 + lane % 16][k0 + lane / 16 * 8])
//   b  from a row-major B tile (K x N):  ldmatrix_x2_trans(b, &B[k0 + lane % 16][n0]), or for two
//        adjacent n8 tiles ldmatrix_x4_trans(r, &B[k0 + lane % 16][n0 + lane / 16 * 8]):
//        r[0..1] = b of columns n0..n0+7, r[2..3] = b of n0+8..n0+15
//   b  from B stored transposed (Bt, N x K row-major):
//        ldmatrix_x2(b, &Bt[n0 + lane % 8][k0 + lane / 8 % 2 * 8])
//
// Simulator (MOETRAIN_SIMT): each function is a warp collective of the simulator
// (simt::detail::warp_aligned): the lanes park until all 32 have arrived from the same call site,
// then the last one computes every lane's results from every lane's operands, by the tables
// above. mma sums in fp32 in a fixed order, k ascending after C:
//   D[m][n] = (((C[m][n] + p_0) + p_1) + ... ) + p_15,  p_k = A[m][k] * B[k][n],
// each p_k exact in fp32 (two 8-bit significands; unless it leaves fp32's range), each addition
// rounded to nearest. A tensor core's order and internal precision are unspecified: tests compare
// sums with tolerances, exact only where every partial sum is an exact fp32. ldmatrix reads the
// rows when the last lane arrives and reports a row address that is not 16-byte aligned or not in
// shared memory.
#pragma once

#include <cstdint>

#include "common.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "kernels/mma.cuh needs sm_80 or newer (mma.sync m16n8k16 with bf16 inputs)"
#endif

#if defined(MOETRAIN_SIMT)

#include <cstdio>
#include <cstring>
#include <source_location>
#include <string>

namespace moetrain::kernels {

namespace mma_detail {

inline ::simt::detail::CallSite call_site(const std::source_location& s) {
  return {s.file_name(), static_cast<unsigned>(s.line()), static_cast<unsigned>(s.column())};
}

// The two bf16 of a .b32 register as fp32 (exact): element 2i in bits 0-15, 2i+1 in bits 16-31.
inline float lo_bf16(uint32_t r) {
  return float_from_bits(r << 16);
}
inline float hi_bf16(uint32_t r) {
  return float_from_bits(r & 0xffff0000u);
}

// One lane's operands of mma_m16n8k16_bf16: pointers to its registers (the lane is parked inside
// the call, so they stay valid until the last lane runs the instruction).
struct MmaLane {
  const uint32_t* a;  // [4] fragment of A (16x16 bf16)
  const uint32_t* b;  // [2] fragment of B (16x8 bf16)
  const float* c;     // [4] fragment of C (16x8 fp32)
  float* d;           // [4] fragment of D (16x8 fp32), may be c
};

inline void mma_m16n8k16_bf16_exec(void* const* lanes) {
  float A[16][16], B[16][8], D[16][8];  // the warp's matrices: M x K, K x N, M x N
  // Gather: PTX ISA "Matrix Fragments for mma.m16n8k16 with floating point type", the .bf16 tables
  // of multiplicands A and B and the .f32 table of accumulators C/D (a_{2r}, a_{2r+1} are the low
  // and high halves of register a[r]; likewise b).
  for (unsigned lane = 0; lane < 32; ++lane) {
    const MmaLane& l = *static_cast<const MmaLane*>(lanes[lane]);
    const unsigned g = lane >> 2, t = lane & 3u;
    for (unsigned r = 0; r < 4; ++r) {  // a[r]: rows g (r even) or g + 8; columns +8 for r >= 2
      const unsigned row = g + 8 * (r & 1u), col = 2 * t + 8 * (r >> 1);
      A[row][col] = lo_bf16(l.a[r]);
      A[row][col + 1] = hi_bf16(l.a[r]);
    }
    for (unsigned r = 0; r < 2; ++r) {  // b[r]: k = 2t, 2t+1 (+8 for r = 1) of column g
      const unsigned k = 2 * t + 8 * r;
      B[k][g] = lo_bf16(l.b[r]);
      B[k + 1][g] = hi_bf16(l.b[r]);
    }
    for (unsigned i = 0; i < 4; ++i) D[g + 8 * (i >> 1)][2 * t + (i & 1u)] = l.c[i];
  }
  // Every lane's operands are read before any result is written: d may alias c.
  for (unsigned m = 0; m < 16; ++m) {
    for (unsigned n = 0; n < 8; ++n) {
      float acc = D[m][n];
      // The product is exact, so a contracted multiply-add would give the same sum.
      for (unsigned k = 0; k < 16; ++k) acc += A[m][k] * B[k][n];
      D[m][n] = acc;
    }
  }
  for (unsigned lane = 0; lane < 32; ++lane) {
    const MmaLane& l = *static_cast<const MmaLane*>(lanes[lane]);
    const unsigned g = lane >> 2, t = lane & 3u;
    for (unsigned i = 0; i < 4; ++i) l.d[i] = D[g + 8 * (i >> 1)][2 * t + (i & 1u)];
  }
}

inline constexpr ::simt::detail::AlignedOp kMmaM16n8k16Bf16{
    "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32", &mma_m16n8k16_bf16_exec};

// One lane's operands of an ldmatrix: the row address it passes and its destination registers.
struct LdmatrixLane {
  const void* row;
  uint32_t* r;  // [kNum]
};

template <int kNum, bool kTrans>
constexpr const char* ldmatrix_name() {
  if constexpr (kNum == 1) {
    return kTrans ? "ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16"
                  : "ldmatrix.sync.aligned.m8n8.x1.shared.b16";
  } else if constexpr (kNum == 2) {
    return kTrans ? "ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16"
                  : "ldmatrix.sync.aligned.m8n8.x2.shared.b16";
  } else {
    static_assert(kNum == 4, "ldmatrix loads 1, 2 or 4 matrices");
    return kTrans ? "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16"
                  : "ldmatrix.sync.aligned.m8n8.x4.shared.b16";
  }
}

[[noreturn]] inline void bad_ldmatrix_row(unsigned lane, const char* name, const void* p,
                                          const char* why) {
  char addr[32];
  std::snprintf(addr, sizeof addr, "%p", p);
  ::simt::detail::lane_error(lane, std::string("gives ") + name + " the address " + addr +
                                       " of row " + std::to_string(lane % 8) + " of matrix " +
                                       std::to_string(lane / 8) + ", " + why);
}

template <int kNum, bool kTrans>
void ldmatrix_exec(void* const* lanes) {
  // PTX ISA "Warp-level matrix load instruction: ldmatrix": the table of which threads hold the
  // row addresses (addr_{8q+i}, row i of matrix q, from lane 8q + i; lanes >= 8 * kNum unused).
  uint16_t m[kNum][8][8];  // matrix, row, column
  for (unsigned q = 0; q < kNum; ++q) {
    for (unsigned i = 0; i < 8; ++i) {
      const unsigned lane = 8 * q + i;
      const void* p = static_cast<const LdmatrixLane*>(lanes[lane])->row;
      if (reinterpret_cast<std::uintptr_t>(p) % 16 != 0)
        bad_ldmatrix_row(lane, ldmatrix_name<kNum, kTrans>(), p, "not 16-byte aligned");
      if (!::simt::detail::in_shared(p, 16))
        bad_ldmatrix_row(lane, ldmatrix_name<kNum, kTrans>(), p, "not in shared memory");
      std::memcpy(m[q][i], p, 16);
    }
  }
  // The same section, "ldmatrix fragment layout for one 8x8 Matrix with 16-bit elements": lane
  // 4i + j gets row i, columns 2j, 2j+1 (low half first) of each matrix in its register q; .trans
  // loads the matrix column-major: column i, rows 2j, 2j+1.
  for (unsigned lane = 0; lane < 32; ++lane) {
    uint32_t* r = static_cast<const LdmatrixLane*>(lanes[lane])->r;
    const unsigned i = lane >> 2, j = lane & 3u;
    for (unsigned q = 0; q < kNum; ++q) {
      const uint32_t lo = kTrans ? m[q][2 * j][i] : m[q][i][2 * j];
      const uint32_t hi = kTrans ? m[q][2 * j + 1][i] : m[q][i][2 * j + 1];
      r[q] = lo | hi << 16;
    }
  }
}

template <int kNum, bool kTrans>
inline constexpr ::simt::detail::AlignedOp kLdmatrix{ldmatrix_name<kNum, kTrans>(),
                                                     &ldmatrix_exec<kNum, kTrans>};

template <int kNum, bool kTrans>
inline void ldmatrix(uint32_t (&r)[kNum], const void* smem_row, const std::source_location& site) {
  LdmatrixLane lane{smem_row, r};
  ::simt::detail::warp_aligned(kLdmatrix<kNum, kTrans>, &lane, call_site(site));
}

}  // namespace mma_detail

// The call site (a defaulted argument, never passed by kernels) tells two calls in the branches of
// a lane-dependent condition apart: different instructions on a GPU.
inline void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                              const float (&c)[4],
                              std::source_location site = std::source_location::current()) {
  mma_detail::MmaLane lane{a, b, c, d};
  ::simt::detail::warp_aligned(mma_detail::kMmaM16n8k16Bf16, &lane, mma_detail::call_site(site));
}

inline void ldmatrix_x1(uint32_t (&r)[1], const void* smem_row,
                        std::source_location site = std::source_location::current()) {
  mma_detail::ldmatrix<1, false>(r, smem_row, site);
}
inline void ldmatrix_x2(uint32_t (&r)[2], const void* smem_row,
                        std::source_location site = std::source_location::current()) {
  mma_detail::ldmatrix<2, false>(r, smem_row, site);
}
inline void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row,
                        std::source_location site = std::source_location::current()) {
  mma_detail::ldmatrix<4, false>(r, smem_row, site);
}
inline void ldmatrix_x1_trans(uint32_t (&r)[1], const void* smem_row,
                              std::source_location site = std::source_location::current()) {
  mma_detail::ldmatrix<1, true>(r, smem_row, site);
}
inline void ldmatrix_x2_trans(uint32_t (&r)[2], const void* smem_row,
                              std::source_location site = std::source_location::current()) {
  mma_detail::ldmatrix<2, true>(r, smem_row, site);
}
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row,
                              std::source_location site = std::source_location::current()) {
  mma_detail::ldmatrix<4, true>(r, smem_row, site);
}

}  // namespace moetrain::kernels

#elif defined(__CUDACC__)

namespace moetrain::kernels {

__device__ __forceinline__ void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4],
                                                  const uint32_t (&b)[2], const float (&c)[4]) {
#if defined(__CUDA_ARCH__)
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
        "f"(c[2]), "f"(c[3]));
#endif
}

namespace mma_detail {
// ldmatrix's operand is a .shared window address, which fits in 32 bits.
__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
}  // namespace mma_detail

// The ldmatrix asm statements read memory the compiler cannot see: the "memory" clobber keeps
// this thread's own earlier shared-memory stores before them (other threads' stores still need a
// barrier, as for any shared-memory read).

__device__ __forceinline__ void ldmatrix_x1(uint32_t (&r)[1], const void* smem_row) {
#if defined(__CUDA_ARCH__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n"
               : "=r"(r[0])
               : "r"(mma_detail::smem_address(smem_row))
               : "memory");
#endif
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* smem_row) {
#if defined(__CUDA_ARCH__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(mma_detail::smem_address(smem_row))
               : "memory");
#endif
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
#if defined(__CUDA_ARCH__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(mma_detail::smem_address(smem_row))
               : "memory");
#endif
}
__device__ __forceinline__ void ldmatrix_x1_trans(uint32_t (&r)[1], const void* smem_row) {
#if defined(__CUDA_ARCH__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
               : "=r"(r[0])
               : "r"(mma_detail::smem_address(smem_row))
               : "memory");
#endif
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* smem_row) {
#if defined(__CUDA_ARCH__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(mma_detail::smem_address(smem_row))
               : "memory");
#endif
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
#if defined(__CUDA_ARCH__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(mma_detail::smem_address(smem_row))
               : "memory");
#endif
}

}  // namespace moetrain::kernels

#endif  // MOETRAIN_SIMT / __CUDACC__
