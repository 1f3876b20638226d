// tests/simt/simt.cpp — the SIMT simulator's runtime: fibers, schedules, barriers, warp
// collectives, launch and the CUDA runtime API subset. See simt.hpp for the model.
#include "simt.hpp"

#include <cxxabi.h>
#include <dlfcn.h>
#include <link.h>
#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <deque>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <sstream>
#include <thread>
#include <unordered_map>

#if defined(__SANITIZE_ADDRESS__)
#define SIMT_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SIMT_ASAN 1
#endif
#endif
#if defined(SIMT_ASAN)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#if !defined(__x86_64__) && !defined(SIMT_USE_UCONTEXT)
#define SIMT_USE_UCONTEXT 1
#endif
#if defined(SIMT_USE_UCONTEXT)
#include <ucontext.h>
#endif

namespace simt::detail {
uint3 g_thread_idx{0, 0, 0};
uint3 g_block_idx{0, 0, 0};
uint3 g_block_dim{1, 1, 1};
uint3 g_grid_dim{1, 1, 1};
unsigned char* g_dynamic_smem = nullptr;
}  // namespace simt::detail

// ------------------------------------------------------------------------------------------------
// Context switch. x86-64: saves the callee-saved registers on the old stack, swaps stack pointers.
// A new context starts in simt_ctx_trampoline with the entry function in r13 and its argument in
// r12.
// ------------------------------------------------------------------------------------------------
#if !defined(SIMT_USE_UCONTEXT)
extern "C" void simt_ctx_switch(void** save_sp, void* new_sp);
extern "C" void simt_ctx_trampoline();
asm(R"(
  .text
  .globl simt_ctx_switch
  .type simt_ctx_switch, @function
  .p2align 4
simt_ctx_switch:
  .cfi_startproc
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .cfi_endproc
  .size simt_ctx_switch, .-simt_ctx_switch

  .globl simt_ctx_trampoline
  .type simt_ctx_trampoline, @function
  .p2align 4
simt_ctx_trampoline:
  .cfi_startproc
  .cfi_undefined rip
  movq %r12, %rdi
  callq *%r13
  ud2
  .cfi_endproc
  .size simt_ctx_trampoline, .-simt_ctx_trampoline
)");
#endif

// The scheduler core is exempt from ASan instrumentation (it is hot, and kernels are what ASan is
// here for); error messages are built in cold functions, out of the hot frames.
#if defined(SIMT_ASAN)
#define SIMT_HOT __attribute__((no_sanitize_address))
#else
#define SIMT_HOT
#endif
#define SIMT_COLD __attribute__((noinline, cold))

namespace {

using simt::Schedule;
using simt::detail::AlignedOp;
using simt::detail::Barrier;
using simt::detail::CallSite;
using simt::detail::LaunchDesc;
using simt::detail::Op;

// ------------------------------------------------------------------------------------------------
// Contexts and fibers
// ------------------------------------------------------------------------------------------------
struct Context {
#if defined(SIMT_USE_UCONTEXT)
  ucontext_t uc;
#else
  void* sp = nullptr;
#endif
  const void* stack_bottom = nullptr;  // for ASan: lowest address and size of the stack
  size_t stack_size = 0;
  void* fake_stack = nullptr;  // ASan's fake stack of this context while it is switched out
};

enum class State : std::uint8_t { Ready, AtBarrier, AtWarp, Exited };

constexpr size_t kStackSize = 256 * 1024;  // reserved per fiber; pages are touched on demand
constexpr size_t kGuardSize = 16 * 1024;   // PROT_NONE below the stack: an overflow faults
constexpr int kMaxThreads = 1024;

struct Fiber {
  Context ctx;
  void* map = nullptr;
  bool needs_init = true;
  // The simulated thread it runs in the current block.
  uint3 tid{0, 0, 0};
  unsigned linear = 0;
  unsigned lane = 0;
  unsigned warp = 0;
  State state = State::Ready;
  Op op = Op::SyncWarp;   // collective it waits in (State::AtWarp)
  std::uint64_t in = 0;   // collective: this lane's value
  std::uint64_t out = 0;  // collective/barrier: this lane's result
  int arg = 0;            // collective: source lane / delta / lane mask
  void* data = nullptr;   // Op::Aligned: this lane's operand block
  int pred = 0;           // barrier predicate
};

struct Pending {  // a warp collective some lanes wait in
  Op op;
  unsigned mask;
  unsigned arrived;
  int width;
  const AlignedOp* aligned;  // Op::Aligned: the instruction and where the first lane called it
  CallSite site;
};

constexpr unsigned kAllLanes = 0xffffffffu;

struct Warp {
  unsigned exists = 0;  // lanes that exist in this block
  unsigned exited = 0;  // lanes that have returned
  int npending = 0;
  Pending pending[32];
};

// The state of the running launch and block.
struct Run {
  const LaunchDesc* desc = nullptr;
  unsigned nthreads = 0;
  unsigned nwarps = 0;
  uint3 block{0, 0, 0};
  Schedule::Kind kind = Schedule::Kind::Forward;
  // forward/reverse: the current round and the next one as bitsets over linear thread indices
  std::uint64_t cur[kMaxThreads / 64];
  std::uint64_t next[kMaxThreads / 64];
  int cur_count = 0;
  int next_count = 0;
  int cursor = 0;  // word index of the scan in `cur`
  // random: the ready threads
  unsigned ready[kMaxThreads];
  unsigned nready = 0;
  // the fibers running the block's threads, by linear thread index
  Fiber* fibers[kMaxThreads];
  // barrier
  unsigned bar_count = 0;
  Barrier bar_kind = Barrier::Sync;
  unsigned n_exited = 0;
  int first_exited = -1;
  int first_at_barrier = -1;
  Warp warps[kMaxThreads / 32];
  // the executable's static TLS block (the static __shared__ arrays), for in_shared()
  const unsigned char* tls_data = nullptr;
  size_t tls_size = 0;
  // error raised inside a fiber
  std::exception_ptr error;
  bool aborted = false;
};

Context g_main;                   // the launching thread's own context
Context* g_switch_src = nullptr;  // the context that switched to the running one
Fiber* g_cur = nullptr;           // running fiber (nullptr: the scheduler)
std::vector<std::unique_ptr<Fiber>> g_fibers;
Run g_run;
std::atomic<bool> g_in_launch{false};  // with g_launch_owner: detects a launch from inside a kernel
pthread_t g_launch_owner{};

std::mutex g_launch_mutex;
std::mutex g_settings_mutex;
Schedule g_schedule = Schedule::forward();
std::uint64_t g_rng = 0;  // random schedule state (advanced under g_launch_mutex)
simt::Stats g_stats;
std::atomic<int> g_last_error{cudaSuccess};

// ------------------------------------------------------------------------------------------------
// Random numbers (splitmix64)
// ------------------------------------------------------------------------------------------------
SIMT_HOT inline std::uint64_t next_random() {
  std::uint64_t z = (g_rng += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
SIMT_HOT inline unsigned random_below(unsigned n) {
  return static_cast<unsigned>((static_cast<unsigned __int128>(next_random()) * n) >> 64);
}

// ------------------------------------------------------------------------------------------------
// Names for messages
// ------------------------------------------------------------------------------------------------
std::string kernel_name(const void* fn) {
  Dl_info info{};
  if (dladdr(fn, &info) && info.dli_sname && info.dli_saddr == fn) {
    int status = 0;
    char* d = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
    std::string s = (status == 0 && d) ? d : info.dli_sname;
    std::free(d);
    return s;
  }
#if defined(SIMT_ASAN)
  char buf[512] = {0};
  __sanitizer_symbolize_pc(const_cast<void*>(fn), "%f", buf, sizeof buf);
  if (buf[0] && std::string(buf) != "??") {
    int status = 0;
    char* d = abi::__cxa_demangle(buf, nullptr, nullptr, &status);
    std::string s = (status == 0 && d) ? d : buf;
    std::free(d);
    return s;
  }
#endif
  std::ostringstream os;
  os << "kernel@" << fn;
  return os.str();
}

std::string dim_str(uint3 v) {
  std::ostringstream os;
  os << "(" << v.x << "," << v.y << "," << v.z << ")";
  return os.str();
}

std::string where() {
  return "kernel '" + kernel_name(g_run.desc->kernel) + "' block " + dim_str(g_run.block);
}

std::string thread_str(const Fiber& f) {
  std::ostringstream os;
  os << "thread " << dim_str(f.tid) << " (warp " << f.warp << " lane " << f.lane << ")";
  return os.str();
}

std::string hex(unsigned v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", v);
  return buf;
}

const char* op_name(Op op) {
  switch (op) {
    case Op::ShflIdx:
      return "__shfl_sync";
    case Op::ShflUp:
      return "__shfl_up_sync";
    case Op::ShflDown:
      return "__shfl_down_sync";
    case Op::ShflXor:
      return "__shfl_xor_sync";
    case Op::Ballot:
      return "__ballot_sync";
    case Op::Any:
      return "__any_sync";
    case Op::All:
      return "__all_sync";
    case Op::SyncWarp:
      return "__syncwarp";
    case Op::ReduceAdd:
      return "__reduce_add_sync";
    case Op::ReduceMinU:
      return "__reduce_min_sync(unsigned)";
    case Op::ReduceMaxU:
      return "__reduce_max_sync(unsigned)";
    case Op::ReduceMinI:
      return "__reduce_min_sync(int)";
    case Op::ReduceMaxI:
      return "__reduce_max_sync(int)";
    case Op::ReduceAnd:
      return "__reduce_and_sync";
    case Op::ReduceOr:
      return "__reduce_or_sync";
    case Op::ReduceXor:
      return "__reduce_xor_sync";
    case Op::Aligned:
      return "a .sync.aligned instruction";
  }
  return "?";
}

// "file:line:column" of a call site, the file without its directories.
std::string site_str(const CallSite& site) {
  const char* file = site.file ? site.file : "?";
  if (const char* slash = std::strrchr(file, '/')) file = slash + 1;
  return std::string(file) + ":" + std::to_string(site.line) + ":" + std::to_string(site.column);
}

// What lanes wait in: the collective's name, or the aligned instruction and its call site.
std::string pending_name(const Pending& p) {
  if (p.op == Op::Aligned) return std::string(p.aligned->name) + " at " + site_str(p.site);
  return op_name(p.op);
}

const char* barrier_name(Barrier b) {
  switch (b) {
    case Barrier::Sync:
      return "__syncthreads";
    case Barrier::Count:
      return "__syncthreads_count";
    case Barrier::And:
      return "__syncthreads_and";
    case Barrier::Or:
      return "__syncthreads_or";
  }
  return "?";
}

std::string lanes_str(unsigned mask) {
  std::ostringstream os;
  bool first = true;
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    int e = l;
    while (e + 1 < 32 && (mask >> (e + 1) & 1u)) ++e;
    os << (first ? "" : ",") << l;
    if (e > l) os << "-" << e;
    first = false;
    l = e;
  }
  return os.str();
}

[[noreturn]] SIMT_COLD void fail(const std::string& msg) {
  throw simt::Error("simt: " + where() + ": " + msg);
}

// ------------------------------------------------------------------------------------------------
// Fiber switching
// ------------------------------------------------------------------------------------------------
void fiber_entry(Fiber* self);

#if defined(SIMT_USE_UCONTEXT)
void ucontext_entry(unsigned lo, unsigned hi) {
  fiber_entry(reinterpret_cast<Fiber*>(static_cast<std::uintptr_t>(lo) |
                                       (static_cast<std::uintptr_t>(hi) << 32)));
}
#endif

void fiber_create(Fiber* f) {
  const size_t total = kStackSize + kGuardSize;
  void* m = mmap(nullptr, total, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) throw simt::Error("simt: cannot map a fiber stack");
  mprotect(m, kGuardSize, PROT_NONE);
  f->map = m;
  f->ctx.stack_bottom = static_cast<char*>(m) + kGuardSize;
  f->ctx.stack_size = kStackSize;
  f->needs_init = true;
}

// (Re)starts the fiber at fiber_entry with an empty stack.
void fiber_init(Fiber* f) {
  char* lo = static_cast<char*>(const_cast<void*>(f->ctx.stack_bottom));
#if defined(SIMT_ASAN)
  // A fiber abandoned after an error leaves poisoned redzones on its stack.
  __asan_unpoison_memory_region(lo, f->ctx.stack_size);
#endif
  f->ctx.fake_stack = nullptr;
#if defined(SIMT_USE_UCONTEXT)
  getcontext(&f->ctx.uc);
  f->ctx.uc.uc_stack.ss_sp = lo;
  f->ctx.uc.uc_stack.ss_size = f->ctx.stack_size;
  f->ctx.uc.uc_link = nullptr;
  const auto p = reinterpret_cast<std::uintptr_t>(f);
  makecontext(&f->ctx.uc, reinterpret_cast<void (*)()>(&ucontext_entry), 2,
              static_cast<unsigned>(p), static_cast<unsigned>(p >> 32));
#else
  void** sp = reinterpret_cast<void**>(lo + f->ctx.stack_size);  // 16-byte aligned (page aligned)
  *--sp = nullptr;                                               // padding
  *--sp = nullptr;                                               // end of the frame chain
  *--sp = reinterpret_cast<void*>(&simt_ctx_trampoline);         // ret target
  *--sp = nullptr;                                               // rbp
  *--sp = nullptr;                                               // rbx
  *--sp = f;                                                     // r12: argument
  *--sp = reinterpret_cast<void*>(&fiber_entry);                 // r13: entry
  *--sp = nullptr;                                               // r14
  *--sp = nullptr;                                               // r15
  f->ctx.sp = sp;  // after 6 pops and ret, rsp % 16 == 0 at the trampoline's call
#endif
  f->needs_init = false;
}

#if defined(SIMT_ASAN)
SIMT_HOT inline void after_switch(Context* self) {
  const void* bottom = nullptr;
  size_t size = 0;
  __sanitizer_finish_switch_fiber(self ? self->fake_stack : nullptr, &bottom, &size);
  if (g_switch_src == &g_main) {  // learn the launching thread's stack, to switch back to it
    g_main.stack_bottom = bottom;
    g_main.stack_size = size;
  }
}
#endif

// Switches from the running context `from` to `to`; returns when something switches back.
SIMT_HOT inline void switch_to(Context* from, Context* to) {
  ++g_stats.switches;
  g_switch_src = from;
#if defined(SIMT_ASAN)
  __sanitizer_start_switch_fiber(&from->fake_stack, to->stack_bottom, to->stack_size);
#endif
#if defined(SIMT_USE_UCONTEXT)
  swapcontext(&from->uc, &to->uc);
#else
  simt_ctx_switch(&from->sp, to->sp);
#endif
#if defined(SIMT_ASAN)
  after_switch(from);
#endif
}

// ------------------------------------------------------------------------------------------------
// Scheduling
// ------------------------------------------------------------------------------------------------
SIMT_HOT inline Fiber* fiber_at(unsigned linear) {
  return g_run.fibers[linear];
}

SIMT_HOT inline void make_ready(unsigned linear) {
  if (g_run.kind == Schedule::Kind::Random) {
    g_run.ready[g_run.nready++] = linear;
  } else {
    g_run.next[linear >> 6] |= 1ull << (linear & 63);
    ++g_run.next_count;
  }
}

// The next thread to run, or nullptr when none is ready (block finished, or stuck).
SIMT_HOT Fiber* pick_next() {
  Run& r = g_run;
  if (r.kind == Schedule::Kind::Random) {
    if (r.nready == 0) return nullptr;
    const unsigned i = random_below(r.nready);
    const unsigned t = r.ready[i];
    r.ready[i] = r.ready[--r.nready];
    return fiber_at(t);
  }
  const int nwords = static_cast<int>((r.nthreads + 63) / 64);
  if (r.cur_count == 0) {
    if (r.next_count == 0) return nullptr;
    std::memcpy(r.cur, r.next, sizeof(std::uint64_t) * nwords);
    std::memset(r.next, 0, sizeof(std::uint64_t) * nwords);
    r.cur_count = r.next_count;
    r.next_count = 0;
    r.cursor = r.kind == Schedule::Kind::Forward ? 0 : nwords - 1;
  }
  --r.cur_count;
  if (r.kind == Schedule::Kind::Forward) {
    while (r.cur[r.cursor] == 0) ++r.cursor;
    const int b = __builtin_ctzll(r.cur[r.cursor]);
    r.cur[r.cursor] &= r.cur[r.cursor] - 1;
    return fiber_at(static_cast<unsigned>(r.cursor * 64 + b));
  }
  while (r.cur[r.cursor] == 0) --r.cursor;
  const int b = 63 - __builtin_clzll(r.cur[r.cursor]);
  r.cur[r.cursor] &= ~(1ull << b);
  return fiber_at(static_cast<unsigned>(r.cursor * 64 + b));
}

// Makes `f` the running thread (built-in variables).
SIMT_HOT inline void enter(Fiber* f) {
  g_cur = f;
  simt::detail::g_thread_idx = f->tid;
}

// The running fiber gives up the processor (it has blocked, or exited); returns when it is resumed.
SIMT_HOT void reschedule() {
  Fiber* self = g_cur;
  Fiber* next = g_run.aborted ? nullptr : pick_next();
  if (next == self) return;
  if (next) {
    enter(next);
    switch_to(&self->ctx, &next->ctx);
  } else {
    g_cur = nullptr;
    switch_to(&self->ctx, &g_main);
  }
}

// Raised inside a fiber: recorded, and the scheduler takes over (the fiber is abandoned, so nothing
// that owns memory may stay on its stack: the exception moves into g_run.error).
[[noreturn]] void abort_from_fiber(std::exception_ptr&& e) {
  if (!g_run.error) g_run.error = std::move(e);
  e = nullptr;
  g_run.aborted = true;
  Fiber* self = g_cur;
  g_cur = nullptr;
  switch_to(&self->ctx, &g_main);
  std::abort();  // never resumed: fibers are re-initialised after an error
}

void thread_exit(Fiber* f) {
  Run& r = g_run;
  f->state = State::Exited;
  ++r.n_exited;
  if (r.first_exited < 0) r.first_exited = static_cast<int>(f->linear);
  Warp& w = r.warps[f->warp];
  w.exited |= 1u << f->lane;
  if (r.bar_count > 0) {
    fail(thread_str(*f) + " exited while " +
         thread_str(*fiber_at(static_cast<unsigned>(r.first_at_barrier))) + " waits at " +
         barrier_name(r.bar_kind) + ": every thread of the block must reach each barrier");
  }
  for (int i = 0; i < w.npending; ++i) {
    const Pending& p = w.pending[i];
    if (p.mask >> f->lane & 1u) {
      fail(thread_str(*f) + " exited while lanes " + lanes_str(p.arrived) +
           " of its warp wait for it in " + pending_name(p) + " (mask " + hex(p.mask) + ")");
    }
  }
}

void fiber_entry(Fiber* self) {
#if defined(SIMT_ASAN)
  after_switch(nullptr);
#endif
  for (;;) {
    std::exception_ptr error;
    try {
      g_run.desc->invoke(g_run.desc->ctx);
      thread_exit(self);
    } catch (...) {
      error = std::current_exception();
    }
    // Leave the handler before switching away: libstdc++ keeps the caught exceptions per OS thread.
    if (error) abort_from_fiber(std::move(error));
    reschedule();  // resumed by the next block that uses this fiber
  }
}

// ------------------------------------------------------------------------------------------------
// Barriers and collectives (called from kernel code, i.e. inside a fiber). The hot paths build no
// strings: every message is made in a cold function.
// ------------------------------------------------------------------------------------------------
[[noreturn]] SIMT_COLD void outside_kernel(const char* what) {
  throw simt::Error(std::string("simt: ") + what + " called outside a kernel");
}

[[noreturn]] SIMT_COLD void bad_barrier(const Fiber* f, Barrier kind) {
  const Run& r = g_run;
  if (r.n_exited > 0) {
    fail(thread_str(*f) + " waits at " + barrier_name(kind) + " but " +
         thread_str(*fiber_at(static_cast<unsigned>(r.first_exited))) +
         " has exited: every thread of the block must reach each barrier");
  }
  fail(thread_str(*f) + " calls " + barrier_name(kind) + " while " +
       thread_str(*fiber_at(static_cast<unsigned>(r.first_at_barrier))) + " waits at " +
       barrier_name(r.bar_kind));
}

SIMT_HOT int barrier(Barrier kind, int predicate) {
  Fiber* f = g_cur;
  if (!f) outside_kernel(barrier_name(kind));
  Run& r = g_run;
  if (r.n_exited > 0 || (r.bar_count > 0 && r.bar_kind != kind)) bad_barrier(f, kind);
  if (r.bar_count == 0) {
    r.bar_kind = kind;
    r.first_at_barrier = static_cast<int>(f->linear);
  }
  f->state = State::AtBarrier;
  f->pred = predicate != 0;
  if (++r.bar_count == r.nthreads) {
    int result = 0;
    if (kind != Barrier::Sync) {
      int count = 0;
      for (unsigned t = 0; t < r.nthreads; ++t) count += fiber_at(t)->pred;
      result = kind == Barrier::Count ? count
               : kind == Barrier::And ? count == static_cast<int>(r.nthreads)
                                      : count > 0;
    }
    for (unsigned t = 0; t < r.nthreads; ++t) {
      Fiber* g = fiber_at(t);
      g->state = State::Ready;
      g->out = static_cast<std::uint64_t>(result);
      make_ready(t);
    }
    r.bar_count = 0;
    r.first_at_barrier = -1;
  }
  reschedule();
  return static_cast<int>(g_cur->out);
}

// Source lane of a shuffle, PTX shfl.sync semantics (clamp 31 except up, segment mask 32 - width).
SIMT_HOT inline unsigned shfl_source(Op op, unsigned lane, int arg, int width) {
  const unsigned seg = static_cast<unsigned>(32 - width);
  const unsigned clamp = op == Op::ShflUp ? 0u : 31u;
  const unsigned b = static_cast<unsigned>(arg) & 31u;
  const int max_lane = static_cast<int>((lane & seg) | (clamp & ~seg));
  const int min_lane = static_cast<int>(lane & seg);
  int j = 0;
  bool valid = false;
  switch (op) {
    case Op::ShflUp:
      j = static_cast<int>(lane) - static_cast<int>(b);
      valid = j >= max_lane;
      break;
    case Op::ShflDown:
      j = static_cast<int>(lane + b);
      valid = j <= max_lane;
      break;
    case Op::ShflXor:
      j = static_cast<int>(lane ^ b);
      valid = j <= max_lane;
      break;
    default:
      j = min_lane | static_cast<int>(b & ~seg);
      valid = j <= max_lane;
      break;
  }
  return valid ? static_cast<unsigned>(j) : lane;
}

[[noreturn]] SIMT_COLD void bad_shuffle_source(const Fiber* f, Op op, unsigned src, unsigned mask) {
  fail(thread_str(*f) + " reads lane " + std::to_string(src) + " in " + op_name(op) +
       " but the mask " + hex(mask) + " does not name that lane");
}

SIMT_HOT void complete(Warp& w, int index) {
  const Pending p = w.pending[index];
  w.pending[index] = w.pending[--w.npending];
  Fiber* lanes[32];
  const unsigned base = static_cast<unsigned>(&w - g_run.warps) * 32;
  for (unsigned l = 0; l < 32; ++l) lanes[l] = (p.mask >> l & 1u) ? fiber_at(base + l) : nullptr;
  std::uint64_t all = 0;
  unsigned bits = 0;
  switch (p.op) {
    case Op::ShflIdx:
    case Op::ShflUp:
    case Op::ShflDown:
    case Op::ShflXor:
      for (unsigned l = 0; l < 32; ++l) {
        if (!lanes[l]) continue;
        const unsigned j = shfl_source(p.op, l, lanes[l]->arg, p.width);
        if (!(p.mask >> j & 1u)) bad_shuffle_source(lanes[l], p.op, j, p.mask);
        lanes[l]->out = lanes[j]->in;
      }
      for (unsigned l = 0; l < 32; ++l) {
        if (!lanes[l]) continue;
        lanes[l]->state = State::Ready;
        make_ready(base + l);
      }
      return;
    case Op::Ballot:
    case Op::Any:
    case Op::All:
      for (unsigned l = 0; l < 32; ++l)
        if (lanes[l] && lanes[l]->in) bits |= 1u << l;
      all = p.op == Op::Ballot ? bits : p.op == Op::Any ? (bits != 0) : (bits == p.mask);
      break;
    case Op::SyncWarp:
      break;
    default: {
      bool first = true;
      std::uint32_t acc = 0;
      for (unsigned l = 0; l < 32; ++l) {
        if (!lanes[l]) continue;
        const auto v = static_cast<std::uint32_t>(lanes[l]->in);
        if (first) {
          acc = v;
          first = false;
          continue;
        }
        switch (p.op) {
          case Op::ReduceAdd:
            acc += v;
            break;
          case Op::ReduceMinU:
            acc = std::min(acc, v);
            break;
          case Op::ReduceMaxU:
            acc = std::max(acc, v);
            break;
          case Op::ReduceMinI:
            acc = static_cast<std::uint32_t>(
                std::min(static_cast<std::int32_t>(acc), static_cast<std::int32_t>(v)));
            break;
          case Op::ReduceMaxI:
            acc = static_cast<std::uint32_t>(
                std::max(static_cast<std::int32_t>(acc), static_cast<std::int32_t>(v)));
            break;
          case Op::ReduceAnd:
            acc &= v;
            break;
          case Op::ReduceOr:
            acc |= v;
            break;
          case Op::ReduceXor:
            acc ^= v;
            break;
          default:
            break;
        }
      }
      all = acc;
      break;
    }
  }
  for (unsigned l = 0; l < 32; ++l) {
    if (!lanes[l]) continue;
    lanes[l]->out = all;
    lanes[l]->state = State::Ready;
    make_ready(base + l);
  }
}

[[noreturn]] SIMT_COLD void bad_collective(const Fiber* f, Op op, unsigned mask, int width) {
  const Run& r = g_run;
  const Warp& w = r.warps[f->warp];
  if (!(mask >> f->lane & 1u)) {
    fail(thread_str(*f) + " calls " + op_name(op) + " with mask " + hex(mask) +
         " that does not name itself");
  }
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    fail(thread_str(*f) + " calls " + op_name(op) + " with width " + std::to_string(width) +
         ": must be a power of two in [1, 32]");
  }
  if (mask & ~w.exists) {
    fail(thread_str(*f) + " calls " + op_name(op) + " with mask " + hex(mask) + " naming lanes " +
         lanes_str(mask & ~w.exists) + " that do not exist (block of " +
         std::to_string(r.nthreads) + " threads)");
  }
  fail(thread_str(*f) + " calls " + op_name(op) + " with mask " + hex(mask) + " naming lanes " +
       lanes_str(mask & w.exited) + " that have exited");
}

[[noreturn]] SIMT_COLD void divergent(const Fiber* f, Op op, int width, const Pending& p) {
  fail(thread_str(*f) + " calls " + op_name(op) + " (width " + std::to_string(width) +
       ") while lanes " + lanes_str(p.arrived) + " of its warp wait in " + pending_name(p) +
       " (width " + std::to_string(p.width) + ") with the same mask " + hex(p.mask) +
       ": divergent warp collectives");
}

SIMT_HOT std::uint64_t collective(Op op, unsigned mask, std::uint64_t value, int arg, int width) {
  Fiber* f = g_cur;
  if (!f) outside_kernel(op_name(op));
  Warp& w = g_run.warps[f->warp];
  const unsigned me = 1u << f->lane;
  if (!(mask & me) || width < 1 || width > 32 || (width & (width - 1)) != 0 || (mask & ~w.exists) ||
      (mask & w.exited)) {
    bad_collective(f, op, mask, width);
  }
  // A pending collective with another mask may overlap this one (e.g. lanes 0-15 went on to a
  // full-warp __syncwarp while lanes 16-31 still shuffle among themselves): legal since Volta.
  // Lanes that end up waiting for each other are reported by the deadlock check.
  int index = -1;
  for (int i = 0; i < w.npending; ++i) {
    if (w.pending[i].mask == mask) {
      if (w.pending[i].op != op || w.pending[i].width != width)
        divergent(f, op, width, w.pending[i]);
      index = i;
      break;
    }
  }
  if (index < 0) {
    index = w.npending++;
    w.pending[index] = Pending{op, mask, 0u, width, nullptr, CallSite{nullptr, 0, 0}};
  }
  f->state = State::AtWarp;
  f->op = op;
  f->in = value;
  f->arg = arg;
  w.pending[index].arrived |= me;
  if (w.pending[index].arrived == mask) complete(w, index);
  reschedule();
  return g_cur->out;
}

// .sync.aligned instructions (mma.sync, ldmatrix): a full-warp collective whose lanes must all
// execute the same instruction, i.e. the same AlignedOp from the same call site.
bool same_instruction(const Pending& p, const AlignedOp& op, const CallSite& site) {
  if (p.op != Op::Aligned) return false;
  if (p.aligned != &op && std::strcmp(p.aligned->name, op.name) != 0) return false;
  return p.site.line == site.line && p.site.column == site.column &&
         (p.site.file == site.file || std::strcmp(p.site.file, site.file) == 0);
}

[[noreturn]] SIMT_COLD void bad_aligned(const Fiber* f, const AlignedOp& op, const CallSite& site) {
  const Run& r = g_run;
  const Warp& w = r.warps[f->warp];
  const std::string call = thread_str(*f) + " executes " + op.name + " at " + site_str(site);
  if (w.exists != kAllLanes) {
    fail(call + ", which needs all 32 lanes of the warp, but lanes " + lanes_str(~w.exists) +
         " do not exist (block of " + std::to_string(r.nthreads) + " threads)");
  }
  fail(call + ", which needs all 32 lanes of the warp, but lanes " + lanes_str(w.exited) +
       " have exited");
}

[[noreturn]] SIMT_COLD void divergent_aligned(const Fiber* f, const AlignedOp& op,
                                              const CallSite& site, const Pending& p) {
  fail(thread_str(*f) + " executes " + op.name + " at " + site_str(site) + " while lanes " +
       lanes_str(p.arrived) + " of its warp wait in " + pending_name(p) +
       ": divergent warp collectives (.aligned: every lane of the warp must execute the same "
       "instruction)");
}

SIMT_HOT void complete_aligned(Warp& w, int index) {
  const Pending p = w.pending[index];
  w.pending[index] = w.pending[--w.npending];
  const unsigned base = static_cast<unsigned>(&w - g_run.warps) * 32;
  void* data[32];
  for (unsigned l = 0; l < 32; ++l) data[l] = fiber_at(base + l)->data;
  p.aligned->exec(data);  // may throw (an operand error): the launch fails with it
  for (unsigned l = 0; l < 32; ++l) {
    fiber_at(base + l)->state = State::Ready;
    make_ready(base + l);
  }
}

SIMT_HOT void aligned_collective(const AlignedOp& op, void* data, const CallSite& site) {
  Fiber* f = g_cur;
  if (!f) outside_kernel(op.name);
  Warp& w = g_run.warps[f->warp];
  if (w.exists != kAllLanes || w.exited) bad_aligned(f, op, site);
  int index = -1;
  for (int i = 0; i < w.npending; ++i) {
    if (w.pending[i].mask == kAllLanes) {
      if (!same_instruction(w.pending[i], op, site)) divergent_aligned(f, op, site, w.pending[i]);
      index = i;
      break;
    }
  }
  if (index < 0) {
    index = w.npending++;
    w.pending[index] = Pending{Op::Aligned, kAllLanes, 0u, 32, &op, site};
  }
  f->state = State::AtWarp;
  f->op = Op::Aligned;
  f->data = data;
  w.pending[index].arrived |= 1u << f->lane;
  if (w.pending[index].arrived == kAllLanes) complete_aligned(w, index);
  reschedule();
}

// ------------------------------------------------------------------------------------------------
// Memory poisoning: the executable's static TLS block (all __shared__ variables) and dynamic smem
// ------------------------------------------------------------------------------------------------
struct TlsBlock {
  unsigned char* data = nullptr;
  size_t size = 0;
};

TlsBlock exe_tls_block() {
  TlsBlock b;
  dl_iterate_phdr(
      [](dl_phdr_info* info, size_t size, void* out) -> int {
        auto* tb = static_cast<TlsBlock*>(out);
        if (size < offsetof(dl_phdr_info, dlpi_tls_data) + sizeof(void*)) return 1;
        for (int i = 0; i < info->dlpi_phnum; ++i) {
          if (info->dlpi_phdr[i].p_type == PT_TLS && info->dlpi_tls_data) {
            tb->data = static_cast<unsigned char*>(info->dlpi_tls_data);
            tb->size = info->dlpi_phdr[i].p_memsz;
          }
        }
        return 1;  // the first object is the executable
      },
      &b);
  return b;
}

// Saves the launching thread's TLS block and restores it when the launch ends.
class TlsGuard {
 public:
  explicit TlsGuard(TlsBlock b) : block_(b), saved_(b.data, b.data + b.size) {}
  ~TlsGuard() {
    if (block_.size) std::memcpy(block_.data, saved_.data(), block_.size);
  }
  TlsGuard(const TlsGuard&) = delete;
  TlsGuard& operator=(const TlsGuard&) = delete;

 private:
  TlsBlock block_;
  std::vector<unsigned char> saved_;
};

constexpr unsigned char kPoison = 0xff;

// ------------------------------------------------------------------------------------------------
// Running a block and a launch
// ------------------------------------------------------------------------------------------------
void reset_fibers_after_error() {
  for (auto& f : g_fibers) f->needs_init = true;
  g_cur = nullptr;
}

std::string deadlock_report() {
  Run& r = g_run;
  std::ostringstream os;
  os << "deadlock: no thread can proceed (" << r.nthreads << " threads, " << r.n_exited
     << " exited";
  if (r.bar_count) os << ", " << r.bar_count << " waiting at " << barrier_name(r.bar_kind);
  os << ")";
  for (unsigned wi = 0; wi < r.nwarps; ++wi) {
    const Warp& w = r.warps[wi];
    for (int i = 0; i < w.npending; ++i) {
      const Pending& p = w.pending[i];
      const unsigned missing = p.mask & ~p.arrived;
      os << "; warp " << wi << ": lanes " << lanes_str(p.arrived) << " wait in " << pending_name(p)
         << " (mask " << hex(p.mask) << ") for lanes " << lanes_str(missing);
      unsigned at_bar = 0, elsewhere = 0;
      for (unsigned l = 0; l < 32; ++l) {
        if (!(missing >> l & 1u)) continue;
        const Fiber* f = fiber_at(wi * 32 + l);
        if (f->state == State::AtBarrier)
          at_bar |= 1u << l;
        else
          elsewhere |= 1u << l;
      }
      if (at_bar)
        os << " (lanes " << lanes_str(at_bar) << " wait at " << barrier_name(r.bar_kind) << ")";
      if (elsewhere) os << " (lanes " << lanes_str(elsewhere) << " wait in another collective)";
    }
  }
  return os.str();
}

void run_block(const LaunchDesc& d, uint3 block, const TlsBlock& tls) {
  Run& r = g_run;
  r.block = block;
  simt::detail::g_block_idx = block;
  if (tls.size) std::memset(tls.data, kPoison, tls.size);
  if (d.smem_bytes) std::memset(simt::detail::g_dynamic_smem, kPoison, d.smem_bytes);

  const unsigned bx = d.block.x, by = d.block.y;
  r.bar_count = 0;
  r.n_exited = 0;
  r.first_exited = -1;
  r.first_at_barrier = -1;
  r.error = nullptr;
  r.aborted = false;
  for (unsigned wi = 0; wi < r.nwarps; ++wi) {
    Warp& w = r.warps[wi];
    const unsigned n = std::min(32u, r.nthreads - wi * 32);
    w.exists = n == 32 ? 0xffffffffu : ((1u << n) - 1u);
    w.exited = 0;
    w.npending = 0;
  }
  const int nwords = static_cast<int>((r.nthreads + 63) / 64);
  std::memset(r.cur, 0, sizeof(std::uint64_t) * nwords);
  std::memset(r.next, 0, sizeof(std::uint64_t) * nwords);
  r.cur_count = 0;
  r.next_count = 0;
  r.nready = 0;
  for (unsigned t = 0; t < r.nthreads; ++t) {
    Fiber* f = fiber_at(t);
    if (f->needs_init) fiber_init(f);
    f->tid = uint3{t % bx, (t / bx) % by, t / (bx * by)};
    f->linear = t;
    f->lane = t & 31u;
    f->warp = t >> 5;
    f->state = State::Ready;
    make_ready(t);
  }
  g_stats.threads += r.nthreads;

  Fiber* first = pick_next();
  enter(first);
  switch_to(&g_main, &first->ctx);
  // Back here when no thread is ready any more, or after an error.
  g_cur = nullptr;
  if (r.aborted) {
    reset_fibers_after_error();
    std::rethrow_exception(r.error);
  }
  if (r.n_exited != r.nthreads) {
    reset_fibers_after_error();
    fail(deadlock_report());
  }
}

void validate(const LaunchDesc& d) {
  auto bad = [&](const std::string& msg) {
    g_last_error = cudaErrorInvalidConfiguration;
    throw simt::Error("simt: launch of kernel '" + kernel_name(d.kernel) + "' with grid " +
                      dim_str(d.grid) + ", block " + dim_str(d.block) + ", " +
                      std::to_string(d.smem_bytes) + " bytes of dynamic shared memory: " + msg);
  };
  if (d.grid.x == 0 || d.grid.y == 0 || d.grid.z == 0) bad("empty grid");
  if (d.block.x == 0 || d.block.y == 0 || d.block.z == 0) bad("empty block");
  if (d.grid.x > 2147483647u || d.grid.y > 65535u || d.grid.z > 65535u) bad("grid too large");
  if (static_cast<unsigned long long>(d.block.x) * d.block.y * d.block.z > 1024u)
    bad("more than 1024 threads per block");
  if (d.block.x > 1024u || d.block.y > 1024u || d.block.z > 64u) bad("block dimension too large");
  if (d.smem_bytes > simt::kMaxDynamicSmem)
    bad("more dynamic shared memory than sm_80 allows (163 KiB)");
}

// One permutation of the blocks: forward, reverse or shuffled.
std::vector<std::uint32_t> block_order(std::uint64_t nblocks, Schedule::Kind kind) {
  std::vector<std::uint32_t> order(nblocks);
  for (std::uint64_t i = 0; i < nblocks; ++i) order[i] = static_cast<std::uint32_t>(i);
  if (kind == Schedule::Kind::Reverse) std::reverse(order.begin(), order.end());
  if (kind == Schedule::Kind::Random) {
    for (std::uint64_t i = nblocks; i > 1; --i)
      std::swap(order[i - 1], order[random_below(static_cast<unsigned>(i))]);
  }
  return order;
}

void init_schedule_from_env() {
  static std::once_flag once;
  std::call_once(once, [] {
    if (const char* s = std::getenv("MOETRAIN_SIMT_SCHEDULE"); s && *s)
      simt::set_schedule(Schedule::parse(s));
  });
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// Public API
// ------------------------------------------------------------------------------------------------
namespace simt {

std::string Schedule::name() const {
  switch (kind_) {
    case Kind::Forward:
      return "forward";
    case Kind::Reverse:
      return "reverse";
    case Kind::Random:
      return "random(" + std::to_string(seed_) + ")";
  }
  return "?";
}

Schedule Schedule::parse(const std::string& text) {
  if (text == "forward") return forward();
  if (text == "reverse") return reverse();
  if (text == "random") return random(0);
  if (text.rfind("random:", 0) == 0) {
    try {
      size_t used = 0;
      const std::string num = text.substr(7);
      const unsigned long long seed = std::stoull(num, &used);
      if (used == num.size()) return random(seed);
    } catch (const std::exception&) {
    }
  }
  throw Error("simt: bad schedule '" + text +
              "': expected forward, reverse, random or random:SEED");
}

void set_schedule(const Schedule& s) {
  std::lock_guard<std::mutex> lock(g_settings_mutex);
  g_schedule = s;
  g_rng = s.seed() * 0x9e3779b97f4a7c15ull + 0x632be59bd9b4e019ull;
}

Schedule schedule() {
  init_schedule_from_env();
  std::lock_guard<std::mutex> lock(g_settings_mutex);
  return g_schedule;
}

std::vector<Schedule> standard_schedules() {
  return {Schedule::forward(), Schedule::reverse(), Schedule::random(1), Schedule::random(2)};
}

Stats stats() {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  return g_stats;
}

void reset_stats() {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  g_stats = Stats{};
}

namespace detail {

std::uint64_t warp_collective(Op op, unsigned int mask, std::uint64_t value, int arg, int width) {
  return collective(op, mask, value, arg, width);
}

int block_barrier(Barrier kind, int predicate) {
  return barrier(kind, predicate);
}

unsigned int active_mask() {
  Fiber* f = g_cur;
  if (!f) outside_kernel("__activemask");
  const Warp& w = g_run.warps[f->warp];
  return w.exists & ~w.exited;
}

void warp_aligned(const AlignedOp& op, void* data, const CallSite& site) {
  aligned_collective(op, data, site);
}

void lane_error(unsigned lane, const std::string& what) {
  Fiber* f = g_cur;
  if (!f) outside_kernel("simt::detail::lane_error");
  fail(thread_str(*fiber_at(f->warp * 32 + (lane & 31u))) + " " + what);
}

bool in_shared(const void* p, std::size_t bytes) {
  if (!g_cur) outside_kernel("simt::detail::in_shared");
  const auto within = [&](const void* base, std::size_t size) {
    const auto a = reinterpret_cast<std::uintptr_t>(p), b = reinterpret_cast<std::uintptr_t>(base);
    return a >= b && a - b <= size && bytes <= size - (a - b);
  };
  return within(g_dynamic_smem, g_run.desc->smem_bytes) || within(g_run.tls_data, g_run.tls_size);
}

void run_launch(const LaunchDesc& d) {
  validate(d);
  init_schedule_from_env();
  if (g_in_launch.load() && pthread_equal(g_launch_owner, pthread_self())) {
    throw Error("simt: kernel '" + kernel_name(d.kernel) + "' launched from inside a kernel");
  }
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  Schedule sched = [] {
    std::lock_guard<std::mutex> l(g_settings_mutex);
    return g_schedule;
  }();

  Run& r = g_run;
  r.desc = &d;
  r.kind = sched.kind();
  r.nthreads = d.block.x * d.block.y * d.block.z;
  r.nwarps = (r.nthreads + 31) / 32;
  while (g_fibers.size() < r.nthreads) {
    auto f = std::make_unique<Fiber>();
    fiber_create(f.get());
    g_fibers.push_back(std::move(f));
  }
  for (unsigned t = 0; t < r.nthreads; ++t) r.fibers[t] = g_fibers[t].get();

  // Dynamic shared memory: exactly smem_bytes on the heap, so ASan sees overruns.
  struct SmemFree {
    void operator()(unsigned char* p) const { ::operator delete[](p, std::align_val_t(16)); }
  };
  std::unique_ptr<unsigned char[], SmemFree> smem(
      static_cast<unsigned char*>(::operator new[](d.smem_bytes, std::align_val_t(16))));
  simt::detail::g_dynamic_smem = smem.get();
  simt::detail::g_grid_dim = d.grid;
  simt::detail::g_block_dim = d.block;

  const TlsBlock tls = exe_tls_block();
  TlsGuard tls_guard(tls);
  r.tls_data = tls.data;
  r.tls_size = tls.size;
  struct InLaunch {
    InLaunch() {
      g_launch_owner = pthread_self();
      g_in_launch = true;
    }
    ~InLaunch() {
      g_in_launch = false;
      simt::detail::g_dynamic_smem = nullptr;
    }
  } in_launch;

  ++g_stats.launches;
  const std::uint64_t nblocks = static_cast<std::uint64_t>(d.grid.x) * d.grid.y * d.grid.z;
  const std::uint64_t gx = d.grid.x, gy = d.grid.y;
  if (nblocks > 0xffffffffull) throw Error("simt: launch of more than 2^32 blocks");
  for (std::uint32_t b : block_order(nblocks, r.kind)) {
    const uint3 block{static_cast<unsigned>(b % gx), static_cast<unsigned>((b / gx) % gy),
                      static_cast<unsigned>(b / (gx * gy))};
    run_block(d, block, tls);
    ++g_stats.blocks;
  }
}

}  // namespace detail
}  // namespace simt

long long clock64() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// ------------------------------------------------------------------------------------------------
// CUDA runtime API
// ------------------------------------------------------------------------------------------------
// ------------------------------------------------------------------------------------------------
// Streams: each one a FIFO of work items (kernel launches, async copies and memsets, event markers,
// host functions). Under the eager schedule an item runs when it is enqueued; under deferred only
// when the host needs it done: drain(q, n) runs q's first n items, each after the items of other
// streams it depends on. A dependency is always on work enqueued earlier, so draining terminates.
// A capturing stream records its work as the nodes of its capture instead; a graph launch is one
// item that runs the nodes in order.
// ------------------------------------------------------------------------------------------------
namespace simt::detail {
struct Queue;
struct Capture;
struct Dep {  // "queue q has run its first `count` items"
  std::shared_ptr<Queue> q;
  std::uint64_t count;
};
struct Item {
  std::function<void()> run;
  std::vector<Dep> deps;
};
// Work as submitted to a stream: `run` does it (once per launch when captured: it is called, never
// moved from); `at_enqueue` runs when it is enqueued (an async copy to the host poisons its
// destination); `host_items` counts the enqueue_host items in it (for Stats).
struct Work {
  explicit Work(std::function<void()> r, std::function<void()> at = {}, std::uint64_t hosts = 0)
      : run(std::move(r)), at_enqueue(std::move(at)), host_items(hosts) {}
  std::function<void()> run;
  std::function<void()> at_enqueue;
  std::uint64_t host_items;
};
using Nodes = std::vector<Work>;
// Stream capture: what each stream of a capture has waited for is a vector clock over the
// capture's streams: seen[k] = how many nodes of stream k precede the stream's next node
// (seen[member] counts its own nodes). An event recorded in the capture keeps the recording
// stream's clock; a wait on it merges that clock into the waiting stream's.
struct Queue {
  Queue(bool is_legacy, bool is_blocking) : legacy(is_legacy), blocking(is_blocking) {}
  const bool legacy;    // the legacy default stream (nullptr, cudaStreamLegacy)
  const bool blocking;  // created without cudaStreamNonBlocking: ordered with the legacy stream
  bool destroyed = false;
  std::deque<Item> items;
  std::uint64_t enqueued = 0, completed = 0;
  bool pending() const { return completed < enqueued; }
  std::shared_ptr<Capture> capture;  // the capture the stream takes part in (null: none)
  std::size_t member = 0;            // its index in capture->streams
  std::vector<std::uint64_t> seen;
};
struct Capture {
  cudaStreamCaptureMode mode = cudaStreamCaptureModeGlobal;
  std::thread::id thread;                       // that began it
  std::vector<std::shared_ptr<Queue>> streams;  // [0]: the origin, then the streams that joined
  Nodes nodes;                                  // in recording order
  bool invalidated = false;
  bool ended = false;
};
}  // namespace simt::detail

struct CUstream_st {
  std::shared_ptr<simt::detail::Queue> q;
};
struct CUevent_st {
  // Host time at which the last record's marker ran.
  std::shared_ptr<std::chrono::steady_clock::time_point> t;
  // The last record: complete once q has run its first `count` items (q null: never recorded, or
  // recorded in a capture).
  std::shared_ptr<simt::detail::Queue> q;
  std::uint64_t count = 0;
  // Recorded in a capture: that capture and the recording stream's clock then.
  std::shared_ptr<simt::detail::Capture> capture;
  std::vector<std::uint64_t> seen;
};
struct CUgraph_st {
  std::shared_ptr<const simt::detail::Nodes> nodes;
};
struct CUgraphExec_st {
  std::shared_ptr<const simt::detail::Nodes> nodes;
  std::uint64_t host_items = 0;
  // The last launch: complete once q has run its first `count` items (a launch waits for it).
  std::shared_ptr<simt::detail::Queue> q;
  std::uint64_t count = 0;
};

namespace {
using simt::detail::Capture;
using simt::detail::Dep;
using simt::detail::Item;
using simt::detail::Nodes;
using simt::detail::Queue;
using simt::detail::Work;

std::mutex g_stream_mutex;
thread_local bool t_in_item = false;  // running a work item (a kernel, a copy, a host function)
simt::StreamSchedule g_stream_schedule = simt::StreamSchedule::Eager;
std::atomic<std::uint64_t> g_sync_count{0};
std::vector<std::shared_ptr<Capture>> g_captures;  // the captures under way
thread_local cudaStreamCaptureMode t_capture_mode = cudaStreamCaptureModeGlobal;

// Every stream with work or a handle; [0] is the legacy stream.
std::vector<std::shared_ptr<Queue>>& queues() {
  static std::vector<std::shared_ptr<Queue>> q{std::make_shared<Queue>(true, true)};
  return q;
}
const std::shared_ptr<Queue>& legacy_queue() {
  return queues()[0];
}

void init_stream_schedule_from_env() {
  static std::once_flag once;
  std::call_once(once, [] {
    if (const char* s = std::getenv("MOETRAIN_SIMT_STREAMS"); s && *s)
      g_stream_schedule = simt::parse_stream_schedule(s);
  });
}

// Holds the stream state. Work items run with it held, so the CUDA runtime is not reentrant from
// them (as a CUDA host function must not call it either).
class StreamLock {
 public:
  StreamLock() {
    if (t_in_item) throw simt::Error("simt: CUDA runtime call from work running on a stream");
    init_stream_schedule_from_env();
    lock_ = std::unique_lock<std::mutex>(g_stream_mutex);
  }

 private:
  std::unique_lock<std::mutex> lock_;
};

std::shared_ptr<Queue> queue_of(cudaStream_t s) {
  if (!s || s == cudaStreamLegacy) return legacy_queue();
  return s->q;
}

void drain(const std::shared_ptr<Queue>& q, std::uint64_t upto);

void run_front(Queue& q) {
  const std::vector<Dep> deps = q.items.front().deps;
  for (const Dep& d : deps) drain(d.q, d.count);
  std::function<void()> run = std::move(q.items.front().run);
  q.items.pop_front();
  ++q.completed;  // also when it throws: the error is reported once, here
  struct InItem {
    InItem() { t_in_item = true; }
    ~InItem() { t_in_item = false; }
  } in_item;
  run();
}

void drain(const std::shared_ptr<Queue>& q, std::uint64_t upto) {
  while (q->completed < upto) run_front(*q);
}

void drain_all() {
  auto& qs = queues();
  for (std::size_t i = 0; i < qs.size(); ++i) drain(qs[i], qs[i]->enqueued);
  qs.erase(std::remove_if(qs.begin(), qs.end(),
                          [](const std::shared_ptr<Queue>& q) { return q->destroyed; }),
           qs.end());
}

// Work on the legacy stream waits for earlier work on every blocking stream; work on a blocking
// stream waits for earlier work on the legacy stream; non-blocking streams order with neither.
void enqueue(const std::shared_ptr<Queue>& q, std::function<void()> run,
             std::vector<Dep> deps = {}) {
  if (q->legacy) {
    for (const auto& b : queues())
      if (!b->legacy && b->blocking && b->pending()) deps.push_back(Dep{b, b->enqueued});
  } else if (q->blocking && legacy_queue()->pending()) {
    deps.push_back(Dep{legacy_queue(), legacy_queue()->enqueued});
  }
  q->items.push_back(Item{std::move(run), std::move(deps)});
  ++q->enqueued;
  if (g_stream_schedule == simt::StreamSchedule::Eager) drain(q, q->enqueued);
}

// Everything the host waits for in cudaStreamSynchronize(s) (for the legacy stream: its work and
// the blocking streams' work before it, as an item enqueued on it now would wait for).
void drain_stream(const std::shared_ptr<Queue>& q) {
  if (q->legacy) enqueue(q, [] {});
  drain(q, q->enqueued);
}

bool stream_pending(const std::shared_ptr<Queue>& q) {
  if (q->pending()) return true;
  if (!q->legacy) return false;
  for (const auto& b : queues())
    if (b->blocking && b->pending()) return true;
  return false;
}

bool event_pending(const CUevent_st* e) {
  return e->q && e->q->completed < e->count;
}

// ---- stream capture (the rules are in simt.hpp) ----

// Takes every stream of `c` out of capture mode.
void end_capture(Capture& c) {
  for (const auto& q : c.streams) {
    q->capture.reset();
    q->member = 0;
    q->seen.clear();
  }
  c.streams.clear();
  c.ended = true;
  g_captures.erase(std::remove_if(g_captures.begin(), g_captures.end(),
                                  [&](const std::shared_ptr<Capture>& p) { return p.get() == &c; }),
                   g_captures.end());
}

// The capture `e` was last recorded in, if it is still under way (an ended one's record is
// forgotten: the event is as if never recorded).
const std::shared_ptr<Capture>& captured(CUevent_st* e) {
  if (e->capture && e->capture->ended) {
    e->capture.reset();
    e->seen.clear();
  }
  return e->capture;
}

void merge_clock(std::vector<std::uint64_t>& into, const std::vector<std::uint64_t>& from) {
  if (into.size() < from.size()) into.resize(from.size(), 0);
  for (std::size_t k = 0; k < from.size(); ++k) into[k] = std::max(into[k], from[k]);
}

// Any use of the legacy stream while a blocking stream captures: invalidates those captures.
cudaError_t legacy_conflict() {
  cudaError_t rc = cudaSuccess;
  for (const auto& c : g_captures) {
    for (const auto& q : c->streams) {
      if (q->blocking) {
        c->invalidated = true;
        rc = cudaErrorStreamCaptureImplicit;
        break;
      }
    }
  }
  return rc;
}

// A potentially unsafe call (cudaMalloc, cudaFree, ...) by the calling thread: prohibited by the
// captures the capture modes name, which it invalidates.
cudaError_t unsafe_call() {
  if (t_capture_mode == cudaStreamCaptureModeRelaxed) return cudaSuccess;
  const std::thread::id me = std::this_thread::get_id();
  cudaError_t rc = cudaSuccess;
  for (const auto& c : g_captures) {
    const bool prohibits = c->thread == me ? c->mode != cudaStreamCaptureModeRelaxed
                                           : t_capture_mode == cudaStreamCaptureModeGlobal &&
                                                 c->mode == cudaStreamCaptureModeGlobal;
    if (prohibits) {
      c->invalidated = true;
      rc = cudaErrorStreamCaptureUnsupported;
    }
  }
  return rc;
}

// Submits work to stream q: records it when q captures, else enqueues it (deps: what it waits
// for besides q's order).
cudaError_t submit(const std::shared_ptr<Queue>& q, Work w, std::vector<Dep> deps = {}) {
  if (q->capture) {
    Capture& c = *q->capture;
    if (c.invalidated) return cudaErrorStreamCaptureInvalidated;
    c.nodes.push_back(std::move(w));
    ++q->seen[q->member];
    ++g_stats.captured_nodes;
    return cudaSuccess;
  }
  if (q->legacy)
    if (const cudaError_t e = legacy_conflict(); e != cudaSuccess) return e;
  if (w.at_enqueue) w.at_enqueue();
  g_stats.host_items += w.host_items;
  enqueue(q, std::move(w.run), std::move(deps));
  return cudaSuccess;
}

// What a call that names stream q, to wait for it or query it, must fail with.
cudaError_t sync_conflict(const std::shared_ptr<Queue>& q) {
  if (q->capture) {
    q->capture->invalidated = true;
    return cudaErrorStreamCaptureUnsupported;
  }
  return q->legacy ? legacy_conflict() : cudaSuccess;
}

// What a call that waits for or queries event e must fail with (potentially_unsafe: a query or
// synchronize, which the capture modes may forbid).
cudaError_t event_conflict(CUevent_st* e, bool potentially_unsafe) {
  if (const auto& c = captured(e)) {
    c->invalidated = true;
    return cudaErrorCapturedEvent;
  }
  return potentially_unsafe ? unsafe_call() : cudaSuccess;
}

cudaError_t set_error(cudaError_t e);

// drain_all for the calls that release resources (cudaFree, cudaFreeHost, cudaDeviceReset), which
// run in destructors and so must not throw: an error of the work they run is printed and returned
// as cudaErrorLaunchFailure (a synchronising call throws it).
cudaError_t drain_all_quietly(bool count_sync) {
  StreamLock lock;
  if (count_sync) ++g_sync_count;
  cudaError_t rc = cudaSuccess;
  for (;;) {  // each error drops the item that raised it: this ends
    try {
      drain_all();
      return rc;
    } catch (const std::exception& e) {
      std::fprintf(stderr, "%s\n", e.what());
      rc = set_error(cudaErrorLaunchFailure);
    }
  }
}
}  // namespace

namespace {
std::mutex g_alloc_mutex;
// Ordered by address, so an interior pointer finds its allocation (cudaPointerGetAttributes).
std::map<const void*, size_t> g_device_allocs;
std::map<const void*, size_t> g_host_allocs;

cudaError_t set_error(cudaError_t e) {
  if (e != cudaSuccess) g_last_error = e;
  return e;
}

// Bytes from ptr to the end of the allocation of `table` that holds it (0: none); the caller holds
// g_alloc_mutex.
size_t extent_in(const std::map<const void*, size_t>& table, const void* ptr) {
  auto it = table.upper_bound(ptr);
  if (it == table.begin()) return 0;
  --it;
  const auto* end = static_cast<const unsigned char*>(it->first) + it->second;
  const auto* p = static_cast<const unsigned char*>(ptr);
  return p < end ? size_t(end - p) : 0;
}

cudaError_t alloc(std::map<const void*, size_t>& table, void** ptr, size_t bytes) {
  if (!ptr) return set_error(cudaErrorInvalidValue);
  *ptr = nullptr;
  if (bytes == 0) return cudaSuccess;
  void* p = nullptr;
  if (posix_memalign(&p, 256, bytes) != 0 || !p) return set_error(cudaErrorMemoryAllocation);
  std::memset(p, kPoison, bytes);  // NaN everywhere: unwritten outputs show
  std::lock_guard<std::mutex> lock(g_alloc_mutex);
  table.emplace(p, bytes);
  *ptr = p;
  return cudaSuccess;
}

cudaError_t release(std::map<const void*, size_t>& table, void* ptr) {
  if (!ptr) return cudaSuccess;
  {
    std::lock_guard<std::mutex> lock(g_alloc_mutex);
    auto it = table.find(ptr);
    if (it == table.end()) return set_error(cudaErrorInvalidDevicePointer);
    table.erase(it);
  }
  std::free(ptr);
  return cudaSuccess;
}
}  // namespace

const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "cudaSuccess";
    case cudaErrorInvalidValue:
      return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation:
      return "cudaErrorMemoryAllocation";
    case cudaErrorInitializationError:
      return "cudaErrorInitializationError";
    case cudaErrorInvalidConfiguration:
      return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidSymbol:
      return "cudaErrorInvalidSymbol";
    case cudaErrorInvalidDevicePointer:
      return "cudaErrorInvalidDevicePointer";
    case cudaErrorInvalidMemcpyDirection:
      return "cudaErrorInvalidMemcpyDirection";
    case cudaErrorNoDevice:
      return "cudaErrorNoDevice";
    case cudaErrorInvalidDevice:
      return "cudaErrorInvalidDevice";
    case cudaErrorInvalidResourceHandle:
      return "cudaErrorInvalidResourceHandle";
    case cudaErrorIllegalState:
      return "cudaErrorIllegalState";
    case cudaErrorNotReady:
      return "cudaErrorNotReady";
    case cudaErrorLaunchFailure:
      return "cudaErrorLaunchFailure";
    case cudaErrorNotSupported:
      return "cudaErrorNotSupported";
    case cudaErrorStreamCaptureUnsupported:
      return "cudaErrorStreamCaptureUnsupported";
    case cudaErrorStreamCaptureInvalidated:
      return "cudaErrorStreamCaptureInvalidated";
    case cudaErrorStreamCaptureMerge:
      return "cudaErrorStreamCaptureMerge";
    case cudaErrorStreamCaptureUnmatched:
      return "cudaErrorStreamCaptureUnmatched";
    case cudaErrorStreamCaptureUnjoined:
      return "cudaErrorStreamCaptureUnjoined";
    case cudaErrorStreamCaptureIsolation:
      return "cudaErrorStreamCaptureIsolation";
    case cudaErrorStreamCaptureImplicit:
      return "cudaErrorStreamCaptureImplicit";
    case cudaErrorCapturedEvent:
      return "cudaErrorCapturedEvent";
    case cudaErrorStreamCaptureWrongThread:
      return "cudaErrorStreamCaptureWrongThread";
    case cudaErrorUnknown:
      return "cudaErrorUnknown";
  }
  return "cudaErrorUnknown";
}

const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorMemoryAllocation:
      return "out of memory";
    case cudaErrorInitializationError:
      return "initialization error";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
    case cudaErrorInvalidSymbol:
      return "invalid device symbol";
    case cudaErrorInvalidDevicePointer:
      return "invalid device pointer";
    case cudaErrorInvalidMemcpyDirection:
      return "invalid copy direction for memcpy";
    case cudaErrorNoDevice:
      return "no CUDA-capable device is detected";
    case cudaErrorInvalidDevice:
      return "invalid device ordinal";
    case cudaErrorInvalidResourceHandle:
      return "invalid resource handle";
    case cudaErrorIllegalState:
      return "the operation cannot be performed in the present state";
    case cudaErrorNotReady:
      return "device not ready";
    case cudaErrorLaunchFailure:
      return "unspecified launch failure";
    case cudaErrorNotSupported:
      return "operation not supported";
    case cudaErrorStreamCaptureUnsupported:
      return "operation not permitted when stream is capturing";
    case cudaErrorStreamCaptureInvalidated:
      return "operation failed due to a previous error during capture";
    case cudaErrorStreamCaptureMerge:
      return "operation would result in a merge of separate capture sequences";
    case cudaErrorStreamCaptureUnmatched:
      return "capture was not ended in the same stream as it began";
    case cudaErrorStreamCaptureUnjoined:
      return "capturing stream has unjoined work";
    case cudaErrorStreamCaptureIsolation:
      return "dependency created on uncaptured work in another stream";
    case cudaErrorStreamCaptureImplicit:
      return "operation would make the legacy stream depend on a capturing blocking stream";
    case cudaErrorCapturedEvent:
      return "operation not permitted on an event last recorded in a capturing stream";
    case cudaErrorStreamCaptureWrongThread:
      return "attempt to terminate a thread-local capture sequence from another thread";
    case cudaErrorUnknown:
      return "unknown error";
  }
  return "unknown error";
}

cudaError_t cudaGetLastError() {
  return static_cast<cudaError_t>(g_last_error.exchange(cudaSuccess));
}
cudaError_t cudaPeekAtLastError() {
  return static_cast<cudaError_t>(g_last_error.load());
}

namespace {
// Allocating and freeing are potentially unsafe during a capture (the modes decide). A work item
// (which holds the stream state) is not checked: it must not call the runtime at all.
cudaError_t alloc_conflict() {
  if (t_in_item) return cudaSuccess;
  StreamLock lock;
  return unsafe_call();
}
cudaError_t checked_alloc(std::map<const void*, size_t>& table, void** ptr, size_t bytes) {
  if (const cudaError_t e = alloc_conflict(); e != cudaSuccess) {
    if (ptr) *ptr = nullptr;
    return set_error(e);
  }
  return alloc(table, ptr, bytes);
}
cudaError_t checked_release(std::map<const void*, size_t>& table, void* ptr) {
  if (const cudaError_t e = alloc_conflict(); e != cudaSuccess) return set_error(e);
  // An implicit device synchronize: no pending work may still use the memory.
  const cudaError_t drained = ptr ? drain_all_quietly(true) : cudaSuccess;
  const cudaError_t e = release(table, ptr);
  return e != cudaSuccess ? e : drained;
}
}  // namespace

cudaError_t cudaMalloc(void** ptr, size_t bytes) {
  return checked_alloc(g_device_allocs, ptr, bytes);
}
cudaError_t cudaFree(void* ptr) {
  return checked_release(g_device_allocs, ptr);
}
cudaError_t cudaMallocHost(void** ptr, size_t bytes) {
  return checked_alloc(g_host_allocs, ptr, bytes);
}
cudaError_t cudaHostAlloc(void** ptr, size_t bytes, unsigned int) {
  return checked_alloc(g_host_allocs, ptr, bytes);
}
cudaError_t cudaFreeHost(void* ptr) {
  return checked_release(g_host_allocs, ptr);
}

namespace {
// All copies: rows of `width` bytes. Synchronous copies are work on the legacy stream: device to
// device they only enqueue (asynchronous to the host, as in CUDA), otherwise the host waits for
// them (and so for the legacy stream and the blocking streams, not the non-blocking ones). An
// asynchronous copy to the host poisons its destination until it runs.
cudaError_t copy_rows(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width,
                      size_t height, cudaMemcpyKind kind, bool async, cudaStream_t stream) {
  if (kind < cudaMemcpyHostToHost || kind > cudaMemcpyDefault)
    return set_error(cudaErrorInvalidMemcpyDirection);
  if (height > 1 && (width > dpitch || width > spitch)) return set_error(cudaErrorInvalidValue);
  if (width == 0 || height == 0) return cudaSuccess;
  if (!dst || !src) return set_error(cudaErrorInvalidValue);
  auto* d = static_cast<unsigned char*>(dst);
  const auto* s = static_cast<const unsigned char*>(src);
  auto run = [=] {
    for (size_t row = 0; row < height; ++row)
      std::memmove(d + row * dpitch, s + row * spitch, width);
  };
  StreamLock lock;
  if (async) {
    std::function<void()> poison;
    if (kind == cudaMemcpyDeviceToHost)
      poison = [=] {
        for (size_t row = 0; row < height; ++row) std::memset(d + row * dpitch, kPoison, width);
      };
    return set_error(submit(queue_of(stream), Work{run, poison}));
  }
  if (kind == cudaMemcpyDeviceToDevice) return set_error(submit(legacy_queue(), Work{run}));
  if (const cudaError_t e = legacy_conflict(); e != cudaSuccess) return set_error(e);
  if (const cudaError_t e = unsafe_call(); e != cudaSuccess) return set_error(e);
  ++g_sync_count;
  enqueue(legacy_queue(), run);
  drain(legacy_queue(), legacy_queue()->enqueued);
  return cudaSuccess;
}

cudaError_t fill_bytes(void* dst, int value, size_t bytes, cudaStream_t stream) {
  if (bytes == 0) return cudaSuccess;
  if (!dst) return set_error(cudaErrorInvalidValue);
  StreamLock lock;
  return set_error(submit(queue_of(stream), Work{[=] { std::memset(dst, value, bytes); }}));
}
}  // namespace

cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
  return copy_rows(dst, bytes, src, bytes, bytes, 1, kind, false, nullptr);
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                            cudaStream_t stream) {
  return copy_rows(dst, bytes, src, bytes, bytes, 1, kind, true, stream);
}
cudaError_t cudaMemcpy2D(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width,
                         size_t height, cudaMemcpyKind kind) {
  return copy_rows(dst, dpitch, src, spitch, width, height, kind, false, nullptr);
}
cudaError_t cudaMemcpy2DAsync(void* dst, size_t dpitch, const void* src, size_t spitch,
                              size_t width, size_t height, cudaMemcpyKind kind,
                              cudaStream_t stream) {
  return copy_rows(dst, dpitch, src, spitch, width, height, kind, true, stream);
}
cudaError_t cudaMemset(void* dst, int value, size_t bytes) {
  return fill_bytes(dst, value, bytes, nullptr);
}
cudaError_t cudaMemsetAsync(void* dst, int value, size_t bytes, cudaStream_t stream) {
  return fill_bytes(dst, value, bytes, stream);
}
cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes) {
  const long pages = sysconf(_SC_PHYS_PAGES), avail = sysconf(_SC_AVPHYS_PAGES),
             page = sysconf(_SC_PAGESIZE);
  if (total_bytes) *total_bytes = static_cast<size_t>(pages) * static_cast<size_t>(page);
  if (free_bytes) *free_bytes = static_cast<size_t>(avail) * static_cast<size_t>(page);
  return cudaSuccess;
}

cudaError_t cudaStreamCreate(cudaStream_t* s) {
  return cudaStreamCreateWithFlags(s, cudaStreamDefault);
}
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned int flags) {
  if (!s) return set_error(cudaErrorInvalidValue);
  StreamLock lock;
  auto q = std::make_shared<Queue>(false, (flags & cudaStreamNonBlocking) == 0);
  queues().push_back(q);
  *s = new CUstream_st{std::move(q)};
  return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t s) {
  if (!s || s == cudaStreamLegacy) return set_error(cudaErrorInvalidResourceHandle);
  StreamLock lock;
  cudaError_t rc = cudaSuccess;
  if (const std::shared_ptr<Capture> c = s->q->capture) {  // a copy: end_capture resets it
    c->invalidated = true;
    if (c->streams.front() == s->q) end_capture(*c);
    rc = set_error(cudaErrorStreamCaptureInvalidated);
  }
  s->q->destroyed = true;  // its pending work still runs when something orders it
  delete s;
  return rc;
}
cudaError_t cudaStreamSynchronize(cudaStream_t s) {
  StreamLock lock;
  const std::shared_ptr<Queue> q = queue_of(s);
  if (const cudaError_t e = sync_conflict(q); e != cudaSuccess) return set_error(e);
  ++g_sync_count;
  drain_stream(q);
  return cudaSuccess;
}
// A query that finds work pending says so and lets the work run (the device makes progress while
// the host polls), so a polling loop ends under the deferred schedule too.
cudaError_t cudaStreamQuery(cudaStream_t s) {
  StreamLock lock;
  const std::shared_ptr<Queue> q = queue_of(s);
  if (const cudaError_t e = sync_conflict(q); e != cudaSuccess) return set_error(e);
  if (!stream_pending(q)) return cudaSuccess;
  drain_stream(q);
  return cudaErrorNotReady;
}
namespace {
// simt::drop_event_waits: the waits still to let through, then the waits still to drop.
std::mutex g_drop_mutex;
std::size_t g_waits_to_skip = 0, g_waits_to_drop = 0;

bool drop_this_wait() {
  const std::lock_guard<std::mutex> lock(g_drop_mutex);
  if (g_waits_to_drop == 0) return false;
  if (g_waits_to_skip > 0) {
    --g_waits_to_skip;
    return false;
  }
  --g_waits_to_drop;
  return true;
}
}  // namespace

void simt::drop_event_waits(std::size_t n, std::size_t skip) {
  const std::lock_guard<std::mutex> lock(g_drop_mutex);
  g_waits_to_drop = n;
  g_waits_to_skip = n ? skip : 0;
}

cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned int) {
  if (!e) return set_error(cudaErrorInvalidResourceHandle);
  StreamLock lock;
  const std::shared_ptr<Queue> q = queue_of(s);
  const std::shared_ptr<Capture> c = captured(e);
  if (q->legacy) {
    if (const cudaError_t err = legacy_conflict(); err != cudaSuccess) return set_error(err);
    if (c) {  // the legacy stream cannot join a capture
      c->invalidated = true;
      return set_error(cudaErrorStreamCaptureUnsupported);
    }
  }
  if (q->capture && q->capture->invalidated) return set_error(cudaErrorStreamCaptureInvalidated);
  if (c) {
    if (q->capture && q->capture != c) {
      q->capture->invalidated = c->invalidated = true;
      return set_error(cudaErrorStreamCaptureMerge);
    }
    if (!q->capture) {  // a fork: q joins the capture
      q->capture = c;
      q->member = c->streams.size();
      q->seen.assign(c->streams.size() + 1, 0);
      c->streams.push_back(q);
    }
    merge_clock(q->seen, e->seen);
    return c->invalidated ? set_error(cudaErrorStreamCaptureInvalidated) : cudaSuccess;
  }
  if (q->capture) {  // uncaptured work cannot order captured work
    q->capture->invalidated = true;
    return set_error(cudaErrorStreamCaptureIsolation);
  }
  if (drop_this_wait()) return cudaSuccess;
  if (event_pending(e)) enqueue(q, [] {}, {Dep{e->q, e->count}});
  return cudaSuccess;
}
cudaError_t cudaLaunchHostFunc(cudaStream_t s, cudaHostFn_t fn, void* user_data) {
  if (!fn) return set_error(cudaErrorInvalidValue);
  StreamLock lock;
  return set_error(submit(queue_of(s), Work{[fn, user_data] { fn(user_data); }}));
}
cudaError_t cudaEventCreate(cudaEvent_t* e) {
  return cudaEventCreateWithFlags(e, cudaEventDefault);
}
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned int) {
  if (!e) return set_error(cudaErrorInvalidValue);
  *e = new CUevent_st{};
  return cudaSuccess;
}
cudaError_t cudaEventDestroy(cudaEvent_t e) {
  delete e;
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s) {
  if (!e) return set_error(cudaErrorInvalidResourceHandle);
  StreamLock lock;
  const std::shared_ptr<Queue> q = queue_of(s);
  if (q->capture) {  // orders the captured work only: no marker
    if (q->capture->invalidated) return set_error(cudaErrorStreamCaptureInvalidated);
    e->t.reset();
    e->q.reset();
    e->count = 0;
    e->capture = q->capture;
    e->seen = q->seen;
    return cudaSuccess;
  }
  if (q->legacy)
    if (const cudaError_t err = legacy_conflict(); err != cudaSuccess) return set_error(err);
  auto t = std::make_shared<std::chrono::steady_clock::time_point>();
  enqueue(q, [t] { *t = std::chrono::steady_clock::now(); });  // the marker
  e->t = std::move(t);
  e->q = q;
  e->count = q->enqueued;
  e->capture.reset();
  e->seen.clear();
  return cudaSuccess;
}
cudaError_t cudaEventSynchronize(cudaEvent_t e) {
  if (!e) return set_error(cudaErrorInvalidResourceHandle);
  StreamLock lock;
  if (const cudaError_t err = event_conflict(e, true); err != cudaSuccess) return set_error(err);
  ++g_sync_count;
  if (e->q) drain(e->q, e->count);
  return cudaSuccess;
}
cudaError_t cudaEventQuery(cudaEvent_t e) {
  if (!e) return set_error(cudaErrorInvalidResourceHandle);
  StreamLock lock;
  if (const cudaError_t err = event_conflict(e, true); err != cudaSuccess) return set_error(err);
  if (!event_pending(e)) return cudaSuccess;
  drain(e->q, e->count);
  return cudaErrorNotReady;
}
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
  if (!ms || !start || !end) return set_error(cudaErrorInvalidValue);
  StreamLock lock;
  for (CUevent_st* e : {start, end})
    if (const cudaError_t err = event_conflict(e, false); err != cudaSuccess) return set_error(err);
  if (!start->q || !end->q) return set_error(cudaErrorInvalidResourceHandle);
  if (event_pending(start) || event_pending(end)) return cudaErrorNotReady;
  *ms = std::chrono::duration<float, std::milli>(*end->t - *start->t).count();
  return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize() {
  StreamLock lock;
  if (!g_captures.empty()) {  // it would wait for capturing streams
    for (const auto& c : g_captures) c->invalidated = true;
    return set_error(cudaErrorStreamCaptureUnsupported);
  }
  ++g_sync_count;
  drain_all();
  return cudaSuccess;
}
cudaError_t cudaDeviceReset() {
  {
    StreamLock lock;  // ends every capture: their graphs are lost
    while (!g_captures.empty()) {
      const std::shared_ptr<Capture> c = g_captures.back();
      end_capture(*c);
    }
  }
  return drain_all_quietly(false);
}
namespace {
// The current device is per host thread, as in CUDA.
thread_local int t_device = 0;
}  // namespace

cudaError_t cudaGetDeviceCount(int* count) {
  if (!count) return set_error(cudaErrorInvalidValue);
  *count = simt::device_count();
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) {
  if (device < 0 || device >= simt::device_count()) return set_error(cudaErrorInvalidDevice);
  t_device = device;
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* device) {
  if (!device) return set_error(cudaErrorInvalidValue);
  *device = t_device;
  return cudaSuccess;
}
cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* attr, const void* ptr) {
  if (!attr) return set_error(cudaErrorInvalidValue);
  *attr = cudaPointerAttributes{};
  attr->device = -2;  // CUDA's value for memory that belongs to no device
  if (!ptr) return cudaSuccess;
  if (simt::device_extent(ptr) > 0) {
    attr->type = cudaMemoryTypeDevice;
    attr->device = t_device;
    attr->devicePointer = const_cast<void*>(ptr);
    return cudaSuccess;
  }
  std::lock_guard<std::mutex> lock(g_alloc_mutex);
  if (extent_in(g_host_allocs, ptr) > 0) {
    attr->type = cudaMemoryTypeHost;
    attr->device = t_device;
    attr->devicePointer = attr->hostPointer = const_cast<void*>(ptr);
  }
  return cudaSuccess;
}
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int device) {
  if (!p) return set_error(cudaErrorInvalidValue);
  if (device < 0 || device >= simt::device_count()) return set_error(cudaErrorInvalidDevice);
  *p = cudaDeviceProp{};
  std::snprintf(p->name, sizeof p->name, "moetrain SIMT simulator (sm_80 limits)");
  size_t free_bytes = 0;
  cudaMemGetInfo(&free_bytes, &p->totalGlobalMem);
  p->sharedMemPerBlock = 48 * 1024;
  p->sharedMemPerBlockOptin = simt::kMaxDynamicSmem;
  p->sharedMemPerMultiprocessor = 164 * 1024;
  p->regsPerBlock = 65536;
  p->warpSize = 32;
  p->maxThreadsPerBlock = 1024;
  p->maxThreadsDim[0] = 1024;
  p->maxThreadsDim[1] = 1024;
  p->maxThreadsDim[2] = 64;
  p->maxGridSize[0] = 2147483647;
  p->maxGridSize[1] = 65535;
  p->maxGridSize[2] = 65535;
  p->maxThreadsPerMultiProcessor = 2048;
  p->multiProcessorCount = 1;
  p->l2CacheSize = 40 * 1024 * 1024;
  p->major = 8;
  p->minor = 0;
  return cudaSuccess;
}
cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (!func) return set_error(cudaErrorInvalidValue);
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize &&
      (value < 0 || static_cast<size_t>(value) > simt::kMaxDynamicSmem)) {
    return set_error(cudaErrorInvalidValue);
  }
  return cudaSuccess;
}

// ---- stream capture and graphs -----------------------------------------------------------------
cudaError_t cudaStreamBeginCapture(cudaStream_t s, cudaStreamCaptureMode mode) {
  if (mode != cudaStreamCaptureModeGlobal && mode != cudaStreamCaptureModeThreadLocal &&
      mode != cudaStreamCaptureModeRelaxed)
    return set_error(cudaErrorInvalidValue);
  StreamLock lock;
  if (!s || s == cudaStreamLegacy) return set_error(cudaErrorStreamCaptureUnsupported);
  const std::shared_ptr<Queue>& q = s->q;
  if (q->capture) return set_error(cudaErrorIllegalState);
  auto c = std::make_shared<Capture>();
  c->mode = mode;
  c->thread = std::this_thread::get_id();
  c->streams.push_back(q);
  q->capture = c;
  q->member = 0;
  q->seen.assign(1, 0);
  g_captures.push_back(std::move(c));
  return cudaSuccess;
}

cudaError_t cudaStreamEndCapture(cudaStream_t s, cudaGraph_t* graph) {
  if (!graph) return set_error(cudaErrorInvalidValue);
  *graph = nullptr;
  StreamLock lock;
  const std::shared_ptr<Queue> q = queue_of(s);
  if (q->legacy)
    if (const cudaError_t e = legacy_conflict(); e != cudaSuccess) return set_error(e);
  const std::shared_ptr<Capture> c = q->capture;
  if (!c) return set_error(cudaErrorIllegalState);
  if (c->streams.front() != q) {
    c->invalidated = true;
    return set_error(cudaErrorStreamCaptureUnmatched);
  }
  if (c->mode != cudaStreamCaptureModeRelaxed && c->thread != std::this_thread::get_id())
    return set_error(cudaErrorStreamCaptureWrongThread);
  // Joined: the origin has seen all the work of every other stream of the capture.
  bool joined = true;
  for (std::size_t k = 1; k < c->streams.size(); ++k) {
    const std::uint64_t own = c->streams[k]->seen[k];
    if (own > 0 && (k >= q->seen.size() || q->seen[k] < own)) joined = false;
  }
  end_capture(*c);
  if (c->invalidated) return set_error(cudaErrorStreamCaptureInvalidated);
  if (!joined) return set_error(cudaErrorStreamCaptureUnjoined);
  *graph = new CUgraph_st{std::make_shared<const Nodes>(std::move(c->nodes))};
  return cudaSuccess;
}

cudaError_t cudaStreamIsCapturing(cudaStream_t s, cudaStreamCaptureStatus* status) {
  if (!status) return set_error(cudaErrorInvalidValue);
  StreamLock lock;
  const std::shared_ptr<Queue> q = queue_of(s);
  if (q->legacy) {
    for (const auto& c : g_captures)
      for (const auto& b : c->streams)
        if (b->blocking) return set_error(cudaErrorStreamCaptureImplicit);  // not invalidating
    *status = cudaStreamCaptureStatusNone;
    return cudaSuccess;
  }
  *status = !q->capture               ? cudaStreamCaptureStatusNone
            : q->capture->invalidated ? cudaStreamCaptureStatusInvalidated
                                      : cudaStreamCaptureStatusActive;
  return cudaSuccess;
}

cudaError_t cudaThreadExchangeStreamCaptureMode(cudaStreamCaptureMode* mode) {
  if (!mode || (*mode != cudaStreamCaptureModeGlobal && *mode != cudaStreamCaptureModeThreadLocal &&
                *mode != cudaStreamCaptureModeRelaxed))
    return set_error(cudaErrorInvalidValue);
  std::swap(*mode, t_capture_mode);
  return cudaSuccess;
}

cudaError_t cudaGraphInstantiate(cudaGraphExec_t* exec, cudaGraph_t graph,
                                 unsigned long long flags) {
  constexpr unsigned long long known =
      cudaGraphInstantiateFlagAutoFreeOnLaunch | cudaGraphInstantiateFlagUpload |
      cudaGraphInstantiateFlagDeviceLaunch | cudaGraphInstantiateFlagUseNodePriority;
  if (!exec || !graph || (flags & ~known) != 0) return set_error(cudaErrorInvalidValue);
  auto* x = new CUgraphExec_st{};
  x->nodes = graph->nodes;  // immutable: the graph may be destroyed, the exec keeps its nodes
  for (const Work& w : *x->nodes) x->host_items += w.host_items;
  *exec = x;
  return cudaSuccess;
}

cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t s) {
  if (!exec) return set_error(cudaErrorInvalidValue);
  StreamLock lock;
  const std::shared_ptr<Queue> q = queue_of(s);
  std::shared_ptr<const Nodes> nodes = exec->nodes;
  Work w{[nodes] {
           for (const Work& n : *nodes) n.run();
         },
         [nodes] {
           for (const Work& n : *nodes)
             if (n.at_enqueue) n.at_enqueue();
         },
         exec->host_items};
  if (q->capture) return set_error(submit(q, std::move(w)));  // a child graph node
  if (q->legacy)
    if (const cudaError_t e = legacy_conflict(); e != cudaSuccess) return set_error(e);
  std::vector<Dep> deps;  // after the exec's previous launch
  if (exec->q && exec->q->completed < exec->count) deps.push_back(Dep{exec->q, exec->count});
  // Counted before it is enqueued: under the eager schedule the graph runs (and may throw) there.
  ++g_stats.graph_launches;
  exec->q = q;
  exec->count = q->enqueued + 1;
  return set_error(submit(q, std::move(w), std::move(deps)));
}

cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec) {
  if (!exec) return set_error(cudaErrorInvalidValue);
  delete exec;  // a pending launch keeps the nodes
  return cudaSuccess;
}

cudaError_t cudaGraphDestroy(cudaGraph_t graph) {
  if (!graph) return set_error(cudaErrorInvalidValue);
  delete graph;
  return cudaSuccess;
}

// ------------------------------------------------------------------------------------------------
// The simulator's stream API
// ------------------------------------------------------------------------------------------------
namespace simt {

std::string name(StreamSchedule schedule) {
  return schedule == StreamSchedule::Eager ? "eager" : "deferred";
}

StreamSchedule parse_stream_schedule(const std::string& text) {
  if (text == "eager") return StreamSchedule::Eager;
  if (text == "deferred") return StreamSchedule::Deferred;
  throw Error("simt: bad stream schedule '" + text + "': expected eager or deferred");
}

void set_stream_schedule(StreamSchedule schedule) {
  StreamLock lock;
  drain_all();
  g_stream_schedule = schedule;
}

StreamSchedule stream_schedule() {
  StreamLock lock;
  return g_stream_schedule;
}

std::vector<StreamSchedule> stream_schedules() {
  return {StreamSchedule::Eager, StreamSchedule::Deferred};
}

ScopedStreamSchedule::~ScopedStreamSchedule() {
  try {
    set_stream_schedule(previous_);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "simt: error in work drained at the end of a stream schedule scope: %s\n",
                 e.what());
    std::lock_guard<std::mutex> lock(g_stream_mutex);
    g_stream_schedule = previous_;
  }
}

namespace {
[[noreturn]] void capture_refused(const std::string& what, cudaError_t e) {
  throw Error("simt: " + what + " refused: " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) +
              ")");
}
}  // namespace

void enqueue_host(cudaStream_t stream, std::function<void()> fn) {
  StreamLock lock;
  if (const cudaError_t e = submit(queue_of(stream), Work{std::move(fn), {}, 1}); e != cudaSuccess)
    capture_refused("host work (enqueue_host)", e);
}

int device_count() {
  static const int count = [] {
    const char* text = std::getenv("MOETRAIN_SIMT_DEVICES");
    if (!text || !*text) return 1;
    char* end = nullptr;
    const long n = std::strtol(text, &end, 10);
    if (*end != '\0' || n < 1 || n > 64) {
      std::fprintf(stderr,
                   "simt: MOETRAIN_SIMT_DEVICES=%s is not a device count from 1 to 64; using 1\n",
                   text);
      return 1;
    }
    return int(n);
  }();
  return count;
}

std::size_t device_extent(const void* ptr) {
  if (!ptr) return 0;
  std::lock_guard<std::mutex> lock(g_alloc_mutex);
  return extent_in(g_device_allocs, ptr);
}

std::size_t pending_work() {
  StreamLock lock;
  std::size_t n = 0;
  for (const auto& q : queues()) n += q->items.size();
  return n;
}

std::uint64_t sync_count() {
  return g_sync_count.load();
}

void reset_sync_count() {
  g_sync_count = 0;
}

namespace detail {
void enqueue_launch(const LaunchDesc& probe, cudaStream_t stream, std::function<void()> run) {
  try {
    validate(probe);
  } catch (const Error&) {
    if (!t_in_item) {  // a failed launch invalidates the stream's capture, as in CUDA
      StreamLock lock;
      if (const auto& c = queue_of(stream)->capture) c->invalidated = true;
    }
    throw;
  }
  if (g_in_launch.load() && pthread_equal(g_launch_owner, pthread_self())) {
    throw Error("simt: kernel '" + kernel_name(probe.kernel) + "' launched from inside a kernel");
  }
  StreamLock lock;
  const std::shared_ptr<Queue> q = queue_of(stream);
  if (const cudaError_t e = submit(q, Work{std::move(run)}); e != cudaSuccess)
    capture_refused("launch of kernel '" + kernel_name(probe.kernel) + "'", e);
}
}  // namespace detail

}  // namespace simt
