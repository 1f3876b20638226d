#include "moetrain/token_shard.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <vector>

namespace moetrain {

static_assert(std::endian::native == std::endian::little,
              "token shards are little-endian and read by memcpy");

// Shards are read with pread, not mapped: a file truncated under a mapping kills the process
// with SIGBUS, while a short read is an error that names the file.

namespace {

std::string errno_text(int err) {
  return std::strerror(err);
}

// Writes the bytes of all pieces to tmp, fsyncs, and renames tmp to path.
void write_file_atomically(const std::string& path, const void* header, std::size_t header_bytes,
                           const void* body, std::size_t body_bytes) {
  const std::string tmp = path + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw std::runtime_error(path + ": cannot create " + tmp + ": " + errno_text(errno));
  auto fail = [&](int err) {
    ::close(fd);
    ::unlink(tmp.c_str());
    throw std::runtime_error(path + ": cannot write " + tmp + ": " + errno_text(err));
  };
  for (const auto& [ptr, bytes] : {std::pair{static_cast<const char*>(header), header_bytes},
                                   std::pair{static_cast<const char*>(body), body_bytes}}) {
    std::size_t done = 0;
    while (done < bytes) {
      const ssize_t w = ::write(fd, ptr + done, bytes - done);
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) fail(w < 0 ? errno : EIO);
      done += std::size_t(w);
    }
  }
  if (::fsync(fd) != 0) fail(errno);
  if (::close(fd) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    throw std::runtime_error(path + ": cannot write " + tmp + ": " + errno_text(err));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    throw std::runtime_error(path + ": cannot rename " + tmp + " to it: " + errno_text(err));
  }
}

}  // namespace

void write_shard(const std::string& path, const std::vector<std::uint32_t>& tokens,
                 int token_bytes) {
  if (token_bytes != 2 && token_bytes != 4)
    throw std::runtime_error(path + ": token size " + std::to_string(token_bytes) +
                             " bytes is not supported (2 for uint16 or 4 for uint32)");
  if (tokens.size() > std::size_t(std::numeric_limits<std::int32_t>::max()))
    throw std::runtime_error(path + ": " + std::to_string(tokens.size()) +
                             " tokens do not fit in one shard (the header counts them in an "
                             "int32)");
  std::int32_t header[kShardHeaderInts] = {};
  header[0] = token_bytes == 2 ? kShardMagicU16 : kShardMagicU32;
  header[1] = token_bytes == 2 ? kShardVersionU16 : kShardVersionU32;
  header[2] = std::int32_t(tokens.size());
  if (token_bytes == 4) {
    write_file_atomically(path, header, sizeof header, tokens.data(), tokens.size() * 4);
    return;
  }
  std::vector<std::uint16_t> narrow(tokens.size());
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] > 0xffffu)
      throw std::runtime_error(path + ": token " + std::to_string(i) + " has id " +
                               std::to_string(tokens[i]) +
                               ", which does not fit the uint16 format (ids < 65536); use 4-byte "
                               "tokens");
    narrow[i] = std::uint16_t(tokens[i]);
  }
  write_file_atomically(path, header, sizeof header, narrow.data(), narrow.size() * 2);
}

namespace {

// Widens n tokens of `token_bytes` each from raw to int32.
void widen(const unsigned char* raw, std::size_t n, int token_bytes, std::int32_t* out) {
  if (token_bytes == 2) {
    for (std::size_t i = 0; i < n; ++i) {
      std::uint16_t v;
      std::memcpy(&v, raw + 2 * i, 2);
      out[i] = std::int32_t(v);
    }
  } else {
    std::memcpy(out, raw, n * 4);
  }
}

}  // namespace

TokenShard::TokenShard(const std::string& path, std::uint32_t vocab_size)
    : path_(path), vocab_size_(vocab_size) {
  if (vocab_size == 0 || vocab_size > std::uint32_t(std::numeric_limits<std::int32_t>::max()))
    throw std::runtime_error(path + ": vocab size " + std::to_string(vocab_size) +
                             " is out of range (1 to 2^31-1, tokens are read as int32)");
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) throw std::runtime_error(path + ": cannot open token shard: " + errno_text(errno));
  try {
    struct stat st {};
    if (::fstat(fd_, &st) != 0)
      throw std::runtime_error(path + ": cannot stat token shard: " + errno_text(errno));
    if (!S_ISREG(st.st_mode)) throw std::runtime_error(path + ": not a regular file");
    const std::uint64_t file_bytes = std::uint64_t(st.st_size);
    if (file_bytes < kShardHeaderBytes)
      throw std::runtime_error(path + ": file is " + std::to_string(file_bytes) +
                               " bytes, smaller than the " + std::to_string(kShardHeaderBytes) +
                               "-byte header of a token shard");
    std::int32_t header[3];
    read_bytes(0, header, sizeof header);
    if (header[0] == kShardMagicU16) {
      if (header[1] != kShardVersionU16)
        throw std::runtime_error(
            path + ": token shard with magic " + std::to_string(kShardMagicU16) + " has version " +
            std::to_string(header[1]) + ", expected " + std::to_string(kShardVersionU16));
      token_bytes_ = 2;
    } else if (header[0] == kShardMagicU32) {
      if (header[1] != kShardVersionU32)
        throw std::runtime_error(
            path + ": token shard with magic " + std::to_string(kShardMagicU32) + " has version " +
            std::to_string(header[1]) + ", expected " + std::to_string(kShardVersionU32));
      token_bytes_ = 4;
    } else {
      throw std::runtime_error(path + ": bad magic number " + std::to_string(header[0]) +
                               " (expected " + std::to_string(kShardMagicU16) +
                               " for uint16 tokens or " + std::to_string(kShardMagicU32) +
                               " for uint32 tokens): not a token shard");
    }
    if (header[2] < 0)
      throw std::runtime_error(path + ": header gives a negative token count " +
                               std::to_string(header[2]));
    size_ = std::uint64_t(header[2]);
    const std::uint64_t expected = kShardHeaderBytes + size_ * std::uint64_t(token_bytes_);
    if (file_bytes != expected)
      throw std::runtime_error(path + ": file is " + std::to_string(file_bytes) +
                               " bytes but its header says " + std::to_string(size_) +
                               " tokens of " + std::to_string(token_bytes_) +
                               " bytes, which need " + std::to_string(expected) + " bytes (" +
                               (file_bytes < expected ? "truncated" : "trailing data") + ")");
    // Every id must be in the vocabulary: read through once, in chunks.
    constexpr std::size_t kChunk = 1 << 18;
    std::vector<std::int32_t> buf(kChunk);
    for (std::uint64_t pos = 0; pos < size_; pos += kChunk) {
      const std::size_t n = std::size_t(std::min<std::uint64_t>(kChunk, size_ - pos));
      read_checked(pos, n, buf.data(), /*at_open=*/true);
    }
  } catch (...) {
    release();
    throw;
  }
}

TokenShard::TokenShard(TokenShard&& o) noexcept
    : path_(std::move(o.path_)),
      fd_(o.fd_),
      size_(o.size_),
      token_bytes_(o.token_bytes_),
      vocab_size_(o.vocab_size_) {
  o.fd_ = -1;
  o.size_ = 0;
}

TokenShard& TokenShard::operator=(TokenShard&& o) noexcept {
  if (this != &o) {
    release();
    path_ = std::move(o.path_);
    fd_ = o.fd_;
    size_ = o.size_;
    token_bytes_ = o.token_bytes_;
    vocab_size_ = o.vocab_size_;
    o.fd_ = -1;
    o.size_ = 0;
  }
  return *this;
}

TokenShard::~TokenShard() {
  release();
}

void TokenShard::release() noexcept {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

void TokenShard::read_bytes(std::uint64_t offset, void* out, std::size_t bytes) const {
  auto* p = static_cast<unsigned char*>(out);
  std::size_t done = 0;
  while (done < bytes) {
    const ssize_t n = ::pread(fd_, p + done, bytes - done, off_t(offset + done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw std::runtime_error(path_ + ": read error: " + errno_text(errno));
    if (n == 0) {
      struct stat st {};
      const long long now = ::fstat(fd_, &st) == 0 ? static_cast<long long>(st.st_size) : -1;
      throw std::runtime_error(path_ +
                               ": the token shard changed on disk while in use: it is now " +
                               std::to_string(now) + " bytes, it was " +
                               std::to_string(kShardHeaderBytes + size_ * token_bytes_) +
                               " when opened (truncated or overwritten?)");
    }
    done += std::size_t(n);
  }
}

void TokenShard::read_checked(std::uint64_t pos, std::size_t n, std::int32_t* out,
                              bool at_open) const {
  std::vector<unsigned char> raw(n * std::size_t(token_bytes_));
  read_bytes(kShardHeaderBytes + pos * std::uint64_t(token_bytes_), raw.data(), raw.size());
  widen(raw.data(), n, token_bytes_, out);
  for (std::size_t i = 0; i < n; ++i)
    if (std::uint32_t(out[i]) >= vocab_size_)
      throw std::runtime_error(path_ + ": token at position " + std::to_string(pos + i) + " is " +
                               std::to_string(std::uint32_t(out[i])) +
                               ", not below the vocab size " + std::to_string(vocab_size_) +
                               (at_open ? "" : " (the shard changed on disk while in use?)"));
}

std::uint32_t TokenShard::at(std::uint64_t pos) const {
  if (pos >= size_)
    throw std::runtime_error(path_ + ": token position " + std::to_string(pos) +
                             " is past the end of the shard (" + std::to_string(size_) +
                             " tokens)");
  std::int32_t v;
  read_checked(pos, 1, &v, false);
  return std::uint32_t(v);
}

void TokenShard::read(std::uint64_t pos, std::size_t n, std::int32_t* out) const {
  if (pos > size_ || n > size_ - pos)
    throw std::runtime_error(path_ + ": reading " + std::to_string(n) + " tokens at position " +
                             std::to_string(pos) + " goes past the end of the shard (" +
                             std::to_string(size_) + " tokens)");
  read_checked(pos, n, out, false);
}

}  // namespace moetrain
