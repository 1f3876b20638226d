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

std::vector<int> assign_matrix_owners(const std::vector<std::pair<int, int>>& shapes, int world) {
  std::vector<std::size_t> order(shapes.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    return ns_cost(shapes[a].first, shapes[a].second) > ns_cost(shapes[b].first, shapes[b].second);
  });
  std::vector<double> load(std::size_t(world), 0.0);
  std::vector<int> owner(shapes.size(), 0);
  for (std::size_t i : order) {
    const int r = int(std::min_element(load.begin(), load.end()) - load.begin());
    owner[i] = r;
    load[std::size_t(r)] += ns_cost(shapes[i].first, shapes[i].second);
  }
  return owner;
}

template <typename T>
Zero1Plan<T>::Zero1Plan(const Config& cfg, const ParamLayout& layout, Backend<T>& be,
                        Communicator& comm, bool matrix_group)
    : be_(be), comm_(comm) {
  const OptimConfig& o = cfg.optim;
  const int world = comm.world(), rank = comm.rank();
  for (const ParamTensor& t : layout.tensors()) {
    const bool hidden = is_hidden_matrix(t.role);
    if (hidden && matrix_group) {
      muon_.push_back({t.offset, int(t.shape[0]), int(t.shape[1]), t.role, t.layer, t.name});
      continue;
    }
    const GroupConfig& gc = hidden ? o.muon_group : o.adamw_group;
    const double wd = t.role == ParamRole::Norm ? 0.0 : gc.weight_decay;
    adamw_.push_back({t.offset, t.numel, adamw_total_, gc.lr_scale, wd});
    adamw_total_ += t.numel;
  }
  shard_ = (adamw_total_ + std::size_t(world) - 1) / std::size_t(world);

  std::vector<std::pair<int, int>> shapes;
  for (const OwnedMatrix& mt : muon_) shapes.emplace_back(mt.rows, mt.cols);
  const std::vector<int> owner = assign_matrix_owners(shapes, world);
  for (std::size_t i = 0; i < muon_.size(); ++i) muon_[i].owner = owner[i];
  std::vector<std::size_t> fill(std::size_t(world), 0);
  std::map<std::pair<int, int>, std::size_t> group_of;
  for (std::size_t i = 0; i < muon_.size(); ++i) {
    OwnedMatrix& mt = muon_[i];
    mt.slot = fill[std::size_t(mt.owner)];
    fill[std::size_t(mt.owner)] += mt.elems();
    if (mt.owner != rank) continue;
    own_elems_ += mt.elems();
    const auto key = std::pair{mt.rows, mt.cols};
    auto it = group_of.find(key);
    if (it == group_of.end()) {
      it = group_of.emplace(key, own_groups_.size()).first;
      own_groups_.push_back({mt.rows, mt.cols, {}});
    }
    own_groups_[it->second].mats.push_back(i);
  }
  part_ = muon_.empty() ? 0 : *std::max_element(fill.begin(), fill.end());

  flat_grad_ = DeviceBuffer<T, T>(be_, shard_ * std::size_t(world));
  flat_param_ = DeviceBuffer<T, T>(be_, shard_ * std::size_t(world));
  shard_grad_ = DeviceBuffer<T, T>(be_, shard_);
  muon_send_ = DeviceBuffer<T, T>(be_, part_ * std::size_t(world));
  muon_recv_ = DeviceBuffer<T, T>(be_, part_);
  muon_gather_ = DeviceBuffer<T, T>(be_, part_ * std::size_t(world));
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
void Zero1Plan<T>::reduce_gradients(const T* grads) {
  for (const AdamWEntry& e : adamw_)
    be_.copy(flat_grad_.get() + e.flat, grads + e.offset, e.numel * sizeof(T));
  for (const OwnedMatrix& mt : muon_)
    be_.copy(muon_send_.get() + std::size_t(mt.owner) * part_ + mt.slot, grads + mt.offset,
             mt.elems() * sizeof(T));
  if (shard_) comm_.reduce_scatter(flat_grad_.get(), shard_grad_.get(), shard_, ReduceOp::Sum);
  if (part_) comm_.reduce_scatter(muon_send_.get(), muon_recv_.get(), part_, ReduceOp::Sum);
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
  if (shard_) {
    // All-gather from a copy of the own shard: MPI forbids overlapping send and receive buffers.
    be_.copy(shard_grad_.get(), flat_param_.get() + shard_begin(), shard_ * sizeof(T));
    comm_.all_gather(shard_grad_.get(), flat_param_.get(), shard_);
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
