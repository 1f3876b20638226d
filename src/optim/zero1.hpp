// ZeRO-1 (docs/design.md §5): how the optimizer's work and state are split over the ranks, and the
// collectives that move gradients to their owners and updated parameters back. Every rank holds
// the whole model but only its part of the optimizer state.
//
// Gradients travel in buckets (§5.2): whole tensors, consecutive in the order backward completes
// them (grad_ready_stage), about train.grad_bucket_mib each, one reduce-scatter per bucket and
// group, started as soon as backward has produced the bucket (or all after backward, the same
// calls in the same order, hence the same bits). Within bucket b:
//   AdamW group: its tensors packed into [world * piece_b] of the packed vector; rank r owns the
//     r-th piece. A rank's shard is its pieces of every bucket, in bucket order.
//   matrix group (Muon and the other matrix optimizers): each matrix has one owner, assigned by
//     Newton-Schulz cost (largest first, to the least-loaded rank counting the earlier buckets;
//     ties to the lower rank, then order), so every rank derives the same plan; an owner's matrices
//     of the bucket sit in [part_b] of its partition, in bucket order.
// With one rank (LocalComm) the same code runs with the collectives as copies.
#pragma once

#include <cstddef>
#include <string>
#include <utility>
#include <vector>

#include "moetrain/backend.hpp"
#include "moetrain/communicator.hpp"
#include "moetrain/config.hpp"
#include "moetrain/param_layout.hpp"

namespace moetrain {

struct AdamWEntry {
  std::size_t offset, numel, flat;  // in params/grads, and in the packed AdamW vector
  double lr_scale, weight_decay;
};

struct OwnedMatrix {
  std::size_t offset;  // in params/grads
  int rows, cols;
  ParamRole role;
  int layer;
  std::string name;
  int owner = 0;
  std::size_t slot = 0;   // offset inside the owner's partition of the packed matrix vectors
  std::size_t state = 0;  // offset among the owner's matrices packed without padding: in its
                          // optimizer state (own_elems() long)
  std::size_t elems() const { return std::size_t(rows) * std::size_t(cols); }
};

// One bucket: indices into Zero1Plan::adamw() and ::matrices(), and where its data sit.
struct GradBucket {
  int ready_stage = 0;  // the backward stage that completes its last gradient
  std::vector<std::size_t> entries, mats;
  // AdamW: [flat, flat + world * piece) of the packed vector; this rank's piece at shard_offset.
  std::size_t flat = 0, piece = 0, shard_offset = 0;
  // Matrices: [part] elements at part_offset of every owner's partition.
  std::size_t part_offset = 0, part = 0;
};

// Same-shape matrices of this rank (in slot order): a matrix optimizer batches them.
struct MatrixGroup {
  int rows, cols;
  std::vector<std::size_t> mats;  // indices into Zero1Plan::matrices()
};

// Newton-Schulz cost of a rows x cols matrix, what the owner assignment balances.
double ns_cost(int rows, int cols);
// The owner of each matrix: by cost, largest first (stable), each to the least-loaded rank (ties:
// the lowest), `load` (world entries) carrying the cost already assigned. Zero1Plan assigns bucket
// by bucket; the memory estimate assigns all at once.
std::vector<int> assign_matrix_owners(const std::vector<std::pair<int, int>>& shapes,
                                      std::vector<double>& load);
std::vector<int> assign_matrix_owners(const std::vector<std::pair<int, int>>& shapes, int world);

template <typename T>
class Zero1Plan {
 public:
  // matrix_group: whether the 2D hidden weights go to a matrix optimizer (else all is AdamW).
  Zero1Plan(const Config& cfg, const ParamLayout& layout, Backend<T>& be, Communicator& comm,
            bool matrix_group);
  Zero1Plan(const Zero1Plan&) = delete;
  Zero1Plan& operator=(const Zero1Plan&) = delete;

  Backend<T>& backend() const { return be_; }
  Communicator& comm() const { return comm_; }

  // 1. This rank's gradients, averaged over the ranks into the owners' buffers: the AdamW shard
  //    (shard_grad) and this rank's matrices (matrix_grad at their slots). grads_ready(stage)
  //    starts the reduce-scatters of the buckets backward has completed up to `stage` (called in
  //    increasing stage order, after the last micro-batch's gradients of that stage);
  //    reduce_gradients starts the rest and finishes them all.
  void grads_ready(int stage, const T* grads);
  void reduce_gradients(const T* grads);
  // *acc (device) += the sum of squares of this rank's averaged gradients (padding is zero); the
  // clipping by the device coefficient *coef.
  void grad_sum_squares(double* acc) const;
  void scale_gradients(const double* coef);
  // 2. AdamW: packs the parameters (flat_params), then, after the shard's update, all-gathers the
  //    shards and unpacks them into params.
  void pack_adamw_params(const T* params);
  void gather_adamw_params(T* params);
  // 3. Matrices: all-gathers every owner's updated matrices into params.
  void gather_matrices(T* params);

  const std::vector<AdamWEntry>& adamw() const { return adamw_; }
  std::size_t adamw_total() const { return adamw_total_; }
  std::size_t shard() const { return shard_; }  // elements per rank
  const std::vector<GradBucket>& buckets() const { return buckets_; }
  // Where this rank's piece of bucket b begins in the packed vector.
  std::size_t own_piece(const GradBucket& b) const {
    return b.flat + b.piece * std::size_t(comm_.rank());
  }
  T* flat_params() const { return flat_param_.get(); }  // [shard * world]
  T* shard_grad() const { return shard_grad_.get(); }   // [shard]

  const std::vector<OwnedMatrix>& matrices() const { return muon_; }
  const std::vector<MatrixGroup>& own_groups() const { return own_groups_; }
  std::size_t own_elems() const { return own_elems_; }  // elements of this rank's matrices
  std::size_t matrix_elems() const;                     // of all matrices
  T* matrix_grad(const OwnedMatrix& m) const { return muon_recv_.get() + m.slot; }
  bool owns(const OwnedMatrix& m) const { return m.owner == comm_.rank(); }
  std::vector<std::string> owned_names() const;

 private:
  Backend<T>& be_;
  Communicator& comm_;
  std::vector<AdamWEntry> adamw_;
  std::size_t adamw_total_ = 0, shard_ = 0;
  void start_bucket(const GradBucket& b, const T* grads);

  std::vector<OwnedMatrix> muon_;
  std::vector<GradBucket> buckets_;
  std::size_t next_bucket_ = 0;  // the first bucket whose reduce-scatters are not started
  std::vector<MatrixGroup> own_groups_;
  std::size_t part_ = 0;       // per-rank partition length of the packed matrix vectors
  std::size_t own_elems_ = 0;  // this rank's fill of its partition
  // Communication staging.
  DeviceBuffer<T, T> flat_grad_, flat_param_, shard_grad_;  // [shard * world], same, [shard]
  // [part * world] (bucket b's at part_offset * world, owner-major), [part], [part * world]
  // (owner-major, for the final all-gather).
  DeviceBuffer<T, T> muon_send_, muon_recv_, muon_gather_;
};

extern template class Zero1Plan<float>;
extern template class Zero1Plan<double>;

}  // namespace moetrain
