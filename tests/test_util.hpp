// Helpers shared by the tests (tests/ and tests/simt/): a scratch directory, the builder of the
// tiny model configurations the gradient, optimizer, checkpoint and backend tests run on, and a
// symmetric eigenvalue reference.
#pragma once

#include <unistd.h>

#include <atomic>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <string>
#include <system_error>
#include <vector>

#include "moetrain/config.hpp"

namespace moetrain::test {

// A fresh, empty directory under the system temp dir, unique to this process and this object
// (moetrain_test_<name>_<pid>_<n>), removed with its contents at scope exit.
struct TempDir {
  const std::filesystem::path path;

  explicit TempDir(const std::string& name) : path(unique_path(name)) {
    std::filesystem::remove_all(path);  // left over by an earlier process with the same pid
    std::filesystem::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  std::string str() const { return path.string(); }
  // The path of `name` in the directory.
  std::string file(const std::string& name) const { return (path / name).string(); }
  // Writes `text` to the file `name` in the directory; returns its path.
  std::string write(const std::string& name, const std::string& text) const {
    const std::string p = file(name);
    std::ofstream(p, std::ios::binary) << text;
    return p;
  }

 private:
  static std::filesystem::path unique_path(const std::string& name) {
    static std::atomic<int> counter{0};
    return std::filesystem::temp_directory_path() /
           ("moetrain_test_" + name + "_" + std::to_string(::getpid()) + "_" +
            std::to_string(counter++));
  }
};

// The sizes of a tiny model; the defaults are a 3-layer MoE (the first layer dense, 4 experts of
// which 2 are routed to, one shared expert) with GQA (4 query heads of 4 dimensions, 2 kv heads),
// d_model 8, 17 tokens and a sequence of 4. The fields follow ModelConfig's order, so a call site
// names the ones it changes: tiny_model({.vocab = 19, .d_model = 12, .seq = 6}).
struct TinyShape {
  int vocab = 17;
  int d_model = 8;
  int layers = 3;
  int heads = 4;
  int kv_heads = 2;
  int head_dim = 4;
  int seq = 4;
  int dense_layers = 1;
  int dense_ff = 10;
  int experts = 4;
  int top_k = 2;
  int expert_ff = 5;
  int shared = 1;
  int shared_ff = 6;
};

// A Config whose model has the given shape; every other field keeps its default. Validated as a
// config file would be (config_from_json), so the shape must be one a config file may have.
inline Config tiny_config(const TinyShape& s = {}) {
  Config c;
  ModelConfig& m = c.model;
  m.vocab_size = s.vocab;
  m.d_model = s.d_model;
  m.n_layers = s.layers;
  m.n_heads = s.heads;
  m.n_kv_heads = s.kv_heads;
  m.head_dim = s.head_dim;
  m.seq_len = s.seq;
  m.dense_layers = s.dense_layers;
  m.dense_ff = s.dense_ff;
  m.moe.n_experts = s.experts;
  m.moe.top_k = s.top_k;
  m.moe.expert_ff = s.expert_ff;
  m.moe.n_shared_experts = s.shared;
  m.moe.shared_ff = s.shared_ff;
  return config_from_json(config_to_json(c), "tiny_config");
}

// The model part of tiny_config(s).
inline ModelConfig tiny_model(const TinyShape& s = {}) {
  return tiny_config(s).model;
}

// Eigenvalues of a symmetric n x n row-major matrix by cyclic Jacobi rotations (an independent
// reference for singular values: those of O are the square roots of its Gram matrix's).
inline std::vector<double> sym_eigenvalues(std::vector<double> a, int n) {
  auto at = [&](int i, int j) -> double& { return a[std::size_t(i * n + j)]; };
  for (int sweep = 0; sweep < 100; ++sweep) {
    double off = 0;
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < n; ++j)
        if (i != j) off += at(i, j) * at(i, j);
    if (off < 1e-26) break;
    for (int p = 0; p < n; ++p)
      for (int q = p + 1; q < n; ++q) {
        if (std::abs(at(p, q)) < 1e-300) continue;
        const double theta = (at(q, q) - at(p, p)) / (2 * at(p, q));
        const double t =
            (theta >= 0 ? 1.0 : -1.0) / (std::abs(theta) + std::sqrt(theta * theta + 1));
        const double c = 1 / std::sqrt(t * t + 1), s = t * c;
        for (int k = 0; k < n; ++k) {  // columns p, q
          const double akp = at(k, p), akq = at(k, q);
          at(k, p) = c * akp - s * akq;
          at(k, q) = s * akp + c * akq;
        }
        for (int k = 0; k < n; ++k) {  // rows p, q
          const double apk = at(p, k), aqk = at(q, k);
          at(p, k) = c * apk - s * aqk;
          at(q, k) = s * apk + c * aqk;
        }
      }
  }
  std::vector<double> ev(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i) ev[std::size_t(i)] = at(i, i);
  return ev;
}

// a [n, k] times b [k, m], row-major, in double (the tests' plain-loop reference product).
inline std::vector<double> matmul(const std::vector<double>& a, const std::vector<double>& b, int n,
                                  int k, int m) {
  std::vector<double> c(std::size_t(n) * std::size_t(m), 0.0);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < m; ++j) {
      double s = 0;
      for (int q = 0; q < k; ++q) s += a[std::size_t(i * k + q)] * b[std::size_t(q * m + j)];
      c[std::size_t(i * m + j)] = s;
    }
  return c;
}

// The transpose of a row-major [r, c] matrix.
inline std::vector<double> transpose(const std::vector<double>& a, int r, int c) {
  std::vector<double> t(a.size());
  for (int i = 0; i < r; ++i)
    for (int j = 0; j < c; ++j) t[std::size_t(j * r + i)] = a[std::size_t(i * c + j)];
  return t;
}

}  // namespace moetrain::test
