// prepare-data's pipeline (see moetrain/prepare_data.hpp): collect and split the documents, train
// or load the tokenizer, encode into shards, write the manifest.
#include "moetrain/prepare_data.hpp"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <memory>
#include <regex>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>
#include <nlohmann/json.hpp>

#include "moetrain/token_shard.hpp"
#include "moetrain/tokenizer.hpp"

namespace moetrain {

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

struct Document {
  fs::path path;
  std::uint64_t bytes = 0;
  bool val = false;
};

constexpr const char* kTokenizerFile = "tokenizer.json";
constexpr const char* kManifestFile = "prepare_data.json";

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

std::uint64_t mix64(std::uint64_t z) {  // splitmix64 finaliser
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// The names prepare-data writes into OUT (and their temporaries).
bool is_output_name(const std::string& name) {
  static const std::regex re(
      R"((tokenizer\.json|prepare_data\.json|(train|val)_\d{6}\.bin)(\.tmp)?)");
  return std::regex_match(name, re);
}

bool is_shard_name(const std::string& name, const std::string& split) {
  static const std::regex re(R"((train|val)_\d{6}\.bin)");
  return std::regex_match(name, re) && name.rfind(split + "_", 0) == 0;
}

std::string shard_name(const std::string& split, std::size_t index) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%s_%06zu.bin", split.c_str(), index);
  return buf;
}

bool is_hidden(const fs::path& p) {
  const std::string name = p.filename().string();
  return !name.empty() && name[0] == '.';
}

// True if `inner` is `outer` or lies inside it (both canonical).
bool path_within(const fs::path& inner, const fs::path& outer) {
  auto i = inner.begin();
  for (auto o = outer.begin(); o != outer.end(); ++o, ++i)
    if (i == inner.end() || *i != *o) return false;
  return true;
}

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path.string() + ": cannot open input file");
  std::string text;
  in.seekg(0, std::ios::end);
  const std::streamoff size = in.tellg();
  in.seekg(0, std::ios::beg);
  text.resize(size > 0 ? std::size_t(size) : 0);
  if (size > 0 && !in.read(text.data(), size))
    throw std::runtime_error(path.string() + ": cannot read input file");
  return text;
}

// Input files: each --input in order; a folder contributes its regular files recursively, sorted
// by path, skipping hidden names (".*") and what prepare-data itself wrote into OUT.
std::vector<Document> collect_documents(const PrepareDataOptions& o, const fs::path& out_canon,
                                        spdlog::logger& log) {
  std::vector<Document> docs;
  std::size_t files = 0;
  auto add = [&](const fs::path& p) {
    const fs::path canon = fs::weakly_canonical(p);
    if (canon.parent_path() == out_canon && is_output_name(canon.filename().string())) return;
    ++files;
    const std::uint64_t bytes = fs::file_size(p);
    if (bytes == 0) {
      log.warn("{}: empty file, skipped", p.string());
      return;
    }
    docs.push_back({p, bytes, false});
  };
  for (const std::string& input : o.inputs) {
    const fs::path p(input);
    std::error_code ec;
    const fs::file_status st = fs::status(p, ec);
    if (ec || !fs::exists(st))
      throw std::runtime_error(input + ": no such file or directory (--input)");
    if (fs::is_directory(st)) {
      std::vector<fs::path> found;
      for (auto it = fs::recursive_directory_iterator(p); it != fs::recursive_directory_iterator();
           ++it) {
        if (is_hidden(it->path())) {
          if (it->is_directory()) it.disable_recursion_pending();
          continue;
        }
        if (it->is_regular_file()) found.push_back(it->path());
      }
      if (found.empty()) throw std::runtime_error(input + ": folder holds no input files");
      std::sort(found.begin(), found.end());
      for (const fs::path& f : found) add(f);
    } else if (fs::is_regular_file(st)) {
      add(p);
    } else {
      throw std::runtime_error(input + ": not a regular file or folder (--input)");
    }
  }
  if (docs.empty()) {
    std::string names;
    for (const std::string& input : o.inputs) names += (names.empty() ? "" : ", ") + input;
    throw std::runtime_error(names + ": no text to prepare: all " + std::to_string(files) +
                             " input file(s) are empty");
  }
  return docs;
}

// Refuses an OUT that holds anything but a previous prepare-data output or the inputs.
void check_out_dir(const fs::path& out, const std::vector<fs::path>& input_canon) {
  if (!fs::exists(out)) return;
  if (!fs::is_directory(out))
    throw std::runtime_error(out.string() + ": exists and is not a folder (--out)");
  std::vector<std::string> foreign;
  for (const auto& entry : fs::directory_iterator(out)) {
    const std::string name = entry.path().filename().string();
    if (entry.is_regular_file() && is_output_name(name)) continue;
    const fs::path canon = fs::weakly_canonical(entry.path());
    const bool holds_input =
        std::any_of(input_canon.begin(), input_canon.end(),
                    [&](const fs::path& in) { return path_within(in, canon); });
    if (!holds_input) foreign.push_back(name);
  }
  if (!foreign.empty()) {
    std::sort(foreign.begin(), foreign.end());
    std::string list;
    for (std::size_t i = 0; i < foreign.size() && i < 5; ++i)
      list += (i ? ", " : "") + std::string("'") + foreign[i] + "'";
    if (foreign.size() > 5) list += ", ...";
    throw std::runtime_error(out.string() +
                             ": folder is not empty and holds files that prepare-data did not "
                             "write (" +
                             list + "); refusing to overwrite it: choose a new or empty --out");
  }
}

// Deterministic split by document: val if a seeded hash of the index falls below the fraction;
// at least one val document (when fraction > 0 and there are >= 2) and at least one train one.
void split_documents(std::vector<Document>& docs, double fraction, std::uint64_t seed) {
  const std::size_t n = docs.size();
  std::vector<std::uint64_t> h(n);
  std::size_t n_val = 0;
  for (std::size_t i = 0; i < n; ++i) {
    h[i] = mix64(mix64(seed) ^ std::uint64_t(i));
    docs[i].val = fraction > 0 && double(h[i] >> 11) * 0x1.0p-53 < fraction;
    n_val += docs[i].val;
  }
  if (fraction > 0 && n >= 2 && n_val == 0)
    docs[std::size_t(std::min_element(h.begin(), h.end()) - h.begin())].val = true;
  if (n_val == n) docs[std::size_t(std::max_element(h.begin(), h.end()) - h.begin())].val = false;
}

// Writes atomically with the shard helper's convention: path.tmp then rename.
void write_json_file(const fs::path& path, const nlohmann::json& j) {
  const fs::path tmp = path.string() + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    f << j.dump(2) << "\n";
    if (!f) throw std::runtime_error(path.string() + ": cannot write " + tmp.string());
  }
  fs::rename(tmp, path);
}

class Progress {
 public:
  Progress(std::uint64_t total_bytes, std::size_t total_docs)
      : total_bytes_(total_bytes), total_docs_(total_docs), tty_(::isatty(2) != 0) {}

  void update(std::size_t docs, std::uint64_t bytes, std::uint64_t tokens, bool last) {
    const double t = seconds_since(start_);
    if (!last && t - last_print_ < (tty_ ? 0.2 : 10.0)) return;
    last_print_ = t;
    std::fprintf(stderr,
                 "%sprepare-data: encoded %zu/%zu documents, %.1f/%.1f MB, %.2fM tokens, "
                 "%.1f MB/s%s",
                 tty_ ? "\r" : "", docs, total_docs_, double(bytes) / 1e6,
                 double(total_bytes_) / 1e6, double(tokens) / 1e6,
                 t > 0 ? double(bytes) / 1e6 / t : 0.0, tty_ && !last ? "" : "\n");
    std::fflush(stderr);
  }

 private:
  Clock::time_point start_ = Clock::now();
  double last_print_ = 0;
  std::uint64_t total_bytes_;
  std::size_t total_docs_;
  bool tty_;
};

}  // namespace

PrepareDataSummary prepare_data(const PrepareDataOptions& o) {
  auto log = std::make_shared<spdlog::logger>(
      "prepare-data", std::make_shared<spdlog::sinks::stderr_color_sink_st>());
  log->set_pattern("prepare-data: %^%l%$: %v");

  if (o.vocab_size == 0 && o.tokenizer.empty())
    throw std::runtime_error(
        "prepare-data: give --vocab-size N (to train a tokenizer) or "
        "--tokenizer FILE");
  if (!(o.val_fraction >= 0 && o.val_fraction < 1))
    throw std::runtime_error("prepare-data: --val-fraction must be in [0, 1), got " +
                             std::to_string(o.val_fraction));

  const fs::path out(o.out);
  const fs::path out_canon = fs::weakly_canonical(out);
  std::vector<Document> docs = collect_documents(o, out_canon, *log);
  std::vector<fs::path> input_canon;
  for (const std::string& in : o.inputs) input_canon.push_back(fs::weakly_canonical(in));
  check_out_dir(out, input_canon);

  split_documents(docs, o.val_fraction, o.seed);
  PrepareDataSplit stats[2];  // train, val
  for (const Document& d : docs) {
    stats[d.val].documents++;
    stats[d.val].bytes += d.bytes;
  }
  if (o.val_fraction > 0 && stats[1].documents == 0)
    log->warn("only one document: the validation split is empty");

  // Tokenizer.
  double train_seconds = 0;
  std::unique_ptr<Tokenizer> tok;
  if (!o.tokenizer.empty()) {
    tok = std::make_unique<Tokenizer>(Tokenizer::load(o.tokenizer));
    if (o.vocab_size != 0 && std::uint32_t(o.vocab_size) != tok->vocab_size())
      throw std::runtime_error(o.tokenizer + ": vocab size " + std::to_string(tok->vocab_size()) +
                               " differs from --vocab-size " + std::to_string(o.vocab_size));
  } else {
    std::vector<std::string> train_text;
    train_text.reserve(stats[0].documents);
    for (const Document& d : docs)
      if (!d.val) train_text.push_back(read_file(d.path));
    std::fprintf(stderr, "prepare-data: training a %d-token tokenizer on %zu documents (%.1f MB)\n",
                 o.vocab_size, train_text.size(), double(stats[0].bytes) / 1e6);
    const auto t0 = Clock::now();
    tok = std::make_unique<Tokenizer>(Tokenizer::train(train_text, o.vocab_size));
    train_seconds = seconds_since(t0);
  }
  const int token_bytes = tok->vocab_size() <= 65536 ? 2 : 4;
  if (o.shard_tokens > std::numeric_limits<std::int32_t>::max())
    throw std::runtime_error("prepare-data: --shard-tokens must be below 2^31");

  fs::create_directories(out);
  tok->save((out / kTokenizerFile).string());

  // Encoding.
  const auto t_encode = Clock::now();
  Progress progress(stats[0].bytes + stats[1].bytes, docs.size());
  std::size_t docs_done = 0;
  std::uint64_t bytes_done = 0, tokens_done = 0;
  const char* split_names[2] = {"train", "val"};
  const std::size_t shard_tokens = std::size_t(o.shard_tokens);
  for (int s = 0; s < 2; ++s) {
    PrepareDataSplit& st = stats[s];
    std::vector<std::uint32_t> buf;
    buf.reserve(std::min<std::size_t>(shard_tokens, st.bytes / 2 + 1024));
    auto flush = [&](std::size_t count) {
      const std::string name = shard_name(split_names[s], st.shards.size());
      const std::vector<std::uint32_t> shard(buf.begin(), buf.begin() + std::ptrdiff_t(count));
      write_shard((out / name).string(), shard, token_bytes);
      st.shards.push_back(name);
      buf.erase(buf.begin(), buf.begin() + std::ptrdiff_t(count));
    };
    for (const Document& d : docs) {
      if (d.val != bool(s)) continue;
      const std::string text = read_file(d.path);
      const std::size_t before = buf.size();
      buf.push_back(tok->eot_id());
      tok->encode_append(text, buf);
      st.tokens += buf.size() - before;
      tokens_done += buf.size() - before;
      bytes_done += text.size();
      ++docs_done;
      while (buf.size() >= shard_tokens) flush(shard_tokens);
      progress.update(docs_done, bytes_done, tokens_done, false);
    }
    if (!buf.empty()) flush(buf.size());
  }
  progress.update(docs_done, bytes_done, tokens_done, true);
  const double encode_seconds = seconds_since(t_encode);

  // Shards of a previous run that this one did not rewrite.
  for (const auto& entry : fs::directory_iterator(out)) {
    const std::string name = entry.path().filename().string();
    for (int s = 0; s < 2; ++s)
      if (is_shard_name(name, split_names[s]) &&
          std::find(stats[s].shards.begin(), stats[s].shards.end(), name) == stats[s].shards.end())
        fs::remove(entry.path());
  }

  const std::uint64_t total_bytes = stats[0].bytes + stats[1].bytes;
  const std::uint64_t total_tokens = stats[0].tokens + stats[1].tokens;
  const double bytes_per_token =
      total_tokens > 0 ? double(total_bytes) / double(total_tokens) : 0.0;
  const double mb_per_s = encode_seconds > 0 ? double(total_bytes) / 1e6 / encode_seconds : 0.0;

  nlohmann::json manifest = {
      {"type", "moetrain_prepare_data"},
      {"version", 1},
      {"inputs", o.inputs},
      {"tokenizer", kTokenizerFile},
      {"tokenizer_source", o.tokenizer.empty() ? "trained" : o.tokenizer},
      {"vocab_size", tok->vocab_size()},
      {"eot_id", tok->eot_id()},
      {"token_bytes", token_bytes},
      {"val_fraction", o.val_fraction},
      {"seed", o.seed},
      {"shard_tokens", o.shard_tokens},
      {"tokenizer_seconds", train_seconds},
      {"encode_seconds", encode_seconds},
      {"bytes_per_token", bytes_per_token},
  };
  for (int s = 0; s < 2; ++s)
    manifest[split_names[s]] = {{"documents", stats[s].documents},
                                {"bytes", stats[s].bytes},
                                {"tokens", stats[s].tokens},
                                {"shards", stats[s].shards}};
  write_json_file(out / kManifestFile, manifest);

  PrepareDataSummary summary;
  summary.train = std::move(stats[0]);
  summary.val = std::move(stats[1]);
  summary.vocab_size = tok->vocab_size();
  summary.token_bytes = token_bytes;
  summary.bytes_per_token = bytes_per_token;
  summary.tokenizer_seconds = train_seconds;
  summary.encode_seconds = encode_seconds;
  summary.mb_per_s = mb_per_s;
  return summary;
}

}  // namespace moetrain
