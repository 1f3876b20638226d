// The step: gradients to their owners (ZeRO-1), the global norm and clipping, AdamW on the shard,
// the matrix optimizer and QK-clip on the owned matrices, parameters back to every rank.
#include "moetrain/optimizer.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <tuple>

#include "optim/adamuon.hpp"
#include "optim/adamw.hpp"
#include "optim/muon.hpp"
#include "optim/normuon.hpp"
#include "optim/qk_clip.hpp"
#include "optim/soap.hpp"
#include "optim/step_stats.hpp"
#include "optim/zero1.hpp"

namespace moetrain {

namespace {

bool has_matrix_group(OptimizerName n) {
  return n != OptimizerName::AdamW;
}

// The matrix group's update rule for optim.name (null for adamw). A new matrix optimizer adds
// its case here (docs/design.md §10).
template <typename T>
std::unique_ptr<MatrixOptimizer<T>> make_matrix_optimizer(const OptimConfig& o,
                                                          Zero1Plan<T>& plan) {
  switch (o.name) {
    case OptimizerName::AdamW:
      return nullptr;
    case OptimizerName::Muon:
    case OptimizerName::MuonClip:
      return std::make_unique<Muon<T>>(o, plan);
    case OptimizerName::NorMuon:
      return std::make_unique<NorMuon<T>>(o, plan);
    case OptimizerName::AdaMuon:
      return std::make_unique<AdaMuon<T>>(o, plan);
    case OptimizerName::Soap:
      return std::make_unique<Soap<T>>(o, plan);
  }
  throw std::logic_error("make_matrix_optimizer: unknown optim.name");
}

}  // namespace

template <typename T>
struct Optimizer<T>::Impl {
  Impl(const Config& c, const ParamLayout& layout, Backend<T>& be, Communicator* external,
       DeviceStats<T>* shared)
      : cfg(c),
        local(external ? nullptr : make_local_comm(be)),
        plan(cfg, layout, be, external ? *external : *local, has_matrix_group(c.optim.name)),
        adamw(cfg.optim, plan),
        matrices(make_matrix_optimizer(cfg.optim, plan)),
        clip(qk_clip_enabled(cfg.optim) ? std::make_unique<QkClip<T>>(cfg, layout, plan) : nullptr),
        own_stats(shared ? nullptr : std::make_unique<DeviceStats<T>>(be)),
        stats(shared ? *shared : *own_stats),
        regions(reserve_optimizer_stats(stats, cfg, plan.comm().world())) {
    if (own_stats) own_stats->allocate();
  }

  std::vector<StateTensor<T>> state_tensors() {
    std::vector<StateTensor<T>> all = adamw.state();
    if (matrices)
      for (StateTensor<T>& s : matrices->state()) all.push_back(std::move(s));
    return all;
  }

  Config cfg;
  std::unique_ptr<LocalComm> local;
  Zero1Plan<T> plan;
  AdamW<T> adamw;
  std::unique_ptr<MatrixOptimizer<T>> matrices;
  std::unique_ptr<QkClip<T>> clip;
  std::unique_ptr<DeviceStats<T>> own_stats;
  DeviceStats<T>& stats;
  OptimizerStatsRegions<T> regions;  // the step's device values (optim/step_stats.hpp)
};

template <typename T>
Optimizer<T>::Optimizer(const Config& cfg, const ParamLayout& layout, Backend<T>& backend,
                        Communicator* comm, DeviceStats<T>* stats)
    : impl_(std::make_unique<Impl>(cfg, layout, backend, comm, stats)) {}

template <typename T>
Optimizer<T>::~Optimizer() = default;

template <typename T>
std::size_t Optimizer<T>::state_bytes() const {
  std::size_t n = 0;
  for (const StateTensor<T>& s : impl_->state_tensors()) n += s.count;
  return n * sizeof(T);
}

template <typename T>
int Optimizer<T>::orthogonalised_last_step() const {
  return impl_->matrices ? impl_->matrices->transformed_last_step() : 0;
}

template <typename T>
std::size_t Optimizer<T>::grad_buckets() const {
  return impl_->plan.buckets().size();
}

template <typename T>
std::vector<std::string> Optimizer<T>::owned_matrix_names() const {
  return impl_->plan.owned_names();
}

std::string skipped_step_message(const OptimizerStats& st, std::int64_t step) {
  const std::string what = std::isfinite(st.grad_norm)
                               ? std::string("non-finite loss on a rank")
                               : "non-finite gradient norm (" + std::to_string(st.grad_norm) + ")";
  return what + " at optimizer step " + std::to_string(step) + "; no parameter was updated";
}

template <typename T>
void Optimizer<T>::step_async(T* params, const T* grads, double lr, const StepInputs<T>& in) {
  Impl& s = *impl_;
  const OptimConfig& o = s.cfg.optim;
  Zero1Plan<T>& plan = s.plan;
  Backend<T>& be = plan.backend();
  Communicator& comm = plan.comm();
  if (s.clip && (!in.smax || in.smax_slots < 1))
    throw std::invalid_argument("Optimizer::step: QK-clip needs S_max of at least one slot");
  if (in.n_losses < 0 || std::size_t(in.n_losses) + 1 > s.regions.send.count ||
      (in.n_losses && !in.losses))
    throw std::invalid_argument(
        "Optimizer::step: " + std::to_string(in.n_losses) +
        " loss sums, at most train.grad_accum = " + std::to_string(s.regions.send.count - 1));
  double* send = s.stats.device(s.regions.send);
  double* gathered = s.stats.device(s.regions.gathered);
  double* gate = s.stats.device(s.regions.gate);
  double* sums = s.stats.device(s.regions.sums);
  be.zero(send, sizeof(double));
  be.zero(sums, 3 * sizeof(double));

  // 1. Gradients to their owners, averaged; the global norm from every rank's shard sums (and the
  //    loss sums to check), gathered so each rank reaches the same verdict; then clipping.
  plan.reduce_gradients(grads);
  plan.grad_sum_squares(send);
  if (in.n_losses) be.copy(send + 1, in.losses, std::size_t(in.n_losses) * sizeof(double));
  const int per_rank = 1 + in.n_losses;
  comm.all_gather(send, gathered, std::size_t(per_rank));
  be.step_gate(gate, gathered, comm.world(), per_rank, o.grad_clip);
  plan.scale_gradients(gate + StepGate::kClipCoef);
  ++t_;

  // 2. AdamW on this rank's shard, then every rank's shard back into params.
  plan.pack_adamw_params(params);
  s.adamw.step(lr, t_, gate, sums + 0);
  plan.gather_adamw_params(params);

  // 3. The matrix optimizer and QK-clip (on the owned matrices, or on every rank's copy of q and k
  //    when they are AdamW's, gathered above), then every owner's matrices back.
  if (s.matrices) s.matrices->step(params, lr * o.muon_group.lr_scale, t_, gate, sums + 1);
  if (s.clip) {
    const ModelConfig& m = s.cfg.model;
    comm.all_reduce(in.smax,
                    std::size_t(in.smax_slots) * std::size_t(m.n_layers) * std::size_t(m.n_heads),
                    ReduceOp::Max);
    s.clip->apply(params, in.smax, in.smax_slots, gate, sums + 2);
  }
  plan.gather_matrices(params);
}

template <typename T>
void Optimizer<T>::grads_ready(int stage, const T* grads) {
  impl_->plan.grads_ready(stage, grads);
}

template <typename T>
std::vector<double> Optimizer<T>::local_sums() const {
  return impl_->stats.host(impl_->regions.sums);
}

template <typename T>
OptimizerStats Optimizer<T>::finish_step() {
  std::vector<double> totals = local_sums();
  impl_->plan.comm().reduce_host(totals.data(), totals.size(), nullptr, 0);
  return finish_step(totals);
}

template <typename T>
OptimizerStats Optimizer<T>::finish_step(const std::vector<double>& totals) {
  Impl& s = *impl_;
  Zero1Plan<T>& plan = s.plan;
  if (totals.size() != s.regions.sums.count)
    throw std::invalid_argument("Optimizer::finish_step: " + std::to_string(totals.size()) +
                                " sums, expected " + std::to_string(s.regions.sums.count));
  const std::vector<double> gate = s.stats.host(s.regions.gate);
  OptimizerStats st;
  st.grad_norm = std::sqrt(gate[StepGate::kGradSumSquares]);
  if (gate[StepGate::kSkip] != 0) {
    st.skipped = true;
    --t_;  // the step did not happen
    return st;
  }
  const std::size_t matrix_elems = plan.matrix_elems();
  st.update_rms_adamw = plan.adamw_total() ? std::sqrt(totals[0] / double(plan.adamw_total())) : 0;
  st.update_rms_muon = matrix_elems ? std::sqrt(totals[1] / double(matrix_elems)) : 0.0;
  st.clipped_heads = int(totals[2]);
  return st;
}

template <typename T>
OptimizerStats Optimizer<T>::step(T* params, const T* grads, double lr,
                                  const std::vector<std::vector<double>>& smax) {
  Impl& s = *impl_;
  StepInputs<T> in;
  if (s.clip) {
    const ModelConfig& m = s.cfg.model;
    if (smax.size() != std::size_t(m.n_layers) ||
        std::any_of(smax.begin(), smax.end(), [&](const std::vector<double>& h) {
          return h.size() != std::size_t(m.n_heads);
        }))
      throw std::invalid_argument("Optimizer::step: smax must be [n_layers][n_heads] for QK-clip");
    std::vector<T> flat;
    for (const auto& layer : smax)
      for (double v : layer) flat.push_back(T(v));
    in.smax = s.stats.device(s.regions.smax_in);
    in.smax_slots = 1;
    s.plan.backend().upload(in.smax, flat.data(), flat.size() * sizeof(T));
  }
  step_async(params, grads, lr, in);
  s.stats.download();
  const OptimizerStats st = finish_step();
  if (st.skipped) throw NonFiniteError(skipped_step_message(st, t_ + 1));
  return st;
}

template <typename T>
TensorMap Optimizer<T>::state() const {
  Impl& s = *impl_;
  TensorMap out;
  for (const StateTensor<T>& t : s.state_tensors()) {
    std::vector<T> host(t.count);
    s.plan.backend().download(host.data(), t.data, t.count * sizeof(T));
    if constexpr (sizeof(T) == sizeof(float))
      out[t.name] = HostTensor::f32(t.shape, host.data());
    else
      out[t.name] = HostTensor::f64(t.shape, host.data());
  }
  const std::int64_t meta[3] = {t_, s.plan.comm().world(), s.plan.comm().rank()};
  out["step"] = HostTensor::i64({1}, &meta[0]);
  out["world_rank"] = HostTensor::i64({2}, &meta[1]);
  return out;
}

template <typename T>
void Optimizer<T>::load_state(const TensorMap& st, const std::string& source) {
  Impl& s = *impl_;
  const Communicator& comm = s.plan.comm();
  // Everything is checked before anything is loaded, so a bad file leaves the state as it was.
  auto find = [&](const std::string& name, bool floating) -> const HostTensor& {
    const auto it = st.find(name);
    if (it == st.end())
      throw std::runtime_error(source + ": optimizer state lacks '" + name +
                               "' (saved with another optimizer, model or number of ranks?)");
    const std::string& dt = it->second.dtype;
    const bool ok = floating ? (dt == "F32" || dt == "F64") : (dt == "I32" || dt == "I64");
    if (!ok)
      throw std::runtime_error(source + ": optimizer state '" + name + "' has dtype " + dt +
                               (floating ? ", expected F32 or F64" : ", expected I32 or I64"));
    return it->second;
  };
  const auto wr = find("world_rank", false).to_i64();
  if (wr.size() != 2 || wr[0] != comm.world() || wr[1] != comm.rank())
    throw std::runtime_error(
        source + ": optimizer shard of rank " + (wr.size() == 2 ? std::to_string(wr[1]) : "?") +
        " of " + (wr.size() == 2 ? std::to_string(wr[0]) : "?") + " ranks, loaded by rank " +
        std::to_string(comm.rank()) + " of " + std::to_string(comm.world()));
  const auto step = find("step", false).to_i64();
  if (step.size() != 1) throw std::runtime_error(source + ": optimizer state 'step' malformed");

  std::vector<std::tuple<const HostTensor*, T*, std::size_t>> loads;
  for (const StateTensor<T>& t : s.state_tensors()) {
    const HostTensor& h = find(t.name, true);
    if (h.numel() != t.count)
      throw std::runtime_error(source + ": optimizer state '" + t.name + "' has " +
                               std::to_string(h.numel()) + " elements, expected " +
                               std::to_string(t.count));
    loads.emplace_back(&h, t.data, t.count);
  }
  for (const auto& [t, dst, n] : loads) {
    const std::vector<double> v = t->to_f64();
    std::vector<T> host(v.begin(), v.end());
    if (n) s.plan.backend().upload(dst, host.data(), n * sizeof(T));
  }
  t_ = step[0];
}

template class Optimizer<float>;
template class Optimizer<double>;

}  // namespace moetrain
