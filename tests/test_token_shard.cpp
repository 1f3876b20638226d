// llm.c token shards: write/read round trips in both formats, a file written the way llm.c
// writes it, and every validation error.
#include <catch2/catch.hpp>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "moetrain/rng.hpp"
#include "moetrain/token_shard.hpp"
#include "test_util.hpp"

using namespace moetrain;
using moetrain::test::TempDir;
namespace fs = std::filesystem;

namespace {

// A shard the way llm.c's Python writes it: int32 header[256] then the raw tokens.
template <class T>
void write_raw(const std::string& path, std::int32_t magic, std::int32_t version,
               std::int32_t count, const std::vector<T>& tokens, std::size_t extra_bytes = 0) {
  std::int32_t header[256] = {};
  header[0] = magic;
  header[1] = version;
  header[2] = count;
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(header), sizeof header);
  f.write(reinterpret_cast<const char*>(tokens.data()), std::streamsize(tokens.size() * sizeof(T)));
  for (std::size_t i = 0; i < extra_bytes; ++i) f.put('\0');
}

std::vector<std::int32_t> read_all(const TokenShard& s) {
  std::vector<std::int32_t> out(s.size());
  s.read(0, out.size(), out.data());
  return out;
}

void expect_error(const std::string& path, std::uint32_t vocab,
                  const std::vector<std::string>& fragments) {
  try {
    TokenShard shard(path, vocab);
    FAIL("opened without error");
  } catch (const std::runtime_error& e) {
    const std::string msg = e.what();
    INFO(msg);
    CHECK(msg.rfind(path, 0) == 0);
    for (const auto& f : fragments) CHECK(msg.find(f) != std::string::npos);
  }
}

}  // namespace

TEST_CASE("token shard write/read round trip in both formats", "[shard]") {
  TempDir dir("shard");
  Rng rng(3);
  for (const int bytes : {2, 4}) {
    INFO("token bytes " << bytes);
    const std::uint32_t vocab = bytes == 2 ? 65536 : 1000003;
    std::vector<std::uint32_t> tokens(12345);
    for (auto& t : tokens) t = std::uint32_t(rng.below(vocab));
    tokens[0] = 0;
    tokens[1] = vocab - 1;
    const std::string path = dir.file("shard" + std::to_string(bytes) + ".bin");
    write_shard(path, tokens, bytes);
    CHECK_FALSE(fs::exists(path + ".tmp"));
    CHECK(fs::file_size(path) == 1024 + tokens.size() * std::size_t(bytes));

    const TokenShard shard(path, vocab);
    CHECK(shard.size() == tokens.size());
    CHECK(shard.token_bytes() == bytes);
    CHECK(shard.path() == path);
    const auto all = read_all(shard);
    CHECK(std::equal(all.begin(), all.end(), tokens.begin(),
                     [](std::int32_t a, std::uint32_t b) { return std::uint32_t(a) == b; }));
    std::int32_t window[7];
    shard.read(1000, 7, window);
    for (int i = 0; i < 7; ++i) CHECK(std::uint32_t(window[i]) == tokens[std::size_t(1000 + i)]);
    shard.read(tokens.size(), 0, window);  // an empty read at the end is fine
    CHECK(shard.at(1) == vocab - 1);

    // Moving keeps the mapping valid.
    TokenShard moved = TokenShard(path, vocab);
    TokenShard target(std::move(moved));
    CHECK(read_all(target) == all);
    TokenShard other(path, vocab);
    other = std::move(target);
    CHECK(read_all(other) == all);
  }
  // An empty shard is a valid file.
  write_shard(dir.file("empty.bin"), {}, 2);
  CHECK(TokenShard(dir.file("empty.bin"), 10).size() == 0);
}

TEST_CASE("token shard written by hand like llm.c loads", "[shard]") {
  TempDir dir("shard");
  const std::vector<std::uint16_t> u16 = {50256, 15496, 11, 995, 0, 65535};
  write_raw(dir.file("llmc_u16.bin"), 20240520, 1, std::int32_t(u16.size()), u16);
  const TokenShard a(dir.file("llmc_u16.bin"), 65536);
  CHECK(a.token_bytes() == 2);
  CHECK(read_all(a) == std::vector<std::int32_t>{50256, 15496, 11, 995, 0, 65535});

  const std::vector<std::uint32_t> u32 = {128000, 9906, 1917, 0, 128255};
  write_raw(dir.file("llmc_u32.bin"), 20240801, 7, std::int32_t(u32.size()), u32);
  const TokenShard b(dir.file("llmc_u32.bin"), 128256);
  CHECK(b.token_bytes() == 4);
  CHECK(read_all(b) == std::vector<std::int32_t>{128000, 9906, 1917, 0, 128255});

  // And ours is byte-for-byte what llm.c writes.
  write_shard(dir.file("ours.bin"), {50256, 15496, 11, 995, 0, 65535}, 2);
  std::ifstream x(dir.file("ours.bin"), std::ios::binary),
      y(dir.file("llmc_u16.bin"), std::ios::binary);
  const std::string xs((std::istreambuf_iterator<char>(x)), {}),
      ys((std::istreambuf_iterator<char>(y)), {});
  CHECK(xs == ys);
}

TEST_CASE("token shard errors name the file and the problem", "[shard]") {
  TempDir dir("shard");
  const std::vector<std::uint16_t> tokens = {1, 2, 3, 4, 5, 6, 7, 8};

  expect_error(dir.file("missing.bin"), 100, {"cannot open"});

  write_raw(dir.file("magic.bin"), 12345, 1, 8, tokens);
  expect_error(dir.file("magic.bin"), 100, {"bad magic number 12345"});

  write_raw(dir.file("version16.bin"), 20240520, 7, 8, tokens);
  expect_error(dir.file("version16.bin"), 100, {"version 7", "expected 1"});
  write_raw(dir.file("version32.bin"), 20240801, 1, 4, tokens);
  expect_error(dir.file("version32.bin"), 100, {"version 1", "expected 7"});

  write_raw(dir.file("truncated.bin"), 20240520, 1, 9, tokens);
  expect_error(dir.file("truncated.bin"), 100, {"1040 bytes", "1042 bytes", "truncated"});
  write_raw(dir.file("oversized.bin"), 20240520, 1, 8, tokens, 3);
  expect_error(dir.file("oversized.bin"), 100, {"1043 bytes", "1040 bytes", "trailing"});
  write_raw(dir.file("negative.bin"), 20240520, 1, -4, tokens);
  expect_error(dir.file("negative.bin"), 100, {"negative"});
  { std::ofstream(dir.file("tiny.bin")) << "not a shard"; }
  expect_error(dir.file("tiny.bin"), 100, {"11 bytes", "header"});

  write_raw(dir.file("vocab.bin"), 20240520, 1, 8, tokens);
  expect_error(dir.file("vocab.bin"), 6, {"position 5", "is 6", "vocab size 6"});
  CHECK(TokenShard(dir.file("vocab.bin"), 9).size() == 8);
  const std::vector<std::uint32_t> big = {3, 70000, 2};
  write_raw(dir.file("vocab32.bin"), 20240801, 7, 3, big);
  expect_error(dir.file("vocab32.bin"), 65536, {"position 1", "is 70000"});

  // Reads past the end.
  const TokenShard shard(dir.file("vocab.bin"), 9);
  std::int32_t out[16];
  CHECK_THROWS_WITH(shard.read(5, 4, out), Catch::StartsWith(dir.file("vocab.bin")));
  CHECK_THROWS_AS(shard.read(9, 0, out), std::runtime_error);
  CHECK_THROWS_AS(shard.read(~std::uint64_t(0), 2, out), std::runtime_error);
  CHECK_NOTHROW(shard.read(4, 4, out));
  CHECK_THROWS_AS(shard.at(8), std::runtime_error);

  // Writing: ids that do not fit uint16, unsupported widths; nothing is left behind.
  const std::string path = dir.file("wide.bin");
  CHECK_THROWS_WITH(write_shard(path, {1, 65536}, 2),
                    Catch::StartsWith(path) && Catch::Contains("65536"));
  CHECK_FALSE(fs::exists(path));
  CHECK_FALSE(fs::exists(path + ".tmp"));
  CHECK_THROWS_WITH(write_shard(path, {1}, 3), Catch::StartsWith(path));
  CHECK_THROWS_WITH(write_shard(dir.file("no/such/dir/x.bin"), {1}, 2),
                    Catch::StartsWith(dir.file("no/such/dir/x.bin")));
}
