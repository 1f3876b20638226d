#include "moetrain/tokenizer.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <mutex>
#include <queue>
#include <shared_mutex>
#include <stdexcept>

#include <nlohmann/json.hpp>

#include "data/bpe_detail.hpp"
#include "moetrain/json_file.hpp"

namespace moetrain {

using namespace bpe_detail;

// Chunk -> ids, shared by all callers of encode() under a reader/writer lock. Bounded: cleared
// when it reaches kMaxEntries.
struct Tokenizer::Cache {
  static constexpr std::size_t kMaxEntries = std::size_t(1) << 18;
  static constexpr std::size_t kMaxChunk = 64;  // longer chunks rarely repeat: not cached
  std::shared_mutex mutex;
  std::unordered_map<std::string, std::vector<std::uint32_t>, SvHash, std::equal_to<>> map;
};

Tokenizer::Tokenizer(std::vector<std::pair<std::uint32_t, std::uint32_t>> merges,
                     std::map<std::string, std::uint32_t> special_tokens)
    : merges_(std::move(merges)),
      specials_(std::move(special_tokens)),
      cache_(std::make_unique<Cache>()) {
  const std::size_t n_merges = merges_.size();
  if (n_merges > std::size_t(std::numeric_limits<std::uint32_t>::max()) - 256 - specials_.size())
    throw std::invalid_argument("too many merges");
  tokens_.reserve(256 + n_merges + specials_.size());
  for (int b = 0; b < 256; ++b) tokens_.emplace_back(1, static_cast<char>(b));
  rank_.reserve(n_merges);
  for (std::size_t i = 0; i < n_merges; ++i) {
    const auto [a, b] = merges_[i];
    const std::uint64_t own = 256 + i;
    for (const std::uint32_t x : {a, b})
      if (x >= own)
        throw std::invalid_argument("merges[" + std::to_string(i) + "] = [" + std::to_string(a) +
                                    ", " + std::to_string(b) + "] refers to id " +
                                    std::to_string(x) + ", which is not below its own id " +
                                    std::to_string(own));
    const auto [it, inserted] = rank_.emplace(pair_key(a, b), std::uint32_t(i));
    if (!inserted)
      throw std::invalid_argument("merges[" + std::to_string(i) + "] = [" + std::to_string(a) +
                                  ", " + std::to_string(b) + "] repeats merges[" +
                                  std::to_string(it->second) + "]");
    tokens_.push_back(tokens_[a] + tokens_[b]);
  }
  const std::uint64_t first_special = 256 + n_merges;
  const std::uint64_t vocab = first_special + specials_.size();
  tokens_.resize(vocab);
  std::vector<bool> taken(specials_.size(), false);
  for (const auto& [name, id] : specials_) {
    if (name.empty()) throw std::invalid_argument("special token with an empty name");
    if (id < first_special || id >= vocab)
      throw std::invalid_argument("special token \"" + name + "\" has id " + std::to_string(id) +
                                  ", expected an id in [" + std::to_string(first_special) + ", " +
                                  std::to_string(vocab) + ") (after the 256 bytes and the " +
                                  std::to_string(n_merges) + " merges)");
    if (taken[id - first_special])
      throw std::invalid_argument("special token \"" + name + "\" reuses id " + std::to_string(id));
    taken[id - first_special] = true;
    tokens_[id] = name;
  }
  const auto eot = specials_.find(kEndOfText);
  if (eot == specials_.end())
    throw std::invalid_argument(std::string("special token \"") + kEndOfText + "\" is missing");
  eot_id_ = eot->second;
}

Tokenizer::Tokenizer(const Tokenizer& o)
    : merges_(o.merges_),
      specials_(o.specials_),
      rank_(o.rank_),
      tokens_(o.tokens_),
      eot_id_(o.eot_id_),
      cache_(std::make_unique<Cache>()) {}

Tokenizer& Tokenizer::operator=(const Tokenizer& o) {
  if (this != &o) {
    Tokenizer copy(o);
    *this = std::move(copy);
  }
  return *this;
}

Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

std::vector<std::string_view> Tokenizer::split(std::string_view text) {
  std::vector<std::string_view> chunks;
  for_each_chunk(text, [&](std::string_view c) { chunks.push_back(c); });
  return chunks;
}

// ---------------------------------------------------------------------------------------------
// Encoding and decoding

// Applies merges to ids by rank, lowest rank (earliest merge) first, leftmost on equal ranks:
// the same result as applying each merge in order, left to right. A merge only creates pairs of
// higher rank than its own, so one rank is done before the next starts.
void Tokenizer::apply_merges(std::vector<std::uint32_t>& ids) const {
  if (ids.size() < 2) return;
  auto rank_of = [&](std::uint32_t x, std::uint32_t y) {
    const auto it = rank_.find(pair_key(x, y));
    return it == rank_.end() ? kNoRank : it->second;
  };
  if (ids.size() <= kShortChunk) {
    // Short chunks (nearly all of them): scan the pair ranks for the minimum.
    std::uint32_t ranks[kShortChunk];
    std::size_t n = ids.size();
    for (std::size_t i = 0; i + 1 < n; ++i) ranks[i] = rank_of(ids[i], ids[i + 1]);
    while (n > 1) {
      std::size_t best = 0;
      for (std::size_t i = 1; i + 1 < n; ++i)
        if (ranks[i] < ranks[best]) best = i;
      if (ranks[best] == kNoRank) break;
      ids[best] = 256 + ranks[best];
      for (std::size_t i = best + 1; i + 1 < n; ++i) ids[i] = ids[i + 1];
      for (std::size_t i = best; i + 2 < n; ++i) ranks[i] = ranks[i + 1];
      --n;
      if (best > 0) ranks[best - 1] = rank_of(ids[best - 1], ids[best]);
      if (best + 1 < n) ranks[best] = rank_of(ids[best], ids[best + 1]);
    }
    ids.resize(n);
    return;
  }
  // Long chunks: a linked list of symbols and a min-heap of (rank, position) over adjacent
  // pairs, with stale entries skipped; O(n log n).
  const std::size_t n = ids.size();
  constexpr std::uint32_t kNone = std::numeric_limits<std::uint32_t>::max();
  std::vector<std::uint32_t> next(n), prev(n);
  for (std::size_t i = 0; i < n; ++i) {
    next[i] = i + 1 < n ? std::uint32_t(i + 1) : kNone;
    prev[i] = i > 0 ? std::uint32_t(i - 1) : kNone;
  }
  using Entry = std::pair<std::uint64_t, std::uint64_t>;  // (rank, left position | right << 32)
  std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> heap;
  auto push = [&](std::uint32_t left, std::uint32_t right) {
    const std::uint32_t r = rank_of(ids[left], ids[right]);
    if (r != kNoRank) heap.push({r, std::uint64_t(left) | (std::uint64_t(right) << 32)});
  };
  for (std::size_t i = 0; i + 1 < n; ++i) push(std::uint32_t(i), std::uint32_t(i + 1));
  while (!heap.empty()) {
    const auto [r, pos] = heap.top();
    heap.pop();
    const std::uint32_t left = std::uint32_t(pos), right = std::uint32_t(pos >> 32);
    // Stale if either side was merged away or changed since the entry was pushed.
    if (next[left] != right || ids[left] == kNone || ids[right] == kNone) continue;
    if (merges_[r].first != ids[left] || merges_[r].second != ids[right]) continue;
    ids[left] = std::uint32_t(256 + r);
    ids[right] = kNone;
    next[left] = next[right];
    if (next[right] != kNone) prev[next[right]] = left;
    next[right] = kNone;
    if (prev[left] != kNone) push(prev[left], left);
    if (next[left] != kNone) push(left, next[left]);
  }
  std::size_t j = 0;
  for (std::size_t i = 0; i < n; ++i)
    if (ids[i] != kNone) ids[j++] = ids[i];
  ids.resize(j);
}

void Tokenizer::encode_chunk(std::string_view chunk, std::vector<std::uint32_t>& out) const {
  if (chunk.size() == 1) {
    out.push_back(static_cast<unsigned char>(chunk[0]));
    return;
  }
  const bool cacheable = cache_ && chunk.size() <= Cache::kMaxChunk;
  if (cacheable) {
    std::shared_lock lock(cache_->mutex);
    const auto it = cache_->map.find(chunk);
    if (it != cache_->map.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<std::uint32_t> ids(
      reinterpret_cast<const unsigned char*>(chunk.data()),
      reinterpret_cast<const unsigned char*>(chunk.data()) + chunk.size());
  apply_merges(ids);
  out.insert(out.end(), ids.begin(), ids.end());
  if (cacheable) {
    std::unique_lock lock(cache_->mutex);
    if (cache_->map.size() >= Cache::kMaxEntries) cache_->map.clear();
    cache_->map.emplace(std::string(chunk), std::move(ids));
  }
}

void Tokenizer::encode_append(std::string_view text, std::vector<std::uint32_t>& out) const {
  for_each_chunk(text, [&](std::string_view c) { encode_chunk(c, out); });
}

std::vector<std::uint32_t> Tokenizer::encode(std::string_view text) const {
  std::vector<std::uint32_t> out;
  out.reserve(text.size() / 3 + 1);
  encode_append(text, out);
  return out;
}

const std::string& Tokenizer::decode_token(std::uint32_t id) const {
  if (id >= tokens_.size())
    throw std::out_of_range("token id " + std::to_string(id) + " is out of range (vocab size " +
                            std::to_string(tokens_.size()) + ")");
  return tokens_[id];
}

std::string Tokenizer::decode(const std::vector<std::uint32_t>& ids) const {
  std::string out;
  out.reserve(ids.size() * 4);
  for (const std::uint32_t id : ids) out += decode_token(id);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Files

void Tokenizer::save(const std::string& path) const {
  std::string text = "{\n";
  text += "  \"type\": \"byte_bpe\",\n";
  text += "  \"version\": 1,\n";
  text += "  \"vocab_size\": " + std::to_string(vocab_size()) + ",\n";
  text += "  \"special_tokens\": " + nlohmann::json(specials_).dump() + ",\n";
  text += "  \"merges\": [";
  for (std::size_t i = 0; i < merges_.size(); ++i) {
    text += i == 0 ? "\n    [" : ",\n    [";
    text += std::to_string(merges_[i].first) + ", " + std::to_string(merges_[i].second) + "]";
  }
  text += merges_.empty() ? "]\n}\n" : "\n  ]\n}\n";

  const std::string tmp = path + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0)
    throw std::runtime_error(path + ": cannot write tokenizer (" + tmp + ": " +
                             std::strerror(errno) + ")");
  std::size_t done = 0;
  while (done < text.size()) {
    const ssize_t w = ::write(fd, text.data() + done, text.size() - done);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) {
      const int err = errno;
      ::close(fd);
      ::unlink(tmp.c_str());
      throw std::runtime_error(path + ": cannot write tokenizer (" + tmp + ": " +
                               std::strerror(err) + ")");
    }
    done += std::size_t(w);
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    throw std::runtime_error(path + ": cannot write tokenizer (" + tmp + ": " + std::strerror(err) +
                             ")");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    throw std::runtime_error(path + ": cannot rename " + tmp + " to it: " + std::strerror(err));
  }
}

namespace {

std::uint32_t as_id(const nlohmann::json& v, const std::string& path, const std::string& what) {
  if (!v.is_number_integer() || v.get<std::int64_t>() < 0 ||
      v.get<std::int64_t>() > std::int64_t(std::numeric_limits<std::uint32_t>::max()))
    throw std::runtime_error(path + ": " + what + " is " + v.dump() +
                             ", expected a non-negative integer token id");
  return std::uint32_t(v.get<std::int64_t>());
}

}  // namespace

Tokenizer Tokenizer::load(const std::string& path) {
  const nlohmann::json j = read_json_file(path, "tokenizer file", kMaxFileBytes);
  if (!j.is_object()) throw std::runtime_error(path + ": expected a JSON object at the top level");
  auto field = [&](const char* name) -> const nlohmann::json& {
    const auto it = j.find(name);
    if (it == j.end()) throw std::runtime_error(path + ": missing field \"" + name + "\"");
    return *it;
  };
  const auto& type = field("type");
  if (type != "byte_bpe")
    throw std::runtime_error(path + ": \"type\" is " + type.dump() +
                             ", expected \"byte_bpe\" (not a moetrain tokenizer file)");
  const auto& version = field("version");
  if (version != 1)
    throw std::runtime_error(path + ": \"version\" is " + version.dump() +
                             ", this moetrain reads version 1");
  const auto& vocab = field("vocab_size");
  if (!vocab.is_number_integer() || vocab.get<std::int64_t>() < kMinVocabSize)
    throw std::runtime_error(path + ": \"vocab_size\" is " + vocab.dump() +
                             ", expected an integer >= " + std::to_string(kMinVocabSize));

  const auto& jm = field("merges");
  if (!jm.is_array()) throw std::runtime_error(path + ": \"merges\" must be an array of [a, b]");
  std::vector<std::pair<std::uint32_t, std::uint32_t>> merges;
  merges.reserve(jm.size());
  for (std::size_t i = 0; i < jm.size(); ++i) {
    const std::string what = "merges[" + std::to_string(i) + "]";
    if (!jm[i].is_array() || jm[i].size() != 2)
      throw std::runtime_error(path + ": " + what + " is " + jm[i].dump() +
                               ", expected a pair of token ids [a, b]");
    merges.emplace_back(as_id(jm[i][0], path, what + "[0]"), as_id(jm[i][1], path, what + "[1]"));
  }

  const auto& js = field("special_tokens");
  if (!js.is_object())
    throw std::runtime_error(path + ": \"special_tokens\" must be an object {name: id}");
  std::map<std::string, std::uint32_t> specials;
  for (const auto& [name, id] : js.items())
    specials.emplace(name, as_id(id, path, "special_tokens[\"" + name + "\"]"));

  const std::int64_t expected = 256 + std::int64_t(merges.size()) + std::int64_t(specials.size());
  if (vocab.get<std::int64_t>() != expected)
    throw std::runtime_error(path + ": \"vocab_size\" is " + vocab.dump() +
                             " but the file defines " + std::to_string(expected) + " ids (256 + " +
                             std::to_string(merges.size()) + " merges + " +
                             std::to_string(specials.size()) + " special tokens)");
  try {
    return Tokenizer(std::move(merges), std::move(specials));
  } catch (const std::invalid_argument& e) {
    throw std::runtime_error(path + ": " + e.what());
  }
}

void check_tokenizer_file(const std::string& path, const std::string& field) {
  namespace fs = std::filesystem;
  if (path.empty()) return;
  std::error_code ec;
  const char* why = nullptr;
  if (!fs::exists(path, ec))
    why = "no such file";
  else if (!fs::is_regular_file(path, ec))
    why = "not a regular file";
  else if (!std::ifstream(path, std::ios::binary))  // a regular file: the open cannot block
    why = "cannot be read";
  if (why) {
    throw std::runtime_error(field + ": '" + path + "': " + why +
                             "; set it to a tokenizer JSON file (prepare-data writes one), or to "
                             "\"\" to train without a tokenizer (sample then needs --tokenizer)");
  }
}

}  // namespace moetrain
