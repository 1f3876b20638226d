#include "model/moe/dispatcher.hpp"

namespace moetrain {

template <typename T>
void Dispatcher<T>::plan_acts(ArenaPlan& plan, Acts& a, std::size_t rows, std::size_t n_experts,
                              std::size_t d, Storage s) {
  plan.request(a.pos, rows);
  plan.request(a.offsets, checked_add(n_experts, 1));
  plan.request(a.xg, checked_mul(rows, d), s);
}

template <typename T>
void Dispatcher<T>::plan(ArenaPlan& plan) {
  plan_acts(plan, acts_, std::size_t(rows()), std::size_t(experts_), std::size_t(d_),
            be_.activation_storage());
}

template <typename T>
void Dispatcher<T>::dispatch(CDevPtr x, const std::int32_t* topk, const std::int32_t* counts) {
  be_.moe_permute(acts_.xg, acts_.pos, acts_.offsets, x, topk, counts, tokens_, d_, experts_, k_);
}

template <typename T>
void Dispatcher<T>::combine(DevPtr out, CDevPtr yg, const T* gates, DevPtr tmp) {
  be_.moe_unpermute(tmp, yg, gates, acts_.pos, tokens_, d_, k_);
  be_.add_inplace(out, tmp, std::size_t(tokens_) * std::size_t(d_));
}

template <typename T>
void Dispatcher<T>::combine_backward(DevPtr dyg, T* dgates, CDevPtr dout, CDevPtr yg,
                                     const T* gates) {
  be_.moe_unpermute_backward(dyg, dgates, dout, yg, gates, acts_.pos, tokens_, d_, k_);
}

template <typename T>
void Dispatcher<T>::dispatch_backward(DevPtr dx, CDevPtr dxg) {
  be_.moe_permute_backward(dx, dxg, acts_.pos, tokens_, d_, k_);
}

template class Dispatcher<float>;
template class Dispatcher<double>;

}  // namespace moetrain
