// `moetrain prepare-data` end to end through the built binary: the shards decode back to the
// input documents joined by <|endoftext|>, reruns replace a previous output, an existing
// tokenizer can be reused, and bad inputs fail clearly without touching unrelated files.
#include <catch2/catch.hpp>

#include <sys/wait.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "moetrain/rng.hpp"
#include "moetrain/token_shard.hpp"
#include "moetrain/tokenizer.hpp"
#include "test_util.hpp"

using namespace moetrain;
using moetrain::test::TempDir;
namespace fs = std::filesystem;

namespace {

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void put(const fs::path& p, const std::string& text) {
  fs::create_directories(p.parent_path());
  std::ofstream(p, std::ios::binary) << text;
}

struct Result {
  int code;
  std::string output;  // stdout and stderr together
};

Result run(const TempDir& dir, const std::string& args) {
  const fs::path log = dir.path / "command_output.log";
  const std::string cmd = std::string("'") + MOETRAIN_BINARY + "' prepare-data " + args + " > '" +
                          log.string() + "' 2>&1";
  const int status = std::system(cmd.c_str());
  Result r{WIFEXITED(status) ? WEXITSTATUS(status) : -1, slurp(log)};
  fs::remove(log);
  return r;
}

std::string quoted(const fs::path& p) {
  std::string q = "'";  // (built with += : GCC 12 warns wrongly on "'" + s + "'")
  q += p.string();
  q += '\'';
  return q;
}

std::string make_document(std::uint64_t seed) {
  static const char* words[] = {"river",        "stone", "light", "garden",  "the",
                                "of",           "and",   "a",     "quietly", "north",
                                "winter",       "held",  "open",  "door",    "caf\xc3\xa9",
                                "na\xc3\xafve", "1961",  "said",  "they",    "was"};
  Rng rng(seed);
  std::string s;
  const std::size_t n = 300 + rng.below(900);
  while (s.size() < n) {
    s += words[rng.below(20)];
    s += rng.below(8) == 0 ? ".\n" : (rng.below(6) == 0 ? ", " : " ");
  }
  return s;
}

// Reads all shards of a split in order and decodes them.
std::string decode_split(const fs::path& out, const Tokenizer& tok, const std::string& split,
                         int* shards = nullptr) {
  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator(out))
    if (e.path().filename().string().rfind(split + "_", 0) == 0) files.push_back(e.path());
  std::sort(files.begin(), files.end());
  if (shards) *shards = int(files.size());
  std::vector<std::uint32_t> ids;
  for (std::size_t i = 0; i < files.size(); ++i) {
    char name[32];
    std::snprintf(name, sizeof name, "%s_%06zu.bin", split.c_str(), i);
    REQUIRE(files[i].filename() == name);
    const TokenShard shard(files[i].string(), tok.vocab_size());
    std::vector<std::int32_t> buf(shard.size());
    shard.read(0, buf.size(), buf.data());
    for (const auto t : buf) ids.push_back(std::uint32_t(t));
  }
  return tok.decode(ids);
}

// "<|endoftext|>A<|endoftext|>B" -> {A, B}
std::vector<std::string> split_documents(const std::string& text) {
  const std::string eot = Tokenizer::kEndOfText;
  std::vector<std::string> docs;
  if (text.empty()) return docs;
  REQUIRE(text.rfind(eot, 0) == 0);
  std::size_t pos = eot.size();
  while (true) {
    const std::size_t next = text.find(eot, pos);
    docs.push_back(text.substr(pos, next == std::string::npos ? std::string::npos : next - pos));
    if (next == std::string::npos) break;
    pos = next + eot.size();
  }
  return docs;
}

}  // namespace

TEST_CASE("prepare-data end to end: shards decode to the documents joined by EOT",
          "[prepare-data]") {
  TempDir dir("prepare");
  const fs::path corpus = dir.path / "corpus";
  // Documents in nested folders; the expected order is the sorted path order.
  std::map<std::string, std::string> docs;  // relative path -> text (sorted like the command)
  for (int i = 0; i < 14; ++i) {
    const std::string rel = (i < 5   ? "a/"
                             : i < 9 ? "b/deep/"
                                     : "") +
                            std::string("doc") + std::to_string(10 + i) + ".txt";
    docs[rel] = make_document(std::uint64_t(i) + 1);
  }
  docs["b/odd.bin"] = std::string("bytes \0\xff\xfe invalid \xc3 utf-8 \n\n", 28);
  for (const auto& [rel, text] : docs) put(corpus / rel, text);
  put(corpus / "a/empty.txt", "");              // skipped with a warning
  put(corpus / ".hidden/notes.txt", "hidden");  // hidden names are skipped
  const fs::path out = dir.path / "out";

  const Result r = run(dir, "--input " + quoted(corpus) + " --out " + quoted(out) +
                                " --vocab-size 300 --val-fraction 0.2 --seed 7 --shard-tokens 700");
  INFO(r.output);
  REQUIRE(r.code == 0);
  CHECK(r.output.find("empty.txt: empty file, skipped") != std::string::npos);
  CHECK(r.output.find("bytes/token") != std::string::npos);
  CHECK(r.output.find("MB/s") != std::string::npos);
  CHECK(r.output.find("documents    15") != std::string::npos);

  const Tokenizer tok = Tokenizer::load((out / "tokenizer.json").string());
  CHECK(tok.vocab_size() == 300);
  int train_shards = 0, val_shards = 0;
  const auto train = split_documents(decode_split(out, tok, "train", &train_shards));
  const auto val = split_documents(decode_split(out, tok, "val", &val_shards));
  CHECK(train_shards > 1);  // 700 tokens per shard
  CHECK(val_shards >= 1);
  REQUIRE(!val.empty());
  REQUIRE(!train.empty());
  CHECK(train.size() + val.size() == docs.size());
  // Each split keeps the path order; together they are exactly the documents.
  std::vector<std::string> ordered;
  for (const auto& [rel, text] : docs) ordered.push_back(text);
  auto is_subsequence = [&](const std::vector<std::string>& part) {
    std::size_t k = 0;
    for (const auto& d : ordered)
      if (k < part.size() && part[k] == d) ++k;
    return k == part.size();
  };
  CHECK(is_subsequence(train));
  CHECK(is_subsequence(val));
  std::vector<std::string> all = train;
  all.insert(all.end(), val.begin(), val.end());
  std::sort(all.begin(), all.end());
  std::sort(ordered.begin(), ordered.end());
  CHECK(all == ordered);

  const auto manifest = nlohmann::json::parse(slurp(out / "prepare_data.json"));
  CHECK(manifest["train"]["documents"] == train.size());
  CHECK(manifest["val"]["documents"] == val.size());
  CHECK(manifest["train"]["shards"].size() == std::size_t(train_shards));

  // Same inputs and seed: the same split and tokens.
  const std::string first_train = slurp(out / "train_000000.bin");
  const fs::path out2 = dir.path / "out2";
  REQUIRE(run(dir, "--input " + quoted(corpus) + " --out " + quoted(out2) +
                       " --vocab-size 300 --val-fraction 0.2 --seed 7 --shard-tokens 700")
              .code == 0);
  CHECK(slurp(out2 / "train_000000.bin") == first_train);
  CHECK(slurp(out2 / "tokenizer.json") == slurp(out / "tokenizer.json"));

  // Rerun over the previous output with bigger shards: stale shards are removed.
  const Result again = run(dir, "--input " + quoted(corpus) + " --out " + quoted(out) +
                                    " --vocab-size 300 --val-fraction 0.2 --seed 7");
  INFO(again.output);
  REQUIRE(again.code == 0);
  CHECK(fs::exists(out / "train_000000.bin"));
  CHECK_FALSE(fs::exists(out / "train_000001.bin"));
  CHECK(split_documents(decode_split(out, tok, "train")) == train);

  // An existing tokenizer instead of training; the output folder may hold the inputs.
  const fs::path out3 = dir.path / "out3";
  put(out3 / "text/only.txt", docs.begin()->second);
  const Result reuse =
      run(dir, "--input " + quoted(out3 / "text") + " --out " + quoted(out3) + " --tokenizer " +
                   quoted(out / "tokenizer.json") + " --val-fraction 0");
  INFO(reuse.output);
  REQUIRE(reuse.code == 0);
  CHECK(reuse.output.find("loaded from") != std::string::npos);
  CHECK(slurp(out3 / "tokenizer.json") == slurp(out / "tokenizer.json"));
  CHECK(split_documents(decode_split(out3, tok, "train")) ==
        std::vector<std::string>{docs.begin()->second});
  CHECK_FALSE(fs::exists(out3 / "val_000000.bin"));
}

TEST_CASE("prepare-data errors are clear and leave unrelated files alone", "[prepare-data]") {
  TempDir dir("prepare");
  const fs::path corpus = dir.path / "corpus";
  put(corpus / "one.txt", make_document(1));
  put(corpus / "two.txt", make_document(2));
  const fs::path out = dir.path / "out";

  SECTION("missing input") {
    const fs::path missing = dir.path / "no_such_folder";
    const Result r =
        run(dir, "--input " + quoted(missing) + " --out " + quoted(out) + " --vocab-size 300");
    INFO(r.output);
    CHECK(r.code != 0);
    CHECK(r.output.find(missing.string() + ": no such file or directory") != std::string::npos);
    CHECK_FALSE(fs::exists(out));
  }
  SECTION("only empty inputs") {
    const fs::path empty = dir.path / "empty";
    put(empty / "a.txt", "");
    put(empty / "b.txt", "");
    const Result r =
        run(dir, "--input " + quoted(empty) + " --out " + quoted(out) + " --vocab-size 300");
    INFO(r.output);
    CHECK(r.code != 0);
    CHECK(r.output.find(empty.string() + ": no text to prepare") != std::string::npos);
    CHECK(r.output.find("empty") != std::string::npos);
    CHECK_FALSE(fs::exists(out));
  }
  SECTION("empty folder") {
    fs::create_directories(dir.path / "nothing");
    const Result r = run(dir, "--input " + quoted(dir.path / "nothing") + " --out " + quoted(out) +
                                  " --vocab-size 300");
    CHECK(r.code != 0);
    CHECK(r.output.find("nothing: folder holds no input files") != std::string::npos);
  }
  SECTION("an output folder with unrelated files is left untouched") {
    put(out / "notes.txt", "my notes");
    put(out / "train_000000.bin", "something that looks like an old shard");
    const Result r =
        run(dir, "--input " + quoted(corpus) + " --out " + quoted(out) + " --vocab-size 300");
    INFO(r.output);
    CHECK(r.code != 0);
    CHECK(r.output.find(out.string() + ": folder is not empty") != std::string::npos);
    CHECK(r.output.find("'notes.txt'") != std::string::npos);
    CHECK(slurp(out / "notes.txt") == "my notes");
    CHECK(slurp(out / "train_000000.bin") == "something that looks like an old shard");
    std::size_t entries = 0;
    for ([[maybe_unused]] const auto& e : fs::directory_iterator(out)) ++entries;
    CHECK(entries == 2);
  }
  SECTION("no vocab size and no tokenizer") {
    const Result r = run(dir, "--input " + quoted(corpus) + " --out " + quoted(out));
    CHECK(r.code != 0);
    CHECK(r.output.find("--vocab-size") != std::string::npos);
  }
  SECTION("bad tokenizer file") {
    put(dir.path / "tok.json", "{\"type\": \"other\"}");
    const Result r = run(dir, "--input " + quoted(corpus) + " --out " + quoted(out) +
                                  " --tokenizer " + quoted(dir.path / "tok.json"));
    INFO(r.output);
    CHECK(r.code != 0);
    CHECK(r.output.find((dir.path / "tok.json").string() + ": \"type\"") != std::string::npos);
  }
  SECTION("one document: everything goes to train") {
    const Result r = run(dir, "--input " + quoted(corpus / "one.txt") + " --out " + quoted(out) +
                                  " --vocab-size 260 --val-fraction 0.5");
    INFO(r.output);
    CHECK(r.code == 0);
    CHECK(r.output.find("validation split is empty") != std::string::npos);
    CHECK(fs::exists(out / "train_000000.bin"));
    CHECK_FALSE(fs::exists(out / "val_000000.bin"));
  }
}
