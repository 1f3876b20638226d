// Central finite differences in double, shared by the op and model gradient checks.
#pragma once

#include <cmath>
#include <cstddef>
#include <functional>
#include <vector>

#include "moetrain/rng.hpp"

namespace moetrain::test {

inline std::vector<double> random_vector(std::size_t n, std::uint64_t seed, double scale = 1.0) {
  Rng rng(seed);
  std::vector<double> v(n);
  for (auto& x : v) x = rng.normal() * scale;
  return v;
}

// A flat [layers * experts] vector as the rows Model::load_expert_bias_state takes.
template <typename V>
std::vector<std::vector<double>> expert_bias_rows(const std::vector<V>& flat, std::size_t layers) {
  const std::size_t E = flat.size() / layers;
  std::vector<std::vector<double>> rows(layers);
  for (std::size_t l = 0; l < layers; ++l)
    rows[l].assign(flat.begin() + std::ptrdiff_t(l * E),
                   flat.begin() + std::ptrdiff_t((l + 1) * E));
  return rows;
}

inline double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (std::size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// Relative error ||fd - analytic|| / ||fd|| over the checked entries of x, where fd is the central
// difference of loss() with respect to x[i] (x is perturbed in place and restored).
inline double fd_relative_error(const std::function<double()>& loss, double* x,
                                const std::vector<double>& analytic,
                                const std::vector<std::size_t>& indices, double h = 1e-5) {
  double num = 0, den = 0;
  for (std::size_t i : indices) {
    const double saved = x[i];
    x[i] = saved + h;
    const double lp = loss();
    x[i] = saved - h;
    const double lm = loss();
    x[i] = saved;
    const double fd = (lp - lm) / (2 * h);
    num += (fd - analytic[i]) * (fd - analytic[i]);
    den += fd * fd;
  }
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-300);
}

inline std::vector<std::size_t> all_indices(std::size_t n) {
  std::vector<std::size_t> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = i;
  return v;
}

// Up to `count` distinct indices in [0, n), deterministic in the seed.
inline std::vector<std::size_t> sample_indices(std::size_t n, std::size_t count,
                                               std::uint64_t seed) {
  if (count >= n) return all_indices(n);
  Rng rng(seed);
  std::vector<std::size_t> v;
  std::vector<char> taken(n, 0);
  while (v.size() < count) {
    const std::size_t i = std::size_t(rng.below(n));
    if (!taken[i]) {
      taken[i] = 1;
      v.push_back(i);
    }
  }
  return v;
}

}  // namespace moetrain::test
