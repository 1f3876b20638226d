// What the tokenizer's training and encoding share: the pre-tokenizer's chunking and the pair keys
// (private to src/data: tokenizer.cpp and bpe_train.cpp).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <unordered_map>

#include "moetrain/tokenizer.hpp"

namespace moetrain::bpe_detail {

constexpr std::uint32_t kNoRank = std::numeric_limits<std::uint32_t>::max();

inline std::uint64_t pair_key(std::uint32_t a, std::uint32_t b) {
  return (std::uint64_t(a) << 32) | std::uint64_t(b);
}

// Byte classes of the pre-split.
enum : std::uint8_t { kLetter, kDigit, kSpace, kOther };

struct ClassTable {
  std::uint8_t c[256];
  constexpr ClassTable() : c{} {
    for (int b = 0; b < 256; ++b) {
      if ((b >= 'a' && b <= 'z') || (b >= 'A' && b <= 'Z') || b >= 0x80)
        c[b] = kLetter;
      else if (b >= '0' && b <= '9')
        c[b] = kDigit;
      else if (b == ' ' || b == '\t' || b == '\n' || b == '\v' || b == '\f' || b == '\r')
        c[b] = kSpace;
      else
        c[b] = kOther;
    }
  }
};
constexpr ClassTable kClass;

inline std::uint8_t byte_class(char ch) {
  return kClass.c[static_cast<unsigned char>(ch)];
}

// Calls f(chunk) for every chunk of text, in order (see the header for the rules).
template <class F>
void for_each_chunk(std::string_view text, F&& f) {
  const std::size_t n = text.size();
  std::size_t i = 0;
  while (i < n) {
    const std::size_t start = i;
    const std::size_t limit = std::min(n, start + moetrain::Tokenizer::kMaxChunkBytes);
    const std::uint8_t c = byte_class(text[i]);
    std::size_t end;
    if (text[i] == ' ' && i + 1 < n && byte_class(text[i + 1]) != kSpace) {
      const std::uint8_t k = byte_class(text[i + 1]);
      end = i + 2;
      while (end < limit && byte_class(text[end]) == k) ++end;
    } else if (c == kSpace) {
      end = i + 1;
      while (end < limit && byte_class(text[end]) == kSpace) ++end;
      // Leave a final space to the word that follows it.
      if (end < n && end - start >= 2 && text[end - 1] == ' ' && byte_class(text[end]) != kSpace)
        --end;
    } else {
      end = i + 1;
      while (end < limit && byte_class(text[end]) == c) ++end;
    }
    f(text.substr(start, end - start));
    i = end;
  }
}

struct SvHash {
  using is_transparent = void;
  std::size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};

}  // namespace moetrain::bpe_detail
