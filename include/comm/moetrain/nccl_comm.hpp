// NcclComm: the Communicator over NCCL for GPU buffers, one GPU per rank. MPI launches the job and
// bootstraps it (rank, world, the node-local rank that picks the GPU, the NCCL unique id), so a
// launch is the same as for MpiComm: `mpirun -np N moetrain ...` or srun, on one node or many.
//
// Every blocking collective runs on a stream NcclComm owns and has completed when the call
// returns, like MpiComm, so the caller can read the result at once. Before enqueuing, it waits for
// all earlier work on the device: the interface does not say which stream produced the buffers.
// Host pointers are accepted too and go through a device staging buffer; host scalars use
// reduce_host (MPI).
//
// Errors throw std::runtime_error naming the rank; a rank without a GPU of its own fails at
// construction, and so do its peers, rather than leaving them waiting in the bootstrap.
//
// This header needs neither NCCL nor CUDA headers: the handles live in the .cpp.
#pragma once

#include <memory>

#include "moetrain/communicator.hpp"
#include "moetrain/mpi_comm.hpp"

namespace moetrain {

class NcclComm final : public Communicator {
 public:
  NcclComm();  // collective over MPI_COMM_WORLD: every rank must construct it
  ~NcclComm() override;
  NcclComm(const NcclComm&) = delete;
  NcclComm& operator=(const NcclComm&) = delete;

  int rank() const override { return mpi_.rank(); }
  int world() const override { return mpi_.world(); }
  const char* name() const override { return "nccl"; }
  // Aborts the NCCL communicator (peers stuck in a collective return with an error), then MPI.
  [[noreturn]] void abort_job(int code) noexcept override;
  void all_reduce(void* data, std::size_t count, DType type, ReduceOp op) override;
  void reduce_scatter(const void* send, void* recv, std::size_t count, DType type,
                      ReduceOp op) override;
  void all_gather(const void* send, void* recv, std::size_t count, DType type) override;
  void broadcast(void* data, std::size_t bytes, int root) override;
  void barrier() override;
  // Started reduce-scatters run on the communicator's stream, ordered with the backend's stream by
  // events (no host wait); progress() checks for a peer's failure, and the next blocking call polls
  // them to completion first.
  void order_with(void* stream) override;
  void reduce_scatter_start(const void* send, void* recv, std::size_t count, DType type,
                            ReduceOp op) override;
  void progress() override;
  void finish_started() override;
  // Host scalars travel over MPI, which launched the job anyway.
  void reduce_host(double* sums, std::size_t n_sums, double* maxes, std::size_t n_maxes) override;

  // The CUDA device this rank drives; the backend must allocate its buffers on the same one.
  int device() const { return device_; }
  int local_rank() const { return local_rank_; }

 private:
  struct Impl;
  // Declared first so that it outlives the NCCL communicator: MPI is finalised last.
  MpiComm mpi_;
  std::unique_ptr<Impl> impl_;
  int device_ = -1;
  int local_rank_ = 0;
};

// A NcclComm for a job launched by mpirun or srun (an error in a build without the toolkit).
std::unique_ptr<Communicator> make_nccl_comm();

}  // namespace moetrain
