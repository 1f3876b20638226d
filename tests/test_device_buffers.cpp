// Typed device pointers (dev_ptr.hpp) and the stats block (device_stats.hpp) on the CPU backend:
// a buffer is read only as the type it holds, arithmetic is in elements of its storage, and the
// stats block's regions are laid out once, reached only after allocation, and read back whole by
// one download.
#include <catch2/catch.hpp>

#include <cstdint>
#include <stdexcept>
#include <vector>

#include "moetrain/cpu_backend.hpp"
#include "moetrain/dev_ptr.hpp"
#include "moetrain/device_stats.hpp"

using namespace moetrain;

TEST_CASE("DevPtr: storage from the pointer type, element arithmetic, checked conversion",
          "[backend]") {
  std::vector<float> f(8, 1.0f);
  std::vector<double> d(8, 2.0);
  const DevPtr pf = f.data();
  const CDevPtr pd = d.data();
  CHECK(pf.storage() == Storage::F32);
  CHECK(pd.storage() == Storage::F64);
  CHECK((pf + 3).get() == static_cast<void*>(f.data() + 3));
  CHECK((pd + 5).get() == static_cast<const void*>(d.data() + 5));
  const CDevPtr as_const = pf;  // a mutable pointer converts to a const one, storage kept
  CHECK(as_const.storage() == Storage::F32);
  CHECK(pf.as<float>() == f.data());
  CHECK(pd.as<const double>() == d.data());
  CHECK_THROWS_WITH(pf.as<double>(), Catch::Contains("f32 buffer used as f64"));
  CHECK_THROWS_AS(pd.as<const float>(), std::logic_error);
  // bf16 has no host type here: its arithmetic steps 2 bytes.
  std::vector<std::uint16_t> h(8);
  const DevPtr pb(h.data(), Storage::BF16);
  CHECK((pb + 3).get() == static_cast<void*>(h.data() + 3));
  CHECK(pb.element_bytes() == 2);
  CHECK_THROWS_WITH(pb.as<float>(), Catch::Contains("bf16 buffer used as f32"));
  CHECK_FALSE(DevPtr());
  CHECK(pf);
}

TEST_CASE("CpuBackend refuses an activation of another storage than its T", "[backend]") {
  CpuBackend<double> be;
  CHECK(be.activation_storage() == Storage::F64);
  CHECK(CpuBackend<float>().activation_storage() == Storage::F32);
  std::vector<float> x(4, 1.0f), y(4, 2.0f);
  CHECK_THROWS_AS(be.add_inplace(x.data(), y.data(), 4), std::logic_error);
  CHECK(x == std::vector<float>(4, 1.0f));  // refused before anything was written
}

TEST_CASE("DeviceStats: regions reserved first, one block, read back by one download",
          "[backend]") {
  CpuBackend<float> be;
  DeviceStats<float> stats(be);
  const auto a = stats.reserve<double>(3);
  const auto b = stats.reserve<float>(5);
  const auto c = stats.reserve<std::int32_t>(2);
  CHECK_THROWS_AS(stats.device(a), std::logic_error);  // not allocated yet
  CHECK_THROWS_AS(stats.download(), std::logic_error);
  stats.allocate();
  CHECK_THROWS_AS(stats.reserve<double>(1), std::logic_error);  // the layout is fixed now
  // Regions do not overlap and are aligned for their type.
  auto* pa = stats.device(a);
  auto* pb = stats.device(b);
  auto* pc = stats.device(c);
  CHECK(reinterpret_cast<std::uintptr_t>(pa) % alignof(double) == 0);
  CHECK(static_cast<void*>(pa + 3) <= static_cast<void*>(pb));
  CHECK(static_cast<void*>(pb + 5) <= static_cast<void*>(pc));
  CHECK(stats.bytes() >= 3 * sizeof(double) + 5 * sizeof(float) + 2 * sizeof(std::int32_t));
  // Zero-filled, then what the device holds at the download (not at the write).
  stats.download();
  CHECK(stats.host(a) == std::vector<double>(3, 0.0));
  pa[1] = 2.5;
  pb[4] = -1.0f;
  pc[0] = 7;
  CHECK(stats.host(a)[1] == 0.0);  // the host copy is the last download's
  stats.download();
  CHECK(stats.host(a) == std::vector<double>{0.0, 2.5, 0.0});
  CHECK(stats.host(b)[4] == -1.0f);
  CHECK(stats.host(c) == std::vector<std::int32_t>{7, 0});
  // Sizing without a backend (the memory estimate) reserves but never allocates.
  DeviceStats<float> sizing;
  sizing.reserve<double>(4);
  CHECK(sizing.bytes() == 4 * sizeof(double));
  CHECK_THROWS_AS(sizing.allocate(), std::logic_error);
}
