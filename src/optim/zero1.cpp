#include "optim/zero1.hpp"

#include <algorithm>
#include <map>

namespace moetrain {

// Newton-Schulz FLOPs per iteration of an m x n matrix, m <= n (docs/design.md §4.3): two Gram
// products (upper triangles only) and one general product, 3 m^2 n + m^3.
double ns_cost(int rows, int cols) {
  const double m = std::min(rows, cols), n = std::max(rows, cols);
  return 3 * m * m * n + m * m * m;
}

std::vector<int> assign_matrix_owners(const std::vector<std::pair<int, int>>& shapes,
                                      std::vector<double>& load) {
  std::vector<std::size_t> order(shapes.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    return ns_cost(shapes[a].first, shapes[a].second) > ns_cost(shapes[b].first, shapes[b].second);
  });
  std::vector<int> owner(shapes.size(), 0);
  for (std::size_t i : order) {
    const int r = int(std::min_element(load.begin(), load.end()) - load.begin());
    owner[i] = r;
    load[std::size_t(r)] += ns_cost(shapes[i].first, shapes[i].second);
  }
  return owner;
}

std::vector<int> assign_matrix_owners(const std::vector<std::pair<int, int>>& shapes, int world) {
  std::vector<double> load(std::size_t(world), 0.0);
  return assign_matrix_owners(shapes, load);
}

template <typename T>
Zero1Plan<T>::Zero1Plan(const Config& cfg, const ParamLayout& layout, Backend<T>& be,
                        Communicator& comm, bool matrix_group)
    : be_(be), comm_(comm) {
  const OptimConfig& o = cfg.optim;
  const std::size_t world = std::size_t(comm.world());
  const int rank = comm.rank();

  // The tensors in the order backward completes them (layout order within a stage), cut into
  // buckets of about train.grad_bucket_mib.
  const std::vector<ParamTensor>& tensors = layout.tensors();
  std::vector<std::size_t> order(tensors.size());
  std::vector<int> stage(tensors.size());
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    order[i] = i;
    stage[i] = grad_ready_stage(tensors[i], cfg.model.n_layers);
  }
  std::stable_sort(order.begin(), order.end(),
                   [&](std::size_t a, std::size_t b) { return stage[a] < stage[b]; });
  const double cap = cfg.train.grad_bucket_mib * double(1 << 20) / double(sizeof(T));
  // (At least one element; a cap beyond any model, 2^62, is one bucket.)
  const std::size_t bucket_elems = cap < 1         ? 1
                                   : cap >= 0x1p62 ? std::size_t(1) << 62
                                                   : std::size_t(cap);
  std::vector<std::vector<std::size_t>> members(1);
  std::size_t filled = 0;
  for (std::size_t i : order) {
    if (filled >= bucket_elems) {
      members.emplace_back();
      filled = 0;
    }
    members.back().push_back(i);
    filled += tensors[i].numel;
  }

  std::vector<double> load(world, 0.0);
  std::size_t flat = 0;  // where the next bucket's AdamW pieces begin in the packed vector
  for (const std::vector<std::size_t>& in : members) {
    GradBucket b;
    std::size_t packed = 0;
    std::vector<std::pair<int, int>> shapes;
    for (std::size_t i : in) {
      const ParamTensor& t = tensors[i];
      const bool hidden = is_hidden_matrix(t.role);
      b.ready_stage = std::max(b.ready_stage, stage[i]);
      if (hidden && matrix_group) {
        b.mats.push_back(muon_.size());
        muon_.push_back({t.offset, int(t.shape[0]), int(t.shape[1]), t.role, t.layer, t.name});
        shapes.emplace_back(muon_.back().rows, muon_.back().cols);
        continue;
      }
      const GroupConfig& gc = hidden ? o.muon_group : o.adamw_group;
      const double wd = t.role == ParamRole::Norm ? 0.0 : gc.weight_decay;
      b.entries.push_back(adamw_.size());
      adamw_.push_back({t.offset, t.numel, flat + packed, gc.lr_scale, wd});
      packed += t.numel;
    }
    b.piece = (packed + world - 1) / world;
    b.flat = flat;
    b.shard_offset = shard_;
    flat += b.piece * world;
    shard_ += b.piece;
    adamw_total_ += packed;

    const std::vector<int> owner = assign_matrix_owners(shapes, load);
    std::vector<std::size_t> fill(world, 0);
    for (std::size_t k = 0; k < b.mats.size(); ++k) {
      OwnedMatrix& mt = muon_[b.mats[k]];
      mt.owner = owner[k];
      mt.slot = part_ + fill[std::size_t(mt.owner)];
      fill[std::size_t(mt.owner)] += mt.elems();
    }
    b.part_offset = part_;
    b.part = *std::max_element(fill.begin(), fill.end());
    part_ += b.part;
    buckets_.push_back(std::move(b));
  }

  std::map<std::pair<int, int>, std::size_t> group_of;
  for (const GradBucket& b : buckets_)
    for (std::size_t i : b.mats) {
      const OwnedMatrix& mt = muon_[i];
      if (mt.owner != rank) continue;
      muon_[i].state = own_elems_;
      own_elems_ += mt.elems();
      const auto key = std::pair{mt.rows, mt.cols};
      auto it = group_of.find(key);
      if (it == group_of.end()) {
        it = group_of.emplace(key, own_groups_.size()).first;
        own_groups_.push_back({mt.rows, mt.cols, {}});
      }
      own_groups_[it->second].mats.push_back(i);
    }

  flat_grad_ = DeviceBuffer<T, T>(be_, shard_ * world);
  flat_param_ = DeviceBuffer<T, T>(be_, shard_ * world);
  shard_grad_ = DeviceBuffer<T, T>(be_, shard_);
  muon_send_ = DeviceBuffer<T, T>(be_, part_ * world);
  muon_recv_ = DeviceBuffer<T, T>(be_, part_);
  muon_gather_ = DeviceBuffer<T, T>(be_, part_ * world);
}

template <typename T>
std::size_t Zero1Plan<T>::matrix_elems() const {
  std::size_t n = 0;
  for (const OwnedMatrix& mt : muon_) n += mt.elems();
  return n;
}

template <typename T>
std::vector<std::string> Zero1Plan<T>::owned_names() const {
  std::vector<std::string> out;
  for (const OwnedMatrix& mt : muon_)
    if (owns(mt)) out.push_back(mt.name);
  return out;
}

template <typename T>
void Zero1Plan<T>::start_bucket(const GradBucket& b, const T* grads) {
  const std::size_t world = std::size_t(comm_.world());
  for (std::size_t i : b.entries) {
    const AdamWEntry& e = adamw_[i];
    be_.copy(flat_grad_.get() + e.flat, grads + e.offset, e.numel * sizeof(T));
  }
  T* send = muon_send_.get() + b.part_offset * world;
  for (std::size_t i : b.mats) {
    const OwnedMatrix& mt = muon_[i];
    be_.copy(send + std::size_t(mt.owner) * b.part + (mt.slot - b.part_offset), grads + mt.offset,
             mt.elems() * sizeof(T));
  }
  if (b.piece)
    comm_.reduce_scatter_start(flat_grad_.get() + b.flat, shard_grad_.get() + b.shard_offset,
                               b.piece, ReduceOp::Sum);
  if (b.part)
    comm_.reduce_scatter_start(send, muon_recv_.get() + b.part_offset, b.part, ReduceOp::Sum);
}

template <typename T>
void Zero1Plan<T>::grads_ready(int stage, const T* grads) {
  while (next_bucket_ < buckets_.size() && buckets_[next_bucket_].ready_stage <= stage)
    start_bucket(buckets_[next_bucket_++], grads);
  comm_.progress();
}

template <typename T>
void Zero1Plan<T>::reduce_gradients(const T* grads) {
  while (next_bucket_ < buckets_.size()) start_bucket(buckets_[next_bucket_++], grads);
  next_bucket_ = 0;
  comm_.finish_started();
  if (comm_.world() > 1) {
    be_.scale(shard_grad_.get(), shard_, 1.0 / comm_.world());
    be_.scale(muon_recv_.get(), part_, 1.0 / comm_.world());
  }
}

template <typename T>
void Zero1Plan<T>::grad_sum_squares(double* acc) const {
  be_.sum_squares(shard_grad_.get(), shard_, acc);
  be_.sum_squares(muon_recv_.get(), part_, acc);
}

template <typename T>
void Zero1Plan<T>::scale_gradients(const double* coef) {
  be_.scale_by(shard_grad_.get(), shard_, coef);
  be_.scale_by(muon_recv_.get(), part_, coef);
}

template <typename T>
void Zero1Plan<T>::pack_adamw_params(const T* params) {
  for (const AdamWEntry& e : adamw_)
    be_.copy(flat_param_.get() + e.flat, params + e.offset, e.numel * sizeof(T));
}

template <typename T>
void Zero1Plan<T>::gather_adamw_params(T* params) {
  for (const GradBucket& b : buckets_) {
    if (!b.piece) continue;
    // All-gather from a copy of the own piece: MPI forbids overlapping send and receive buffers.
    T* own = shard_grad_.get() + b.shard_offset;
    be_.copy(own, flat_param_.get() + own_piece(b), b.piece * sizeof(T));
    comm_.all_gather(own, flat_param_.get() + b.flat, b.piece);
  }
  for (const AdamWEntry& e : adamw_)
    be_.copy(params + e.offset, flat_param_.get() + e.flat, e.numel * sizeof(T));
}

template <typename T>
void Zero1Plan<T>::gather_matrices(T* params) {
  if (!part_) return;
  for (const OwnedMatrix& mt : muon_)
    if (owns(mt)) be_.copy(muon_recv_.get() + mt.slot, params + mt.offset, mt.elems() * sizeof(T));
  comm_.all_gather(muon_recv_.get(), muon_gather_.get(), part_);
  for (const OwnedMatrix& mt : muon_)
    be_.copy(params + mt.offset, muon_gather_.get() + std::size_t(mt.owner) * part_ + mt.slot,
             mt.elems() * sizeof(T));
}

template class Zero1Plan<float>;
template class Zero1Plan<double>;

}  // namespace moetrain
