// Batches of token windows from llm.c shards, for training (endless, optionally shuffled, with
// resumable state) and for evaluation (one ordered pass over the split).
//
// A window is T+1 consecutive tokens of one shard (inputs = the first T, targets = the last T);
// window w of a shard starts at token w*T, so windows tile the shard. A global batch is
// world * B windows; rank r takes windows [r*B, (r+1)*B) of it, so ranks read disjoint data.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "moetrain/token_shard.hpp"

namespace moetrain {

// One rank's part of a batch: rows * seq inputs and targets (target -1 = padding, no loss).
struct Batch {
  std::vector<std::int32_t> inputs, targets;
  int rows = 0, seq = 0;
  std::int64_t valid_targets() const;
};

// Shards matched by a glob pattern (sorted by path). Errors name `what` (e.g. a config field).
std::vector<std::string> match_shards(const std::string& pattern, const std::string& what);

// The windows of a list of shards.
class WindowIndex {
 public:
  WindowIndex(const std::vector<std::string>& paths, std::uint32_t vocab_size, int seq);
  std::size_t num_shards() const { return shards_.size(); }
  std::uint64_t windows_in(std::size_t shard) const;
  std::uint64_t total_windows() const { return total_; }
  // Writes the T inputs and T targets of window w of shard s.
  void read(std::size_t shard, std::uint64_t window, std::int32_t* inputs,
            std::int32_t* targets) const;
  const std::string& path(std::size_t shard) const { return shards_[shard].path(); }

 private:
  std::vector<TokenShard> shards_;
  int seq_;
  std::uint64_t total_ = 0;
  mutable std::vector<std::int32_t> buf_;
};

class DataLoader {
 public:
  // `what` names the source in errors (e.g. "data.train_pattern 'data/x_*.bin'").
  DataLoader(const std::vector<std::string>& paths, std::uint32_t vocab_size, int batch, int seq,
             int rank, int world, bool shuffle, std::uint64_t seed, const std::string& what);

  // This rank's part of the next global batch; rolls over to a new epoch when fewer than a
  // global batch of windows remain in the current one.
  void next(Batch& out);

  std::uint64_t epoch() const { return epoch_; }
  std::uint64_t batches_per_epoch() const { return order_.size() / std::uint64_t(global_); }

  // Everything needed to continue exactly where the loader is.
  nlohmann::json state() const;
  // Throws if the state does not belong to this data (shard paths and sizes, batch geometry).
  void restore(const nlohmann::json& state);

 private:
  void start_epoch(std::uint64_t epoch);
  nlohmann::json fingerprint() const;

  WindowIndex index_;
  std::vector<std::string> paths_;
  int batch_, seq_, rank_, world_, global_;
  bool shuffle_;
  std::uint64_t seed_;
  std::uint64_t epoch_ = 0, cursor_ = 0;  // cursor: next window of the epoch order
  std::vector<std::pair<std::uint32_t, std::uint64_t>> order_;  // (shard, window) of this epoch
};

// One ordered pass over a split: every window exactly once; the last batch is padded with
// target -1 rows (which carry no loss) so every rank always gets `batch` rows.
class EvalLoader {
 public:
  EvalLoader(const std::vector<std::string>& paths, std::uint32_t vocab_size, int batch, int seq,
             int rank, int world, const std::string& what);
  void reset() { cursor_ = 0; }
  // False when the pass is complete.
  bool next(Batch& out);
  std::uint64_t batches_per_pass() const;
  std::uint64_t total_windows() const { return index_.total_windows(); }

 private:
  WindowIndex index_;
  int batch_, seq_, rank_, world_;
  std::uint64_t cursor_ = 0;
  std::vector<std::pair<std::uint32_t, std::uint64_t>> order_;
};

}  // namespace moetrain
