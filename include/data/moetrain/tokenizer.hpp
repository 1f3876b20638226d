// Byte-level BPE tokenizer: ids 0..255 are the raw bytes, 256.. the merges in the order they were
// learned, then the special tokens (today only `<|endoftext|>`, the last id), so every byte string
// encodes, and decode(encode(s)) == s for any bytes, valid UTF-8 or not.
//
// Text is first pre-split into chunks and merges never cross a chunk boundary. A chunk is either
//   - an optional single leading space followed by a run of one class: letters (A-Z, a-z and every
//     byte >= 0x80, so UTF-8 words stay together), digits (0-9), or other non-space bytes
//     (punctuation, control bytes, NUL); or
//   - a run of whitespace (space, \t, \n, \v, \f, \r); when such a run ends in a space followed by
//     a non-space byte, that last space is left to start the next chunk (" word").
// A chunk is cut after kMaxChunkBytes bytes so that pathological inputs (megabytes without a
// space) stay linear. This splitting is part of format version 1.
//
// The JSON file (see save()):
//   {"type": "byte_bpe", "version": 1, "vocab_size": N,
//    "special_tokens": {"<|endoftext|>": N-1},
//    "merges": [[a, b], ...]}          merge i makes id 256+i from ids a, b < 256+i
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace moetrain {

class Tokenizer {
 public:
  static constexpr const char* kEndOfText = "<|endoftext|>";
  static constexpr std::size_t kMaxChunkBytes = 256;
  static constexpr int kMinVocabSize = 258;  // 256 bytes, at least one merge, end-of-text
  // The largest tokenizer file load() reads (a file above it is refused, naming the bound).
  static constexpr std::size_t kMaxFileBytes = std::size_t(256) << 20;

  // Learns vocab_size - 257 merges on the documents (each pre-split on its own). Throws
  // std::invalid_argument if vocab_size < kMinVocabSize, std::runtime_error if the text has too
  // few distinct adjacent pairs to learn that many merges. Deterministic: ties between equally
  // frequent pairs go to the lowest (first id, second id).
  static Tokenizer train(const std::vector<std::string>& documents, int vocab_size);

  // Reads and validates a file written by save(); every error is a std::runtime_error whose
  // message starts with the path.
  static Tokenizer load(const std::string& path);
  // Writes the JSON to path + ".tmp", then renames it over path.
  void save(const std::string& path) const;

  // Builds a tokenizer from merges (ids as described above) and special tokens (name -> id);
  // throws std::invalid_argument if they are inconsistent.
  Tokenizer(std::vector<std::pair<std::uint32_t, std::uint32_t>> merges,
            std::map<std::string, std::uint32_t> special_tokens);

  Tokenizer(const Tokenizer& other);
  Tokenizer& operator=(const Tokenizer& other);
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  // Special tokens are never parsed from the text: "<|endoftext|>" in the text encodes as bytes.
  // Thread-safe (the chunk cache is shared under a lock).
  std::vector<std::uint32_t> encode(std::string_view text) const;
  // Appends the ids of text to out.
  void encode_append(std::string_view text, std::vector<std::uint32_t>& out) const;

  // Special tokens decode to their names. Throws std::out_of_range for ids >= vocab_size().
  std::string decode(const std::vector<std::uint32_t>& ids) const;
  const std::string& decode_token(std::uint32_t id) const;

  std::uint32_t vocab_size() const { return std::uint32_t(tokens_.size()); }
  std::uint32_t eot_id() const { return eot_id_; }
  const std::vector<std::pair<std::uint32_t, std::uint32_t>>& merges() const { return merges_; }
  const std::map<std::string, std::uint32_t>& special_tokens() const { return specials_; }

  // The pre-split of text into chunks (exposed for tests and tools).
  static std::vector<std::string_view> split(std::string_view text);

 private:
  struct Cache;
  static constexpr std::size_t kShortChunk = 32;  // apply_merges: scan below, heap above

  void encode_chunk(std::string_view chunk, std::vector<std::uint32_t>& out) const;
  void apply_merges(std::vector<std::uint32_t>& ids) const;

  std::vector<std::pair<std::uint32_t, std::uint32_t>> merges_;
  std::map<std::string, std::uint32_t> specials_;
  std::unordered_map<std::uint64_t, std::uint32_t> rank_;  // (a << 32 | b) -> merge index
  std::vector<std::string> tokens_;                        // bytes (or name) of every id
  std::uint32_t eot_id_ = 0;
  std::unique_ptr<Cache> cache_;
};

// Refuses, at the start of training, a tokenizer path (the config field `field`) that is set but is
// not a readable regular file, so that checkpoints do not silently go without their tokenizer
// copy. An empty path means training without a tokenizer. Throws std::runtime_error naming the
// field and the path.
void check_tokenizer_file(const std::string& path, const std::string& field);

}  // namespace moetrain
