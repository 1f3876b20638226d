// What every communicator shares: the rank-order reduction of gathered host scalars, and how a
// process knows it was launched as one rank of a job.
#include <algorithm>
#include <cstdlib>

#include "moetrain/communicator.hpp"

namespace moetrain {

void Communicator::reduce_gathered(const std::vector<double>& gathered, int world, double* sums,
                                   std::size_t n_sums, double* maxes, std::size_t n_maxes) {
  const std::size_t n = n_sums + n_maxes;
  for (std::size_t i = 0; i < n_sums; ++i) {
    double v = gathered[i];
    for (int r = 1; r < world; ++r) v += gathered[std::size_t(r) * n + i];
    sums[i] = v;
  }
  for (std::size_t i = 0; i < n_maxes; ++i) {
    double v = gathered[n_sums + i];
    for (int r = 1; r < world; ++r) v = std::max(v, gathered[std::size_t(r) * n + n_sums + i]);
    maxes[i] = v;
  }
}

bool launched_by_mpi() {
  for (const char* var : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"})
    if (std::getenv(var)) return true;
  return false;
}

}  // namespace moetrain
