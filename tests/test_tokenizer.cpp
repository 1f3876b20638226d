// Byte-level BPE tokenizer: pre-split rules, training (determinism, exact vocab size,
// compression), encode/decode round trips on arbitrary bytes, agreement with a naive reference
// encoder, save/load, and every load error.
#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "moetrain/rng.hpp"
#include "moetrain/tokenizer.hpp"
#include "test_util.hpp"

using namespace moetrain;
using moetrain::test::TempDir;
namespace fs = std::filesystem;

namespace {

const std::vector<std::string> kWords = {
    "the",     "of",      "and",     "to",       "a",       "in",      "that",       "is",
    "was",     "he",      "for",     "it",       "with",    "as",      "his",        "on",
    "be",      "at",      "by",      "had",      "not",     "are",     "but",        "from",
    "or",      "have",    "an",      "they",     "which",   "one",     "you",        "were",
    "her",     "all",     "she",     "there",    "would",   "their",   "we",         "him",
    "been",    "has",     "when",    "who",      "will",    "more",    "no",         "if",
    "out",     "so",      "said",    "what",     "up",      "its",     "about",      "into",
    "than",    "them",    "can",     "only",     "other",   "new",     "some",       "could",
    "time",    "these",   "two",     "may",      "then",    "do",      "first",      "any",
    "my",      "now",     "such",    "like",     "our",     "over",    "man",        "me",
    "even",    "most",    "made",    "after",    "also",    "did",     "many",       "before",
    "must",    "through", "back",    "years",    "where",   "much",    "your",       "way",
    "well",    "down",    "should",  "because",  "each",    "just",    "those",      "people",
    "how",     "too",     "little",  "state",    "good",    "very",    "make",       "world",
    "still",   "own",     "see",     "men",      "work",    "long",    "get",        "here",
    "between", "both",    "life",    "being",    "under",   "never",   "day",        "same",
    "another", "know",    "while",   "last",     "might",   "us",      "great",      "old",
    "year",    "off",     "come",    "since",    "against", "go",      "came",       "right",
    "used",    "take",    "three",   "himself",  "few",     "house",   "use",        "during",
    "without", "again",   "place",   "American", "around",  "however", "home",       "small",
    "found",   "Mrs.",    "thought", "went",     "say",     "part",    "once",       "general",
    "high",    "upon",    "school",  "every",    "don't",   "does",    "got",        "united",
    "left",    "number",  "course",  "war",      "until",   "always",  "away",       "something",
    "fact",    "though",  "water",   "less",     "public",  "put",     "think",      "almost",
    "hand",    "enough",  "far",     "took",     "head",    "yet",     "government", "system"};

// English-like text: sentences of dictionary words, some capitalised, punctuation, numbers,
// paragraphs.
std::string english(std::uint64_t seed, std::size_t bytes) {
  Rng rng(seed);
  std::string s;
  while (s.size() < bytes) {
    const int words = 4 + int(rng.below(14));
    for (int w = 0; w < words; ++w) {
      std::string word = kWords[rng.below(kWords.size())];
      if (w == 0) word[0] = char(std::toupper(static_cast<unsigned char>(word[0])));
      if (w > 0) s += ' ';
      if (rng.below(40) == 0) word = std::to_string(rng.below(2000));
      s += word;
      if (w + 1 < words && rng.below(9) == 0) s += ',';
    }
    s += rng.below(6) == 0 ? "?" : ".";
    s += rng.below(5) == 0 ? "\n\n" : " ";
  }
  return s;
}

std::vector<std::string> english_docs(std::uint64_t seed, int n, std::size_t bytes) {
  std::vector<std::string> docs;
  for (int i = 0; i < n; ++i) docs.push_back(english(seed + std::uint64_t(i), bytes));
  return docs;
}

// Strings meant to break things: random bytes (NULs included), invalid UTF-8, long runs.
std::string nasty(Rng& rng) {
  std::string s;
  const int kind = int(rng.below(6));
  const std::size_t n = rng.below(3000);
  switch (kind) {
    case 0:  // uniform random bytes
      for (std::size_t i = 0; i < n; ++i) s += char(rng.below(256));
      break;
    case 1:  // runs of one byte, including NUL, space, letters, newlines
      for (int r = 0; r < 4; ++r) {
        const char c = "\0 a\n\xff.7"[rng.below(7)];
        s.append(rng.below(1500), c);
      }
      break;
    case 2:  // invalid UTF-8 mixed with text: lone continuation bytes, truncated sequences
      for (std::size_t i = 0; i < n / 8; ++i) {
        using namespace std::string_literals;
        static const std::string pieces[] = {
            "\x80"s,     "\xbf"s,        "\xc3"s, "\xe2\x82"s,     "\xf0\x9f\x98"s,
            "\xff\xfe"s, "caf\xc3\xa9"s, " the"s, "\xed\xa0\x80"s, "\0"s};
        s += pieces[rng.below(10)];
      }
      break;
    case 3:  // English with random bytes sprinkled in
      s = english(rng.next_u64(), n);
      for (std::size_t i = 0; i < s.size(); i += 1 + rng.below(50)) s[i] = char(rng.below(256));
      break;
    case 4:  // whitespace-heavy
      for (std::size_t i = 0; i < n; ++i) s += " \t\n\r\v\fx"[rng.below(7)];
      break;
    default:  // the literal special token and near misses
      for (int i = 0; i < 20; ++i) s += rng.below(2) ? "<|endoftext|>" : "<|endof";
      break;
  }
  return s;
}

// The training semantics, naively: each merge in order, applied left to right to every chunk.
std::vector<std::uint32_t> reference_encode(const Tokenizer& tok, std::string_view text) {
  std::vector<std::uint32_t> out;
  for (const std::string_view chunk : Tokenizer::split(text)) {
    std::vector<std::uint32_t> ids(chunk.begin(), chunk.end());
    for (auto& id : ids) id &= 0xffu;
    for (std::size_t m = 0; m < tok.merges().size() && ids.size() > 1; ++m) {
      const auto [a, b] = tok.merges()[m];
      std::vector<std::uint32_t> next;
      for (std::size_t i = 0; i < ids.size();) {
        if (i + 1 < ids.size() && ids[i] == a && ids[i + 1] == b) {
          next.push_back(std::uint32_t(256 + m));
          i += 2;
        } else {
          next.push_back(ids[i++]);
        }
      }
      ids.swap(next);
    }
    out.insert(out.end(), ids.begin(), ids.end());
  }
  return out;
}

const Tokenizer& english_tokenizer() {
  static const Tokenizer tok = Tokenizer::train(english_docs(1, 8, 20000), 600);
  return tok;
}

}  // namespace

TEST_CASE("tokenizer pre-split follows the GPT-2-like rules", "[tokenizer]") {
  using V = std::vector<std::string_view>;
  CHECK(Tokenizer::split("Hello, world!  123 abc\n\nxyz") ==
        V{"Hello", ",", " world", "!", " ", " 123", " abc", "\n\n", "xyz"});
  CHECK(Tokenizer::split(" caf\xc3\xa9 na\xc3\xafve") == V{" caf\xc3\xa9", " na\xc3\xafve"});
  CHECK(Tokenizer::split("x  \n y") == V{"x", "  \n", " y"});
  CHECK(Tokenizer::split("a...b") == V{"a", "...", "b"});
  CHECK(Tokenizer::split(" ") == V{" "});
  CHECK(Tokenizer::split("") == V{});
  const std::string run(1000, 'q');
  const auto chunks = Tokenizer::split(run);
  REQUIRE(chunks.size() == 4);
  CHECK(chunks[0].size() == Tokenizer::kMaxChunkBytes);
  CHECK(chunks[3].size() == 1000 - 3 * Tokenizer::kMaxChunkBytes);
}

TEST_CASE("tokenizer training respects the vocab size exactly and is deterministic",
          "[tokenizer]") {
  const auto docs = english_docs(10, 4, 8000);
  for (const int vocab : {258, 300, 777}) {
    INFO("vocab " << vocab);
    const Tokenizer a = Tokenizer::train(docs, vocab);
    const Tokenizer b = Tokenizer::train(docs, vocab);
    CHECK(a.vocab_size() == std::uint32_t(vocab));
    CHECK(a.merges().size() == std::size_t(vocab - 257));
    CHECK(a.eot_id() == std::uint32_t(vocab - 1));
    CHECK(a.decode_token(a.eot_id()) == "<|endoftext|>");
    CHECK(a.merges() == b.merges());
  }
  // A shorter run learns the first merges of a longer one.
  const Tokenizer small = Tokenizer::train(docs, 300), large = Tokenizer::train(docs, 777);
  CHECK(std::equal(small.merges().begin(), small.merges().end(), large.merges().begin()));
  // The most frequent pair of English-like text with spaces is learned first.
  CHECK(large.decode_token(256).size() == 2);

  CHECK_THROWS_AS(Tokenizer::train(docs, 257), std::invalid_argument);
  CHECK_THROWS_AS(Tokenizer::train(docs, 0), std::invalid_argument);
  // Text with fewer distinct pairs than merges asked for.
  CHECK_THROWS_WITH(Tokenizer::train({"ab"}, 300), Catch::Contains("too small"));
}

TEST_CASE("tokenizer merges compress English-like text", "[tokenizer]") {
  const Tokenizer& tok = english_tokenizer();
  const std::string held_out = english(999, 50000);
  const auto ids = tok.encode(held_out);
  const double bytes_per_token = double(held_out.size()) / double(ids.size());
  INFO("bytes per token " << bytes_per_token);
  CHECK(bytes_per_token > 2.0);
  CHECK(tok.decode(ids) == held_out);
}

TEST_CASE("tokenizer round trip on arbitrary bytes", "[tokenizer]") {
  const Tokenizer& english_tok = english_tokenizer();
  // A tokenizer trained on random bytes has merges involving every kind of byte.
  Rng rng(5);
  std::vector<std::string> random_docs;
  for (int i = 0; i < 20; ++i) random_docs.push_back(nasty(rng));
  const Tokenizer random_tok = Tokenizer::train(random_docs, 500);

  for (const Tokenizer* tok : {&english_tok, &random_tok}) {
    Rng r(17);
    for (int i = 0; i < 150; ++i) {
      const std::string s = nasty(r);
      const auto ids = tok->encode(s);
      for (const auto id : ids) REQUIRE(id < tok->eot_id());  // no special token from text
      REQUIRE(tok->decode(ids) == s);
    }
    const std::string nul_only(777, '\0');
    CHECK(tok->decode(tok->encode(nul_only)) == nul_only);
    CHECK(tok->encode("").empty());
    const std::string text = english(3, 20000);
    CHECK(tok->decode(tok->encode(text)) == text);
  }
  CHECK(english_tok.decode({english_tok.eot_id()}) == "<|endoftext|>");
  CHECK_THROWS_AS(english_tok.decode({english_tok.vocab_size()}), std::out_of_range);
}

TEST_CASE("tokenizer encoding equals applying each merge in order", "[tokenizer]") {
  const Tokenizer& tok = english_tokenizer();
  Rng rng(23);
  for (int i = 0; i < 20; ++i) {
    const std::string s = i % 2 ? english(rng.next_u64(), 2000) : nasty(rng);
    REQUIRE(tok.encode(s) == reference_encode(tok, s));
  }
  // Long chunks (text without spaces, like CJK) take the heap path of the encoder; a small
  // alphabet makes merges, repeats and overlaps ("aaaa") frequent.
  auto letters = [&](std::size_t n) {
    std::string s;
    for (std::size_t i = 0; i < n; ++i) s += "aab\xe4\xb8"[rng.below(5)];
    return s;
  };
  std::vector<std::string> docs;
  for (int i = 0; i < 8; ++i) docs.push_back(letters(3000));
  const Tokenizer dense = Tokenizer::train(docs, 700);
  for (int i = 0; i < 20; ++i) {
    const std::string s = letters(rng.below(1200)) + " " + letters(rng.below(40));
    const auto ids = dense.encode(s);
    REQUIRE(ids == reference_encode(dense, s));
    REQUIRE(dense.decode(ids) == s);
  }
}

TEST_CASE("tokenizer encode is thread-safe and copies encode alike", "[tokenizer]") {
  const Tokenizer& tok = english_tokenizer();
  const std::string text = english(77, 40000);
  const auto expected = reference_encode(tok, text);
  std::vector<std::vector<std::uint32_t>> got(4);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      for (int rep = 0; rep < 3; ++rep) got[std::size_t(t)] = tok.encode(text);
    });
  for (auto& th : threads) th.join();
  for (const auto& g : got) CHECK(g == expected);
  const Tokenizer copy = tok;
  CHECK(copy.encode(text) == expected);
}

TEST_CASE("tokenizer save and load round trip", "[tokenizer]") {
  TempDir dir("tokenizer");
  const Tokenizer& tok = english_tokenizer();
  const std::string path = (dir.path / "tokenizer.json").string();
  tok.save(path);
  CHECK_FALSE(fs::exists(path + ".tmp"));
  const Tokenizer loaded = Tokenizer::load(path);
  CHECK(loaded.vocab_size() == tok.vocab_size());
  CHECK(loaded.eot_id() == tok.eot_id());
  CHECK(loaded.merges() == tok.merges());
  Rng rng(31);
  for (int i = 0; i < 10; ++i) {
    const std::string s = i % 2 ? english(rng.next_u64(), 3000) : nasty(rng);
    CHECK(loaded.encode(s) == tok.encode(s));
  }
  // The file is plain JSON in the documented layout.
  std::ifstream in(path);
  const auto j = nlohmann::json::parse(in);
  CHECK(j["type"] == "byte_bpe");
  CHECK(j["version"] == 1);
  CHECK(j["vocab_size"] == tok.vocab_size());
  CHECK(j["special_tokens"]["<|endoftext|>"] == tok.eot_id());
  CHECK(j["merges"].size() == tok.merges().size());
  // Saving again over the file replaces it.
  Tokenizer::train(english_docs(50, 2, 5000), 300).save(path);
  CHECK(Tokenizer::load(path).vocab_size() == 300);
}

TEST_CASE("tokenizer load reports what is wrong with the file", "[tokenizer]") {
  TempDir dir("tokenizer");
  const std::string good = (dir.path / "good.json").string();
  Tokenizer::train(english_docs(60, 2, 4000), 270).save(good);
  nlohmann::json base;
  {
    std::ifstream in(good);
    base = nlohmann::json::parse(in);
  }
  int counter = 0;
  auto write = [&](const std::string& text) {
    const std::string p = (dir.path / ("bad" + std::to_string(counter++) + ".json")).string();
    std::ofstream(p) << text;
    return p;
  };
  auto expect_error = [&](const std::string& path, const std::string& what) {
    INFO("expecting: " << what);
    try {
      Tokenizer::load(path);
      FAIL("no error");
    } catch (const std::runtime_error& e) {
      const std::string msg = e.what();
      INFO(msg);
      CHECK(msg.rfind(path, 0) == 0);  // starts with the path
      CHECK(msg.find(what) != std::string::npos);
    }
  };
  auto mutated = [&](auto&& change) {
    nlohmann::json j = base;
    change(j);
    return write(j.dump());
  };

  expect_error((dir.path / "missing.json").string(), "cannot read tokenizer file");
  expect_error(write("{\"type\": \"byte_bpe\", "), "invalid JSON");
  expect_error(write("[1, 2]"), "JSON object");
  expect_error(mutated([](auto& j) { j["type"] = "wordpiece"; }), "\"type\"");
  expect_error(mutated([](auto& j) { j.erase("type"); }), "missing field \"type\"");
  expect_error(mutated([](auto& j) { j["version"] = 2; }), "\"version\"");
  expect_error(mutated([](auto& j) { j["vocab_size"] = 9999; }), "\"vocab_size\" is 9999");
  expect_error(mutated([](auto& j) { j["vocab_size"] = "big"; }), "\"vocab_size\"");
  expect_error(mutated([](auto& j) {
                 j["merges"][5] = {300, 1};
               }),
               "merges[5] = [300, 1] refers to id 300");
  expect_error(mutated([](auto& j) { j["merges"][0] = {256, 1}; }), "merges[0]");
  expect_error(mutated([](auto& j) { j["merges"][3] = {-1, 1}; }), "merges[3][0]");
  expect_error(mutated([](auto& j) { j["merges"][2] = {1}; }), "merges[2]");
  expect_error(mutated([](auto& j) { j["merges"][4] = j["merges"][1]; }), "repeats merges[1]");
  expect_error(mutated([](auto& j) { j["merges"] = "none"; }), "\"merges\"");
  expect_error(mutated([](auto& j) { j["special_tokens"] = {{"<|pad|>", 269}}; }), "<|endoftext|>");
  expect_error(mutated([](auto& j) { j["special_tokens"]["<|endoftext|>"] = 12; }), "has id 12");
  expect_error(mutated([](auto& j) {
                 j["special_tokens"]["<|pad|>"] = 269;
                 j["vocab_size"] = 271;
               }),
               "reuses id 269");
  // More specials: the format keeps room for them.
  const Tokenizer more = Tokenizer::load(mutated([](auto& j) {
    j["special_tokens"]["<|pad|>"] = 270;
    j["vocab_size"] = 271;
  }));
  CHECK(more.vocab_size() == 271);
  CHECK(more.eot_id() == 269);
  CHECK(more.decode({270, 269}) == "<|pad|><|endoftext|>");
}
