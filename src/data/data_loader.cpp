#include "moetrain/data_loader.hpp"

#include <glob.h>

#include <algorithm>
#include <stdexcept>

#include "moetrain/rng.hpp"

namespace moetrain {

std::int64_t Batch::valid_targets() const {
  std::int64_t n = 0;
  for (auto t : targets) n += t >= 0;
  return n;
}

std::vector<std::string> match_shards(const std::string& pattern, const std::string& what) {
  glob_t g{};
  const int rc = ::glob(pattern.c_str(), 0, nullptr, &g);
  std::vector<std::string> paths;
  if (rc == 0)
    for (std::size_t i = 0; i < g.gl_pathc; ++i) paths.emplace_back(g.gl_pathv[i]);
  globfree(&g);
  if (paths.empty())
    throw std::runtime_error(
        what + ": no file matches '" + pattern +
        "' (prepare data with `moetrain prepare-data` or scripts/get_corpus.sh)");
  std::sort(paths.begin(), paths.end());
  return paths;
}

WindowIndex::WindowIndex(const std::vector<std::string>& paths, std::uint32_t vocab_size, int seq)
    : seq_(seq), buf_(std::size_t(seq) + 1) {
  for (const auto& p : paths) {
    shards_.emplace_back(p, vocab_size);
    total_ += windows_in(shards_.size() - 1);
  }
}

std::uint64_t WindowIndex::windows_in(std::size_t shard) const {
  const std::uint64_t n = shards_[shard].size();
  return n < 1 ? 0 : (n - 1) / std::uint64_t(seq_);
}

void WindowIndex::read(std::size_t shard, std::uint64_t window, std::int32_t* inputs,
                       std::int32_t* targets) const {
  shards_[shard].read(window * std::uint64_t(seq_), std::size_t(seq_) + 1, buf_.data());
  std::copy_n(buf_.data(), seq_, inputs);
  std::copy_n(buf_.data() + 1, seq_, targets);
}

namespace {

std::vector<std::pair<std::uint32_t, std::uint64_t>> natural_order(const WindowIndex& idx) {
  std::vector<std::pair<std::uint32_t, std::uint64_t>> order;
  order.reserve(idx.total_windows());
  for (std::size_t s = 0; s < idx.num_shards(); ++s)
    for (std::uint64_t w = 0; w < idx.windows_in(s); ++w) order.emplace_back(std::uint32_t(s), w);
  return order;
}

template <typename V>
void shuffle(V& v, Rng& rng) {
  for (std::size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[std::size_t(rng.below(i))]);
}

void check_geometry(const WindowIndex& idx, int batch, int world, const std::string& what) {
  const std::uint64_t global = std::uint64_t(batch) * std::uint64_t(world);
  if (idx.total_windows() < global)
    throw std::runtime_error(what + ": " + std::to_string(idx.total_windows()) +
                             " windows of seq_len+1 tokens, fewer than one global batch (" +
                             std::to_string(world) + " rank(s) x batch_size " +
                             std::to_string(batch) + " = " + std::to_string(global) + ")");
}

}  // namespace

DataLoader::DataLoader(const std::vector<std::string>& paths, std::uint32_t vocab_size, int batch,
                       int seq, int rank, int world, bool shuffle, std::uint64_t seed,
                       const std::string& what)
    : index_(paths, vocab_size, seq),
      paths_(paths),
      batch_(batch),
      seq_(seq),
      rank_(rank),
      world_(world),
      global_(batch * world),
      shuffle_(shuffle),
      seed_(seed) {
  check_geometry(index_, batch, world, what);
  start_epoch(0);
}

void DataLoader::start_epoch(std::uint64_t epoch) {
  epoch_ = epoch;
  cursor_ = 0;
  if (!shuffle_) {
    order_ = natural_order(index_);
    return;
  }
  // Shard order, then window order within each shard, both drawn from (seed, epoch).
  Rng rng(seed_ * 0x9E3779B97F4A7C15ull + epoch + 1);
  std::vector<std::uint32_t> shards(index_.num_shards());
  for (std::size_t s = 0; s < shards.size(); ++s) shards[s] = std::uint32_t(s);
  shuffle(shards, rng);
  order_.clear();
  order_.reserve(index_.total_windows());
  for (std::uint32_t s : shards) {
    std::vector<std::uint64_t> w(index_.windows_in(s));
    for (std::size_t i = 0; i < w.size(); ++i) w[i] = i;
    shuffle(w, rng);
    for (auto x : w) order_.emplace_back(s, x);
  }
}

void DataLoader::next(Batch& out) {
  if (cursor_ + std::uint64_t(global_) > order_.size()) start_epoch(epoch_ + 1);
  out.rows = batch_;
  out.seq = seq_;
  out.inputs.resize(std::size_t(batch_) * seq_);
  out.targets.resize(out.inputs.size());
  for (int b = 0; b < batch_; ++b) {
    const auto [s, w] = order_[cursor_ + std::uint64_t(rank_) * batch_ + std::uint64_t(b)];
    index_.read(s, w, out.inputs.data() + std::size_t(b) * seq_,
                out.targets.data() + std::size_t(b) * seq_);
  }
  cursor_ += std::uint64_t(global_);
}

nlohmann::json DataLoader::fingerprint() const {
  nlohmann::json shards = nlohmann::json::array();
  for (std::size_t s = 0; s < index_.num_shards(); ++s)
    shards.push_back({{"path", paths_[s]}, {"windows", index_.windows_in(s)}});
  return {{"shards", shards},
          {"seq", seq_},
          {"global_batch", global_},
          {"shuffle", shuffle_},
          {"seed", seed_}};
}

nlohmann::json DataLoader::state() const {
  return {{"epoch", epoch_}, {"cursor", cursor_}, {"data", fingerprint()}};
}

void DataLoader::restore(const nlohmann::json& st) {
  if (!st.is_object() || !st.contains("epoch") || !st.contains("cursor") || !st.contains("data"))
    throw std::runtime_error("loader state: expected an object with epoch, cursor and data");
  if (st.at("data") != fingerprint())
    throw std::runtime_error("loader state: it was saved for other data or batch geometry (saved " +
                             st.at("data").dump() + ", now " + fingerprint().dump() + ")");
  for (const char* key : {"epoch", "cursor"})
    if (!st.at(key).is_number_unsigned())
      throw std::runtime_error(std::string("loader state: ") + key +
                               ": expected a non-negative integer, got " + st.at(key).dump());
  start_epoch(st.at("epoch").get<std::uint64_t>());
  const auto cursor = st.at("cursor").get<std::uint64_t>();
  if (cursor > order_.size())
    throw std::runtime_error("loader state: cursor " + std::to_string(cursor) +
                             " beyond the epoch's " + std::to_string(order_.size()) + " windows");
  cursor_ = cursor;
}

EvalLoader::EvalLoader(const std::vector<std::string>& paths, std::uint32_t vocab_size, int batch,
                       int seq, int rank, int world, const std::string& what)
    : index_(paths, vocab_size, seq), batch_(batch), seq_(seq), rank_(rank), world_(world) {
  if (index_.total_windows() == 0)
    throw std::runtime_error(what + ": no window of seq_len+1 tokens in the split");
  order_ = natural_order(index_);
}

std::uint64_t EvalLoader::batches_per_pass() const {
  const std::uint64_t global = std::uint64_t(batch_) * world_;
  return (order_.size() + global - 1) / global;
}

bool EvalLoader::next(Batch& out) {
  if (cursor_ >= order_.size()) return false;
  out.rows = batch_;
  out.seq = seq_;
  out.inputs.assign(std::size_t(batch_) * seq_, 0);
  out.targets.assign(out.inputs.size(), -1);
  for (int b = 0; b < batch_; ++b) {
    const std::uint64_t i = cursor_ + std::uint64_t(rank_) * batch_ + std::uint64_t(b);
    if (i >= order_.size()) break;
    const auto [s, w] = order_[i];
    index_.read(s, w, out.inputs.data() + std::size_t(b) * seq_,
                out.targets.data() + std::size_t(b) * seq_);
  }
  cursor_ += std::uint64_t(batch_) * world_;
  return true;
}

}  // namespace moetrain
