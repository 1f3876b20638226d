// Byte-level BPE training (Tokenizer::train), with incremental pair counts.
#include <algorithm>
#include <cstring>
#include <functional>
#include <limits>
#include <queue>
#include <stdexcept>

#include "data/bpe_detail.hpp"
#include "moetrain/tokenizer.hpp"

namespace moetrain {

using namespace bpe_detail;

// ---------------------------------------------------------------------------------------------
// Training

Tokenizer Tokenizer::train(const std::vector<std::string>& documents, int vocab_size) {
  if (vocab_size < kMinVocabSize)
    throw std::invalid_argument("vocab size " + std::to_string(vocab_size) +
                                " is too small: a byte-level BPE needs at least " +
                                std::to_string(kMinVocabSize) +
                                " (256 bytes, one merge and <|endoftext|>)");
  const std::size_t n_merges = std::size_t(vocab_size) - 257;

  // Unique chunks ("words") with their counts. The views point into `documents`.
  std::unordered_map<std::string_view, std::uint32_t> index;
  std::vector<std::string_view> word_text;
  std::vector<std::int64_t> freq;
  for (const std::string& doc : documents) {
    for_each_chunk(doc, [&](std::string_view c) {
      if (c.size() < 2) return;  // a single byte has no pair to merge
      const auto [it, inserted] = index.try_emplace(c, std::uint32_t(word_text.size()));
      if (inserted) {
        word_text.push_back(c);
        freq.push_back(1);
      } else {
        ++freq[it->second];
      }
    });
  }
  index = {};

  std::vector<std::vector<std::uint32_t>> words(word_text.size());
  std::unordered_map<std::uint64_t, std::int64_t> count;                // pair -> occurrences
  std::unordered_map<std::uint64_t, std::vector<std::uint32_t>> where;  // pair -> words
  for (std::uint32_t w = 0; w < words.size(); ++w) {
    auto& s = words[w];
    s.assign(reinterpret_cast<const unsigned char*>(word_text[w].data()),
             reinterpret_cast<const unsigned char*>(word_text[w].data()) + word_text[w].size());
    for (std::size_t i = 0; i + 1 < s.size(); ++i) {
      const std::uint64_t p = pair_key(s[i], s[i + 1]);
      count[p] += freq[w];
      auto& list = where[p];
      if (list.empty() || list.back() != w) list.push_back(w);
    }
  }

  // Max-heap of (count, pair) with lazy updates: an entry's count is an upper bound of the
  // pair's count (counts of existing pairs only fall; a pair only rises in the step that creates
  // its newer id, and is pushed again then). Equal counts: the lowest pair key is on top.
  struct Entry {
    std::int64_t count;
    std::uint64_t pair;
    bool operator<(const Entry& o) const {
      return count < o.count || (count == o.count && pair > o.pair);
    }
  };
  std::priority_queue<Entry> heap;
  {
    std::vector<Entry> initial;
    initial.reserve(count.size());
    for (const auto& [p, c] : count) initial.push_back({c, p});
    heap = std::priority_queue<Entry>(std::less<Entry>(), std::move(initial));
  }

  std::vector<std::pair<std::uint32_t, std::uint32_t>> merges;
  merges.reserve(n_merges);
  std::vector<std::uint64_t> changed;
  while (merges.size() < n_merges) {
    std::uint64_t best = 0;
    bool found = false;
    while (!heap.empty()) {
      const Entry top = heap.top();
      heap.pop();
      const auto it = count.find(top.pair);
      const std::int64_t actual = it == count.end() ? 0 : it->second;
      if (actual == top.count && actual > 0) {
        best = top.pair;
        found = true;
        break;
      }
      if (actual > 0) heap.push({actual, top.pair});
    }
    if (!found)
      throw std::runtime_error(
          "the training text is too small for vocab size " + std::to_string(vocab_size) +
          ": it has no adjacent pair left after " + std::to_string(merges.size()) + " of the " +
          std::to_string(n_merges) + " merges");

    const std::uint32_t a = std::uint32_t(best >> 32), b = std::uint32_t(best & 0xffffffffu);
    const std::uint32_t z = std::uint32_t(256 + merges.size());
    merges.emplace_back(a, b);

    std::vector<std::uint32_t> affected = std::move(where[best]);
    where.erase(best);
    count.erase(best);
    changed.clear();
    for (const std::uint32_t w : affected) {
      auto& s = words[w];
      const std::int64_t f = freq[w];
      auto inc = [&](std::uint32_t x, std::uint32_t y) {
        const std::uint64_t p = pair_key(x, y);
        count[p] += f;
        auto& list = where[p];
        if (list.empty() || list.back() != w) list.push_back(w);
        changed.push_back(p);
      };
      auto dec = [&](std::uint32_t x, std::uint32_t y) {
        const std::uint64_t p = pair_key(x, y);
        if (p == best) return;  // already removed
        auto it = count.find(p);
        if (it != count.end() && (it->second -= f) <= 0) count.erase(it);
      };
      const std::size_t n = s.size();
      std::size_t j = 0;
      for (std::size_t i = 0; i < n;) {
        if (i + 1 < n && s[i] == a && s[i + 1] == b) {
          if (j > 0) {
            dec(s[j - 1], a);
            inc(s[j - 1], z);
          }
          if (i + 2 < n) {
            dec(b, s[i + 2]);
            inc(z, s[i + 2]);
          }
          s[j++] = z;
          i += 2;
        } else {
          s[j++] = s[i++];
        }
      }
      s.resize(j);
    }
    std::sort(changed.begin(), changed.end());
    changed.erase(std::unique(changed.begin(), changed.end()), changed.end());
    for (const std::uint64_t p : changed) {
      const auto it = count.find(p);
      if (it != count.end() && it->second > 0) heap.push({it->second, p});
    }
  }
  return Tokenizer(std::move(merges), {{kEndOfText, std::uint32_t(vocab_size - 1)}});
}

}  // namespace moetrain
