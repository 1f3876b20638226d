#include "moetrain/mpi_comm.hpp"

#include <vector>

#include <mpi.h>

#include <climits>
#include <cstdlib>
#include <stdexcept>
#include <string>

namespace moetrain {

namespace {

MPI_Datatype mpi_type(DType t) {
  switch (t) {
    case DType::F32:
      return MPI_FLOAT;
    case DType::F64:
      return MPI_DOUBLE;
    case DType::I32:
      return MPI_INT32_T;
    case DType::I64:
      return MPI_INT64_T;
  }
  return MPI_BYTE;
}

MPI_Op mpi_op(ReduceOp op) {
  return op == ReduceOp::Sum ? MPI_SUM : MPI_MAX;
}

void check(int rc, int rank, const char* what) {
  if (rc == MPI_SUCCESS) return;
  char msg[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, msg, &len);
  throw std::runtime_error("rank " + std::to_string(rank) + ": MPI " + what +
                           " failed: " + std::string(msg, std::size_t(len)));
}

int as_int(std::size_t count, int rank, const char* what) {
  if (count > std::size_t(INT_MAX))
    throw std::runtime_error("rank " + std::to_string(rank) + ": MPI " + what + " of " +
                             std::to_string(count) + " elements exceeds INT_MAX");
  return int(count);
}

}  // namespace

struct MpiComm::Requests {
  std::vector<MPI_Request> pending;
};

MpiComm::MpiComm() : started_(std::make_unique<Requests>()) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) {
    int provided = 0;
    MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided);
    owns_init_ = true;
  }
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &world_);
}

MpiComm::~MpiComm() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (owns_init_ && !finalized) MPI_Finalize();
}

void MpiComm::abort_job(int code) noexcept {
  MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);  // MPI_Abort does not return; this satisfies [[noreturn]]
}

void MpiComm::all_reduce(void* data, std::size_t count, DType type, ReduceOp op) {
  const BlockedTimer timer(*this);
  check(MPI_Allreduce(MPI_IN_PLACE, data, as_int(count, rank_, "all-reduce"), mpi_type(type),
                      mpi_op(op), MPI_COMM_WORLD),
        rank_, "all-reduce");
  bytes_moved_ += 2 * count * type_size(type) * std::uint64_t(world_ - 1) / std::uint64_t(world_);
}

void MpiComm::reduce_scatter(const void* send, void* recv, std::size_t count, DType type,
                             ReduceOp op) {
  const BlockedTimer timer(*this);
  check(MPI_Reduce_scatter_block(send, recv, as_int(count, rank_, "reduce-scatter"), mpi_type(type),
                                 mpi_op(op), MPI_COMM_WORLD),
        rank_, "reduce-scatter");
  bytes_moved_ += count * type_size(type) * std::uint64_t(world_ - 1);
}

void MpiComm::all_gather(const void* send, void* recv, std::size_t count, DType type) {
  const BlockedTimer timer(*this);
  check(MPI_Allgather(send, as_int(count, rank_, "all-gather"), mpi_type(type), recv, int(count),
                      mpi_type(type), MPI_COMM_WORLD),
        rank_, "all-gather");
  bytes_moved_ += count * type_size(type) * std::uint64_t(world_ - 1);
}

void MpiComm::broadcast(void* data, std::size_t bytes, int root) {
  const BlockedTimer timer(*this);
  check(MPI_Bcast(data, as_int(bytes, rank_, "broadcast"), MPI_BYTE, root, MPI_COMM_WORLD), rank_,
        "broadcast");
  if (rank_ == root) bytes_moved_ += bytes;
}

void MpiComm::barrier() {
  const BlockedTimer timer(*this);
  check(MPI_Barrier(MPI_COMM_WORLD), rank_, "barrier");
}

void MpiComm::reduce_host(double* sums, std::size_t n_sums, double* maxes, std::size_t n_maxes) {
  // Timed by all_gather.
  std::vector<double> mine(sums, sums + n_sums);
  mine.insert(mine.end(), maxes, maxes + n_maxes);
  std::vector<double> all(mine.size() * std::size_t(world_));
  all_gather(mine.data(), all.data(), mine.size(), DType::F64);
  reduce_gathered(all, world_, sums, n_sums, maxes, n_maxes);
}

void MpiComm::reduce_scatter_start(const void* send, void* recv, std::size_t count, DType type,
                                   ReduceOp op) {
  const BlockedTimer timer(*this);
  MPI_Request request = MPI_REQUEST_NULL;
  check(MPI_Ireduce_scatter_block(send, recv, as_int(count, rank_, "reduce-scatter"),
                                  mpi_type(type), mpi_op(op), MPI_COMM_WORLD, &request),
        rank_, "reduce-scatter start");
  started_->pending.push_back(request);
  bytes_moved_ += count * type_size(type) * std::uint64_t(world_ - 1);
}

void MpiComm::progress() {
  std::vector<MPI_Request>& p = started_->pending;
  if (p.empty()) return;
  const BlockedTimer timer(*this);
  int done = 0;
  check(MPI_Testall(int(p.size()), p.data(), &done, MPI_STATUSES_IGNORE), rank_,
        "reduce-scatter progress");
  if (done) p.clear();
}

void MpiComm::finish_started() {
  std::vector<MPI_Request>& p = started_->pending;
  if (p.empty()) return;
  const BlockedTimer timer(*this);
  const int rc = MPI_Waitall(int(p.size()), p.data(), MPI_STATUSES_IGNORE);
  p.clear();
  check(rc, rank_, "reduce-scatter wait");
}

}  // namespace moetrain
