#include "moetrain/nccl_comm.hpp"

// OpenMPI's C++ bindings (deprecated, unused here) are not warning-free unless MPI's headers come
// in as system headers, as CMake does but a plain mpicxx compile does not.
#ifndef OMPI_SKIP_MPICXX
#define OMPI_SKIP_MPICXX 1
#endif

#include <mpi.h>
#if defined(MOETRAIN_SIMT)
// The SIMT build: the simulator's CUDA runtime (force-included) and NCCL over MPI on its streams.
#include "nccl_shim.hpp"
#else
#include <cuda_runtime.h>
#include <nccl.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace moetrain {

namespace {

ncclDataType_t nccl_type(DType t) {
  switch (t) {
    case DType::F32:
      return ncclFloat32;
    case DType::F64:
      return ncclFloat64;
    case DType::I32:
      return ncclInt32;
    case DType::I64:
      return ncclInt64;
  }
  return ncclUint8;
}

ncclRedOp_t nccl_op(ReduceOp op) {
  return op == ReduceOp::Sum ? ncclSum : ncclMax;
}

std::string who(int rank) {
  return "rank " + std::to_string(rank) + ": ";
}

std::string cuda_text(cudaError_t rc) {
  return std::string(cudaGetErrorName(rc)) + " (" + cudaGetErrorString(rc) + ")";
}

std::string nccl_text(ncclResult_t rc, ncclComm_t comm) {
  std::string text = ncclGetErrorString(rc);
  // The result code alone is generic ("invalid usage"); the last error says which rule was broken.
  const char* last = ncclGetLastError(comm);
  if (last && *last) text += std::string(" (") + last + ")";
  return text;
}

void check_mpi(int rc, int rank, const char* what) {
  if (rc == MPI_SUCCESS) return;
  char msg[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, msg, &len);
  throw std::runtime_error(who(rank) + "MPI " + what +
                           " failed: " + std::string(msg, std::size_t(len)));
}

std::string host_name() {
  char name[MPI_MAX_PROCESSOR_NAME];
  int len = 0;
  if (MPI_Get_processor_name(name, &len) != MPI_SUCCESS) return "?";
  return std::string(name, std::size_t(len));
}

// The staging buffer holds a send and a receive region; keeping both aligned keeps NCCL on its
// vectorised path.
constexpr std::size_t kAlign = 256;
std::size_t aligned(std::size_t bytes) {
  return (bytes + kAlign - 1) / kAlign * kAlign;
}

}  // namespace

struct NcclComm::Impl {
  int rank = 0;
  int device = -1;
  cudaStream_t stream = nullptr;  // every collective's, blocking and started
  ncclComm_t comm = nullptr;
  // Started collectives: the backend's stream, and the events that order it with `stream` (ready:
  // the backend's work before a start; done: the started collectives, before the backend's later
  // work).
  cudaStream_t compute = nullptr;
  cudaEvent_t ready = nullptr, done = nullptr;
  bool started = false;     // collectives started since the host last saw `stream` drain
  bool unfinished = false;  // collectives started since the last finish_started()
  void* staging = nullptr;
  std::size_t staging_bytes = 0;
  // Set once a call failed: peers may still be inside that collective, and ncclCommDestroy would
  // wait for them, so teardown must abort instead.
  bool broken = false;

  ~Impl() {
    if (device >= 0) cudaSetDevice(device);
    if (comm) {
      if (broken || std::uncaught_exceptions() > 0)
        ncclCommAbort(comm);
      else
        ncclCommDestroy(comm);
    }
    if (staging) cudaFree(staging);
    if (ready) cudaEventDestroy(ready);
    if (done) cudaEventDestroy(done);
    if (stream) cudaStreamDestroy(stream);
  }

  // Makes the rank's GPU current for a call and restores the caller's device after it.
  struct OnDevice {
    int caller = -1, device = -1;
    OnDevice(Impl& s, const std::string& what) : device(s.device) {
      s.check(cudaGetDevice(&caller), "get device for " + what);
      if (caller != device) s.check(cudaSetDevice(device), "set device for " + what);
    }
    ~OnDevice() {
      if (caller != device) cudaSetDevice(caller);
    }
    OnDevice(const OnDevice&) = delete;
    OnDevice& operator=(const OnDevice&) = delete;
  };

  void check(cudaError_t rc, const std::string& what) {
    if (rc == cudaSuccess) return;
    broken = true;
    throw std::runtime_error(who(rank) + "CUDA " + what + " failed: " + cuda_text(rc));
  }

  void check(ncclResult_t rc, const std::string& what) {
    if (rc == ncclSuccess) return;
    broken = true;
    throw std::runtime_error(who(rank) + "NCCL " + what + " failed: " + nccl_text(rc, comm));
  }

  // A peer's failure, as far as the communicator knows now (no wait).
  void check_async(const std::string& what) {
    ncclResult_t async = ncclSuccess;
    check(ncclCommGetAsyncError(comm, &async), what);
    if (async != ncclSuccess && async != ncclInProgress) check(async, what);
  }

  // Polls rather than cudaStreamSynchronize: when a peer fails, NCCL's kernel keeps spinning and
  // the stream never drains; only the communicator's async error reports it. The error is read
  // once more after the stream drained, so a failure reported as the work ends is not missed.
  void wait(const std::string& what) {
    for (;;) {
      const cudaError_t q = cudaStreamQuery(stream);
      if (q != cudaSuccess && q != cudaErrorNotReady) check(q, what + " (stream)");
      check_async(what);
      if (q == cudaSuccess) return;
      std::this_thread::yield();
    }
  }

  bool in_host_memory(const void* p, const std::string& what) {
    cudaPointerAttributes attr{};
    check(cudaPointerGetAttributes(&attr, p), "pointer query for " + what);
    return attr.type == cudaMemoryTypeUnregistered || attr.type == cudaMemoryTypeHost;
  }

  void* stage(std::size_t bytes, const std::string& what) {
    if (bytes <= staging_bytes) return staging;
    // Every call leaves the stream idle, so nothing still reads the old buffer.
    if (staging) check(cudaFree(staging), "staging free for " + what);
    staging = nullptr;
    staging_bytes = 0;
    const std::size_t grown = std::max(bytes, std::size_t(1) << 20);
    check(cudaMalloc(&staging, grown), "staging alloc for " + what);
    staging_bytes = grown;
    return staging;
  }

  // One collective from the caller's buffers to completion. `launch` enqueues it on device
  // pointers; send == recv means in place.
  template <typename Launch>
  void run(const std::string& what, const void* send, std::size_t send_bytes, void* recv,
           std::size_t recv_bytes, Launch launch) {
    // Counts agree across ranks, so every rank skips together.
    if (send_bytes == 0 && recv_bytes == 0) return;
    const OnDevice on(*this, what);
    // Started collectives are polled to completion first: if a peer died, their kernels spin and
    // the device synchronize below would never return.
    if (started) {
      wait("the reduce-scatters started before " + what);
      started = false;
    }
    // The buffers come from another stream (the backend's) that this interface does not name.
    check(cudaDeviceSynchronize(), "device sync before " + what);

    const bool in_place = send == recv;
    const bool send_host = send_bytes && in_host_memory(send, what);
    const bool recv_host = in_place ? send_host : (recv_bytes && in_host_memory(recv, what));
    const std::size_t send_region = send_host ? aligned(send_bytes) : 0;
    const std::size_t stage_bytes =
        in_place ? (send_host ? send_bytes : 0) : send_region + (recv_host ? recv_bytes : 0);
    char* base = stage_bytes ? static_cast<char*>(stage(stage_bytes, what)) : nullptr;
    const void* dsend = send_host ? base : send;
    void* drecv = recv_host ? (in_place ? base : base + send_region) : recv;

    if (send_host)
      check(cudaMemcpyAsync(base, send, send_bytes, cudaMemcpyHostToDevice, stream),
            "upload for " + what);
    check(launch(dsend, drecv), what);
    // Completed before any download: a pageable download blocks the host and would hide a failure
    // from wait().
    wait(what);
    if (recv_host) {
      check(cudaMemcpyAsync(recv, drecv, recv_bytes, cudaMemcpyDeviceToHost, stream),
            "download for " + what);
      wait(what);
    }
  }
};

NcclComm::NcclComm() : impl_(std::make_unique<Impl>()) {
  Impl& s = *impl_;
  const int me = mpi_.rank(), n = mpi_.world();
  s.rank = me;

  // Ranks that share memory share the node's GPUs; their order among themselves picks the GPU.
  MPI_Comm node = MPI_COMM_NULL;
  int local_size = 1;
  check_mpi(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, me, MPI_INFO_NULL, &node), me,
            "node split");
  const int rank_rc = MPI_Comm_rank(node, &local_rank_);
  const int size_rc = MPI_Comm_size(node, &local_size);
  MPI_Comm_free(&node);
  check_mpi(rank_rc, me, "node rank");
  check_mpi(size_rc, me, "node size");

  // Local failures are not thrown yet: the peers must learn of them, or they would wait in the
  // unique-id broadcast for a rank that has gone.
  std::string error;
  int gpus = 0;
  const cudaError_t count_rc = cudaGetDeviceCount(&gpus);
  if (count_rc != cudaSuccess || gpus <= 0) {
    cudaGetLastError();  // the runtime keeps the error sticky otherwise
    error = who(me) + "no GPU is visible to rank " + std::to_string(me) + " on " + host_name() +
            ", and the NCCL communicator needs one per rank (cudaGetDeviceCount: " +
            (count_rc != cudaSuccess ? cuda_text(count_rc) : std::string("0 devices")) + ")";
  } else if (gpus < local_size) {
    // Two ranks on one GPU are not supported by NCCL and may hang it.
    error = who(me) + "node " + host_name() + " has " + std::to_string(gpus) +
            " GPU(s) visible but " + std::to_string(local_size) + " ranks (this is local rank " +
            std::to_string(local_rank_) + "); NCCL needs one GPU per rank, so launch at most " +
            std::to_string(gpus) + " ranks per node";
  } else {
    try {
      s.device = local_rank_ % gpus;
      // Left current on this thread, so the backend created next lands on the same GPU.
      s.check(cudaSetDevice(s.device), "set device " + std::to_string(s.device));
      s.check(cudaStreamCreateWithFlags(&s.stream, cudaStreamNonBlocking), "stream create");
      device_ = s.device;
    } catch (const std::runtime_error& e) {
      error = e.what();
    }
  }

  const std::int32_t failed = error.empty() ? 0 : 1;
  std::vector<std::int32_t> all_failed(std::size_t(n), 0);
  mpi_.all_gather(&failed, all_failed.data(), 1, DType::I32);
  if (!error.empty()) throw std::runtime_error(error);
  std::string bad;
  for (int r = 0; r < n; ++r)
    if (all_failed[std::size_t(r)]) bad += (bad.empty() ? "" : ", ") + std::to_string(r);
  if (!bad.empty())
    throw std::runtime_error(who(me) + "NCCL bootstrap failed: rank(s) " + bad +
                             " could not get a GPU (see their errors)");

  // The status travels with the id so that a failure on rank 0 does not strand the others.
  struct {
    std::int32_t ok = 0;
    ncclUniqueId id{};
  } boot;
  std::string id_error;
  if (me == 0) {
    const ncclResult_t rc = ncclGetUniqueId(&boot.id);
    if (rc == ncclSuccess)
      boot.ok = 1;
    else
      id_error = who(me) + "NCCL get unique id failed: " + nccl_text(rc, nullptr);
  }
  mpi_.broadcast(&boot, sizeof boot, 0);
  if (!boot.ok)
    throw std::runtime_error(me == 0 ? id_error
                                     : who(me) +
                                           "NCCL bootstrap failed: rank 0 could not create the "
                                           "unique id (see its error)");

  ncclComm_t comm = nullptr;
  s.check(ncclCommInitRank(&comm, n, boot.id, me), "communicator init");
  s.comm = comm;
}

NcclComm::~NcclComm() = default;

void NcclComm::abort_job(int code) noexcept {
  if (impl_->comm) ncclCommAbort(impl_->comm);
  impl_->comm = nullptr;
  mpi_.abort_job(code);
}

void NcclComm::all_reduce(void* data, std::size_t count, DType type, ReduceOp op) {
  const BlockedTimer timer(*this);
  Impl& s = *impl_;
  const std::size_t bytes = count * type_size(type);
  s.run("all-reduce", data, bytes, data, bytes, [&](const void* send, void* recv) {
    return ncclAllReduce(send, recv, count, nccl_type(type), nccl_op(op), s.comm, s.stream);
  });
  const std::uint64_t n = std::uint64_t(world());
  bytes_moved_ += 2 * count * type_size(type) * (n - 1) / n;
}

void NcclComm::reduce_scatter(const void* send, void* recv, std::size_t count, DType type,
                              ReduceOp op) {
  const BlockedTimer timer(*this);
  Impl& s = *impl_;
  const std::size_t bytes = count * type_size(type);
  s.run("reduce-scatter", send, bytes * std::size_t(world()), recv, bytes,
        [&](const void* dsend, void* drecv) {
          return ncclReduceScatter(dsend, drecv, count, nccl_type(type), nccl_op(op), s.comm,
                                   s.stream);
        });
  bytes_moved_ += count * type_size(type) * std::uint64_t(world() - 1);
}

void NcclComm::all_gather(const void* send, void* recv, std::size_t count, DType type) {
  const BlockedTimer timer(*this);
  Impl& s = *impl_;
  const std::size_t bytes = count * type_size(type);
  s.run("all-gather", send, bytes, recv, bytes * std::size_t(world()),
        [&](const void* dsend, void* drecv) {
          return ncclAllGather(dsend, drecv, count, nccl_type(type), s.comm, s.stream);
        });
  bytes_moved_ += count * type_size(type) * std::uint64_t(world() - 1);
}

void NcclComm::broadcast(void* data, std::size_t bytes, int root) {
  const BlockedTimer timer(*this);
  Impl& s = *impl_;
  s.run("broadcast", data, bytes, data, bytes, [&](const void* send, void* recv) {
    return ncclBroadcast(send, recv, bytes, ncclUint8, root, s.comm, s.stream);
  });
  if (rank() == root) bytes_moved_ += bytes;
}

void NcclComm::barrier() {
  const BlockedTimer timer(*this);
  impl_->wait("barrier");
  impl_->started = false;
  mpi_.barrier();
}

void NcclComm::reduce_host(double* sums, std::size_t n_sums, double* maxes, std::size_t n_maxes) {
  const BlockedTimer timer(*this);
  const std::uint64_t before = mpi_.bytes_moved();
  mpi_.reduce_host(sums, n_sums, maxes, n_maxes);
  bytes_moved_ += mpi_.bytes_moved() - before;
}

void NcclComm::order_with(void* stream) {
  Impl& s = *impl_;
  const Impl::OnDevice on(s, "order with the backend's stream");
  if (!s.ready) s.check(cudaEventCreateWithFlags(&s.ready, cudaEventDisableTiming), "event create");
  if (!s.done) s.check(cudaEventCreateWithFlags(&s.done, cudaEventDisableTiming), "event create");
  s.compute = static_cast<cudaStream_t>(stream);
}

void NcclComm::reduce_scatter_start(const void* send, void* recv, std::size_t count, DType type,
                                    ReduceOp op) {
  const BlockedTimer timer(*this);
  Impl& s = *impl_;
  if (count == 0) return;  // on every rank alike
  const std::string what = "reduce-scatter start";
  if (!s.ready)
    throw std::runtime_error(who(rank()) + what +
                             ": no backend stream to order with (order_with was not called)");
  const Impl::OnDevice on(s, what);
  if (s.in_host_memory(send, what) || s.in_host_memory(recv, what))
    throw std::runtime_error(who(rank()) + what +
                             ": a started collective takes device buffers, not host memory");
  // The collective reads `send` after the backend's work so far (the bucket's gradients and their
  // packing) without the host waiting for it.
  s.check(cudaEventRecord(s.ready, s.compute), "event record for " + what);
  s.check(cudaStreamWaitEvent(s.stream, s.ready, 0), "event wait for " + what);
  s.check(ncclReduceScatter(send, recv, count, nccl_type(type), nccl_op(op), s.comm, s.stream),
          what);
  s.started = s.unfinished = true;
  bytes_moved_ += count * type_size(type) * std::uint64_t(world() - 1);
}

void NcclComm::progress() {
  if (impl_->started) impl_->check_async("reduce-scatter progress");
}

void NcclComm::finish_started() {
  Impl& s = *impl_;
  if (!s.unfinished) return;
  const BlockedTimer timer(*this);
  const Impl::OnDevice on(s, "reduce-scatter finish");
  s.check(cudaEventRecord(s.done, s.stream), "event record for reduce-scatter finish");
  s.check(cudaStreamWaitEvent(s.compute, s.done, 0), "event wait for reduce-scatter finish");
  s.unfinished = false;
}

std::unique_ptr<Communicator> make_nccl_comm() {
  return std::make_unique<NcclComm>();
}

}  // namespace moetrain
