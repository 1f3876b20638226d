// MpiComm: the Communicator over MPI_COMM_WORLD for CPU buffers (OpenMPI; launched with
// `mpirun -np N moetrain ...` or srun). MPI errors are returned, not fatal, and rethrown as
// std::runtime_error naming the rank and the collective.
#pragma once

#include <memory>
#include <vector>

#include "moetrain/communicator.hpp"

namespace moetrain {

class MpiComm final : public Communicator {
 public:
  MpiComm();  // initialises MPI if needed
  ~MpiComm() override;
  int rank() const override { return rank_; }
  int world() const override { return world_; }
  const char* name() const override { return "mpi"; }
  [[noreturn]] void abort_job(int code) noexcept override;
  void all_reduce(void* data, std::size_t count, DType type, ReduceOp op) override;
  void reduce_scatter(const void* send, void* recv, std::size_t count, DType type,
                      ReduceOp op) override;
  void all_gather(const void* send, void* recv, std::size_t count, DType type) override;
  void broadcast(void* data, std::size_t bytes, int root) override;
  void barrier() override;
  void reduce_host(double* sums, std::size_t n_sums, double* maxes, std::size_t n_maxes) override;
  // MPI_Ireduce_scatter_block; progress() tests the requests, finish_started() waits for them.
  void reduce_scatter_start(const void* send, void* recv, std::size_t count, DType type,
                            ReduceOp op) override;
  void progress() override;
  void finish_started() override;

 private:
  // The started collectives' MPI_Request handles (an MPI_Request is an int or a pointer: kept
  // opaque so this header needs no MPI).
  struct Requests;
  std::unique_ptr<Requests> started_;
  int rank_ = 0, world_ = 1;
  bool owns_init_ = false;
};

}  // namespace moetrain
