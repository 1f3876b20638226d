// NcclComm and the simulator's NCCL (nccl_shim.hpp) in one process per rank: CTest runs these
// hidden [nccl] cases as `mpirun -np 2 moetrain_simt_tests [nccl]` (nccl_2_ranks, label simt).
// Every rank runs the same cases in the same order, so their collectives meet. Expected values
// are formulas of the rank and the world size, exact in floating point. The SIMT build only: the
// GPU build (moetrain_gpu_tests) runs on one GPU, and NCCL needs one per rank.
#include <catch2/catch.hpp>

#include <cstdint>
#include <cstring>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernel_test_util.hpp"
#include "moetrain/mpi_comm.hpp"
#include "moetrain/nccl_comm.hpp"
#include "nccl_shim.hpp"

namespace {

using kernel_test::DeviceBuffer;
using kernel_test::Event;
using kernel_test::Stream;
using moetrain::DType;
using moetrain::ReduceOp;

// MPI for the whole process: the first MpiComm initialises it and finalises it at exit, so the
// NcclComm of each case (whose own MpiComm finds MPI running) leaves it up.
moetrain::MpiComm& world() {
  static moetrain::MpiComm w;
  return w;
}

// A raw NCCL communicator over every rank (the unique id from rank 0, as NcclComm does).
struct RawComm {
  ncclComm_t c = nullptr;
  RawComm() {
    ncclUniqueId id{};
    if (world().rank() == 0) REQUIRE(ncclGetUniqueId(&id) == ncclSuccess);
    world().broadcast(&id, sizeof id, 0);
    REQUIRE(ncclCommInitRank(&c, world().world(), id, world().rank()) == ncclSuccess);
  }
  ~RawComm() { ncclCommDestroy(c); }
  RawComm(const RawComm&) = delete;
  RawComm& operator=(const RawComm&) = delete;
};

bool last_error_says(const std::string& text) {
  const std::string last = ncclGetLastError(nullptr);
  INFO("ncclGetLastError: " << last);
  return last.find(text) != std::string::npos;
}

// ZeRO-1's overlapped gradient buckets (docs/design.md §5.2) on NcclComm: `compute` (the
// backend's stream) writes each bucket's send blocks, the bucket's reduce-scatter starts without
// the host waiting, and after finish_started the compute stream reads the results. With
// `blocking_call`, a blocking collective follows the starts, as the optimizer's norm gather does:
// it drains the communicator's stream first, so without the start's event the reduce-scatters
// would read the buckets before the compute stream wrote them. Whether every rank's result is the
// ranks' sum of what was written (element j of block b of bucket k on rank q: q 1000 + k 100 +
// b 10 + j).
bool buckets_reduced(moetrain::Communicator& comm, const Stream& compute, bool blocking_call) {
  const int r = comm.rank(), n = comm.world();
  constexpr std::size_t kBuckets = 3, kCount = 40;
  const std::size_t per_bucket = std::size_t(n) * kCount;
  DeviceBuffer<float> send(std::vector<float>(kBuckets * per_bucket, 0.0f));
  DeviceBuffer<float> recv(kBuckets * kCount), out(kBuckets * kCount), scalar(1);
  std::vector<std::vector<float>> written(kBuckets, std::vector<float>(per_bucket));
  for (std::size_t k = 0; k < kBuckets; ++k) {
    for (int b = 0; b < n; ++b)
      for (std::size_t j = 0; j < kCount; ++j)
        written[k][std::size_t(b) * kCount + j] =
            float(r * 1000 + int(k) * 100 + b * 10) + float(j);
    // Read when the copy runs (the simulator's async copies), so `written` lives to the end.
    REQUIRE(cudaMemcpyAsync(send.ptr + k * per_bucket, written[k].data(), per_bucket * 4,
                            cudaMemcpyHostToDevice, compute.s) == cudaSuccess);
    comm.reduce_scatter_start(send.ptr + k * per_bucket, recv.ptr + k * kCount, kCount,
                              ReduceOp::Sum);
    comm.progress();
  }
  comm.finish_started();
  if (blocking_call) comm.all_reduce(scalar.ptr, 1, ReduceOp::Sum);
  REQUIRE(cudaMemcpyAsync(out.ptr, recv.ptr, kBuckets * kCount * 4, cudaMemcpyDeviceToDevice,
                          compute.s) == cudaSuccess);
  compute.sync();
  const std::vector<float> got = out.download();
  comm.barrier();  // every rank's collectives done before the buffers go
  bool all = true;
  for (std::size_t k = 0; k < kBuckets; ++k)
    for (std::size_t j = 0; j < kCount; ++j) {
      const double want =
          1000.0 * n * (n - 1) / 2 + double(n) * (double(k) * 100 + r * 10 + double(j));
      all = all && got[k * kCount + j] == float(want);
    }
  return all;
}

}  // namespace

TEST_CASE("NcclComm: started reduce-scatters wait for the compute stream's writes by an event",
          "[.nccl]") {
  world();
  EACH_STREAM_SCHEDULE();
  moetrain::NcclComm nccl;
  moetrain::Communicator& comm = nccl;
  Stream compute(cudaStreamNonBlocking);
  CHECK_THROWS_WITH(comm.reduce_scatter_start(nullptr, nullptr, 1, DType::F32, ReduceOp::Sum),
                    Catch::Matchers::Contains("order_with was not called"));
  comm.order_with(compute.s);
  CHECK(buckets_reduced(comm, compute, true));
  CHECK(buckets_reduced(comm, compute, false));
  std::vector<float> host(8, 1.0f);
  CHECK_THROWS_WITH(
      comm.reduce_scatter_start(host.data(), host.data(), 4, DType::F32, ReduceOp::Sum),
      Catch::Matchers::Contains("takes device buffers, not host memory"));
}

// The planted faults: each event NcclComm orders the two streams with, missing, makes the check
// above fail under the deferred schedule (the eager one runs all work at once, so it cannot tell).
TEST_CASE("NcclComm: without the start's or the finish's event a bucket is reduced stale",
          "[.nccl]") {
  world();
  simt::ScopedStreamSchedule deferred(simt::StreamSchedule::Deferred);
  moetrain::NcclComm nccl;
  moetrain::Communicator& comm = nccl;
  Stream compute(cudaStreamNonBlocking);
  comm.order_with(compute.s);
  SECTION("the start's event: the reduce-scatter reads the bucket before it is written") {
    simt::drop_event_waits(1);  // the first bucket's start
    CHECK_FALSE(buckets_reduced(comm, compute, true));
  }
  SECTION("the finish's event: the compute stream reads the result before it is reduced") {
    simt::drop_event_waits(1, 3);  // after the three starts' waits
    CHECK_FALSE(buckets_reduced(comm, compute, false));
  }
  simt::drop_event_waits(0);
  CHECK(buckets_reduced(comm, compute, true));
}

TEST_CASE("NcclComm: every collective on device and host buffers gives the ranks' reduction",
          "[.nccl]") {
  world();  // MPI first, so that the NcclComm leaves it running
  EACH_STREAM_SCHEDULE();
  moetrain::NcclComm nccl;
  moetrain::Communicator& comm = nccl;  // the typed overloads are the base class's
  const int r = comm.rank(), n = comm.world();
  REQUIRE(n == world().world());
  CHECK(nccl.device() == nccl.local_rank());  // one simulated GPU per rank (MOETRAIN_SIMT_DEVICES)
  constexpr std::size_t kCount = 37;
  const double ranks_sum = n * (n + 1) / 2.0;  // sum over ranks of (r + 1)

  // all-reduce, sum and max, in place on device buffers, each type.
  std::vector<float> f(kCount);
  std::vector<double> d(kCount);
  std::vector<std::int32_t> i32(kCount);
  std::vector<std::int64_t> i64(kCount);
  for (std::size_t i = 0; i < kCount; ++i) {
    f[i] = float(r + 1) * float(i + 1) * 0.5f;
    d[i] = double(r) * 10.0 + double(i);
    i32[i] = (r + 1) * std::int32_t(i);
    i64[i] = (std::int64_t(r) << 40) - std::int64_t(i);
  }
  DeviceBuffer<float> df(f);
  DeviceBuffer<double> dd(d);
  DeviceBuffer<std::int32_t> di32(i32);
  DeviceBuffer<std::int64_t> di64(i64);
  const std::uint64_t bytes0 = comm.bytes_moved();
  comm.all_reduce(df.ptr, kCount, ReduceOp::Sum);
  comm.all_reduce(dd.ptr, kCount, ReduceOp::Max);
  comm.all_reduce(di32.ptr, kCount, ReduceOp::Sum);
  comm.all_reduce(di64.ptr, kCount, ReduceOp::Max);
  const auto gf = df.download();
  const auto gd = dd.download();
  const auto gi32 = di32.download();
  const auto gi64 = di64.download();
  for (std::size_t i = 0; i < kCount; ++i) {
    INFO("element " << i);
    CHECK(gf[i] == float(ranks_sum * double(i + 1) * 0.5));
    CHECK(gd[i] == double(n - 1) * 10.0 + double(i));
    CHECK(gi32[i] == std::int32_t(ranks_sum) * std::int32_t(i));
    CHECK(gi64[i] == (std::int64_t(n - 1) << 40) - std::int64_t(i));
  }
  // The ring's bytes: 2 (n-1)/n of each buffer.
  const std::uint64_t all_reduce_bytes = kCount * (4 + 8 + 4 + 8);
  CHECK(comm.bytes_moved() - bytes0 == 2 * all_reduce_bytes * std::uint64_t(n - 1) / n);

  // reduce-scatter: element j of block b on rank r is r * 1000 + b * 100 + j.
  std::vector<float> send(std::size_t(n) * kCount);
  for (int b = 0; b < n; ++b)
    for (std::size_t j = 0; j < kCount; ++j)
      send[std::size_t(b) * kCount + j] = float(r * 1000 + b * 100) + float(j);
  DeviceBuffer<float> dsend(send), drecv(kCount);
  comm.reduce_scatter(dsend.ptr, drecv.ptr, kCount, ReduceOp::Sum);
  const auto rs = drecv.download();
  const double rank_thousands = 1000.0 * n * (n - 1) / 2.0;
  for (std::size_t j = 0; j < kCount; ++j)
    CHECK(rs[j] == float(rank_thousands + 100.0 * r * n + double(j) * n));

  // all-gather into a device buffer, and from a device buffer into host memory (staged).
  std::vector<std::int32_t> mine(kCount);
  for (std::size_t j = 0; j < kCount; ++j) mine[j] = r * 10 + std::int32_t(j);
  DeviceBuffer<std::int32_t> dmine(mine), dall(std::size_t(n) * kCount);
  comm.all_gather(dmine.ptr, dall.ptr, kCount);
  std::vector<std::int32_t> hall(std::size_t(n) * kCount, -1);
  comm.all_gather(dmine.ptr, hall.data(), kCount);
  const auto gall = dall.download();
  for (int b = 0; b < n; ++b)
    for (std::size_t j = 0; j < kCount; ++j) {
      const std::size_t at = std::size_t(b) * kCount + j;
      CHECK(gall[at] == b * 10 + std::int32_t(j));
      CHECK(hall[at] == b * 10 + std::int32_t(j));
    }

  // Host memory in place (staged both ways), and a broadcast from the last rank.
  std::vector<double> host(kCount);
  for (std::size_t j = 0; j < kCount; ++j) host[j] = double(r + 1) + 0.25 * double(j);
  comm.all_reduce(host.data(), kCount, ReduceOp::Sum);
  for (std::size_t j = 0; j < kCount; ++j) CHECK(host[j] == ranks_sum + 0.25 * double(j) * n);
  std::vector<unsigned char> blob(1000);
  for (std::size_t j = 0; j < blob.size(); ++j)
    blob[j] = (unsigned char)((j * 7 + std::size_t(r)) & 0xff);
  DeviceBuffer<unsigned char> dblob(blob);
  comm.broadcast(dblob.ptr, blob.size(), n - 1);
  const auto gblob = dblob.download();
  for (std::size_t j = 0; j < blob.size(); ++j)
    CHECK(gblob[j] == (unsigned char)((j * 7 + std::size_t(n - 1)) & 0xff));

  // Host scalars: sums in rank order and maxes, in one collective.
  double sums[2] = {double(r), 0.5}, maxes[1] = {double(-r)};
  comm.reduce_host(sums, 2, maxes, 1);
  CHECK(sums[0] == double(n * (n - 1) / 2));
  CHECK(sums[1] == 0.5 * n);
  CHECK(maxes[0] == 0.0);
  comm.barrier();
}

TEST_CASE("nccl shim: a collective runs in its stream's order and reads its input when it runs",
          "[.nccl]") {
  simt::ScopedStreamSchedule deferred(simt::StreamSchedule::Deferred);
  RawComm comm;
  const int n = world().world();
  constexpr std::size_t kCount = 64;
  DeviceBuffer<std::int32_t> send(std::vector<std::int32_t>(kCount, 0)), recv(kCount);
  Stream producer(cudaStreamNonBlocking), comm_stream(cudaStreamNonBlocking);

  // Without an event: the collective runs when its stream is synchronised, before the producer's
  // write (nothing orders that), so it reduces the old zeros, as a GPU may.
  REQUIRE(cudaMemsetAsync(send.ptr, 0x01, kCount * 4, producer.s) == cudaSuccess);
  REQUIRE(ncclAllReduce(send.ptr, recv.ptr, kCount, ncclInt32, ncclSum, comm.c, comm_stream.s) ==
          ncclSuccess);
  CHECK(simt::nccl::pending() == 1);
  comm_stream.sync();
  CHECK(simt::nccl::pending() == 0);
  for (const std::int32_t v : recv.download()) CHECK(v == 0);
  producer.sync();

  // With the producer's event waited for, it reduces what the producer wrote.
  Event written;
  REQUIRE(cudaMemsetAsync(send.ptr, 0x02, kCount * 4, producer.s) == cudaSuccess);
  REQUIRE(cudaEventRecord(written.e, producer.s) == cudaSuccess);
  REQUIRE(cudaStreamWaitEvent(comm_stream.s, written.e, 0) == cudaSuccess);
  REQUIRE(ncclAllReduce(send.ptr, recv.ptr, kCount, ncclInt32, ncclSum, comm.c, comm_stream.s) ==
          ncclSuccess);
  comm_stream.sync();
  for (const std::int32_t v : recv.download()) CHECK(v == n * 0x02020202);

  // In-place reduce-scatter and all-gather (NCCL's in-place layouts: a rank's own block).
  const int r = world().rank();
  std::vector<std::int32_t> blocks(std::size_t(n) * kCount);
  for (std::size_t j = 0; j < blocks.size(); ++j) blocks[j] = std::int32_t(j) + r;
  DeviceBuffer<std::int32_t> inplace(blocks);
  std::int32_t* own = inplace.ptr + std::size_t(r) * kCount;
  REQUIRE(ncclReduceScatter(inplace.ptr, own, kCount, ncclInt32, ncclSum, comm.c, comm_stream.s) ==
          ncclSuccess);
  REQUIRE(ncclAllGather(own, inplace.ptr, kCount, ncclInt32, comm.c, comm_stream.s) == ncclSuccess);
  comm_stream.sync();
  const auto got = inplace.download();
  for (std::size_t j = 0; j < got.size(); ++j)
    CHECK(got[j] == n * std::int32_t(j) + n * (n - 1) / 2);
}

TEST_CASE("nccl shim: a group's collectives are enqueued at the outermost ncclGroupEnd",
          "[.nccl]") {
  simt::ScopedStreamSchedule eager(simt::StreamSchedule::Eager);
  RawComm comm;
  const int n = world().world();
  DeviceBuffer<float> a(std::vector<float>(8, 1.0f)), b(std::vector<float>(8, 2.0f));
  Stream s(cudaStreamNonBlocking);
  REQUIRE(ncclGroupStart() == ncclSuccess);
  REQUIRE(ncclGroupStart() == ncclSuccess);
  REQUIRE(ncclAllReduce(a.ptr, a.ptr, 8, ncclFloat32, ncclSum, comm.c, s.s) == ncclSuccess);
  REQUIRE(ncclGroupEnd() == ncclSuccess);
  REQUIRE(ncclAllReduce(b.ptr, b.ptr, 8, ncclFloat32, ncclMax, comm.c, s.s) == ncclSuccess);
  // Even the eager schedule has run nothing yet: the group holds both.
  CHECK(simt::nccl::pending() == 2);
  for (const float v : a.download()) CHECK(v == 1.0f);
  REQUIRE(ncclGroupEnd() == ncclSuccess);
  s.sync();
  CHECK(simt::nccl::pending() == 0);
  for (const float v : a.download()) CHECK(v == float(n));
  for (const float v : b.download()) CHECK(v == 2.0f);
  CHECK(ncclGroupEnd() == ncclInvalidUsage);
  CHECK(last_error_says("no ncclGroupStart"));
}

TEST_CASE("nccl shim: invalid arguments return NCCL's error codes and say which argument",
          "[.nccl]") {
  RawComm comm;
  const int n = world().world();
  DeviceBuffer<float> dev(16);
  std::vector<float> host(16);
  Stream s(cudaStreamNonBlocking);
  CHECK(ncclAllReduce(dev.ptr, dev.ptr, 16, ncclFloat32, ncclSum, nullptr, s.s) ==
        ncclInvalidArgument);
  CHECK(last_error_says("comm is null"));
  CHECK(ncclAllReduce(host.data(), dev.ptr, 16, ncclFloat32, ncclSum, comm.c, s.s) ==
        ncclInvalidArgument);
  CHECK(last_error_says("sendbuff is not device memory"));
  CHECK(ncclAllReduce(dev.ptr, dev.ptr + 8, 16, ncclFloat32, ncclSum, comm.c, s.s) ==
        ncclInvalidArgument);
  CHECK(last_error_says("recvbuff holds 32 bytes from that address, 64 needed"));
  CHECK(ncclAllGather(dev.ptr, dev.ptr, 16, ncclFloat32, comm.c, s.s) ==
        (n > 1 ? ncclInvalidArgument : ncclSuccess));
  CHECK(ncclAllReduce(dev.ptr, dev.ptr, 16, ncclDataType_t(42), ncclSum, comm.c, s.s) ==
        ncclInvalidArgument);
  CHECK(last_error_says("invalid datatype 42"));
  CHECK(ncclAllReduce(dev.ptr, dev.ptr, 16, ncclBfloat16, ncclSum, comm.c, s.s) ==
        ncclInvalidArgument);
  CHECK(last_error_says("fp16 and bf16"));
  CHECK(ncclAllReduce(dev.ptr, dev.ptr, 16, ncclFloat32, ncclAvg, comm.c, s.s) ==
        ncclInvalidArgument);
  CHECK(ncclAllReduce(dev.ptr, dev.ptr, 16, ncclFloat32, ncclRedOp_t(17), comm.c, s.s) ==
        ncclInvalidArgument);
  CHECK(last_error_says("invalid reduction operation 17"));
  CHECK(ncclBroadcast(dev.ptr, dev.ptr, 16, ncclFloat32, n, comm.c, s.s) == ncclInvalidArgument);
  CHECK(last_error_says("root " + std::to_string(n) + " is not a rank"));
  CHECK(ncclGroupEnd() == ncclInvalidUsage);
  CHECK(simt::nccl::pending() == 0);  // nothing of the above was enqueued

  // A stream under capture: the shim cannot replay MPI transfers from a graph.
  REQUIRE(cudaStreamBeginCapture(s.s, cudaStreamCaptureModeRelaxed) == cudaSuccess);
  CHECK(ncclAllReduce(dev.ptr, dev.ptr, 16, ncclFloat32, ncclSum, comm.c, s.s) == ncclInvalidUsage);
  cudaGraph_t graph = nullptr;
  REQUIRE(cudaStreamEndCapture(s.s, &graph) == cudaSuccess);
  cudaGraphDestroy(graph);

  // Communicator set-up and queries.
  ncclUniqueId id{};
  if (world().rank() == 0) REQUIRE(ncclGetUniqueId(&id) == ncclSuccess);
  world().broadcast(&id, sizeof id, 0);
  ncclComm_t bad = nullptr;
  CHECK(ncclCommInitRank(&bad, n + 1, id, world().rank()) == ncclInvalidArgument);
  CHECK(bad == nullptr);
  CHECK(last_error_says(std::to_string(n) + " process(es) hold this unique id (" +
                        std::to_string(n + 1) + " expected)"));
  CHECK(ncclCommInitRank(&bad, n, id, -1) == ncclInvalidArgument);
  CHECK(last_error_says("rank -1 is not in [0, " + std::to_string(n) + ")"));
  CHECK(ncclCommInitRank(nullptr, n, id, 0) == ncclInvalidArgument);
  ncclResult_t async = ncclInternalError;
  CHECK(ncclCommGetAsyncError(nullptr, &async) == ncclInvalidArgument);
  CHECK(ncclCommGetAsyncError(comm.c, &async) == ncclSuccess);
  CHECK(async == ncclSuccess);
  int count = 0, rank = -1;
  CHECK(ncclCommCount(comm.c, &count) == ncclSuccess);
  CHECK(ncclCommUserRank(comm.c, &rank) == ncclSuccess);
  CHECK(count == n);
  CHECK(rank == world().rank());
  CHECK(ncclCommDestroy(nullptr) == ncclInvalidArgument);
  CHECK(ncclCommAbort(nullptr) == ncclSuccess);
  CHECK(std::string(ncclGetErrorString(ncclRemoteError)) ==
        "remote process exited or there was a network error");
}

TEST_CASE("NcclComm: a broken transfer fails the call that waits for it, naming the rank",
          "[.nccl]") {
  world();  // MPI first, so that the NcclComm leaves it running
  EACH_STREAM_SCHEDULE();
  moetrain::NcclComm nccl;
  moetrain::Communicator& comm = nccl;
  DeviceBuffer<float> x(std::vector<float>(32, 1.0f));
  simt::nccl::fail_collective_at(1);  // on every rank, as a real failure is seen by all
  const std::string rank = "rank " + std::to_string(comm.rank()) + ": ";
  try {
    comm.all_reduce(x.ptr, 32, ReduceOp::Sum);
    FAIL("the broken all-reduce returned");
  } catch (const std::runtime_error& e) {
    const std::string what = e.what();
    INFO(what);
    CHECK(what.rfind(rank + "NCCL all-reduce failed: remote process exited", 0) == 0);
    CHECK(what.find("the transfer broke") != std::string::npos);
  }
  // The communicator stays failed: the next call fails at once (and its teardown aborts rather
  // than waiting for peers).
  CHECK_THROWS_WITH(comm.all_reduce(x.ptr, 32, ReduceOp::Sum),
                    Catch::Matchers::StartsWith(rank + "NCCL all-reduce failed"));
  simt::nccl::fail_collective_at(0);
  world().barrier();
}
