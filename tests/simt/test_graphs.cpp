// CUDA stream capture and graphs: a captured sequence of kernels, memsets and async copies replayed
// many times gives bit for bit what running it directly gives; a replay reads the buffers as they
// are then; fork/join across streams; every call that a capture forbids fails with CUDA's error
// code, invalidates the capture and leaves the streams usable; the capture modes across threads.
// The first part uses the CUDA runtime API only, so moetrain_gpu_tests runs it against CUDA
// itself; the last part (the deferred schedule, Stats, sync_count) is the simulator's and is
// compiled in the SIMT build only.
#include <catch2/catch.hpp>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "elementwise.cuh"
#include "kernel_test_util.hpp"
#if defined(MOETRAIN_SIMT)
#include "test_kernels.hpp"
#endif

namespace {

namespace mk = moetrain::kernels;
using Catch::Matchers::Contains;
using kernel_test::DeviceBuffer;
using kernel_test::Event;
using kernel_test::Stream;
using kernel_test::times;

constexpr std::size_t kN = 300;
constexpr std::size_t kBytes = kN * sizeof(float);

std::vector<float> iota(float start) {
  return kernel_test::iota_floats(kN, start);
}

// Pinned host memory: what async copies of a graph use.
struct HostBuffer {
  float* ptr = nullptr;
  HostBuffer() { MOETRAIN_CUDA_CHECK(cudaMallocHost(&ptr, kBytes)); }
  ~HostBuffer() { cudaFreeHost(ptr); }
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;
  std::vector<float> get() const { return std::vector<float>(ptr, ptr + kN); }
  void set(const std::vector<float>& v) { std::memcpy(ptr, v.data(), kBytes); }
};

// A captured graph and its executable.
struct Graph {
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  Graph() = default;
  ~Graph() {
    if (exec) cudaGraphExecDestroy(exec);
    if (graph) cudaGraphDestroy(graph);
  }
  Graph(const Graph&) = delete;
  Graph& operator=(const Graph&) = delete;
  void end_capture(cudaStream_t s) {
    MOETRAIN_CUDA_CHECK(cudaStreamEndCapture(s, &graph));
    REQUIRE(graph != nullptr);
    MOETRAIN_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  }
  void launch(cudaStream_t s) const { MOETRAIN_CUDA_CHECK(cudaGraphLaunch(exec, s)); }
};

cudaStreamCaptureStatus capture_status(cudaStream_t s) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusInvalidated;
  MOETRAIN_CUDA_CHECK(cudaStreamIsCapturing(s, &status));
  return status;
}

// Ends a capture that must have been invalidated: the error, a null graph, the stream not
// capturing any more.
void end_invalidated(cudaStream_t s) {
  cudaGraph_t graph = nullptr;
  CHECK(cudaStreamEndCapture(s, &graph) == cudaErrorStreamCaptureInvalidated);
  CHECK(graph == nullptr);
  if (graph) cudaGraphDestroy(graph);
  cudaGetLastError();
  CHECK(capture_status(s) == cudaStreamCaptureStatusNone);
}

// One step of work on a stream: every kind a graph records, each depending on the one before,
// and an accumulator that makes the result depend on how many steps ran, and in which order.
struct Step {
  float *x, *y, *z, *acc;
  const float* in;  // pinned host
  float* out;       // pinned host
  void enqueue(cudaStream_t s) const {
    MOETRAIN_CUDA_CHECK(cudaMemcpyAsync(x, in, kBytes, cudaMemcpyHostToDevice, s));
    MOETRAIN_CUDA_CHECK(cudaMemsetAsync(y, 0, kBytes, s));
    mk::scale(x, kN, 3.0f, s);           // x = 3 in
    mk::axpby(y, x, kN, 1.0f, 2.0f, s);  // y = x + 2 y = 3 in
    mk::add_inplace(acc, y, kN, s);      // acc += 3 in
    mk::scale(acc, kN, 0.7f, s);         // rounds: the order and number of steps show
    MOETRAIN_CUDA_CHECK(cudaMemcpyAsync(z, acc, kBytes, cudaMemcpyDeviceToDevice, s));
    MOETRAIN_CUDA_CHECK(cudaMemcpyAsync(out, z, kBytes, cudaMemcpyDeviceToHost, s));
  }
};

}  // namespace

TEST_CASE("graphs: a captured sequence replayed N times gives what running it gives, bit for bit",
          "[simt][graphs]") {
  EACH_STREAM_SCHEDULE();
  constexpr int kReplays = 5;
  std::mt19937 rng(7);
  const std::vector<float> input = kernel_test::random_floats(kN, rng);
  const std::vector<float> sentinel(kN, -7.0f);
  DeviceBuffer<float> x(kN), y(kN), z(kN), acc(iota(1));
  HostBuffer in, out;
  in.set(input);
  Stream s(cudaStreamNonBlocking);
  const Step step{x.ptr, y.ptr, z.ptr, acc.ptr, in.ptr, out.ptr};

  std::vector<std::vector<float>> direct;
  for (int r = 0; r < kReplays; ++r) {
    step.enqueue(s.s);
    s.sync();
    direct.push_back(out.get());
  }
  const std::vector<float> acc_direct = acc.download();

  acc.upload(iota(1));
  out.set(sentinel);
  CHECK(capture_status(s.s) == cudaStreamCaptureStatusNone);
  MOETRAIN_CUDA_CHECK(cudaStreamBeginCapture(s.s, cudaStreamCaptureModeGlobal));
  CHECK(capture_status(s.s) == cudaStreamCaptureStatusActive);
  step.enqueue(s.s);
  Graph g;
  g.end_capture(s.s);
  CHECK(capture_status(s.s) == cudaStreamCaptureStatusNone);
  s.sync();
  CHECK(out.get() == sentinel);  // capturing ran nothing
  CHECK(acc.download() == iota(1));

  for (int r = 0; r < kReplays; ++r) {
    INFO("replay " << r);
    g.launch(s.s);
    s.sync();
    CHECK(out.get() == direct[std::size_t(r)]);
  }
  CHECK(acc.download() == acc_direct);
}

TEST_CASE("graphs: a replay reads the buffers as they are then (same pointers, new contents)",
          "[simt][graphs]") {
  EACH_STREAM_SCHEDULE();
  DeviceBuffer<float> x(kN);
  HostBuffer out;
  Stream s(cudaStreamNonBlocking);
  MOETRAIN_CUDA_CHECK(cudaStreamBeginCapture(s.s, cudaStreamCaptureModeGlobal));
  mk::scale(x.ptr, kN, 2.0f, s.s);
  MOETRAIN_CUDA_CHECK(cudaMemcpyAsync(out.ptr, x.ptr, kBytes, cudaMemcpyDeviceToHost, s.s));
  Graph g;
  g.end_capture(s.s);
  for (int r = 0; r < 4; ++r) {
    INFO("replay " << r);
    x.upload(iota(float(10 * r)));
    g.launch(s.s);
    s.sync();
    CHECK(out.get() == times(iota(float(10 * r)), 2));
  }
}

TEST_CASE("graphs: cudaStreamIsCapturing through a capture, an invalidation and a new capture",
          "[simt][graphs]") {
  DeviceBuffer<float> x(iota(1));
  Stream s(cudaStreamDefault);  // blocking: the legacy stream may not be used while it captures
  CHECK(capture_status(s.s) == cudaStreamCaptureStatusNone);
  CHECK(capture_status(cudaStreamLegacy) == cudaStreamCaptureStatusNone);
  MOETRAIN_CUDA_CHECK(cudaStreamBeginCapture(s.s, cudaStreamCaptureModeGlobal));
  CHECK(capture_status(s.s) == cudaStreamCaptureStatusActive);
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  CHECK(cudaStreamIsCapturing(cudaStreamLegacy, &status) == cudaErrorStreamCaptureImplicit);
  cudaGetLastError();
  CHECK(capture_status(s.s) == cudaStreamCaptureStatusActive);  // that does not invalidate
  mk::scale(x.ptr, kN, 2.0f, s.s);
  CHECK(cudaStreamSynchronize(s.s) == cudaErrorStreamCaptureUnsupported);
  cudaGetLastError();
  CHECK(capture_status(s.s) == cudaStreamCaptureStatusInvalidated);
  end_invalidated(s.s);
  CHECK(capture_status(cudaStreamLegacy) == cudaStreamCaptureStatusNone);

  MOETRAIN_CUDA_CHECK(cudaStreamBeginCapture(s.s, cudaStreamCaptureModeGlobal));
  CHECK(capture_status(s.s) == cudaStreamCaptureStatusActive);
  mk::scale(x.ptr, kN, 3.0f, s.s);
  Graph g;
  g.end_capture(s.s);
  CHECK(capture_status(s.s) == cudaStreamCaptureStatusNone);
  g.launch(s.s);
  s.sync();
  CHECK(x.download() == times(iota(1), 3));  // the invalidated capture's scale never ran
}

namespace {

// What an illegal call may use: the capturing stream, an event recorded before the capture and one
// recorded in it, buffers.
struct IllegalContext {
  cudaStream_t s;
  cudaEvent_t outside, inside;
  float* device;
  float* spare;  // device memory the capture does not use
  std::vector<float>& host;
};

struct IllegalCall {
  const char* what;
  bool blocking;  // the capturing stream is a blocking one
  cudaError_t expected;
  std::function<cudaError_t(IllegalContext&)> call;
};

// The CUDA error in the message of what `fn` throws (a launch that the capture refuses throws).
cudaError_t thrown(const std::function<void()>& fn, cudaError_t expected) {
  try {
    fn();
  } catch (const std::exception& e) {
    return std::string(e.what()).find(cudaGetErrorName(expected)) != std::string::npos
               ? expected
               : cudaErrorUnknown;
  }
  return cudaSuccess;
}

std::vector<IllegalCall> illegal_calls() {
  return {
      {"cudaStreamSynchronize of the capturing stream", false, cudaErrorStreamCaptureUnsupported,
       [](IllegalContext& c) { return cudaStreamSynchronize(c.s); }},
      {"cudaStreamQuery of the capturing stream", false, cudaErrorStreamCaptureUnsupported,
       [](IllegalContext& c) { return cudaStreamQuery(c.s); }},
      {"cudaDeviceSynchronize", false, cudaErrorStreamCaptureUnsupported,
       [](IllegalContext&) { return cudaDeviceSynchronize(); }},
      {"cudaEventSynchronize of an event recorded in the capture", false, cudaErrorCapturedEvent,
       [](IllegalContext& c) { return cudaEventSynchronize(c.inside); }},
      {"cudaEventQuery of an event recorded in the capture", false, cudaErrorCapturedEvent,
       [](IllegalContext& c) { return cudaEventQuery(c.inside); }},
      {"cudaEventQuery of another event (global mode)", false, cudaErrorStreamCaptureUnsupported,
       [](IllegalContext& c) { return cudaEventQuery(c.outside); }},
      {"cudaMalloc (global mode)", false, cudaErrorStreamCaptureUnsupported,
       [](IllegalContext&) {
         void* p = nullptr;
         const cudaError_t rc = cudaMalloc(&p, 256);
         if (rc == cudaSuccess) cudaFree(p);
         return rc;
       }},
      {"cudaFree (global mode)", false, cudaErrorStreamCaptureUnsupported,
       [](IllegalContext& c) { return cudaFree(c.spare); }},
      {"a blocking cudaMemcpy to the host", false, cudaErrorStreamCaptureUnsupported,
       [](IllegalContext& c) {
         return cudaMemcpy(c.host.data(), c.spare, kBytes, cudaMemcpyDeviceToHost);
       }},
      {"a blocking cudaMemcpy from the host", false, cudaErrorStreamCaptureUnsupported,
       [](IllegalContext& c) {
         return cudaMemcpy(c.spare, c.host.data(), kBytes, cudaMemcpyHostToDevice);
       }},
      {"a wait on an event recorded outside the capture", false, cudaErrorStreamCaptureIsolation,
       [](IllegalContext& c) { return cudaStreamWaitEvent(c.s, c.outside, 0); }},
      {"a kernel on the legacy stream while a blocking stream captures", true,
       cudaErrorStreamCaptureImplicit,
       [](IllegalContext& c) {
         return thrown([&] { mk::scale(c.spare, kN, 2.0f, nullptr); },
                       cudaErrorStreamCaptureImplicit);
       }},
      {"cudaMemsetAsync on the legacy stream while a blocking stream captures", true,
       cudaErrorStreamCaptureImplicit,
       [](IllegalContext& c) { return cudaMemsetAsync(c.spare, 0, kBytes, cudaStreamLegacy); }},
      {"cudaMemset while a blocking stream captures", true, cudaErrorStreamCaptureImplicit,
       [](IllegalContext& c) { return cudaMemset(c.spare, 0, kBytes); }},
      {"cudaStreamSynchronize of the legacy stream while a blocking stream captures", true,
       cudaErrorStreamCaptureImplicit,
       [](IllegalContext&) { return cudaStreamSynchronize(cudaStreamLegacy); }},
  };
}

}  // namespace

TEST_CASE(
    "graphs: a call that capture forbids fails, invalidates the capture, leaves the stream "
    "usable",
    "[simt][graphs]") {
  for (const IllegalCall& illegal : illegal_calls()) {
    INFO(illegal.what);
    DeviceBuffer<float> x(iota(1)), spare(iota(5));
    std::vector<float> host = iota(-3);
    Event outside, inside;
    Stream s(illegal.blocking ? cudaStreamDefault : cudaStreamNonBlocking);
    MOETRAIN_CUDA_CHECK(cudaEventRecord(outside.e, s.s));
    s.sync();
    MOETRAIN_CUDA_CHECK(cudaStreamBeginCapture(s.s, cudaStreamCaptureModeGlobal));
    mk::scale(x.ptr, kN, 2.0f, s.s);
    MOETRAIN_CUDA_CHECK(cudaEventRecord(inside.e, s.s));
    IllegalContext context{s.s, outside.e, inside.e, x.ptr, spare.ptr, host};
    CHECK(illegal.call(context) == illegal.expected);
    cudaGetLastError();
    CHECK(capture_status(s.s) == cudaStreamCaptureStatusInvalidated);
    // Later work on the stream fails, until the capture ends.
    CHECK_THROWS_WITH(mk::scale(x.ptr, kN, 2.0f, s.s),
                      Contains("cudaErrorStreamCaptureInvalidated"));
    CHECK(cudaMemsetAsync(x.ptr, 0, kBytes, s.s) == cudaErrorStreamCaptureInvalidated);
    cudaGetLastError();
    end_invalidated(s.s);
    // Usable again, and none of the captured work ran.
    mk::scale(x.ptr, kN, 3.0f, s.s);
    s.sync();
    CHECK(x.download() == times(iota(1), 3));
    CHECK(spare.download() == iota(5));
    CHECK(host == iota(-3));
  }
}

TEST_CASE("graphs: the capture modes decide who may make potentially unsafe calls",
          "[simt][graphs]") {
  DeviceBuffer<float> x(iota(1));
  Stream s(cudaStreamNonBlocking);
  // cudaMalloc and cudaFree from another thread (its mode relaxed, or as it starts: global): what
  // they returned. No Catch2 assertion runs on that thread.
  const auto malloc_free_elsewhere = [](bool relaxed_thread) {
    cudaError_t rc = cudaErrorUnknown;
    cudaStreamCaptureMode initial = cudaStreamCaptureModeRelaxed;
    std::thread t([&] {
      cudaStreamCaptureMode mode =
          relaxed_thread ? cudaStreamCaptureModeRelaxed : cudaStreamCaptureModeGlobal;
      if (cudaThreadExchangeStreamCaptureMode(&mode) != cudaSuccess) return;
      initial = mode;
      void* p = nullptr;
      rc = cudaMalloc(&p, 256);
      if (rc == cudaSuccess) rc = cudaFree(p);
      cudaGetLastError();
    });
    t.join();
    CHECK(initial == cudaStreamCaptureModeGlobal);  // every thread starts global
    return rc;
  };

  SECTION("relaxed: the capturing thread may allocate and free") {
    MOETRAIN_CUDA_CHECK(cudaStreamBeginCapture(s.s, cudaStreamCaptureModeRelaxed));
    mk::scale(x.ptr, kN, 2.0f, s.s);
    void* p = nullptr;
    CHECK(cudaMalloc(&p, 256) == cudaSuccess);
    CHECK(cudaFree(p) == cudaSuccess);
    CHECK(malloc_free_elsewhere(false) == cudaSuccess);
    CHECK(capture_status(s.s) == cudaStreamCaptureStatusActive);
    Graph g;
    g.end_capture(s.s);
    g.launch(s.s);
    s.sync();
    CHECK(x.download() == times(iota(1), 2));
  }
  SECTION("thread-local: the capturing thread may not, another thread may") {
    MOETRAIN_CUDA_CHECK(cudaStreamBeginCapture(s.s, cudaStreamCaptureModeThreadLocal));
    CHECK(malloc_free_elsewhere(false) == cudaSuccess);
    CHECK(capture_status(s.s) == cudaStreamCaptureStatusActive);
    void* p = nullptr;
    CHECK(cudaMalloc(&p, 256) == cudaErrorStreamCaptureUnsupported);
    cudaGetLastError();
    CHECK(capture_status(s.s) == cudaStreamCaptureStatusInvalidated);
    end_invalidated(s.s);
  }
  SECTION("global: another thread may not, unless its own mode is relaxed") {
    MOETRAIN_CUDA_CHECK(cudaStreamBeginCapture(s.s, cudaStreamCaptureModeGlobal));
    CHECK(malloc_free_elsewhere(true) == cudaSuccess);
    CHECK(capture_status(s.s) == cudaStreamCaptureStatusActive);
    CHECK(malloc_free_elsewhere(false) == cudaErrorStreamCaptureUnsupported);
    CHECK(capture_status(s.s) == cudaStreamCaptureStatusInvalidated);
    end_invalidated(s.s);
  }
}

namespace {

// s0: x *= 2; fork to s1: y += x; s0 meanwhile: z *= 5; join: x += y.
void fork_join(cudaStream_t s0, cudaStream_t s1, cudaEvent_t fork, cudaEvent_t join, float* x,
               float* y, float* z) {
  mk::scale(x, kN, 2.0f, s0);
  MOETRAIN_CUDA_CHECK(cudaEventRecord(fork, s0));
  MOETRAIN_CUDA_CHECK(cudaStreamWaitEvent(s1, fork, 0));
  mk::add_inplace(y, x, kN, s1);
  mk::scale(z, kN, 5.0f, s0);
  MOETRAIN_CUDA_CHECK(cudaEventRecord(join, s1));
  MOETRAIN_CUDA_CHECK(cudaStreamWaitEvent(s0, join, 0));
  mk::add_inplace(x, y, kN, s0);
}

}  // namespace

TEST_CASE("graphs: fork and join across streams, captured and replayed", "[simt][graphs]") {
  EACH_STREAM_SCHEDULE();
  constexpr int kReplays = 3;
  DeviceBuffer<float> x(iota(1)), y(iota(2)), z(iota(3));     // run directly
  DeviceBuffer<float> gx(iota(1)), gy(iota(2)), gz(iota(3));  // by the graph
  Event fork, join;
  Stream s0(cudaStreamNonBlocking), s1(cudaStreamNonBlocking);
  for (int r = 0; r < kReplays; ++r) fork_join(s0.s, s1.s, fork.e, join.e, x.ptr, y.ptr, z.ptr);
  s0.sync();

  MOETRAIN_CUDA_CHECK(cudaStreamBeginCapture(s0.s, cudaStreamCaptureModeGlobal));
  mk::scale(gx.ptr, kN, 2.0f, s0.s);
  MOETRAIN_CUDA_CHECK(cudaEventRecord(fork.e, s0.s));
  CHECK(capture_status(s1.s) == cudaStreamCaptureStatusNone);
  MOETRAIN_CUDA_CHECK(cudaStreamWaitEvent(s1.s, fork.e, 0));
  CHECK(capture_status(s1.s) == cudaStreamCaptureStatusActive);  // s1 joined the capture
  mk::add_inplace(gy.ptr, gx.ptr, kN, s1.s);
  mk::scale(gz.ptr, kN, 5.0f, s0.s);
  MOETRAIN_CUDA_CHECK(cudaEventRecord(join.e, s1.s));
  MOETRAIN_CUDA_CHECK(cudaStreamWaitEvent(s0.s, join.e, 0));
  mk::add_inplace(gx.ptr, gy.ptr, kN, s0.s);
  Graph g;
  g.end_capture(s0.s);
  CHECK(capture_status(s1.s) == cudaStreamCaptureStatusNone);  // both left capture mode
  CHECK(gx.download() == iota(1));
  for (int r = 0; r < kReplays; ++r) g.launch(s0.s);
  s0.sync();
  CHECK(gx.download() == x.download());
  CHECK(gy.download() == y.download());
  CHECK(gz.download() == z.download());

  // A stream that joined and did nothing needs no join back.
  MOETRAIN_CUDA_CHECK(cudaStreamBeginCapture(s0.s, cudaStreamCaptureModeGlobal));
  mk::scale(gz.ptr, kN, 0.5f, s0.s);
  MOETRAIN_CUDA_CHECK(cudaEventRecord(fork.e, s0.s));
  MOETRAIN_CUDA_CHECK(cudaStreamWaitEvent(s1.s, fork.e, 0));
  Graph idle;
  idle.end_capture(s0.s);
  CHECK(capture_status(s1.s) == cudaStreamCaptureStatusNone);
}

TEST_CASE("graphs: a fork not joined back, and ending a capture on the wrong stream, fail",
          "[simt][graphs]") {
  DeviceBuffer<float> x(iota(1)), y(iota(2));
  Event fork, join;
  Stream s0(cudaStreamNonBlocking), s1(cudaStreamNonBlocking);

  SECTION("unjoined") {
    MOETRAIN_CUDA_CHECK(cudaStreamBeginCapture(s0.s, cudaStreamCaptureModeGlobal));
    mk::scale(x.ptr, kN, 2.0f, s0.s);
    MOETRAIN_CUDA_CHECK(cudaEventRecord(fork.e, s0.s));
    MOETRAIN_CUDA_CHECK(cudaStreamWaitEvent(s1.s, fork.e, 0));
    mk::scale(y.ptr, kN, 2.0f, s1.s);
    // A join recorded before s1's last work does not join it.
    MOETRAIN_CUDA_CHECK(cudaEventRecord(join.e, s1.s));
    mk::scale(y.ptr, kN, 3.0f, s1.s);
    MOETRAIN_CUDA_CHECK(cudaStreamWaitEvent(s0.s, join.e, 0));
    cudaGraph_t graph = nullptr;
    CHECK(cudaStreamEndCapture(s0.s, &graph) == cudaErrorStreamCaptureUnjoined);
    CHECK(graph == nullptr);
    cudaGetLastError();
  }
  SECTION("unmatched") {
    MOETRAIN_CUDA_CHECK(cudaStreamBeginCapture(s0.s, cudaStreamCaptureModeGlobal));
    MOETRAIN_CUDA_CHECK(cudaEventRecord(fork.e, s0.s));
    MOETRAIN_CUDA_CHECK(cudaStreamWaitEvent(s1.s, fork.e, 0));
    mk::scale(y.ptr, kN, 2.0f, s1.s);
    cudaGraph_t graph = nullptr;
    CHECK(cudaStreamEndCapture(s1.s, &graph) == cudaErrorStreamCaptureUnmatched);
    CHECK(graph == nullptr);
    cudaGetLastError();
    CHECK(capture_status(s0.s) == cudaStreamCaptureStatusInvalidated);
    CHECK(capture_status(s1.s) == cudaStreamCaptureStatusInvalidated);
    CHECK(cudaEventRecord(join.e, s1.s) == cudaErrorStreamCaptureInvalidated);
    cudaGetLastError();
    end_invalidated(s0.s);
  }
  SECTION("two captures merged by a wait") {
    MOETRAIN_CUDA_CHECK(cudaStreamBeginCapture(s0.s, cudaStreamCaptureModeGlobal));
    MOETRAIN_CUDA_CHECK(cudaStreamBeginCapture(s1.s, cudaStreamCaptureModeGlobal));
    mk::scale(x.ptr, kN, 2.0f, s0.s);
    MOETRAIN_CUDA_CHECK(cudaEventRecord(fork.e, s0.s));
    CHECK(cudaStreamWaitEvent(s1.s, fork.e, 0) == cudaErrorStreamCaptureMerge);
    cudaGetLastError();
    end_invalidated(s1.s);
    end_invalidated(s0.s);
  }
  // Both streams work again, and none of the captured work ran.
  CHECK(capture_status(s0.s) == cudaStreamCaptureStatusNone);
  CHECK(capture_status(s1.s) == cudaStreamCaptureStatusNone);
  mk::add_inplace(x.ptr, y.ptr, kN, s1.s);
  s1.sync();
  std::vector<float> expect = iota(1);
  for (std::size_t i = 0; i < kN; ++i) expect[i] += iota(2)[i];
  CHECK(x.download() == expect);
}

// ---- the simulator's own behaviour --------------------------------------------------------------
#if defined(MOETRAIN_SIMT)

using kernel_test::all_poison;
using simt::StreamSchedule;

TEST_CASE("graphs (simulator): under the deferred schedule a graph launch runs when ordered",
          "[simt][graphs]") {
  simt::ScopedStreamSchedule scope(StreamSchedule::Deferred);
  DeviceBuffer<float> x(iota(1));
  HostBuffer out;
  out.set(iota(-9));
  Stream s(cudaStreamNonBlocking), other(cudaStreamNonBlocking);
  MOETRAIN_CUDA_CHECK(cudaStreamBeginCapture(s.s, cudaStreamCaptureModeGlobal));
  mk::scale(x.ptr, kN, 2.0f, s.s);
  MOETRAIN_CUDA_CHECK(cudaMemcpyAsync(out.ptr, x.ptr, kBytes, cudaMemcpyDeviceToHost, s.s));
  CHECK(simt::pending_work() == 0);
  Graph g;
  g.end_capture(s.s);
  CHECK(out.get() == iota(-9));  // a captured copy touches nothing

  g.launch(s.s);
  CHECK(simt::pending_work() == 1);  // one item: the whole graph
  CHECK(all_poison(out.get()));      // its download has not arrived
  CHECK(x.download() == iota(1));    // the legacy stream does not wait for s
  g.launch(s.s);
  CHECK(simt::pending_work() == 2);
  s.sync();
  CHECK(simt::pending_work() == 0);
  CHECK(out.get() == times(iota(1), 4));

  // A launch waits for the exec's previous launch, on whichever stream it was.
  g.launch(s.s);
  g.launch(other.s);
  CHECK(simt::pending_work() == 2);
  other.sync();
  CHECK(simt::pending_work() == 0);
  CHECK(out.get() == times(iota(1), 16));
}

TEST_CASE("graphs (simulator): stats count replayed launches, graph launches, captured nodes",
          "[simt][graphs]") {
  EACH_STREAM_SCHEDULE();
  DeviceBuffer<float> x(iota(1));
  Stream s(cudaStreamNonBlocking);
  int host_runs = 0;
  simt::reset_stats();
  simt::reset_sync_count();
  MOETRAIN_CUDA_CHECK(cudaStreamBeginCapture(s.s, cudaStreamCaptureModeGlobal));
  mk::scale(x.ptr, kN, 2.0f, s.s);
  mk::scale(x.ptr, kN, 0.5f, s.s);
  mk::scale(x.ptr, kN, 3.0f, s.s);
  MOETRAIN_CUDA_CHECK(cudaMemsetAsync(x.ptr, 0, 0, s.s));  // nothing to record
  simt::enqueue_host(s.s, [&host_runs] { ++host_runs; });
  Graph g;
  g.end_capture(s.s);
  simt::Stats st = simt::stats();
  CHECK(st.launches == 0);
  CHECK(st.captured_nodes == 4);
  CHECK(st.host_items == 0);
  CHECK(st.graph_launches == 0);
  CHECK(host_runs == 0);
  constexpr int kReplays = 4;
  for (int r = 0; r < kReplays; ++r) g.launch(s.s);
  s.sync();
  st = simt::stats();
  CHECK(st.launches == 3 * kReplays);
  CHECK(st.graph_launches == kReplays);
  CHECK(st.host_items == kReplays);
  CHECK(st.captured_nodes == 4);
  CHECK(host_runs == kReplays);  // the recorded function is called, never moved from
  CHECK(simt::sync_count() == 1);
  CHECK(x.download() == times(iota(1), 81));
}

TEST_CASE("graphs (simulator): a call that capture forbids runs nothing and is no host sync",
          "[simt][graphs]") {
  simt::ScopedStreamSchedule scope(StreamSchedule::Deferred);
  DeviceBuffer<float> x(iota(1)), y(iota(2));
  std::vector<float> host(kN);
  Stream s(cudaStreamNonBlocking), busy(cudaStreamNonBlocking);
  mk::scale(y.ptr, kN, 2.0f, busy.s);  // pending on another stream
  MOETRAIN_CUDA_CHECK(cudaStreamBeginCapture(s.s, cudaStreamCaptureModeGlobal));
  mk::scale(x.ptr, kN, 2.0f, s.s);
  simt::reset_sync_count();
  CHECK(cudaStreamSynchronize(s.s) == cudaErrorStreamCaptureUnsupported);
  CHECK(cudaDeviceSynchronize() == cudaErrorStreamCaptureUnsupported);
  CHECK(cudaMemcpy(host.data(), y.ptr, kBytes, cudaMemcpyDeviceToHost) ==
        cudaErrorStreamCaptureUnsupported);
  CHECK(cudaFree(y.ptr) == cudaErrorStreamCaptureUnsupported);  // y stays allocated
  CHECK(cudaGetLastError() == cudaErrorStreamCaptureUnsupported);
  CHECK(simt::sync_count() == 0);
  CHECK(simt::pending_work() == 1);  // busy's kernel did not run
  end_invalidated(s.s);
  busy.sync();
  CHECK(simt::sync_count() == 1);
  CHECK(y.download() == times(iota(2), 2));
  CHECK(x.download() == iota(1));
}

TEST_CASE("graphs (simulator): capture calls on the wrong stream or state, and the error names",
          "[simt][graphs]") {
  DeviceBuffer<float> x(iota(1));
  Stream s(cudaStreamNonBlocking);
  cudaGraph_t graph = nullptr;
  CHECK(cudaStreamBeginCapture(nullptr, cudaStreamCaptureModeGlobal) ==
        cudaErrorStreamCaptureUnsupported);
  CHECK(cudaStreamBeginCapture(cudaStreamLegacy, cudaStreamCaptureModeGlobal) ==
        cudaErrorStreamCaptureUnsupported);
  CHECK(cudaStreamBeginCapture(s.s, static_cast<cudaStreamCaptureMode>(7)) ==
        cudaErrorInvalidValue);
  CHECK(cudaStreamEndCapture(s.s, &graph) == cudaErrorIllegalState);
  CHECK(graph == nullptr);
  MOETRAIN_CUDA_CHECK(cudaStreamBeginCapture(s.s, cudaStreamCaptureModeGlobal));
  CHECK(cudaStreamBeginCapture(s.s, cudaStreamCaptureModeGlobal) == cudaErrorIllegalState);
  CHECK(capture_status(s.s) == cudaStreamCaptureStatusActive);
  CHECK(cudaStreamEndCapture(s.s, nullptr) == cudaErrorInvalidValue);
  mk::scale(x.ptr, kN, 2.0f, s.s);
  Graph g;
  g.end_capture(s.s);
  cudaGraphExec_t exec = nullptr;
  CHECK(cudaGraphInstantiate(&exec, g.graph, 1ull << 40) == cudaErrorInvalidValue);
  CHECK(cudaGraphInstantiate(&exec, nullptr, 0) == cudaErrorInvalidValue);
  CHECK(cudaGraphLaunch(nullptr, s.s) == cudaErrorInvalidValue);
  CHECK(cudaGraphDestroy(nullptr) == cudaErrorInvalidValue);
  CHECK(cudaGraphExecDestroy(nullptr) == cudaErrorInvalidValue);
  // The graph outlives its source graph and exec: a second exec of it, the graph destroyed first.
  MOETRAIN_CUDA_CHECK(
      cudaGraphInstantiate(&exec, g.graph, cudaGraphInstantiateFlagAutoFreeOnLaunch));
  MOETRAIN_CUDA_CHECK(cudaGraphDestroy(g.graph));
  g.graph = nullptr;
  MOETRAIN_CUDA_CHECK(cudaGraphLaunch(exec, s.s));
  MOETRAIN_CUDA_CHECK(cudaGraphExecDestroy(exec));
  s.sync();
  CHECK(x.download() == times(iota(1), 2));
  cudaGetLastError();

  cudaStreamCaptureMode mode = static_cast<cudaStreamCaptureMode>(9);
  CHECK(cudaThreadExchangeStreamCaptureMode(&mode) == cudaErrorInvalidValue);
  mode = cudaStreamCaptureModeThreadLocal;
  MOETRAIN_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));
  CHECK(mode == cudaStreamCaptureModeGlobal);
  MOETRAIN_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));
  CHECK(mode == cudaStreamCaptureModeThreadLocal);
  cudaGetLastError();

  for (cudaError_t e : {cudaErrorIllegalState, cudaErrorStreamCaptureUnsupported,
                        cudaErrorStreamCaptureInvalidated, cudaErrorStreamCaptureMerge,
                        cudaErrorStreamCaptureUnmatched, cudaErrorStreamCaptureUnjoined,
                        cudaErrorStreamCaptureIsolation, cudaErrorStreamCaptureImplicit,
                        cudaErrorCapturedEvent, cudaErrorStreamCaptureWrongThread}) {
    CHECK(std::string(cudaGetErrorName(e)) != "cudaErrorUnknown");
    CHECK(std::string(cudaGetErrorString(e)) != "unknown error");
  }
  CHECK(std::string(cudaGetErrorName(cudaErrorStreamCaptureImplicit)) ==
        "cudaErrorStreamCaptureImplicit");
}

TEST_CASE(
    "graphs (simulator): a graph launched inside a capture, a capture's thread, stream "
    "destruction",
    "[simt][graphs]") {
  EACH_STREAM_SCHEDULE();
  DeviceBuffer<float> x(iota(1));
  Stream s(cudaStreamNonBlocking);
  MOETRAIN_CUDA_CHECK(cudaStreamBeginCapture(s.s, cudaStreamCaptureModeGlobal));
  mk::scale(x.ptr, kN, 2.0f, s.s);
  Graph inner;
  inner.end_capture(s.s);
  MOETRAIN_CUDA_CHECK(cudaStreamBeginCapture(s.s, cudaStreamCaptureModeGlobal));
  inner.launch(s.s);  // a child graph
  mk::scale(x.ptr, kN, 3.0f, s.s);
  Graph outer;
  outer.end_capture(s.s);
  outer.launch(s.s);
  outer.launch(s.s);
  s.sync();
  CHECK(x.download() == times(iota(1), 36));

  // A capture not begun relaxed ends on its own thread only.
  MOETRAIN_CUDA_CHECK(cudaStreamBeginCapture(s.s, cudaStreamCaptureModeThreadLocal));
  cudaError_t elsewhere = cudaSuccess;
  std::thread([&] {
    cudaGraph_t graph = nullptr;
    elsewhere = cudaStreamEndCapture(s.s, &graph);
    cudaGetLastError();
  }).join();
  CHECK(elsewhere == cudaErrorStreamCaptureWrongThread);
  CHECK(capture_status(s.s) == cudaStreamCaptureStatusActive);
  Graph empty;
  empty.end_capture(s.s);
  empty.launch(s.s);  // an empty graph runs nothing
  s.sync();

  // Destroying a capturing stream: a joined one invalidates the capture, the origin ends it.
  Event fork;
  Stream origin(cudaStreamNonBlocking);
  MOETRAIN_CUDA_CHECK(cudaStreamBeginCapture(origin.s, cudaStreamCaptureModeGlobal));
  MOETRAIN_CUDA_CHECK(cudaEventRecord(fork.e, origin.s));
  {
    cudaStream_t joined = nullptr;
    MOETRAIN_CUDA_CHECK(cudaStreamCreateWithFlags(&joined, cudaStreamNonBlocking));
    MOETRAIN_CUDA_CHECK(cudaStreamWaitEvent(joined, fork.e, 0));
    CHECK(cudaStreamDestroy(joined) == cudaErrorStreamCaptureInvalidated);
  }
  end_invalidated(origin.s);
  cudaStream_t doomed = nullptr;
  MOETRAIN_CUDA_CHECK(cudaStreamCreateWithFlags(&doomed, cudaStreamNonBlocking));
  MOETRAIN_CUDA_CHECK(cudaStreamBeginCapture(doomed, cudaStreamCaptureModeGlobal));
  mk::scale(x.ptr, kN, 2.0f, doomed);
  CHECK(cudaStreamDestroy(doomed) == cudaErrorStreamCaptureInvalidated);
  cudaGetLastError();
  MOETRAIN_CUDA_CHECK(cudaDeviceSynchronize());  // no capture is left under way
  CHECK(x.download() == times(iota(1), 36));
}

TEST_CASE("graphs (simulator): a deferred graph's kernel error is thrown by the call that runs it",
          "[simt][graphs]") {
  simt::ScopedStreamSchedule scope(StreamSchedule::Deferred);
  int* out = nullptr;
  MOETRAIN_CUDA_CHECK(cudaMalloc(&out, 256 * sizeof(int)));
  {
    Stream s(cudaStreamNonBlocking);
    MOETRAIN_CUDA_CHECK(cudaStreamBeginCapture(s.s, cudaStreamCaptureModeGlobal));
    moetrain::simt_test::exit_before_barrier(out, s.s);
    Graph g;
    g.end_capture(s.s);
    g.launch(s.s);
    CHECK_THROWS_WITH(cudaStreamSynchronize(s.s), Contains("__syncthreads"));
    g.launch(s.s);  // each launch runs (and fails) again
    CHECK_THROWS_WITH(cudaStreamSynchronize(s.s), Contains("__syncthreads"));
    CHECK(simt::pending_work() == 0);
    // A launch configuration error invalidates the capture it was made in.
    MOETRAIN_CUDA_CHECK(cudaStreamBeginCapture(s.s, cudaStreamCaptureModeGlobal));
    CHECK_THROWS_AS(moetrain::simt_test::launch_with(dim3(1), dim3(2048), 0, out, s.s),
                    simt::Error);
    CHECK(capture_status(s.s) == cudaStreamCaptureStatusInvalidated);
    end_invalidated(s.s);
  }
  MOETRAIN_CUDA_CHECK(cudaFree(out));
}

#endif  // MOETRAIN_SIMT
