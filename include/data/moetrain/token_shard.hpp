// Token shards in the llm.c format, so shards made by llm.c / modded-nanogpt tools load as is:
// a header of 256 little-endian int32 — [0] magic, [1] version, [2] number of tokens — then the
// tokens, little-endian:
//   magic 20240520, version 1: uint16 tokens
//   magic 20240801, version 7: uint32 tokens
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace moetrain {

inline constexpr std::int32_t kShardMagicU16 = 20240520;
inline constexpr std::int32_t kShardVersionU16 = 1;
inline constexpr std::int32_t kShardMagicU32 = 20240801;
inline constexpr std::int32_t kShardVersionU32 = 7;
inline constexpr std::size_t kShardHeaderInts = 256;
inline constexpr std::size_t kShardHeaderBytes = kShardHeaderInts * 4;

// Writes tokens with token_bytes 2 (uint16; every id must be < 65536) or 4 (uint32) to
// path + ".tmp", then renames it to path. Throws std::runtime_error starting with the path.
void write_shard(const std::string& path, const std::vector<std::uint32_t>& tokens,
                 int token_bytes);

// A shard open for reading. Opening validates the header, that the file size is exactly header +
// tokens, and that every token id is < vocab_size; reads check the ids again and that the file
// still holds them (a shard truncated or overwritten while training is an error, not a crash).
// Every error is a std::runtime_error whose message starts with the path.
class TokenShard {
 public:
  TokenShard(const std::string& path, std::uint32_t vocab_size);
  TokenShard(const TokenShard&) = delete;
  TokenShard& operator=(const TokenShard&) = delete;
  TokenShard(TokenShard&& other) noexcept;
  TokenShard& operator=(TokenShard&& other) noexcept;
  ~TokenShard();

  // Number of tokens.
  std::uint64_t size() const { return size_; }
  // Copies tokens [pos, pos + n) to out; throws std::runtime_error past the end.
  void read(std::uint64_t pos, std::size_t n, std::int32_t* out) const;
  std::uint32_t at(std::uint64_t pos) const;
  int token_bytes() const { return token_bytes_; }
  const std::string& path() const { return path_; }

 private:
  void release() noexcept;
  void read_bytes(std::uint64_t offset, void* out, std::size_t bytes) const;
  // Tokens [pos, pos + n) into out, each checked against the vocabulary.
  void read_checked(std::uint64_t pos, std::size_t n, std::int32_t* out, bool at_open) const;

  std::string path_;
  int fd_ = -1;
  std::uint64_t size_ = 0;
  int token_bytes_ = 0;
  std::uint32_t vocab_size_ = 0;
};

}  // namespace moetrain
