// NCCL over MPI on the simulator's streams (the contract is in nccl_shim.hpp).
#include "nccl_shim.hpp"

#ifndef OMPI_SKIP_MPICXX
#define OMPI_SKIP_MPICXX 1
#endif
#include <mpi.h>
#include <unistd.h>

#include <chrono>
#include <climits>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "simt.hpp"

namespace {

// What the collectives of one communicator share with the work they enqueued: the work may run
// after the handle is gone (an abort does not wait for it).
struct State {
  MPI_Comm mpi = MPI_COMM_NULL;
  int rank = 0, nranks = 1;
  bool aborted = false;
  ncclResult_t async = ncclSuccess;
  std::string async_reason;
  std::size_t pending = 0;  // enqueued, not run
};

}  // namespace

struct ncclComm {
  std::shared_ptr<State> state;
};

namespace {

std::size_t g_pending = 0;         // over all communicators (the simulator runs work on one thread)
std::size_t g_fail_countdown = 0;  // fail_collective_at
thread_local std::string t_last_error;
thread_local int t_group_depth = 0;

struct Deferred {
  cudaStream_t stream;
  std::shared_ptr<State> state;
  std::function<void()> run;
};
thread_local std::vector<Deferred> t_group;

ncclResult_t fail(ncclResult_t rc, std::string why) {
  t_last_error = std::move(why);
  return rc;
}

std::string mpi_text(int rc) {
  char msg[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(rc, msg, &len) != MPI_SUCCESS) return "MPI error " + std::to_string(rc);
  return std::string(msg, std::size_t(len));
}

bool mpi_ready() {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  return initialized && !finalized;
}

// An element type's size and MPI type; size 0 for the types the shim does not reduce or know.
struct TypeInfo {
  std::size_t size;
  MPI_Datatype mpi;
};
TypeInfo type_info(ncclDataType_t t) {
  switch (t) {
    case ncclInt8:
      return {1, MPI_INT8_T};
    case ncclUint8:
      return {1, MPI_UINT8_T};
    case ncclInt32:
      return {4, MPI_INT32_T};
    case ncclUint32:
      return {4, MPI_UINT32_T};
    case ncclInt64:
      return {8, MPI_INT64_T};
    case ncclUint64:
      return {8, MPI_UINT64_T};
    case ncclFloat32:
      return {4, MPI_FLOAT};
    case ncclFloat64:
      return {8, MPI_DOUBLE};
    case ncclFloat16:
    case ncclBfloat16:
      break;
  }
  return {0, MPI_DATATYPE_NULL};
}

ncclResult_t check_type(ncclDataType_t t, const char* call) {
  const int v = int(t);
  if (v < 0 || v > int(ncclBfloat16))
    return fail(ncclInvalidArgument, std::string(call) + ": invalid datatype " + std::to_string(v));
  if (type_info(t).size == 0)
    return fail(ncclInvalidArgument, std::string(call) +
                                         ": fp16 and bf16 are not reduced by the simulator's "
                                         "NCCL (tests/simt/nccl_shim.hpp)");
  return ncclSuccess;
}

ncclResult_t check_op(ncclRedOp_t op, MPI_Op* out, const char* call) {
  switch (op) {
    case ncclSum:
      *out = MPI_SUM;
      return ncclSuccess;
    case ncclProd:
      *out = MPI_PROD;
      return ncclSuccess;
    case ncclMax:
      *out = MPI_MAX;
      return ncclSuccess;
    case ncclMin:
      *out = MPI_MIN;
      return ncclSuccess;
    case ncclAvg:
      return fail(ncclInvalidArgument,
                  std::string(call) + ": ncclAvg is not supported by the simulator's NCCL");
  }
  return fail(ncclInvalidArgument,
              std::string(call) + ": invalid reduction operation " + std::to_string(int(op)));
}

ncclResult_t check_buffer(const void* p, std::size_t bytes, const char* what, const char* call) {
  if (!p) return fail(ncclInvalidArgument, std::string(call) + ": " + what + " is null");
  const std::size_t extent = simt::device_extent(p);
  if (extent == 0)
    return fail(ncclInvalidArgument,
                std::string(call) + ": " + what + " is not device memory (cudaMalloc)");
  if (extent < bytes)
    return fail(ncclInvalidArgument, std::string(call) + ": " + what + " holds " +
                                         std::to_string(extent) + " bytes from that address, " +
                                         std::to_string(bytes) + " needed");
  return ncclSuccess;
}

// The checks every collective makes on its communicator and count.
ncclResult_t check_comm(ncclComm_t comm, std::size_t count, const char* call) {
  if (!comm || !comm->state) return fail(ncclInvalidArgument, std::string(call) + ": comm is null");
  const State& s = *comm->state;
  if (s.async != ncclSuccess)
    return fail(s.async,
                std::string(call) + ": the communicator failed earlier: " + s.async_reason);
  if (count > std::size_t(INT_MAX))
    return fail(ncclInvalidArgument, std::string(call) + ": " + std::to_string(count) +
                                         " elements exceed the simulator's INT_MAX limit");
  return ncclSuccess;
}

// A collective enqueued or held by a group has run, or will not.
void settle(State& s) {
  --s.pending;
  --g_pending;
}

// Enqueues `move` (the MPI transfer) on `stream`, or keeps it for the group's end.
ncclResult_t submit(ncclComm_t comm, cudaStream_t stream, std::function<int(State&)> move,
                    const char* call) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &capture) == cudaSuccess &&
      capture != cudaStreamCaptureStatusNone)
    return fail(ncclInvalidUsage, std::string(call) +
                                      ": the simulator's NCCL does not capture collectives into "
                                      "CUDA graphs");
  std::shared_ptr<State> state = comm->state;
  const std::string name = call;
  auto run = [state, move = std::move(move), name] {
    settle(*state);
    if (state->aborted || state->async != ncclSuccess) return;
    if (g_fail_countdown > 0 && --g_fail_countdown == 0) {
      state->async = ncclRemoteError;
      state->async_reason = name + ": the transfer broke (simt::nccl::fail_collective_at)";
      return;
    }
    const int rc = move(*state);
    if (rc != MPI_SUCCESS) {
      // NCCL's name for a peer that went away or a transfer that broke.
      state->async = ncclRemoteError;
      state->async_reason = name + " failed in MPI: " + mpi_text(rc);
    }
  };
  ++state->pending;
  ++g_pending;
  if (t_group_depth > 0) {
    t_group.push_back({stream, state, std::move(run)});
    return ncclSuccess;
  }
  try {
    simt::enqueue_host(stream, std::move(run));
  } catch (const std::exception& e) {
    settle(*state);
    return fail(ncclUnhandledCudaError, name + ": " + e.what());
  }
  return ncclSuccess;
}

std::uint32_t color_of(const ncclUniqueId& id) {
  std::uint32_t h = 2166136261u;  // FNV-1a
  for (const char c : id.internal) h = (h ^ std::uint8_t(c)) * 16777619u;
  return h & 0x7fffffffu;
}

}  // namespace

const char* ncclGetErrorString(ncclResult_t result) {
  switch (result) {
    case ncclSuccess:
      return "no error";
    case ncclUnhandledCudaError:
      return "unhandled cuda error (run with NCCL_DEBUG=INFO for details)";
    case ncclSystemError:
      return "unhandled system error (run with NCCL_DEBUG=INFO for details)";
    case ncclInternalError:
      return "internal error - please report this issue to the NCCL developers";
    case ncclInvalidArgument:
      return "invalid argument (run with NCCL_DEBUG=WARN for details)";
    case ncclInvalidUsage:
      return "invalid usage (run with NCCL_DEBUG=WARN for details)";
    case ncclRemoteError:
      return "remote process exited or there was a network error";
    case ncclInProgress:
      return "NCCL operation in progress";
  }
  return "unknown result code";
}

const char* ncclGetLastError(ncclComm_t) {
  return t_last_error.c_str();
}

ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
  if (!id) return fail(ncclInvalidArgument, "ncclGetUniqueId: id is null");
  std::random_device device;
  std::seed_seq seed{device(), device(), std::uint32_t(::getpid()),
                     std::uint32_t(std::chrono::steady_clock::now().time_since_epoch().count())};
  std::mt19937 gen(seed);
  for (char& c : id->internal) c = char(gen() & 0xff);
  return ncclSuccess;
}

ncclResult_t ncclCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId id, int rank) {
  if (!comm) return fail(ncclInvalidArgument, "ncclCommInitRank: comm is null");
  *comm = nullptr;
  if (!mpi_ready())
    return fail(ncclSystemError,
                "ncclCommInitRank: the simulator's NCCL runs over MPI, which is not initialised");
  // An invalid rank still takes part in the split (without a colour), so its peers see too few
  // processes and fail instead of waiting for it.
  const bool valid = nranks >= 1 && rank >= 0 && rank < nranks;
  MPI_Comm split = MPI_COMM_NULL;
  const int rc =
      MPI_Comm_split(MPI_COMM_WORLD, valid ? int(color_of(id)) : MPI_UNDEFINED, rank, &split);
  if (!valid)
    return fail(ncclInvalidArgument, "ncclCommInitRank: rank " + std::to_string(rank) +
                                         " is not in [0, " + std::to_string(nranks) + ")");
  if (rc != MPI_SUCCESS)
    return fail(ncclSystemError, "ncclCommInitRank: MPI_Comm_split failed: " + mpi_text(rc));
  int size = 0, me = 0;
  MPI_Comm_size(split, &size);
  MPI_Comm_rank(split, &me);
  if (size != nranks || me != rank) {
    MPI_Comm_free(&split);
    return fail(ncclInvalidArgument,
                "ncclCommInitRank: " + std::to_string(size) + " process(es) hold this unique id (" +
                    std::to_string(nranks) + " expected) and this one is number " +
                    std::to_string(me) + " among them, not rank " + std::to_string(rank));
  }
  MPI_Comm_set_errhandler(split, MPI_ERRORS_RETURN);
  auto state = std::make_shared<State>();
  state->mpi = split;
  state->rank = rank;
  state->nranks = nranks;
  *comm = new ncclComm{std::move(state)};
  return ncclSuccess;
}

ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t* async_error) {
  if (!comm || !comm->state)
    return fail(ncclInvalidArgument, "ncclCommGetAsyncError: comm is null");
  if (!async_error) return fail(ncclInvalidArgument, "ncclCommGetAsyncError: asyncError is null");
  *async_error = comm->state->async;
  if (comm->state->async != ncclSuccess) t_last_error = comm->state->async_reason;
  return ncclSuccess;
}

ncclResult_t ncclCommAbort(ncclComm_t comm) {
  if (!comm) return ncclSuccess;  // as NCCL: aborting nothing succeeds
  // Work still enqueued does nothing when it runs; the MPI communicator is left to MPI_Finalize
  // or MPI_Abort, since freeing it is collective and a peer may be gone.
  comm->state->aborted = true;
  delete comm;
  return ncclSuccess;
}

ncclResult_t ncclCommDestroy(ncclComm_t comm) {
  if (!comm) return fail(ncclInvalidArgument, "ncclCommDestroy: comm is null");
  std::shared_ptr<State> state = comm->state;
  // As NCCL, the collectives already enqueued complete first.
  if (state->pending > 0) {
    const cudaError_t rc = cudaDeviceSynchronize();
    if (rc != cudaSuccess)
      return fail(ncclUnhandledCudaError, std::string("ncclCommDestroy: ") + cudaGetErrorName(rc));
  }
  if (state->mpi != MPI_COMM_NULL && mpi_ready()) MPI_Comm_free(&state->mpi);
  state->aborted = true;
  delete comm;
  return ncclSuccess;
}

ncclResult_t ncclCommCount(const ncclComm_t comm, int* count) {
  if (!comm || !count) return fail(ncclInvalidArgument, "ncclCommCount: null argument");
  *count = comm->state->nranks;
  return ncclSuccess;
}

ncclResult_t ncclCommUserRank(const ncclComm_t comm, int* rank) {
  if (!comm || !rank) return fail(ncclInvalidArgument, "ncclCommUserRank: null argument");
  *rank = comm->state->rank;
  return ncclSuccess;
}

namespace {

enum class Kind { AllReduce, ReduceScatter, AllGather, Broadcast };

// What the four collectives share: the checks at the call, then the transfer, on copies of the
// buffers, when the stream runs it. `op` is read by the reductions, `root` by the broadcast.
ncclResult_t collective(Kind kind, const char* call, const void* sendbuff, void* recvbuff,
                        size_t count, ncclDataType_t datatype, ncclRedOp_t op, int root,
                        ncclComm_t comm, cudaStream_t stream) {
  MPI_Op mop = MPI_OP_NULL;
  if (ncclResult_t rc = check_comm(comm, count, call); rc != ncclSuccess) return rc;
  if (ncclResult_t rc = check_type(datatype, call); rc != ncclSuccess) return rc;
  const bool reduces = kind == Kind::AllReduce || kind == Kind::ReduceScatter;
  if (reduces) {
    if (ncclResult_t rc = check_op(op, &mop, call); rc != ncclSuccess) return rc;
  }
  const int n = comm->state->nranks;
  if (kind == Kind::Broadcast && (root < 0 || root >= n))
    return fail(ncclInvalidArgument, std::string(call) + ": root " + std::to_string(root) +
                                         " is not a rank of the communicator");
  if (count == 0) return ncclSuccess;
  const std::size_t bytes = count * type_info(datatype).size;
  // Blocks of `count` elements in each buffer; a broadcast reads the send buffer on the root only.
  const bool is_root = comm->state->rank == root;
  const std::size_t send_blocks = kind == Kind::ReduceScatter           ? std::size_t(n)
                                  : kind == Kind::Broadcast && !is_root ? 0
                                                                        : 1;
  const std::size_t recv_blocks = kind == Kind::AllGather ? std::size_t(n) : 1;
  if (send_blocks > 0) {
    if (ncclResult_t rc = check_buffer(sendbuff, send_blocks * bytes, "sendbuff", call);
        rc != ncclSuccess)
      return rc;
  }
  if (ncclResult_t rc = check_buffer(recvbuff, recv_blocks * bytes, "recvbuff", call);
      rc != ncclSuccess)
    return rc;
  const MPI_Datatype type = type_info(datatype).mpi;
  const int c = int(count);
  return submit(
      comm, stream,
      [=](State& s) {
        const auto* from = static_cast<const unsigned char*>(sendbuff);
        std::vector<unsigned char> in(from, from + send_blocks * bytes), out(recv_blocks * bytes);
        int rc = MPI_SUCCESS;
        switch (kind) {
          case Kind::AllReduce:
            rc = MPI_Allreduce(in.data(), out.data(), c, type, mop, s.mpi);
            break;
          case Kind::ReduceScatter:
            rc = MPI_Reduce_scatter_block(in.data(), out.data(), c, type, mop, s.mpi);
            break;
          case Kind::AllGather:
            rc = MPI_Allgather(in.data(), c, type, out.data(), c, type, s.mpi);
            break;
          case Kind::Broadcast:
            if (is_root) out = in;
            rc = MPI_Bcast(out.data(), c, type, root, s.mpi);
            break;
        }
        if (rc == MPI_SUCCESS) std::memcpy(recvbuff, out.data(), out.size());
        return rc;
      },
      call);
}

}  // namespace

ncclResult_t ncclAllReduce(const void* sendbuff, void* recvbuff, size_t count,
                           ncclDataType_t datatype, ncclRedOp_t op, ncclComm_t comm,
                           cudaStream_t stream) {
  return collective(Kind::AllReduce, "ncclAllReduce", sendbuff, recvbuff, count, datatype, op, 0,
                    comm, stream);
}

ncclResult_t ncclReduceScatter(const void* sendbuff, void* recvbuff, size_t recvcount,
                               ncclDataType_t datatype, ncclRedOp_t op, ncclComm_t comm,
                               cudaStream_t stream) {
  return collective(Kind::ReduceScatter, "ncclReduceScatter", sendbuff, recvbuff, recvcount,
                    datatype, op, 0, comm, stream);
}

ncclResult_t ncclAllGather(const void* sendbuff, void* recvbuff, size_t sendcount,
                           ncclDataType_t datatype, ncclComm_t comm, cudaStream_t stream) {
  return collective(Kind::AllGather, "ncclAllGather", sendbuff, recvbuff, sendcount, datatype,
                    ncclSum, 0, comm, stream);
}

ncclResult_t ncclBroadcast(const void* sendbuff, void* recvbuff, size_t count,
                           ncclDataType_t datatype, int root, ncclComm_t comm,
                           cudaStream_t stream) {
  return collective(Kind::Broadcast, "ncclBroadcast", sendbuff, recvbuff, count, datatype, ncclSum,
                    root, comm, stream);
}

ncclResult_t ncclGroupStart() {
  ++t_group_depth;
  return ncclSuccess;
}

ncclResult_t ncclGroupEnd() {
  if (t_group_depth == 0) return fail(ncclInvalidUsage, "ncclGroupEnd: no ncclGroupStart to end");
  if (--t_group_depth > 0) return ncclSuccess;
  std::vector<Deferred> group;
  group.swap(t_group);
  ncclResult_t result = ncclSuccess;
  for (Deferred& d : group) {
    if (result != ncclSuccess) {  // the rest of a group that failed to enqueue does not run
      settle(*d.state);
      continue;
    }
    try {
      simt::enqueue_host(d.stream, std::move(d.run));
    } catch (const std::exception& e) {
      settle(*d.state);
      result = fail(ncclUnhandledCudaError, std::string("ncclGroupEnd: ") + e.what());
    }
  }
  return result;
}

namespace simt::nccl {
std::size_t pending() {
  return g_pending;
}
void fail_collective_at(std::size_t n) {
  g_fail_countdown = n;
}
}  // namespace simt::nccl
