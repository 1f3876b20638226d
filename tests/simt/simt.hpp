// tests/simt/simt.hpp — the SIMT simulator: runs the CUDA kernels of kernels/ on the CPU.
//
// kernels/*.cu are compiled by g++ as ordinary C++ with this header force-included (the SIMT build,
// CMake option MOETRAIN_SIMT=ON); the same files are compiled by nvcc in the CUDA build. Kernels
// include "common.cuh" and launch through moetrain::kernels::launch(), never with <<<>>>.
//
// How a launch runs
//   Blocks run one after another on the calling thread. The threads of a block run as fibers
//   (cooperative user-space threads with their own stacks, switched by a few instructions). A
//   thread runs until it reaches __syncthreads() or a warp collective (__shfl_*_sync,
//   __ballot_sync, __any_sync, __all_sync, __syncwarp, __reduce_*_sync, and the .sync.aligned
//   instructions mma.sync and ldmatrix of kernels/mma.cuh), then the schedule picks the next
//   thread:
//     Schedule::forward()     rounds over the ready threads in ascending linear thread index,
//     Schedule::reverse()     the same in descending order,
//     Schedule::random(seed)  any ready thread, drawn at random at every switch (repeatable:
//                             the same seed gives the same order).
//   Blocks run in ascending order (forward), descending (reverse) or shuffled (random). A kernel
//   that misses a __syncthreads reads data that are not written yet under at least one of these
//   orders. Set the schedule with simt::set_schedule() (or the environment variable
//   MOETRAIN_SIMT_SCHEDULE=forward|reverse|random:SEED) and run kernel tests under
//   simt::standard_schedules().
//
// Memory
//   * __shared__ variables are `static thread_local`: the fibers of a block share them (they run on
//     one OS thread) and blocks run one at a time. Before every block all of them — in fact the
//     whole static TLS block of the executable on the launching thread, saved before and restored
//     after the launch — and the dynamic shared memory are filled with 0xFF bytes (NaN as
//     float/bf16, -1 as int), so a kernel that relies on stale or unwritten shared memory fails.
//     AddressSanitizer does not guard static __shared__ arrays; the dynamic shared memory
//     (dynamic_smem<T>()) is a heap buffer of exactly smem_bytes, so ASan catches out-of-bounds
//     accesses there.
//   * cudaMalloc returns heap memory (256-byte aligned) filled with 0xFF bytes (NaN): outputs
//     a kernel forgot to write show up as NaN. cudaFree checks the pointer.
//   * Atomics go through std::atomic_ref (the simulator is single-threaded, so they are exact).
//   * extern __shared__ arrays are not supported: use dynamic_smem<T>() from common.cuh.
//
// Streams (CUDA's semantics)
//   Each stream is a FIFO of work: kernel launches, async copies and memsets, event markers, host
//   functions. The legacy stream (nullptr, cudaStreamLegacy) orders with every blocking stream
//   (created without cudaStreamNonBlocking) in both directions and with no non-blocking stream.
//   cudaStreamSynchronize(s) runs s's work and what it waits for; cudaDeviceSynchronize, cudaFree
//   and cudaFreeHost run everything; cudaEventRecord enqueues a marker, cudaStreamWaitEvent makes
//   the stream's later work wait for it, cudaEventSynchronize runs up to it; a query that finds
//   work pending returns cudaErrorNotReady and lets the work run. cudaMemcpy and cudaMemcpy2D are
//   work on the legacy stream: device to device they only enqueue (asynchronous to the host, as in
//   CUDA), otherwise the host waits for them. cudaMemset enqueues on the legacy stream. An async
//   copy to the host fills its destination with 0xFF bytes (NaN) when it is enqueued; the data
//   arrive when it runs (and every copy reads its source when it runs). When work runs is the
//   stream schedule (set_stream_schedule below): eager, at enqueue (a GPU always done before the
//   host looks), or deferred, only when something orders it, so a missing event or
//   synchronisation reads stale data or NaN. Launch configurations are checked at enqueue; an
//   error of a deferred kernel is thrown by the call that runs it, except cudaFree, cudaFreeHost
//   and cudaDeviceReset (destructors call them), which print it and return
//   cudaErrorLaunchFailure.
//
// Stream capture and graphs (CUDA's semantics)
//   cudaStreamBeginCapture(s, mode) puts a created stream (not the legacy one) in capture mode: the
//   work then enqueued on it (kernel launches, cudaMemcpyAsync / cudaMemcpy2DAsync,
//   cudaMemsetAsync, cudaLaunchHostFunc, enqueue_host, cudaGraphLaunch as a child graph) is
//   recorded, not run: kernel arguments as launch() converted them at the call, copies and memsets
//   with their pointers, sizes and values. Several streams share a capture as in CUDA: an event
//   recorded on a capturing stream and waited for by another stream makes that stream join the
//   capture (a fork); cudaStreamEndCapture on the origin stream takes every stream of the capture
//   out of capture mode and fails with cudaErrorStreamCaptureUnjoined (and no graph) unless the
//   origin has waited, through events, directly or not, for all the work of every joined stream. A
//   graph keeps its work in the order it was recorded, which is consistent with the dependencies
//   (every dependency is on earlier work), and runs it in that order. cudaGraphInstantiate makes an
//   executable graph; cudaGraphLaunch(exec, s) enqueues it on s as one work item in s's order,
//   after the exec's previous launch (on any stream), as in CUDA: under the deferred schedule it
//   runs when something orders it, like any work. Every launch runs the same recorded work with the
//   same arguments and pointers, reading the buffers as they are then; an async copy to the host
//   poisons its destination at each launch. An event recorded during a capture only orders the
//   captured work (nothing of it runs at a launch); once the capture ends it is as if never
//   recorded. An error of a graph's kernel is thrown by the call that runs the graph (its later
//   nodes do not run).
//   What fails, with CUDA's error codes. Each failure but those of the last item invalidates the
//   capture concerned (CUDA: "any associated capture graphs are invalidated"): its streams' later
//   work fails with cudaErrorStreamCaptureInvalidated (kernel launches and enqueue_host throw
//   simt::Error naming it, as the CUDA build's launch() throws), cudaStreamIsCapturing says
//   cudaStreamCaptureStatusInvalidated, and cudaStreamEndCapture returns
//   cudaErrorStreamCaptureInvalidated and a null graph and ends the capture, after which the
//   streams work normally.
//     * cudaStreamSynchronize / cudaStreamQuery of a capturing stream, cudaDeviceSynchronize while
//       any capture is under way: cudaErrorStreamCaptureUnsupported;
//     * cudaEventSynchronize / cudaEventQuery / cudaEventElapsedTime of an event last recorded in a
//       capture under way: cudaErrorCapturedEvent;
//     * any use of the legacy stream (work, an event record or wait, cudaMemcpy, cudaMemset, its
//       synchronize or query) while a blocking stream captures: cudaErrorStreamCaptureImplicit;
//     * the potentially unsafe calls, by the capture modes of cudaThreadExchangeStreamCaptureMode
//       (the thread's, initially global) and of cudaStreamBeginCapture: cudaMalloc,
//       cudaMallocHost, cudaHostAlloc, cudaFree, cudaFreeHost (nullptr too), cudaEventSynchronize /
//       cudaEventQuery of other events, blocking copies to or from the host. A thread whose mode is
//       not relaxed may not make them while it has a capture not begun relaxed, nor, when its mode
//       is global, while another thread has a capture begun global:
//       cudaErrorStreamCaptureUnsupported;
//     * a wait of a capturing stream on an event not recorded in its capture:
//       cudaErrorStreamCaptureIsolation (recorded in another capture: cudaErrorStreamCaptureMerge,
//       invalidating both); a wait of the legacy stream on a captured event:
//       cudaErrorStreamCaptureUnsupported;
//     * cudaStreamEndCapture on a stream that joined a capture: cudaErrorStreamCaptureUnmatched; a
//       launch with an invalid configuration on a capturing stream (simt::Error);
//     * destroying a capturing stream: returns cudaErrorStreamCaptureInvalidated (the stream is
//       destroyed; the origin's destruction ends its capture, and the graph is lost);
//     * not invalidating: cudaStreamIsCapturing of the legacy stream while a blocking stream
//       captures (cudaErrorStreamCaptureImplicit); cudaStreamEndCapture from another thread than
//       the one that began a capture not begun relaxed (cudaErrorStreamCaptureWrongThread).
//   cudaStreamBeginCapture of the legacy stream fails with cudaErrorStreamCaptureUnsupported, of a
//   stream already capturing and cudaStreamEndCapture of a stream not capturing with
//   cudaErrorIllegalState. A call that fails because of a capture runs nothing and waits for
//   nothing: sync_count() does not count it.
//
// Checks (each throws simt::Error, a std::runtime_error, naming the kernel, block and thread)
//   * a thread waits at __syncthreads while another thread of the block has exited (or exits while
//     others wait), or threads of a block call different barrier kinds;
//   * a warp collective whose mask names a lane that does not exist or has exited; lanes calling
//     different collectives (or widths) with the same mask; a calling lane missing from its own
//     mask; a shuffle reading a lane outside the mask; a width that is not a power of two in
//     [1, 32]. Collectives with different, overlapping masks may be pending at once (legal since
//     Volta: lanes 0-15 may reach a full-warp __syncwarp while lanes 16-31 still shuffle among
//     themselves); lanes that end up waiting for each other are reported as a deadlock;
//   * a .sync.aligned instruction (mma.sync, ldmatrix of kernels/mma.cuh, through warp_aligned)
//     that not every lane of a full warp executes, or that lanes execute from different call
//     sites (divergent control flow); its operand errors (a misaligned or non-shared ldmatrix row
//     address);
//   * a block in which no thread can make progress (deadlock), with the state of every waiting
//     warp;
//   * an invalid launch configuration (zero or too large dims, more than 1024 threads, dynamic
//     shared memory above 163 KiB, the sm_80 limit), a launch from inside a kernel.
//   After an error the simulator resets its fibers; later launches work normally.
//
// Differences from a GPU, by design: no preemption between synchronisation points (a data race
// between two threads of a block that never synchronise gives one of the possible results, not
// garbage); fast-math intrinsics (__expf, __fdividef, ...) are the exact libm functions; bf16
// arithmetic rounds through fp32; __activemask() returns the lanes that have not exited; no
// cooperative groups, no named barriers, no dynamic parallelism, no __noinline__ (it clashes with
// libstdc++).
//
// Requirements: x86-64 (hand-written context switch) or any POSIX target via ucontext; no LTO
// (thread indices are plain globals updated at the opaque synchronisation calls); libstdc++ and
// libasan linked dynamically (the default), since the executable's TLS block is overwritten during
// a launch.
#pragma once

#ifndef MOETRAIN_SIMT
#define MOETRAIN_SIMT 1
#endif

#include <math.h>  // libstdc++'s: puts the float overloads (exp(float), ...) in the global namespace, as CUDA does
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ------------------------------------------------------------------------------------------------
// Qualifiers
// ------------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __constant__
#define __managed__
#define __grid_constant__
#define __shared__ static thread_local
#define __forceinline__ __inline__ __attribute__((always_inline))
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
// __restrict__ is a GCC keyword already. __noinline__ is deliberately not defined (libstdc++ uses
// __attribute__((__noinline__))).

// ------------------------------------------------------------------------------------------------
// Vector types (CUDA's alignments) and make_* functions
// ------------------------------------------------------------------------------------------------
#define SIMT_VEC1(T, N, A)               \
  struct __attribute__((aligned(A))) N { \
    T x;                                 \
  };                                     \
  inline constexpr N make_##N(T x) {     \
    return N{x};                         \
  }
#define SIMT_VEC2(T, N, A)                \
  struct __attribute__((aligned(A))) N {  \
    T x, y;                               \
  };                                      \
  inline constexpr N make_##N(T x, T y) { \
    return N{x, y};                       \
  }
#define SIMT_VEC3(T, N, A)                     \
  struct __attribute__((aligned(A))) N {       \
    T x, y, z;                                 \
  };                                           \
  inline constexpr N make_##N(T x, T y, T z) { \
    return N{x, y, z};                         \
  }
#define SIMT_VEC4(T, N, A)                          \
  struct __attribute__((aligned(A))) N {            \
    T x, y, z, w;                                   \
  };                                                \
  inline constexpr N make_##N(T x, T y, T z, T w) { \
    return N{x, y, z, w};                           \
  }

SIMT_VEC1(signed char, char1, 1)
SIMT_VEC2(signed char, char2, 2)
SIMT_VEC3(signed char, char3, 1)
SIMT_VEC4(signed char, char4, 4)
SIMT_VEC1(unsigned char, uchar1, 1)
SIMT_VEC2(unsigned char, uchar2, 2)
SIMT_VEC3(unsigned char, uchar3, 1)
SIMT_VEC4(unsigned char, uchar4, 4)
SIMT_VEC1(short, short1, 2)
SIMT_VEC2(short, short2, 4)
SIMT_VEC3(short, short3, 2)
SIMT_VEC4(short, short4, 8)
SIMT_VEC1(unsigned short, ushort1, 2)
SIMT_VEC2(unsigned short, ushort2, 4)
SIMT_VEC3(unsigned short, ushort3, 2)
SIMT_VEC4(unsigned short, ushort4, 8)
SIMT_VEC1(int, int1, 4)
SIMT_VEC2(int, int2, 8)
SIMT_VEC3(int, int3, 4)
SIMT_VEC4(int, int4, 16)
SIMT_VEC1(unsigned int, uint1, 4)
SIMT_VEC2(unsigned int, uint2, 8)
SIMT_VEC3(unsigned int, uint3, 4)
SIMT_VEC4(unsigned int, uint4, 16)
SIMT_VEC1(long long, longlong1, 8)
SIMT_VEC2(long long, longlong2, 16)
SIMT_VEC1(unsigned long long, ulonglong1, 8)
SIMT_VEC2(unsigned long long, ulonglong2, 16)
SIMT_VEC1(float, float1, 4)
SIMT_VEC2(float, float2, 8)
SIMT_VEC3(float, float3, 4)
SIMT_VEC4(float, float4, 16)
SIMT_VEC1(double, double1, 8)
SIMT_VEC2(double, double2, 16)
SIMT_VEC3(double, double3, 8)
#undef SIMT_VEC1
#undef SIMT_VEC2
#undef SIMT_VEC3
#undef SIMT_VEC4

struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1)
      : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

// ------------------------------------------------------------------------------------------------
// bf16 (cuda_bf16.h subset): storage type, conversions (round-to-nearest-even), a few intrinsics
// ------------------------------------------------------------------------------------------------
struct __nv_bfloat16_raw {
  unsigned short x;
};

namespace simt::detail {
inline unsigned int f2u(float f) {
  unsigned int u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float u2f(unsigned int u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
// fp32 -> bf16 bits, round to nearest even; NaN -> canonical 0x7FFF (as cvt.rn.bf16.f32).
inline unsigned short f2bf_rn(float f) {
  unsigned int u = f2u(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<unsigned short>(u >> 16);
}
// fp64 -> bf16 bits with a single rounding: round to odd into fp32, then to nearest even.
inline unsigned short d2bf_rn(double d) {
  float f = static_cast<float>(d);
  if (std::isfinite(d) && static_cast<double>(f) != d) {
    if (std::fabs(static_cast<double>(f)) > std::fabs(d)) f = std::nextafter(f, 0.0f);
    f = u2f(f2u(f) | 1u);
  }
  return f2bf_rn(f);
}
inline unsigned short f2bf_rz(float f) {
  unsigned int u = f2u(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
  return static_cast<unsigned short>(u >> 16);
}
}  // namespace simt::detail

struct __nv_bfloat16 {
  unsigned short __x;
  __nv_bfloat16() = default;
  constexpr __nv_bfloat16(const __nv_bfloat16_raw& r) : __x(r.x) {}
  __nv_bfloat16(float f) : __x(simt::detail::f2bf_rn(f)) {}  // implicit, as in cuda_bf16.h
  __nv_bfloat16(double f) : __x(simt::detail::d2bf_rn(f)) {}
  __nv_bfloat16(short v) : __x(simt::detail::d2bf_rn(v)) {}
  __nv_bfloat16(unsigned short v) : __x(simt::detail::d2bf_rn(v)) {}
  __nv_bfloat16(int v) : __x(simt::detail::d2bf_rn(v)) {}
  __nv_bfloat16(unsigned int v) : __x(simt::detail::d2bf_rn(v)) {}
  __nv_bfloat16(long v) : __x(simt::detail::d2bf_rn(static_cast<double>(v))) {}
  __nv_bfloat16(unsigned long v) : __x(simt::detail::d2bf_rn(static_cast<double>(v))) {}
  __nv_bfloat16(long long v) : __x(simt::detail::d2bf_rn(static_cast<double>(v))) {}
  __nv_bfloat16(unsigned long long v) : __x(simt::detail::d2bf_rn(static_cast<double>(v))) {}
  operator float() const { return simt::detail::u2f(static_cast<unsigned int>(__x) << 16); }
  operator __nv_bfloat16_raw() const { return __nv_bfloat16_raw{__x}; }
};
typedef __nv_bfloat16 nv_bfloat16;

struct __attribute__((aligned(4))) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
typedef __nv_bfloat162 nv_bfloat162;

inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) {
  return __nv_bfloat16_raw{u};
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) {
  return h.__x;
}
inline float __bfloat162float(__nv_bfloat16 h) {
  return static_cast<float>(h);
}
inline __nv_bfloat16 __float2bfloat16(float f) {
  return __nv_bfloat16_raw{simt::detail::f2bf_rn(f)};
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  return __nv_bfloat16_raw{simt::detail::f2bf_rn(f)};
}
inline __nv_bfloat16 __float2bfloat16_rz(float f) {
  return __nv_bfloat16_raw{simt::detail::f2bf_rz(f)};
}
inline __nv_bfloat16 __double2bfloat16(double d) {
  return __nv_bfloat16_raw{simt::detail::d2bf_rn(d)};
}
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return {__float2bfloat16_rn(a), __float2bfloat16_rn(b)};
}
inline __nv_bfloat162 __float2bfloat162_rn(float a) {
  return {__float2bfloat16_rn(a), __float2bfloat16_rn(a)};
}
inline __nv_bfloat162 __float22bfloat162_rn(float2 f) {
  return {__float2bfloat16_rn(f.x), __float2bfloat16_rn(f.y)};
}
inline float2 __bfloat1622float2(__nv_bfloat162 h) {
  return float2{float(h.x), float(h.y)};
}
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) {
  return {a, b};
}
inline __nv_bfloat162 __bfloat162bfloat162(__nv_bfloat16 a) {
  return {a, a};
}
inline __nv_bfloat16 __low2bfloat16(__nv_bfloat162 h) {
  return h.x;
}
inline __nv_bfloat16 __high2bfloat16(__nv_bfloat162 h) {
  return h.y;
}
inline float __low2float(__nv_bfloat162 h) {
  return float(h.x);
}
inline float __high2float(__nv_bfloat162 h) {
  return float(h.y);
}
inline bool __hisnan(__nv_bfloat16 h) {
  return (h.__x & 0x7fffu) > 0x7f80u;
}
inline int __hisinf(__nv_bfloat16 h) {
  return (h.__x & 0x7fffu) == 0x7f80u ? ((h.__x & 0x8000u) ? -1 : 1) : 0;
}
// Arithmetic rounds the fp32 result once more to bf16 (sm_80 rounds once; differs only in rare
// double-rounding cases: kernels should accumulate in fp32 anyway).
inline __nv_bfloat16 __hadd(__nv_bfloat16 a, __nv_bfloat16 b) {
  return __float2bfloat16_rn(float(a) + float(b));
}
inline __nv_bfloat16 __hsub(__nv_bfloat16 a, __nv_bfloat16 b) {
  return __float2bfloat16_rn(float(a) - float(b));
}
inline __nv_bfloat16 __hmul(__nv_bfloat16 a, __nv_bfloat16 b) {
  return __float2bfloat16_rn(float(a) * float(b));
}
inline __nv_bfloat16 __hdiv(__nv_bfloat16 a, __nv_bfloat16 b) {
  return __float2bfloat16_rn(float(a) / float(b));
}
inline __nv_bfloat16 __hfma(__nv_bfloat16 a, __nv_bfloat16 b, __nv_bfloat16 c) {
  return __float2bfloat16_rn(std::fma(float(a), float(b), float(c)));
}
inline __nv_bfloat16 __hneg(__nv_bfloat16 a) {
  return __ushort_as_bfloat16(static_cast<unsigned short>(a.__x ^ 0x8000u));
}
inline __nv_bfloat16 __habs(__nv_bfloat16 a) {
  return __ushort_as_bfloat16(static_cast<unsigned short>(a.__x & 0x7fffu));
}
inline __nv_bfloat16 __hmax(__nv_bfloat16 a, __nv_bfloat16 b) {
  return __float2bfloat16_rn(std::fmax(float(a), float(b)));
}
inline __nv_bfloat16 __hmin(__nv_bfloat16 a, __nv_bfloat16 b) {
  return __float2bfloat16_rn(std::fmin(float(a), float(b)));
}
inline __nv_bfloat162 __hadd2(__nv_bfloat162 a, __nv_bfloat162 b) {
  return {__hadd(a.x, b.x), __hadd(a.y, b.y)};
}
inline __nv_bfloat162 __hmul2(__nv_bfloat162 a, __nv_bfloat162 b) {
  return {__hmul(a.x, b.x), __hmul(a.y, b.y)};
}
inline __nv_bfloat162 __hfma2(__nv_bfloat162 a, __nv_bfloat162 b, __nv_bfloat162 c) {
  return {__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y)};
}
inline __nv_bfloat162 operator+(const __nv_bfloat162& a, const __nv_bfloat162& b) {
  return __hadd2(a, b);
}
inline __nv_bfloat162 operator*(const __nv_bfloat162& a, const __nv_bfloat162& b) {
  return __hmul2(a, b);
}
inline __nv_bfloat16 operator+(const __nv_bfloat16& a, const __nv_bfloat16& b) {
  return __hadd(a, b);
}
inline __nv_bfloat16 operator-(const __nv_bfloat16& a, const __nv_bfloat16& b) {
  return __hsub(a, b);
}
inline __nv_bfloat16 operator*(const __nv_bfloat16& a, const __nv_bfloat16& b) {
  return __hmul(a, b);
}
inline __nv_bfloat16 operator/(const __nv_bfloat16& a, const __nv_bfloat16& b) {
  return __hdiv(a, b);
}
inline __nv_bfloat16 operator-(const __nv_bfloat16& a) {
  return __hneg(a);
}
inline __nv_bfloat16& operator+=(__nv_bfloat16& a, const __nv_bfloat16& b) {
  return a = __hadd(a, b);
}
inline __nv_bfloat16& operator-=(__nv_bfloat16& a, const __nv_bfloat16& b) {
  return a = __hsub(a, b);
}
inline __nv_bfloat16& operator*=(__nv_bfloat16& a, const __nv_bfloat16& b) {
  return a = __hmul(a, b);
}
inline __nv_bfloat16& operator/=(__nv_bfloat16& a, const __nv_bfloat16& b) {
  return a = __hdiv(a, b);
}
inline bool operator==(const __nv_bfloat16& a, const __nv_bfloat16& b) {
  return float(a) == float(b);
}
inline bool operator!=(const __nv_bfloat16& a, const __nv_bfloat16& b) {
  return float(a) != float(b);
}
inline bool operator<(const __nv_bfloat16& a, const __nv_bfloat16& b) {
  return float(a) < float(b);
}
inline bool operator>(const __nv_bfloat16& a, const __nv_bfloat16& b) {
  return float(a) > float(b);
}
inline bool operator<=(const __nv_bfloat16& a, const __nv_bfloat16& b) {
  return float(a) <= float(b);
}
inline bool operator>=(const __nv_bfloat16& a, const __nv_bfloat16& b) {
  return float(a) >= float(b);
}

// ------------------------------------------------------------------------------------------------
// Math functions and bit intrinsics of the device library (exact host versions)
// ------------------------------------------------------------------------------------------------

inline float rsqrtf(float x) {
  return 1.0f / std::sqrt(x);
}
inline double rsqrt(double x) {
  return 1.0 / std::sqrt(x);
}
inline float rcbrtf(float x) {
  return 1.0f / std::cbrt(x);
}
inline float __expf(float x) {
  return std::exp(x);
}
inline float __exp10f(float x) {
  return std::pow(10.0f, x);
}
inline float __logf(float x) {
  return std::log(x);
}
inline float __log2f(float x) {
  return std::log2(x);
}
inline float __log10f(float x) {
  return std::log10(x);
}
inline float __powf(float x, float y) {
  return std::pow(x, y);
}
inline float __sinf(float x) {
  return std::sin(x);
}
inline float __cosf(float x) {
  return std::cos(x);
}
inline float __tanf(float x) {
  return std::tan(x);
}
inline void __sincosf(float x, float* s, float* c) {
  *s = std::sin(x);
  *c = std::cos(x);
}
inline void sincosf(float x, float* s, float* c) {
  *s = std::sin(x);
  *c = std::cos(x);
}
inline float __fdividef(float a, float b) {
  return a / b;
}
inline float __fdiv_rn(float a, float b) {
  return a / b;
}
inline float __frcp_rn(float x) {
  return 1.0f / x;
}
inline float __fsqrt_rn(float x) {
  return std::sqrt(x);
}
inline float __frsqrt_rn(float x) {
  return 1.0f / std::sqrt(x);
}
inline float __fadd_rn(float a, float b) {
  return a + b;
}
inline float __fsub_rn(float a, float b) {
  return a - b;
}
inline float __fmul_rn(float a, float b) {
  return a * b;
}
inline float __fmaf_rn(float a, float b, float c) {
  return std::fma(a, b, c);
}
inline double __dadd_rn(double a, double b) {
  return a + b;
}
inline double __dmul_rn(double a, double b) {
  return a * b;
}
inline double __fma_rn(double a, double b, double c) {
  return std::fma(a, b, c);
}
inline float __saturatef(float x) {
  return x != x ? 0.0f : (x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x));
}
inline float exp10f(float x) {
  return std::pow(10.0f, x);
}
inline int __float2int_rn(float x) {
  return static_cast<int>(std::nearbyint(x));
}
inline int __float2int_rz(float x) {
  return static_cast<int>(x);
}
inline int __float2int_rd(float x) {
  return static_cast<int>(std::floor(x));
}
inline int __float2int_ru(float x) {
  return static_cast<int>(std::ceil(x));
}
inline unsigned int __float2uint_rn(float x) {
  return static_cast<unsigned int>(std::nearbyint(x));
}
inline unsigned int __float2uint_rz(float x) {
  return static_cast<unsigned int>(x);
}
inline float __int2float_rn(int x) {
  return static_cast<float>(x);
}
inline float __uint2float_rn(unsigned int x) {
  return static_cast<float>(x);
}
inline int __float_as_int(float x) {
  return static_cast<int>(simt::detail::f2u(x));
}
inline unsigned int __float_as_uint(float x) {
  return simt::detail::f2u(x);
}
inline float __int_as_float(int x) {
  return simt::detail::u2f(static_cast<unsigned int>(x));
}
inline float __uint_as_float(unsigned int x) {
  return simt::detail::u2f(x);
}
inline long long __double_as_longlong(double x) {
  long long r;
  std::memcpy(&r, &x, sizeof r);
  return r;
}
inline double __longlong_as_double(long long x) {
  double r;
  std::memcpy(&r, &x, sizeof r);
  return r;
}
inline int __popc(unsigned int x) {
  return __builtin_popcount(x);
}
inline int __popcll(unsigned long long x) {
  return __builtin_popcountll(x);
}
inline int __clz(int x) {
  return x == 0 ? 32 : __builtin_clz(static_cast<unsigned int>(x));
}
inline int __clzll(long long x) {
  return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x));
}
inline int __ffs(int x) {
  return __builtin_ffs(x);
}
inline int __ffsll(long long x) {
  return __builtin_ffsll(x);
}
inline unsigned int __brev(unsigned int x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
  return __builtin_bswap32(x);
}
inline int __mul24(int a, int b) {
  return a * b;
}
inline unsigned int __umul24(unsigned int a, unsigned int b) {
  return a * b;
}
inline int __mulhi(int a, int b) {
  return static_cast<int>((static_cast<long long>(a) * b) >> 32);
}
inline unsigned int __umulhi(unsigned int a, unsigned int b) {
  return static_cast<unsigned int>((static_cast<unsigned long long>(a) * b) >> 32);
}
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}
inline unsigned int __funnelshift_l(unsigned int lo, unsigned int hi, unsigned int s) {
  s &= 31u;
  return s == 0 ? hi : (hi << s) | (lo >> (32 - s));
}
inline unsigned int __funnelshift_r(unsigned int lo, unsigned int hi, unsigned int s) {
  s &= 31u;
  return s == 0 ? lo : (lo >> s) | (hi << (32 - s));
}

// min/max overloads of the CUDA math library (mixed signedness goes unsigned, as in CUDA).
#define SIMT_MINMAX(R, A, B)                                                              \
  inline R min(A a, B b) {                                                                \
    return static_cast<R>(a) < static_cast<R>(b) ? static_cast<R>(a) : static_cast<R>(b); \
  }                                                                                       \
  inline R max(A a, B b) {                                                                \
    return static_cast<R>(a) > static_cast<R>(b) ? static_cast<R>(a) : static_cast<R>(b); \
  }
SIMT_MINMAX(int, int, int)
SIMT_MINMAX(unsigned int, unsigned int, unsigned int)
SIMT_MINMAX(unsigned int, int, unsigned int)
SIMT_MINMAX(unsigned int, unsigned int, int)
SIMT_MINMAX(long, long, long)
SIMT_MINMAX(unsigned long, unsigned long, unsigned long)
SIMT_MINMAX(long long, long long, long long)
SIMT_MINMAX(unsigned long long, unsigned long long, unsigned long long)
#undef SIMT_MINMAX
inline float min(float a, float b) {
  return std::fmin(a, b);
}
inline float max(float a, float b) {
  return std::fmax(a, b);
}
inline double min(double a, double b) {
  return std::fmin(a, b);
}
inline double max(double a, double b) {
  return std::fmax(a, b);
}

// Cache-hinted loads/stores: plain accesses.
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
template <typename T>
inline T __ldcg(const T* p) {
  return *p;
}
template <typename T>
inline T __ldca(const T* p) {
  return *p;
}
template <typename T>
inline T __ldcs(const T* p) {
  return *p;
}
template <typename T>
inline T __ldlu(const T* p) {
  return *p;
}
template <typename T>
inline T __ldcv(const T* p) {
  return *p;
}
template <typename T>
inline void __stwb(T* p, T v) {
  *p = v;
}
template <typename T>
inline void __stcg(T* p, T v) {
  *p = v;
}
template <typename T>
inline void __stcs(T* p, T v) {
  *p = v;
}
template <typename T>
inline void __stwt(T* p, T v) {
  *p = v;
}

inline void __threadfence() {
  std::atomic_thread_fence(std::memory_order_seq_cst);
}
inline void __threadfence_block() {
  std::atomic_thread_fence(std::memory_order_seq_cst);
}
inline void __threadfence_system() {
  std::atomic_thread_fence(std::memory_order_seq_cst);
}
inline void __nanosleep(unsigned int) {}
long long clock64();  // nanoseconds of a steady clock (clock() is libc's)

// ------------------------------------------------------------------------------------------------
// CUDA runtime API subset (streams, events and copies as described at the top)
// ------------------------------------------------------------------------------------------------
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInitializationError = 3,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidSymbol = 13,
  cudaErrorInvalidDevicePointer = 17,
  cudaErrorInvalidMemcpyDirection = 21,
  cudaErrorNoDevice = 100,
  cudaErrorInvalidDevice = 101,
  cudaErrorInvalidResourceHandle = 400,
  cudaErrorIllegalState = 401,
  cudaErrorNotReady = 600,
  cudaErrorLaunchFailure = 719,
  cudaErrorNotSupported = 801,
  cudaErrorStreamCaptureUnsupported = 900,
  cudaErrorStreamCaptureInvalidated = 901,
  cudaErrorStreamCaptureMerge = 902,
  cudaErrorStreamCaptureUnmatched = 903,
  cudaErrorStreamCaptureUnjoined = 904,
  cudaErrorStreamCaptureIsolation = 905,
  cudaErrorStreamCaptureImplicit = 906,
  cudaErrorCapturedEvent = 907,
  cudaErrorStreamCaptureWrongThread = 908,
  cudaErrorUnknown = 999,
};
typedef cudaError_t cudaError;

enum cudaMemcpyKind : int {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};

enum cudaFuncAttribute : int {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};

struct CUstream_st;
struct CUevent_st;
struct CUgraph_st;
struct CUgraphExec_st;
typedef CUstream_st* cudaStream_t;
typedef CUevent_st* cudaEvent_t;
typedef CUgraph_st* cudaGraph_t;          // a captured graph (cudaStreamEndCapture)
typedef CUgraphExec_st* cudaGraphExec_t;  // an executable graph (cudaGraphInstantiate)
typedef void (*cudaHostFn_t)(void* user_data);
// The legacy default stream by name (nullptr means the same).
#define cudaStreamLegacy (reinterpret_cast<cudaStream_t>(0x1))

inline constexpr unsigned int cudaStreamDefault = 0x00;
inline constexpr unsigned int cudaStreamNonBlocking = 0x01;
inline constexpr unsigned int cudaEventDefault = 0x00;
inline constexpr unsigned int cudaEventBlockingSync = 0x01;
inline constexpr unsigned int cudaEventDisableTiming = 0x02;
inline constexpr unsigned int cudaHostAllocDefault = 0x00;

enum cudaStreamCaptureStatus : int {
  cudaStreamCaptureStatusNone = 0,
  cudaStreamCaptureStatusActive = 1,
  cudaStreamCaptureStatusInvalidated = 2,
};
enum cudaStreamCaptureMode : int {
  cudaStreamCaptureModeGlobal = 0,
  cudaStreamCaptureModeThreadLocal = 1,
  cudaStreamCaptureModeRelaxed = 2,
};
// Accepted by cudaGraphInstantiate (they change nothing here: no graph allocates or runs on a
// device).
enum cudaGraphInstantiateFlags : int {
  cudaGraphInstantiateFlagAutoFreeOnLaunch = 1,
  cudaGraphInstantiateFlagUpload = 2,
  cudaGraphInstantiateFlagDeviceLaunch = 4,
  cudaGraphInstantiateFlagUseNodePriority = 8,
};

enum cudaMemoryType : int {
  cudaMemoryTypeUnregistered = 0,
  cudaMemoryTypeHost = 1,
  cudaMemoryTypeDevice = 2,
  cudaMemoryTypeManaged = 3,
};
struct cudaPointerAttributes {
  cudaMemoryType type;
  int device;
  void* devicePointer;
  void* hostPointer;
};

struct cudaDeviceProp {
  char name[256];
  size_t totalGlobalMem;
  size_t sharedMemPerBlock;
  size_t sharedMemPerBlockOptin;
  size_t sharedMemPerMultiprocessor;
  int regsPerBlock;
  int warpSize;
  int maxThreadsPerBlock;
  int maxThreadsDim[3];
  int maxGridSize[3];
  int maxThreadsPerMultiProcessor;
  int multiProcessorCount;
  int l2CacheSize;
  int major;
  int minor;
};

const char* cudaGetErrorString(cudaError_t error);
const char* cudaGetErrorName(cudaError_t error);
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
cudaError_t cudaMalloc(void** ptr, size_t bytes);
template <typename T>
inline cudaError_t cudaMalloc(T** ptr, size_t bytes) {
  return cudaMalloc(reinterpret_cast<void**>(ptr), bytes);
}
cudaError_t cudaFree(void* ptr);
cudaError_t cudaMallocHost(void** ptr, size_t bytes);
template <typename T>
inline cudaError_t cudaMallocHost(T** ptr, size_t bytes) {
  return cudaMallocHost(reinterpret_cast<void**>(ptr), bytes);
}
cudaError_t cudaHostAlloc(void** ptr, size_t bytes, unsigned int flags);
cudaError_t cudaFreeHost(void* ptr);
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                            cudaStream_t stream = nullptr);
cudaError_t cudaMemcpy2D(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width,
                         size_t height, cudaMemcpyKind kind);
cudaError_t cudaMemcpy2DAsync(void* dst, size_t dpitch, const void* src, size_t spitch,
                              size_t width, size_t height, cudaMemcpyKind kind,
                              cudaStream_t stream = nullptr);
cudaError_t cudaMemset(void* dst, int value, size_t bytes);
cudaError_t cudaMemsetAsync(void* dst, int value, size_t bytes, cudaStream_t stream = nullptr);
template <typename T>
inline cudaError_t cudaMemcpyToSymbol(T& symbol, const void* src, size_t bytes, size_t offset = 0,
                                      cudaMemcpyKind kind = cudaMemcpyHostToDevice) {
  if (offset + bytes > sizeof(T)) return cudaErrorInvalidValue;
  return cudaMemcpy(reinterpret_cast<unsigned char*>(&symbol) + offset, src, bytes, kind);
}
template <typename T>
inline cudaError_t cudaMemcpyFromSymbol(void* dst, const T& symbol, size_t bytes, size_t offset = 0,
                                        cudaMemcpyKind kind = cudaMemcpyDeviceToHost) {
  if (offset + bytes > sizeof(T)) return cudaErrorInvalidValue;
  return cudaMemcpy(dst, reinterpret_cast<const unsigned char*>(&symbol) + offset, bytes, kind);
}
cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes);
cudaError_t cudaStreamCreate(cudaStream_t* stream);
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned int flags);
cudaError_t cudaStreamDestroy(cudaStream_t stream);
cudaError_t cudaStreamSynchronize(cudaStream_t stream);
cudaError_t cudaStreamQuery(cudaStream_t stream);
cudaError_t cudaLaunchHostFunc(cudaStream_t stream, cudaHostFn_t fn, void* user_data);
cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned int flags = 0);
cudaError_t cudaEventCreate(cudaEvent_t* event);
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned int flags);
cudaError_t cudaEventDestroy(cudaEvent_t event);
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream = nullptr);
cudaError_t cudaEventSynchronize(cudaEvent_t event);
cudaError_t cudaEventQuery(cudaEvent_t event);
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end);
cudaError_t cudaDeviceSynchronize();
cudaError_t cudaDeviceReset();
cudaError_t cudaGetDeviceCount(int* count);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device);
// Device memory (cudaMalloc), pinned host memory (cudaMallocHost / cudaHostAlloc) or neither
// (cudaMemoryTypeUnregistered, device -2), interior pointers included, as in CUDA 11 and later.
cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* attr, const void* ptr);
cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value);
// Stream capture and graphs (see "Stream capture and graphs" at the top).
cudaError_t cudaStreamBeginCapture(cudaStream_t stream, cudaStreamCaptureMode mode);
cudaError_t cudaStreamEndCapture(cudaStream_t stream, cudaGraph_t* graph);
cudaError_t cudaStreamIsCapturing(cudaStream_t stream, cudaStreamCaptureStatus* status);
cudaError_t cudaThreadExchangeStreamCaptureMode(cudaStreamCaptureMode* mode);
cudaError_t cudaGraphInstantiate(cudaGraphExec_t* exec, cudaGraph_t graph,
                                 unsigned long long flags = 0);
cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t stream);
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec);
cudaError_t cudaGraphDestroy(cudaGraph_t graph);
template <typename T>
inline cudaError_t cudaFuncSetAttribute(T* func, cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(func), attr, value);
}

// ------------------------------------------------------------------------------------------------
// The simulator's own API
// ------------------------------------------------------------------------------------------------
namespace simt {

// Every error the simulator detects (deadlock, divergent collective, bad launch, ...).
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The order in which ready threads (and blocks) run.
class Schedule {
 public:
  enum class Kind { Forward, Reverse, Random };
  static Schedule forward() { return Schedule(Kind::Forward, 0); }
  static Schedule reverse() { return Schedule(Kind::Reverse, 0); }
  static Schedule random(std::uint64_t seed) { return Schedule(Kind::Random, seed); }
  Kind kind() const { return kind_; }
  std::uint64_t seed() const { return seed_; }
  std::string name() const;  // "forward", "reverse", "random(7)"
  // Parses "forward", "reverse", "random" (seed 0) or "random:SEED"; throws simt::Error otherwise.
  static Schedule parse(const std::string& text);

 private:
  Schedule(Kind kind, std::uint64_t seed) : kind_(kind), seed_(seed) {}
  Kind kind_;
  std::uint64_t seed_;
};

// The schedule used by every later launch (process-wide; the initial one is forward, or the value
// of the environment variable MOETRAIN_SIMT_SCHEDULE). A random schedule's generator is re-seeded
// by each set_schedule, so a test is reproducible.
void set_schedule(const Schedule& schedule);
Schedule schedule();
// forward, reverse, random(1), random(2): what kernel tests loop over.
std::vector<Schedule> standard_schedules();

// Sets a schedule for a scope and restores the previous one.
class ScopedSchedule {
 public:
  explicit ScopedSchedule(const Schedule& s) : previous_(schedule()) { set_schedule(s); }
  ~ScopedSchedule() { set_schedule(previous_); }
  ScopedSchedule(const ScopedSchedule&) = delete;
  ScopedSchedule& operator=(const ScopedSchedule&) = delete;

 private:
  Schedule previous_;
};

// When the work enqueued on streams runs (process-wide; the initial one is eager, or the value of
// the environment variable MOETRAIN_SIMT_STREAMS=eager|deferred):
//   eager     every kernel, async copy and memset runs when it is enqueued (a GPU that is always
//             done before the host looks);
//   deferred  work runs only when something orders it before the host goes on: a synchronize of
//             its stream (or of a stream or event that waits for it), cudaDeviceSynchronize, a
//             blocking copy on the legacy stream (which waits for the blocking streams' work, not
//             for the non-blocking streams'), cudaFree, a query. As late as CUDA's rules allow, so
//             a missing event or sync reads data that are not written yet.
// Switching drains all pending work first (errors of kernels it runs are thrown there).
enum class StreamSchedule { Eager, Deferred };
void set_stream_schedule(StreamSchedule schedule);
StreamSchedule stream_schedule();
std::string name(StreamSchedule schedule);  // "eager", "deferred"
// Parses "eager" or "deferred"; throws simt::Error otherwise.
StreamSchedule parse_stream_schedule(const std::string& text);
// Eager and deferred: what tests of host code that uses streams loop over.
std::vector<StreamSchedule> stream_schedules();

// Sets a stream schedule for a scope and restores the previous one.
class ScopedStreamSchedule {
 public:
  explicit ScopedStreamSchedule(StreamSchedule s) : previous_(stream_schedule()) {
    set_stream_schedule(s);
  }
  // Drains pending work; an error it raises is printed (a destructor must not throw).
  ~ScopedStreamSchedule();
  ScopedStreamSchedule(const ScopedStreamSchedule&) = delete;
  ScopedStreamSchedule& operator=(const ScopedStreamSchedule&) = delete;

 private:
  StreamSchedule previous_;
};

// Enqueues host work on a stream, in order with its kernels and copies (what a library call such
// as a cuBLAS GEMM is in the simulator build). `fn` must not call the CUDA runtime. On a capturing
// stream `fn` is recorded and runs at every launch of the graph (it is called, never moved from);
// where the capture forbids the work (an invalidated capture, the legacy stream while a blocking
// stream captures) it throws simt::Error naming the CUDA error.
void enqueue_host(cudaStream_t stream, std::function<void()> fn);
// Work items enqueued and not run yet, over all streams.
std::size_t pending_work();
// A planted fault: of the next calls of cudaStreamWaitEvent outside a capture, the `skip` first
// work as usual and the n after them return cudaSuccess and order nothing, so a test can show
// that the code under test needs that event (under the deferred schedule the waiting stream's work
// then runs before what it should wait for). n = 0 cancels.
void drop_event_waits(std::size_t n, std::size_t skip = 0);

// The simulated machine's GPUs: 1, or the value of the environment variable MOETRAIN_SIMT_DEVICES
// (1 to 64), read once. They share one memory and one set of streams; only cudaSetDevice /
// cudaGetDevice (per host thread) and the checks of a device number tell them apart, which is what
// host code that picks a GPU per rank needs.
int device_count();
// Bytes from `ptr` to the end of the cudaMalloc allocation that holds it; 0 if none does.
std::size_t device_extent(const void* ptr);

// Calls that make the host wait for the device: cudaStreamSynchronize, cudaEventSynchronize,
// cudaDeviceSynchronize, cudaFree / cudaFreeHost (an implicit device synchronize), and blocking
// copies (cudaMemcpy / cudaMemcpy2D other than device to device, cudaMemcpyToSymbol /
// FromSymbol), whatever the stream schedule; not one that a stream capture made fail (it did not
// wait), nor cudaGraphLaunch (asynchronous, like any launch).
std::uint64_t sync_count();
void reset_sync_count();

struct Stats {
  std::uint64_t launches = 0;  // kernel launches run (a graph's kernels at each of its launches)
  std::uint64_t blocks = 0;
  std::uint64_t threads = 0;   // thread instances run
  std::uint64_t switches = 0;  // fiber context switches
  // enqueue_host items enqueued (the simulator build's GEMMs): a call outside a capture, and each
  // launch of a graph its captured items (a captured call counts in captured_nodes instead).
  std::uint64_t host_items = 0;
  std::uint64_t graph_launches = 0;  // cudaGraphLaunch calls that enqueued a graph (not captured)
  std::uint64_t captured_nodes = 0;  // work items recorded by stream captures instead of enqueued
};
Stats stats();
void reset_stats();

// Largest dynamic shared memory a launch may ask for (sm_80: 163 KiB per block).
inline constexpr std::size_t kMaxDynamicSmem = 163 * 1024;

namespace detail {
// Built-in variables of the running thread/block (plain globals: one launch at a time; threadIdx is
// rewritten at every fiber switch, and switches happen only inside the out-of-line functions
// below).
extern uint3 g_thread_idx;
extern uint3 g_block_idx;
extern uint3 g_block_dim;
extern uint3 g_grid_dim;
extern unsigned char* g_dynamic_smem;

enum class Op : std::uint8_t {
  ShflIdx,
  ShflUp,
  ShflDown,
  ShflXor,
  Ballot,
  Any,
  All,
  SyncWarp,
  ReduceAdd,
  ReduceMinU,
  ReduceMaxU,
  ReduceMinI,
  ReduceMaxI,
  ReduceAnd,
  ReduceOr,
  ReduceXor,
  Aligned,  // a .sync.aligned instruction (warp_aligned below)
};
// Blocks the calling thread until every lane of `mask` calls the same collective; returns this
// lane's result (the 64-bit pattern of the value read, or the ballot/reduction).
std::uint64_t warp_collective(Op op, unsigned int mask, std::uint64_t value, int arg, int width);
enum class Barrier : std::uint8_t { Sync, Count, And, Or };
int block_barrier(Barrier kind, int predicate);
unsigned int active_mask();

// Warp-synchronous instructions of PTX's .sync.aligned kind (mma.sync, ldmatrix: kernels/mma.cuh).
// All 32 lanes of the warp must execute the same instruction: the same AlignedOp, called from the
// same source location (PTX: "all threads in the warp must execute the same instruction"; two call
// sites in the branches of a lane-dependent condition are two instructions). `data` is the calling
// lane's operand block; when the last lane arrives, `op.exec` runs once, on that lane's fiber, with
// the 32 lanes' blocks indexed by lane: it reads every lane's operands before it writes any
// result, since a lane's outputs may alias its inputs. Errors (simt::Error): a warp with fewer than
// 32 threads or an exited lane, lanes executing different instructions, a lane exiting while
// others wait, deadlocks.
struct AlignedOp {
  const char* name;                  // the PTX instruction, for messages
  void (*exec)(void* const* lanes);  // lanes[0..31]: each lane's `data`
};
struct CallSite {
  const char* file;
  unsigned line;
  unsigned column;
};
void warp_aligned(const AlignedOp& op, void* data, const CallSite& site);
// For an AlignedOp's exec: throws simt::Error naming the kernel, block and the thread of `lane` in
// the running warp, followed by `what` (e.g. "gives ldmatrix ... a misaligned row address").
[[noreturn]] void lane_error(unsigned lane, const std::string& what);
// Whether [p, p + bytes) lies in the running block's shared memory: its dynamic shared memory, or
// the executable's static TLS block, which holds the static __shared__ arrays (and any other
// thread_local of the executable: the simulator cannot tell those apart). Global (cudaMalloc) and
// local (stack) memory are not shared.
bool in_shared(const void* p, std::size_t bytes);

template <typename T>
inline T shfl(Op op, unsigned int mask, T var, int arg, int width) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8,
                "shuffle of an unsupported type");
  std::uint64_t in = 0;
  std::memcpy(&in, &var, sizeof(T));
  const std::uint64_t out = warp_collective(op, mask, in, arg, width);
  T r;
  std::memcpy(&r, &out, sizeof(T));
  return r;
}

struct LaunchDesc {
  const void* kernel;  // for messages
  dim3 grid;
  dim3 block;
  std::size_t smem_bytes;
  void (*invoke)(void* ctx);  // runs the kernel body for the current thread
  void* ctx;
};
void run_launch(const LaunchDesc& desc);
// Checks the configuration of `probe` (kernel, grid, block, smem_bytes) and enqueues `run` on
// `stream` (a kernel launch, in order with the stream's other work), or records it when `stream`
// captures (then `run` runs at every launch of the graph). Throws simt::Error for a bad
// configuration (invalidating the stream's capture) and for a launch the capture forbids (naming
// the CUDA error, which the CUDA build's launch() throws as well).
void enqueue_launch(const LaunchDesc& probe, cudaStream_t stream, std::function<void()> run);
}  // namespace detail

// Enqueues kernel<<<grid, block, smem_bytes, stream>>>(args...) on `stream`: the configuration is
// checked now; the kernel runs on the calling thread now (eager stream schedule) or when something
// orders it (deferred), or, on a capturing stream, at every launch of the graph. Arguments are
// converted to the kernel's parameter types once, at the call; every thread of every run gets a
// copy.
template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, std::size_t smem_bytes,
            cudaStream_t stream, Args&&... args) {
  static_assert(sizeof...(KArgs) == sizeof...(Args),
                "simt::launch: wrong number of kernel arguments");
  using Params = std::tuple<std::decay_t<KArgs>...>;
  struct Ctx {
    void (*kernel)(KArgs...);
    Params params;
  };
  const detail::LaunchDesc probe{
      reinterpret_cast<const void*>(kernel), grid, block, smem_bytes, nullptr, nullptr};
  detail::enqueue_launch(probe, stream,
                         [probe, ctx = Ctx{kernel, Params(std::forward<Args>(args)...)}]() mutable {
                           detail::LaunchDesc desc = probe;
                           desc.invoke = [](void* c) {
                             Ctx* x = static_cast<Ctx*>(c);
                             std::apply(x->kernel, x->params);
                           };
                           desc.ctx = &ctx;
                           detail::run_launch(desc);
                         });
}

// The dynamic shared memory of the running launch (common.cuh's dynamic_smem<T>() uses it).
inline void* dynamic_smem() {
  return detail::g_dynamic_smem;
}

}  // namespace simt

// ------------------------------------------------------------------------------------------------
// Built-in variables
// ------------------------------------------------------------------------------------------------
#define threadIdx (static_cast<const uint3&>(::simt::detail::g_thread_idx))
#define blockIdx (static_cast<const uint3&>(::simt::detail::g_block_idx))
#define blockDim (static_cast<const uint3&>(::simt::detail::g_block_dim))
#define gridDim (static_cast<const uint3&>(::simt::detail::g_grid_dim))
inline constexpr int warpSize = 32;

// ------------------------------------------------------------------------------------------------
// Barriers and warp collectives
// ------------------------------------------------------------------------------------------------
inline void __syncthreads() {
  simt::detail::block_barrier(simt::detail::Barrier::Sync, 1);
}
inline int __syncthreads_count(int p) {
  return simt::detail::block_barrier(simt::detail::Barrier::Count, p);
}
inline int __syncthreads_and(int p) {
  return simt::detail::block_barrier(simt::detail::Barrier::And, p);
}
inline int __syncthreads_or(int p) {
  return simt::detail::block_barrier(simt::detail::Barrier::Or, p);
}
inline void __syncwarp(unsigned int mask = 0xffffffffu) {
  simt::detail::warp_collective(simt::detail::Op::SyncWarp, mask, 0, 0, 32);
}
inline unsigned int __activemask() {
  return simt::detail::active_mask();
}

#define SIMT_SHFL_OVERLOADS(T)                                                                    \
  inline T __shfl_sync(unsigned int mask, T var, int src_lane, int width = warpSize) {            \
    return simt::detail::shfl(simt::detail::Op::ShflIdx, mask, var, src_lane, width);             \
  }                                                                                               \
  inline T __shfl_up_sync(unsigned int mask, T var, unsigned int delta, int width = warpSize) {   \
    return simt::detail::shfl(simt::detail::Op::ShflUp, mask, var, static_cast<int>(delta),       \
                              width);                                                             \
  }                                                                                               \
  inline T __shfl_down_sync(unsigned int mask, T var, unsigned int delta, int width = warpSize) { \
    return simt::detail::shfl(simt::detail::Op::ShflDown, mask, var, static_cast<int>(delta),     \
                              width);                                                             \
  }                                                                                               \
  inline T __shfl_xor_sync(unsigned int mask, T var, int lane_mask, int width = warpSize) {       \
    return simt::detail::shfl(simt::detail::Op::ShflXor, mask, var, lane_mask, width);            \
  }
SIMT_SHFL_OVERLOADS(int)
SIMT_SHFL_OVERLOADS(unsigned int)
SIMT_SHFL_OVERLOADS(long)
SIMT_SHFL_OVERLOADS(unsigned long)
SIMT_SHFL_OVERLOADS(long long)
SIMT_SHFL_OVERLOADS(unsigned long long)
SIMT_SHFL_OVERLOADS(float)
SIMT_SHFL_OVERLOADS(double)
SIMT_SHFL_OVERLOADS(__nv_bfloat16)
SIMT_SHFL_OVERLOADS(__nv_bfloat162)
#undef SIMT_SHFL_OVERLOADS

inline unsigned int __ballot_sync(unsigned int mask, int predicate) {
  return static_cast<unsigned int>(
      simt::detail::warp_collective(simt::detail::Op::Ballot, mask, predicate != 0, 0, 32));
}
inline int __any_sync(unsigned int mask, int predicate) {
  return static_cast<int>(
      simt::detail::warp_collective(simt::detail::Op::Any, mask, predicate != 0, 0, 32));
}
inline int __all_sync(unsigned int mask, int predicate) {
  return static_cast<int>(
      simt::detail::warp_collective(simt::detail::Op::All, mask, predicate != 0, 0, 32));
}
inline unsigned int __reduce_add_sync(unsigned int mask, unsigned int v) {
  return static_cast<unsigned int>(
      simt::detail::warp_collective(simt::detail::Op::ReduceAdd, mask, v, 0, 32));
}
inline int __reduce_add_sync(unsigned int mask, int v) {
  return static_cast<int>(simt::detail::warp_collective(simt::detail::Op::ReduceAdd, mask,
                                                        static_cast<unsigned int>(v), 0, 32));
}
inline unsigned int __reduce_min_sync(unsigned int mask, unsigned int v) {
  return static_cast<unsigned int>(
      simt::detail::warp_collective(simt::detail::Op::ReduceMinU, mask, v, 0, 32));
}
inline unsigned int __reduce_max_sync(unsigned int mask, unsigned int v) {
  return static_cast<unsigned int>(
      simt::detail::warp_collective(simt::detail::Op::ReduceMaxU, mask, v, 0, 32));
}
inline int __reduce_min_sync(unsigned int mask, int v) {
  return static_cast<int>(simt::detail::warp_collective(simt::detail::Op::ReduceMinI, mask,
                                                        static_cast<unsigned int>(v), 0, 32));
}
inline int __reduce_max_sync(unsigned int mask, int v) {
  return static_cast<int>(simt::detail::warp_collective(simt::detail::Op::ReduceMaxI, mask,
                                                        static_cast<unsigned int>(v), 0, 32));
}
inline unsigned int __reduce_and_sync(unsigned int mask, unsigned int v) {
  return static_cast<unsigned int>(
      simt::detail::warp_collective(simt::detail::Op::ReduceAnd, mask, v, 0, 32));
}
inline unsigned int __reduce_or_sync(unsigned int mask, unsigned int v) {
  return static_cast<unsigned int>(
      simt::detail::warp_collective(simt::detail::Op::ReduceOr, mask, v, 0, 32));
}
inline unsigned int __reduce_xor_sync(unsigned int mask, unsigned int v) {
  return static_cast<unsigned int>(
      simt::detail::warp_collective(simt::detail::Op::ReduceXor, mask, v, 0, 32));
}

// ------------------------------------------------------------------------------------------------
// Atomics (std::atomic_ref; also valid on __shared__ memory)
// ------------------------------------------------------------------------------------------------
namespace simt::detail {
template <typename T>
inline std::atomic_ref<T> aref(T* p) {
  return std::atomic_ref<T>(*p);
}
template <typename T, typename F>
inline T atomic_update(T* p, F f) {
  std::atomic_ref<T> a(*p);
  T old = a.load(std::memory_order_relaxed);
  while (!a.compare_exchange_weak(old, f(old), std::memory_order_relaxed)) {
  }
  return old;
}
}  // namespace simt::detail

#define SIMT_ATOMIC_INT(T)                                                                \
  inline T atomicAdd(T* p, T v) {                                                         \
    return simt::detail::aref(p).fetch_add(v, std::memory_order_relaxed);                 \
  }                                                                                       \
  inline T atomicSub(T* p, T v) {                                                         \
    return simt::detail::aref(p).fetch_sub(v, std::memory_order_relaxed);                 \
  }                                                                                       \
  inline T atomicAnd(T* p, T v) {                                                         \
    return simt::detail::aref(p).fetch_and(v, std::memory_order_relaxed);                 \
  }                                                                                       \
  inline T atomicOr(T* p, T v) {                                                          \
    return simt::detail::aref(p).fetch_or(v, std::memory_order_relaxed);                  \
  }                                                                                       \
  inline T atomicXor(T* p, T v) {                                                         \
    return simt::detail::aref(p).fetch_xor(v, std::memory_order_relaxed);                 \
  }                                                                                       \
  inline T atomicExch(T* p, T v) {                                                        \
    return simt::detail::aref(p).exchange(v, std::memory_order_relaxed);                  \
  }                                                                                       \
  inline T atomicMax(T* p, T v) {                                                         \
    return simt::detail::atomic_update(p, [v](T o) { return o > v ? o : v; });            \
  }                                                                                       \
  inline T atomicMin(T* p, T v) {                                                         \
    return simt::detail::atomic_update(p, [v](T o) { return o < v ? o : v; });            \
  }                                                                                       \
  inline T atomicCAS(T* p, T compare, T v) {                                              \
    simt::detail::aref(p).compare_exchange_strong(compare, v, std::memory_order_relaxed); \
    return compare;                                                                       \
  }
SIMT_ATOMIC_INT(int)
SIMT_ATOMIC_INT(unsigned int)
SIMT_ATOMIC_INT(unsigned long long)
SIMT_ATOMIC_INT(long long)
#undef SIMT_ATOMIC_INT
inline unsigned short atomicCAS(unsigned short* p, unsigned short compare, unsigned short v) {
  simt::detail::aref(p).compare_exchange_strong(compare, v, std::memory_order_relaxed);
  return compare;
}
inline float atomicAdd(float* p, float v) {
  return simt::detail::aref(p).fetch_add(v, std::memory_order_relaxed);
}
inline double atomicAdd(double* p, double v) {
  return simt::detail::aref(p).fetch_add(v, std::memory_order_relaxed);
}
inline float atomicExch(float* p, float v) {
  return simt::detail::aref(p).exchange(v, std::memory_order_relaxed);
}
inline unsigned int atomicInc(unsigned int* p, unsigned int limit) {
  return simt::detail::atomic_update(p,
                                     [limit](unsigned int o) { return o >= limit ? 0u : o + 1u; });
}
inline unsigned int atomicDec(unsigned int* p, unsigned int limit) {
  return simt::detail::atomic_update(
      p, [limit](unsigned int o) { return (o == 0u || o > limit) ? limit : o - 1u; });
}
inline __nv_bfloat16 atomicAdd(__nv_bfloat16* p, __nv_bfloat16 v) {
  unsigned short* bits = &p->__x;
  const unsigned short old = simt::detail::atomic_update(bits, [v](unsigned short o) {
    return __bfloat16_as_ushort(__hadd(__ushort_as_bfloat16(o), v));
  });
  return __ushort_as_bfloat16(old);
}
inline __nv_bfloat162 atomicAdd(__nv_bfloat162* p, __nv_bfloat162 v) {
  return {atomicAdd(&p->x, v.x), atomicAdd(&p->y, v.y)};
}
