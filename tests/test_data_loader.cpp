// DataLoader / EvalLoader: tiling, rank disjointness, seeded shuffling, epoch rollover, resumable
// state, one exact pass for evaluation, and the errors for data that cannot fill a batch.
#include <catch2/catch.hpp>

#include <map>
#include <set>

#include "moetrain/data_loader.hpp"
#include "moetrain/token_shard.hpp"
#include "test_util.hpp"

using namespace moetrain;
using moetrain::test::TempDir;

namespace {

constexpr int kSeq = 8;
constexpr std::uint32_t kVocab = 60000;

// Shards whose token at position i of shard s is s*10000 + i: a window is identified by its first
// input token.
struct Shards {
  TempDir dir;
  std::vector<std::string> paths;
  explicit Shards(std::vector<int> sizes, const std::string& name) : dir("loader_" + name) {
    for (std::size_t s = 0; s < sizes.size(); ++s) {
      std::vector<std::uint32_t> tok(std::size_t(sizes[s]));
      for (std::size_t i = 0; i < tok.size(); ++i) tok[i] = std::uint32_t(s * 10000 + i);
      paths.push_back(dir.file("train_" + std::to_string(s) + ".bin"));
      write_shard(paths.back(), tok, 2);
    }
  }
};

std::vector<int> window_ids(const Batch& b) {
  std::vector<int> ids;
  for (int r = 0; r < b.rows; ++r) {
    const std::int32_t* in = b.inputs.data() + std::size_t(r) * b.seq;
    const std::int32_t* tg = b.targets.data() + std::size_t(r) * b.seq;
    if (tg[0] < 0) continue;  // padding

    // Targets are the inputs shifted by one.
    for (int t = 0; t + 1 < b.seq; ++t) REQUIRE(tg[t] == in[t + 1]);
    REQUIRE(in[0] % 10000 % kSeq == 0);  // windows start at multiples of T
    ids.push_back(in[0]);
  }
  return ids;
}

}  // namespace

TEST_CASE("loader: windows tile the shards, ranks read disjoint parts of each global batch",
          "[data][loader]") {
  Shards sh({8 * 10 + 1, 8 * 7 + 5}, "ranks");  // 10 + 7 windows
  DataLoader whole(sh.paths, kVocab, 4, kSeq, 0, 1, true, 3, "test");
  DataLoader r0(sh.paths, kVocab, 2, kSeq, 0, 2, true, 3, "test");
  DataLoader r1(sh.paths, kVocab, 2, kSeq, 1, 2, true, 3, "test");
  CHECK(whole.batches_per_epoch() == 4);  // 17 windows, 4 per global batch
  Batch a, b, c;
  for (int step = 0; step < 9; ++step) {
    whole.next(a);
    r0.next(b);
    r1.next(c);
    auto ids = window_ids(a), i0 = window_ids(b), i1 = window_ids(c);
    REQUIRE(ids.size() == 4);
    std::vector<int> joined = i0;
    joined.insert(joined.end(), i1.begin(), i1.end());
    CHECK(joined == ids);  // rank r holds rows [r*B, (r+1)*B) of the global batch
    for (int x : i0) CHECK(std::find(i1.begin(), i1.end(), x) == i1.end());
  }
}

TEST_CASE("loader: an epoch visits each window at most once, shuffling is seeded per epoch",
          "[data][loader]") {
  Shards sh({8 * 12 + 1, 8 * 9 + 1, 8 * 5 + 1}, "epochs");  // 26 windows
  auto epoch_ids = [&](std::uint64_t seed, bool shuffle, int epochs) {
    DataLoader dl(sh.paths, kVocab, 3, kSeq, 0, 1, shuffle, seed, "test");
    std::vector<std::vector<int>> per_epoch(static_cast<std::size_t>(epochs));
    Batch b;
    for (int e = 0; e < epochs; ++e)
      for (std::uint64_t i = 0; i < dl.batches_per_epoch(); ++i) {
        dl.next(b);
        REQUIRE(dl.epoch() == std::uint64_t(e));
        for (int x : window_ids(b)) per_epoch[std::size_t(e)].push_back(x);
      }
    dl.next(b);
    CHECK(dl.epoch() == std::uint64_t(epochs));  // rolled over
    return per_epoch;
  };
  const auto s1 = epoch_ids(1, true, 2), s1b = epoch_ids(1, true, 2), s2 = epoch_ids(2, true, 2);
  const auto plain = epoch_ids(1, false, 2);
  CHECK(s1 == s1b);
  CHECK(s1 != s2);
  CHECK(s1[0] != s1[1]);  // a new order each epoch
  CHECK(plain[0] == plain[1]);
  for (const auto& e : s1) {
    CHECK(e.size() == 24);  // 8 batches of 3; the 2 left over roll into the next epoch
    CHECK(std::set<int>(e.begin(), e.end()).size() == e.size());
  }
  std::vector<int> sorted_plain = plain[0];
  CHECK(std::is_sorted(sorted_plain.begin(), sorted_plain.end()));
}

TEST_CASE("loader: restoring the state yields exactly the batches that would have come next",
          "[data][loader]") {
  Shards sh({8 * 11 + 3, 8 * 6 + 1}, "resume");
  DataLoader dl(sh.paths, kVocab, 2, kSeq, 1, 2, true, 9, "test");
  Batch b;
  for (int i = 0; i < 5; ++i) dl.next(b);  // into the second epoch (4 batches per epoch)
  const nlohmann::json st = nlohmann::json::parse(dl.state().dump());  // through text
  std::vector<std::vector<std::int32_t>> expect;
  for (int i = 0; i < 7; ++i) {
    dl.next(b);
    expect.push_back(b.inputs);
    expect.push_back(b.targets);
  }
  DataLoader fresh(sh.paths, kVocab, 2, kSeq, 1, 2, true, 9, "test");
  fresh.restore(st);
  for (int i = 0; i < 7; ++i) {
    fresh.next(b);
    CHECK(b.inputs == expect[std::size_t(2 * i)]);
    CHECK(b.targets == expect[std::size_t(2 * i + 1)]);
  }
  // A state from another seed or geometry is refused, naming what differs.
  DataLoader other(sh.paths, kVocab, 2, kSeq, 1, 2, true, 10, "test");
  CHECK_THROWS_WITH(other.restore(st), Catch::Contains("other data or batch geometry"));
  DataLoader other_b(sh.paths, kVocab, 3, kSeq, 0, 1, true, 9, "test");
  CHECK_THROWS_WITH(other_b.restore(st), Catch::Contains("global_batch"));
  CHECK_THROWS_WITH(fresh.restore(nlohmann::json{{"epoch", 1}}), Catch::Contains("loader state"));
}

TEST_CASE("eval loader: one pass covers every window exactly once across ranks", "[data][loader]") {
  Shards sh({8 * 7 + 1, 8 * 4 + 2}, "eval");  // 11 windows
  std::multiset<int> seen;
  std::uint64_t batches = 0;
  for (int rank = 0; rank < 2; ++rank) {
    EvalLoader ev(sh.paths, kVocab, 2, kSeq, rank, 2, "val");
    Batch b;
    for (int pass = 0; pass < 2; ++pass) {  // reset() starts the same pass again
      ev.reset();
      std::uint64_t n = 0;
      while (ev.next(b)) {
        ++n;
        REQUIRE(b.rows == 2);
        if (pass == 0)
          for (int x : window_ids(b)) seen.insert(x);
      }
      CHECK(n == ev.batches_per_pass());
      batches = n;
    }
  }
  CHECK(batches == 3);  // ceil(11 / (2 ranks x 2))
  CHECK(seen.size() == 11);
  CHECK(std::set<int>(seen.begin(), seen.end()).size() == 11);
}

TEST_CASE("loader errors name the data and what was expected", "[data][loader][errors]") {
  Shards sh({8 * 3 + 1}, "small");  // 3 windows
  CHECK_THROWS_WITH(
      DataLoader(sh.paths, kVocab, 2, kSeq, 0, 2, true, 1, "data.train_pattern 'x'"),
      Catch::Contains("data.train_pattern 'x'") && Catch::Contains("fewer than one global batch"));
  CHECK_THROWS_WITH(match_shards(sh.dir.file("nothing_*.bin"), "data.val_pattern"),
                    Catch::Contains("data.val_pattern") && Catch::Contains("no file matches"));
  CHECK(match_shards(sh.dir.file("train_*.bin"), "x") == sh.paths);
}
