// Streams in the simulator: per-stream FIFOs, the legacy stream's implicit ordering (with blocking
// streams, not with non-blocking ones), events, device synchronisation, poisoned async copies to
// the host, the sync counter — and, under the deferred schedule, the race of a copy on the legacy
// stream against the CUDA backend's non-blocking stream (the LocalComm bug of old), fixed by
// events.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "backend/cuda/cuda_backend.hpp"
#include "elementwise.cuh"
#include "kernel_test_util.hpp"
#include "moetrain/communicator.hpp"
#include "moetrain/config.hpp"
#include "moetrain/device_stats.hpp"
#include "moetrain/model.hpp"
#include "moetrain/optimizer.hpp"
#include "test_kernels.hpp"

namespace {

namespace mk = moetrain::kernels;
using kernel_test::DeviceBuffer;
using simt::StreamSchedule;

constexpr std::size_t kN = 300;

using kernel_test::Event;
using kernel_test::Stream;
using kernel_test::times;

std::vector<float> iota(float start) {
  return kernel_test::iota_floats(kN, start);
}

// Host copy of a device buffer through a blocking cudaMemcpy (ordered with the legacy stream).
std::vector<float> read_legacy(const float* d) {
  std::vector<float> h(kN);
  MOETRAIN_CUDA_CHECK(cudaMemcpy(h.data(), d, kN * sizeof(float), cudaMemcpyDeviceToHost));
  return h;
}

using kernel_test::all_poison;

}  // namespace

TEST_CASE("streams: schedules parse, and the deferred one defers", "[simt][streams]") {
  CHECK(simt::parse_stream_schedule("eager") == StreamSchedule::Eager);
  CHECK(simt::parse_stream_schedule("deferred") == StreamSchedule::Deferred);
  CHECK_THROWS_AS(simt::parse_stream_schedule("lazy"), simt::Error);
  CHECK(simt::name(StreamSchedule::Deferred) == "deferred");
  EACH_STREAM_SCHEDULE();
  const bool deferred = simt::stream_schedule() == StreamSchedule::Deferred;
  DeviceBuffer<float> x(iota(1));
  Stream s(cudaStreamNonBlocking);
  mk::scale(x.ptr, kN, 2.0f, s.s);
  CHECK(simt::pending_work() == (deferred ? 1u : 0u));
  CHECK(cudaStreamQuery(s.s) == (deferred ? cudaErrorNotReady : cudaSuccess));
  CHECK(cudaStreamQuery(s.s) == cudaSuccess);  // a query lets pending work run
  CHECK(simt::pending_work() == 0);
  CHECK(read_legacy(x.ptr) == times(iota(1), 2));
}

TEST_CASE("streams: work on one stream runs in order (FIFO)", "[simt][streams]") {
  EACH_STREAM_SCHEDULE();
  Stream s(cudaStreamNonBlocking);
  DeviceBuffer<float> x(kN), y(kN);
  const std::vector<float> a = iota(1), b = iota(-7);
  std::vector<float> out(kN);
  MOETRAIN_CUDA_CHECK(cudaMemcpyAsync(x.ptr, a.data(), kN * 4, cudaMemcpyHostToDevice, s.s));
  MOETRAIN_CUDA_CHECK(cudaMemcpyAsync(y.ptr, b.data(), kN * 4, cudaMemcpyHostToDevice, s.s));
  mk::scale(x.ptr, kN, 3.0f, s.s);               // x = 3a
  mk::axpby(y.ptr, x.ptr, kN, 1.0f, 2.0f, s.s);  // y = 3a + 2b
  mk::add_inplace(x.ptr, y.ptr, kN, s.s);        // x = 6a + 2b
  MOETRAIN_CUDA_CHECK(cudaMemcpyAsync(out.data(), x.ptr, kN * 4, cudaMemcpyDeviceToHost, s.s));
  MOETRAIN_CUDA_CHECK(cudaStreamSynchronize(s.s));
  for (std::size_t i = 0; i < kN; ++i) CHECK(out[i] == 6 * a[i] + 2 * b[i]);
}

TEST_CASE("streams: the legacy stream orders with blocking streams, not non-blocking ones",
          "[simt][streams]") {
  EACH_STREAM_SCHEDULE();
  const bool deferred = simt::stream_schedule() == StreamSchedule::Deferred;
  Stream blocking(cudaStreamDefault), non_blocking(cudaStreamNonBlocking);
  DeviceBuffer<float> x(iota(1)), y(iota(1));
  mk::scale(x.ptr, kN, 2.0f, blocking.s);
  mk::scale(y.ptr, kN, 2.0f, non_blocking.s);
  // A blocking copy waits for the blocking stream's kernel...
  CHECK(read_legacy(x.ptr) == times(iota(1), 2));
  // ...not for the non-blocking stream's: under deferred it reads the old values.
  CHECK(read_legacy(y.ptr) == (deferred ? iota(1) : times(iota(1), 2)));
  MOETRAIN_CUDA_CHECK(cudaStreamSynchronize(non_blocking.s));
  CHECK(read_legacy(y.ptr) == times(iota(1), 2));

  // And the other way: a blocking stream's kernel runs after earlier legacy-stream work.
  mk::scale(x.ptr, kN, 0.5f, nullptr);
  mk::add_inplace(y.ptr, x.ptr, kN, blocking.s);  // y = 2 iota + iota
  MOETRAIN_CUDA_CHECK(cudaStreamSynchronize(blocking.s));
  CHECK(simt::pending_work() == 0);
  CHECK(read_legacy(y.ptr) == times(iota(1), 3));
}

TEST_CASE("streams: an event orders work across streams", "[simt][streams]") {
  EACH_STREAM_SCHEDULE();
  const bool deferred = simt::stream_schedule() == StreamSchedule::Deferred;
  Stream producer(cudaStreamNonBlocking), consumer(cudaStreamNonBlocking);
  Event done;
  DeviceBuffer<float> x(iota(1)), y(iota(0));
  mk::scale(x.ptr, kN, 2.0f, producer.s);
  MOETRAIN_CUDA_CHECK(cudaEventRecord(done.e, producer.s));
  mk::scale(x.ptr, kN, 100.0f, producer.s);  // after the record: not waited for
  MOETRAIN_CUDA_CHECK(cudaStreamWaitEvent(consumer.s, done.e, 0));
  mk::add_inplace(y.ptr, x.ptr, kN, consumer.s);
  // Synchronising the consumer runs the producer's work up to the event, not beyond.
  MOETRAIN_CUDA_CHECK(cudaStreamSynchronize(consumer.s));
  // (Under eager the later scale has run too, as it may on a GPU.)
  std::vector<float> expect = iota(0);
  const std::vector<float> x_read = times(iota(1), deferred ? 2 : 200);
  for (std::size_t i = 0; i < kN; ++i) expect[i] += x_read[i];
  CHECK(read_legacy(y.ptr) == expect);
  CHECK(simt::pending_work() == (deferred ? 1u : 0u));
  MOETRAIN_CUDA_CHECK(cudaEventRecord(done.e, producer.s));
  MOETRAIN_CUDA_CHECK(cudaEventSynchronize(done.e));
  CHECK(cudaEventQuery(done.e) == cudaSuccess);
  CHECK(read_legacy(x.ptr) == times(iota(1), 200));
}

TEST_CASE("streams: cudaDeviceSynchronize drains every stream", "[simt][streams]") {
  EACH_STREAM_SCHEDULE();
  Stream a(cudaStreamNonBlocking), b(cudaStreamNonBlocking), c(cudaStreamDefault);
  DeviceBuffer<float> x(iota(1)), y(iota(2)), z(iota(3));
  mk::scale(x.ptr, kN, 2.0f, a.s);
  mk::scale(y.ptr, kN, 3.0f, b.s);
  mk::scale(z.ptr, kN, 4.0f, c.s);
  {
    Stream gone(cudaStreamNonBlocking);  // destroyed with work pending: the work still runs
    mk::scale(x.ptr, kN, 5.0f, gone.s);
  }
  MOETRAIN_CUDA_CHECK(cudaDeviceSynchronize());
  CHECK(simt::pending_work() == 0);
  // The two scales of x ran in some order; both ran.
  CHECK(read_legacy(x.ptr) == times(iota(1), 10));
  CHECK(read_legacy(y.ptr) == times(iota(2), 3));
  CHECK(read_legacy(z.ptr) == times(iota(3), 4));
}

TEST_CASE("streams: an async copy to the host reads poison until the stream is synchronised",
          "[simt][streams]") {
  simt::ScopedStreamSchedule scope(StreamSchedule::Deferred);
  Stream s(cudaStreamNonBlocking);
  DeviceBuffer<float> x(iota(1));
  std::vector<float> host = iota(-5);
  MOETRAIN_CUDA_CHECK(cudaMemcpyAsync(host.data(), x.ptr, kN * 4, cudaMemcpyDeviceToHost, s.s));
  // The bug this catches: using a download before synchronising its stream.
  CHECK(all_poison(host));
  CHECK(std::isnan(host[0]));
  MOETRAIN_CUDA_CHECK(cudaStreamSynchronize(s.s));
  CHECK(host == iota(1));
}

TEST_CASE("streams: sync_count counts the calls that make the host wait", "[simt][streams]") {
  EACH_STREAM_SCHEDULE();
  Stream s(cudaStreamNonBlocking);
  Event e;
  DeviceBuffer<float> x(iota(1)), y(kN);
  std::vector<float> host(kN);
  simt::reset_sync_count();
  mk::scale(x.ptr, kN, 2.0f, s.s);
  MOETRAIN_CUDA_CHECK(cudaMemcpyAsync(host.data(), x.ptr, kN * 4, cudaMemcpyDeviceToHost, s.s));
  MOETRAIN_CUDA_CHECK(cudaMemcpy(y.ptr, x.ptr, kN * 4, cudaMemcpyDeviceToDevice));
  MOETRAIN_CUDA_CHECK(cudaEventRecord(e.e, s.s));
  CHECK(simt::sync_count() == 0);  // none of these waits
  MOETRAIN_CUDA_CHECK(cudaStreamSynchronize(s.s));
  MOETRAIN_CUDA_CHECK(cudaEventSynchronize(e.e));
  MOETRAIN_CUDA_CHECK(cudaDeviceSynchronize());
  MOETRAIN_CUDA_CHECK(cudaMemcpy(host.data(), y.ptr, kN * 4, cudaMemcpyDeviceToHost));
  CHECK(simt::sync_count() == 4);
}

TEST_CASE("streams: a deferred kernel's error is thrown by the call that runs it",
          "[simt][streams]") {
  simt::ScopedStreamSchedule scope(StreamSchedule::Deferred);
  Stream s(cudaStreamNonBlocking);
  int* out = nullptr;
  MOETRAIN_CUDA_CHECK(cudaMalloc(&out, 256 * sizeof(int)));
  moetrain::simt_test::exit_before_barrier(out, s.s);  // enqueued, not run
  CHECK_THROWS_WITH(cudaStreamSynchronize(s.s), Catch::Matchers::Contains("__syncthreads"));
  MOETRAIN_CUDA_CHECK(cudaStreamSynchronize(s.s));  // reported once
  // A call that releases memory (destructors make it) returns the error instead of throwing.
  moetrain::simt_test::exit_before_barrier(out, s.s);
  CHECK(cudaFree(out) == cudaErrorLaunchFailure);
  CHECK(cudaGetLastError() == cudaErrorLaunchFailure);
  CHECK(simt::pending_work() == 0);
}

// ---- the LocalComm race -------------------------------------------------------------------------
//
// ZeRO-1 in a world of one: the optimizer updates the weight shard on the backend's stream, the
// communicator all-gathers the shard into the weights, the next forward reads them. LocalComm once
// copied with a plain cudaMemcpy (the legacy stream), which a non-blocking stream does not order
// with: on a GPU the next step's kernels could read the weights of the step before.
namespace {

// Runs "update (x2), all-gather, read" through `comm` on `be`; returns what the read saw.
std::vector<float> update_gather_read(moetrain::CudaBackend& be, moetrain::Communicator& comm) {
  auto* shard = static_cast<float*>(be.alloc_bytes(kN * sizeof(float)));
  auto* weights = static_cast<float*>(be.alloc_bytes(kN * sizeof(float)));
  auto* out = static_cast<float*>(be.alloc_bytes(kN * sizeof(float)));
  const std::vector<float> w0 = iota(1);
  be.upload(shard, w0.data(), kN * sizeof(float));
  be.upload(weights, w0.data(), kN * sizeof(float));  // last step's weights
  be.scale(shard, kN, 2.0);                           // the optimizer step
  comm.all_gather(shard, weights, kN, moetrain::DType::F32);
  be.zero(out, kN * sizeof(float));
  be.add_inplace(out, weights, kN);  // the next forward reads the weights
  std::vector<float> got(kN);
  be.download(got.data(), out, kN * sizeof(float));
  be.synchronize();
  MOETRAIN_CUDA_CHECK(cudaDeviceSynchronize());  // let the legacy copy finish before the frees
  for (float* p : {shard, weights, out}) be.free_bytes(p);
  return got;
}

moetrain::CudaBackendOptions fp32() {
  moetrain::CudaBackendOptions o;
  o.bf16 = false;
  return o;
}

}  // namespace

TEST_CASE("streams: a copy on the legacy stream races with the backend's stream (planted)",
          "[simt][streams]") {
  // The old LocalComm, planted: its copy is a cudaMemcpy, on the legacy stream.
  moetrain::LocalComm legacy_copy([](void* dst, const void* src, std::size_t bytes) {
    MOETRAIN_CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToDevice));
  });
  const std::vector<float> right = times(iota(1), 2);
  {
    simt::ScopedStreamSchedule scope(StreamSchedule::Eager);
    moetrain::CudaBackend be(fp32());
    CHECK(update_gather_read(be, legacy_copy) == right);  // eager hides the race
  }
  simt::ScopedStreamSchedule scope(StreamSchedule::Deferred);
  moetrain::CudaBackend be(fp32());
  const std::vector<float> got = update_gather_read(be, legacy_copy);
  CHECK(got != right);
  CHECK(got == iota(1));  // last step's weights
}

TEST_CASE("streams: the same copy ordered by events, and LocalComm as it is, read the update",
          "[simt][streams]") {
  const std::vector<float> right = times(iota(1), 2);
  EACH_STREAM_SCHEDULE();
  moetrain::CudaBackend be(fp32());
  Event before, after;
  // The legacy-stream copy, ordered after the backend's work and before its later work.
  moetrain::LocalComm ordered([&](void* dst, const void* src, std::size_t bytes) {
    MOETRAIN_CUDA_CHECK(cudaEventRecord(before.e, be.stream()));
    MOETRAIN_CUDA_CHECK(cudaStreamWaitEvent(cudaStreamLegacy, before.e, 0));
    MOETRAIN_CUDA_CHECK(
        cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, cudaStreamLegacy));
    MOETRAIN_CUDA_CHECK(cudaEventRecord(after.e, cudaStreamLegacy));
    MOETRAIN_CUDA_CHECK(cudaStreamWaitEvent(be.stream(), after.e, 0));
  });
  CHECK(update_gather_read(be, ordered) == right);
  // make_local_comm copies with the backend's copy, on its stream.
  const auto local = moetrain::make_local_comm(be);
  CHECK(update_gather_read(be, *local) == right);
}

namespace {

// Host synchronisations of one optimizer step on the CUDA backend, taken as the trainer takes it
// (src/train/trainer.cpp, train_step): the micro-batches and the optimizer step enqueued into one
// shared stats block, one download of it, the router bias update. What may synchronise: that
// download; the grouped expert GEMMs read the expert offsets on the device. The launch count
// depends on the model's structure (layers, experts, matrices), not on its sizes or its routing,
// so configs/gpu_moe_small.json is measured at its structure with small dimensions; docs/perf.md
// quotes these numbers.
struct StepCounts {
  std::uint64_t syncs = 0;
  std::uint64_t launches = 0;       // our kernels plus the GEMM calls (each at least one on a GPU)
  std::uint64_t host_launches = 0;  // what the host launched: with CUDA graphs, one per micro-batch
                                    // replay plus the optimizer's kernels
};

StepCounts counts_per_step(const moetrain::Config& cfg) {
  moetrain::CudaBackendOptions o;
  moetrain::CudaBackend be(o);
  const int ga = cfg.train.grad_accum;
  moetrain::DeviceStats<float> stats(be);
  moetrain::Model<float> model(cfg.model, be, cfg.data.batch_size, &stats, ga);
  model.init_weights(1);
  moetrain::Optimizer<float> opt(cfg, model.layout(), be, nullptr, &stats);
  stats.allocate();
  const std::size_t n = std::size_t(cfg.data.batch_size) * std::size_t(cfg.model.seq_len);
  std::vector<std::int32_t> tok(n), tgt(n);
  for (std::size_t i = 0; i < n; ++i) {
    tok[i] = std::int32_t((i * 7919) % std::size_t(cfg.model.vocab_size));
    tgt[i] = std::int32_t((i * 104729 + 3) % std::size_t(cfg.model.vocab_size));
  }
  std::vector<StepCounts> per_step;
  // Step 1 runs eagerly and grows scratch buffers (dropping the recordings), step 2 warms the
  // graphs up again, step 3 captures them and step 4 replays (test_cuda_graphs.cpp).
  for (int step = 0; step < 4; ++step) {
    be.synchronize();  // the previous step's uploads (the bias update) are not this step's
    simt::reset_sync_count();
    simt::reset_stats();
    const std::uint64_t host0 = be.host_launches();
    model.zero_grads();
    for (int micro = 0; micro < ga; ++micro)
      model.forward_backward_async(tok.data(), tgt.data(), 1.0 / ga, micro);
    opt.step_async(
        model.params(), model.grads(), cfg.optim.lr,
        moetrain::StepInputs<float>{model.smax_device(), ga, model.loss_sums_device(), ga});
    stats.download();
    const moetrain::OptimizerStats os = opt.finish_step();
    REQUIRE_FALSE(os.skipped);
    std::vector<std::vector<std::int64_t>> load(std::size_t(cfg.model.n_layers));
    for (int micro = 0; micro < ga; ++micro) {
      const moetrain::ForwardStats st = model.slot_stats(micro);
      for (std::size_t l = 0; l < load.size(); ++l) {
        load[l].resize(st.load[l].size(), 0);
        for (std::size_t e = 0; e < st.load[l].size(); ++e) load[l][e] += st.load[l][e];
      }
    }
    model.update_router_biases(load, cfg.model.moe.bias_update_rate);
    per_step.push_back({simt::sync_count(), simt::stats().launches + simt::stats().host_items,
                        be.host_launches() - host0});
  }
  // A fixed sequence of device work: the same syncs and launches every step, whatever the routing.
  for (int s = 0; s < 3; ++s) {
    CHECK(per_step[std::size_t(s)].syncs == per_step[3].syncs);
    CHECK(per_step[std::size_t(s)].launches == per_step[3].launches);
  }
  // Replayed: the host launches ga graphs instead of the micro-batches' kernels.
  CHECK(per_step[3].host_launches < per_step[1].host_launches);
  return per_step[3];
}

int moe_layers(const moetrain::Config& cfg) {
  return cfg.model.n_layers - cfg.model.dense_layers;
}

}  // namespace

TEST_CASE("cuda backend: one host synchronisation per optimizer step", "[simt][streams][syncs]") {
  const std::string configs = std::string(MOETRAIN_SOURCE_DIR) + "/configs/";
  const moetrain::Config ci = moetrain::load_config(configs + "ci.json");
  const StepCounts ci_counts = counts_per_step(ci);
  moetrain::Config ci_accum = moetrain::load_config(configs + "ci.json", {"train.grad_accum=3"});
  const StepCounts accum_counts = counts_per_step(ci_accum);
  moetrain::Config small = moetrain::load_config(configs + "gpu_moe_small.json");
  small.model.vocab_size = 256;
  small.model.d_model = 64;
  small.model.seq_len = 16;
  small.model.dense_ff = small.model.moe.expert_ff = small.model.moe.shared_ff = 32;
  small.model.head_dim = 16;  // the smallest the flash kernels take
  small.data.batch_size = 2;
  const StepCounts moe_small = counts_per_step(small);
  WARN("per optimizer step: configs/ci.json "
       << ci_counts.syncs << " host syncs, " << ci_counts.launches << " launches ("
       << ci_counts.host_launches << " by the host, with CUDA graphs); with "
       << "grad_accum 3 " << accum_counts.syncs << " host syncs; gpu_moe_small structure "
       << moe_small.syncs << " host syncs, " << moe_small.launches << " launches ("
       << moe_small.host_launches << " by the host)");
  // The bar of issue 15 is <= 2 on configs/ci.json; what runs is exactly the one stats download,
  // whatever the number of MoE layers and micro-batches.
  REQUIRE(moe_layers(ci) > 0);
  REQUIRE(moe_layers(small) > 1);
  CHECK(ci_counts.syncs == 1);
  CHECK(accum_counts.syncs == 1);
  CHECK(moe_small.syncs == 1);
}
