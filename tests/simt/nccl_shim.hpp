// tests/simt/nccl_shim.hpp — NCCL for the SIMT build: the subset of nccl.h that NcclComm
// (src/comm/nccl_comm.cpp) uses, with NCCL's names, types, values and semantics, on the simulator's
// streams, the data moving between processes over MPI (docs/design.md §6.5).
//
// Semantics kept from NCCL:
//   * a collective checks its arguments at the call and returns NCCL's error code (the reason in
//     ncclGetLastError): a null or destroyed communicator, an unknown type or operation, a root or
//     rank out of range, a buffer that is not device memory (cudaMalloc) for its whole extent —
//     NCCL reads and writes device buffers, so host memory is an error here too;
//   * a valid collective is enqueued on the given stream and runs in that stream's order: under the
//     simulator's eager schedule at once, under the deferred one only when something orders it (a
//     synchronize, a query, an event a later wait depends on), so a missing event between the
//     producer of a buffer and its collective reads stale data, as on a GPU. Its receive buffer is
//     written when it runs;
//   * ncclGroupStart/End: the collectives between them are enqueued at the outermost ncclGroupEnd,
//     in call order;
//   * a failure while a collective runs (the MPI transfer failed) is not returned by the call that
//     enqueued it, which has returned already, but by ncclCommGetAsyncError, as NCCL reports a
//     peer's failure; later collectives on that communicator then fail at the call;
//   * a collective on a stream that is being captured into a CUDA graph returns ncclInvalidUsage
//     (NCCL supports capture; the simulator does not replay MPI transfers);
//   * ncclCommAbort returns at once and never waits for a peer; ncclCommDestroy first runs the
//     collectives still pending on the communicator's streams.
// Underneath, ncclCommInitRank splits MPI_COMM_WORLD by the unique id, so every MPI process calls
// it (as every rank of a moetrain job does) and MPI must be initialised first (NcclComm's MpiComm
// does that). Reductions: sum, prod, max, min of the integer and fp32/fp64 types; fp16, bf16 and
// ncclAvg return ncclInvalidArgument (nothing in moetrain reduces them). Each collective copies
// its input before it moves data, so any overlap of send and receive buffers (NCCL's in-place
// forms included) gives NCCL's result.
#pragma once

#include <cstddef>

#include "simt.hpp"  // cudaStream_t and the streams the collectives run on

typedef enum {
  ncclSuccess = 0,
  ncclUnhandledCudaError = 1,
  ncclSystemError = 2,
  ncclInternalError = 3,
  ncclInvalidArgument = 4,
  ncclInvalidUsage = 5,
  ncclRemoteError = 6,
  ncclInProgress = 7,
} ncclResult_t;

typedef enum {
  ncclInt8 = 0,
  ncclChar = 0,
  ncclUint8 = 1,
  ncclInt32 = 2,
  ncclInt = 2,
  ncclUint32 = 3,
  ncclInt64 = 4,
  ncclUint64 = 5,
  ncclFloat16 = 6,
  ncclHalf = 6,
  ncclFloat32 = 7,
  ncclFloat = 7,
  ncclFloat64 = 8,
  ncclDouble = 8,
  ncclBfloat16 = 9,
} ncclDataType_t;

typedef enum { ncclSum = 0, ncclProd = 1, ncclMax = 2, ncclMin = 3, ncclAvg = 4 } ncclRedOp_t;

#define NCCL_UNIQUE_ID_BYTES 128
typedef struct {
  char internal[NCCL_UNIQUE_ID_BYTES];
} ncclUniqueId;

struct ncclComm;
typedef struct ncclComm* ncclComm_t;

const char* ncclGetErrorString(ncclResult_t result);
// The reason for the last failed call on this thread ("" if none); `comm` may be null.
const char* ncclGetLastError(ncclComm_t comm);

ncclResult_t ncclGetUniqueId(ncclUniqueId* id);
ncclResult_t ncclCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId id, int rank);
ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t* async_error);
ncclResult_t ncclCommAbort(ncclComm_t comm);
ncclResult_t ncclCommDestroy(ncclComm_t comm);
ncclResult_t ncclCommCount(const ncclComm_t comm, int* count);
ncclResult_t ncclCommUserRank(const ncclComm_t comm, int* rank);

ncclResult_t ncclAllReduce(const void* sendbuff, void* recvbuff, size_t count,
                           ncclDataType_t datatype, ncclRedOp_t op, ncclComm_t comm,
                           cudaStream_t stream);
// sendbuff holds nranks * recvcount elements; rank r receives the reduction of block r.
ncclResult_t ncclReduceScatter(const void* sendbuff, void* recvbuff, size_t recvcount,
                               ncclDataType_t datatype, ncclRedOp_t op, ncclComm_t comm,
                               cudaStream_t stream);
// recvbuff receives nranks * sendcount elements, every rank's in rank order.
ncclResult_t ncclAllGather(const void* sendbuff, void* recvbuff, size_t sendcount,
                           ncclDataType_t datatype, ncclComm_t comm, cudaStream_t stream);
// sendbuff is read on the root only.
ncclResult_t ncclBroadcast(const void* sendbuff, void* recvbuff, size_t count,
                           ncclDataType_t datatype, int root, ncclComm_t comm, cudaStream_t stream);
ncclResult_t ncclGroupStart();
ncclResult_t ncclGroupEnd();

namespace simt::nccl {
// Collectives enqueued on a stream (or held by a group) and not run yet, over every communicator
// of this process.
std::size_t pending();
// Makes the n-th collective that runs from now on (1: the next one) fail as a broken transfer
// does: it moves no data, and its communicator reports ncclRemoteError through
// ncclCommGetAsyncError. 0 cancels. A real failure is seen by every peer, so a test calls this
// with the same n on every rank.
void fail_collective_at(std::size_t n);
}  // namespace simt::nccl
