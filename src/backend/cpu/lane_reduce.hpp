// Row reductions in independent lanes, the vectoriser's form of a reduction: a serial sum's single
// chain of dependent adds keeps the compiler from vectorising (it may not reorder floating-point
// additions), and on a row of 256 that chain is most of an elementwise op's time. The lanes are
// combined in a fixed order, so a result depends only on the data.
#pragma once

#include <algorithm>
#include <cstddef>

namespace moetrain::cpu {

// Sum over b <= i < e of f(i) in Acc, in 8 interleaved partial sums (lane j takes i = b + j mod 8)
// added in lane order, then the tail.
template <typename Acc, typename I, typename F>
Acc lane_sum(I b, I e, F f) {
  constexpr I kLanes = 8;
  Acc lane[kLanes] = {};
  I i = b;
  for (; i + kLanes <= e; i += kLanes)
    for (I j = 0; j < kLanes; ++j) lane[j] += f(i + j);
  Acc tail = 0;
  for (; i < e; ++i) tail += f(i);
  Acc s = 0;
  for (Acc l : lane) s += l;
  return s + tail;
}

// The largest of x[0..n), n >= 1, as T, in 16 lanes (a max is the same in any order).
template <typename T, typename X>
T row_max(const X* x, int n) {
  constexpr int kLanes = 16;
  if (n < kLanes) {
    T m = x[0];
    for (int j = 1; j < n; ++j) m = std::max(m, T(x[j]));
    return m;
  }
  T lane[kLanes];
  for (int c = 0; c < kLanes; ++c) lane[c] = x[c];
  int j = kLanes;
  for (; j + kLanes <= n; j += kLanes)
    for (int c = 0; c < kLanes; ++c) {
      const T v = x[j + c];
      lane[c] = lane[c] > v ? lane[c] : v;
    }
  T m = lane[0];
  for (int c = 1; c < kLanes; ++c) m = std::max(m, lane[c]);
  for (; j < n; ++j) m = std::max(m, T(x[j]));
  return m;
}

}  // namespace moetrain::cpu
