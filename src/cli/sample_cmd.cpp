// `moetrain sample`: text continued from a prompt by a checkpoint, with temperature and top-k.
#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <numeric>
#include <stdexcept>
#include <system_error>

#include "cli/commands.hpp"
#include "cli/common.hpp"
#include "moetrain/rng.hpp"
#include "moetrain/runtime.hpp"
#include "moetrain/tokenizer.hpp"

namespace fs = std::filesystem;

namespace moetrain::cli {

namespace {

// row.size() activations from `src` as floats, whatever their storage (bf16 on a GPU in bf16 mode:
// widened exactly, the bits shifted into the high half of a float).
void download_floats(Backend<float>& be, CDevPtr src, std::vector<float>& row) {
  if (src.storage() == Storage::F32) {
    be.download(row.data(), src.get(), row.size() * sizeof(float));
    return;
  }
  if (src.storage() != Storage::BF16)
    throw std::logic_error(std::string("sample: logits of storage ") + to_string(src.storage()));
  std::vector<std::uint16_t> bits(row.size());
  be.download(bits.data(), src.get(), bits.size() * sizeof(std::uint16_t));
  for (std::size_t i = 0; i < bits.size(); ++i) {
    const std::uint32_t u = std::uint32_t(bits[i]) << 16;
    std::memcpy(&row[i], &u, sizeof u);
  }
}

// Draws a token from logits / temperature restricted to the top_k largest (0: all);
// temperature 0 is greedy.
std::uint32_t draw(const float* logits, int vocab, double temperature, int top_k, Rng& rng) {
  std::vector<int> idx(static_cast<std::size_t>(vocab));
  std::iota(idx.begin(), idx.end(), 0);
  const int k = top_k > 0 ? std::min(top_k, vocab) : vocab;
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](int a, int b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  });
  if (temperature <= 0) return std::uint32_t(idx[0]);
  std::vector<double> p(static_cast<std::size_t>(k));
  double sum = 0;
  for (int i = 0; i < k; ++i) {
    p[std::size_t(i)] =
        std::exp((double(logits[idx[std::size_t(i)]]) - logits[idx[0]]) / temperature);
    sum += p[std::size_t(i)];
  }
  double u = rng.uniform() * sum;
  for (int i = 0; i < k; ++i) {
    u -= p[std::size_t(i)];
    if (u <= 0) return std::uint32_t(idx[std::size_t(i)]);
  }
  return std::uint32_t(idx[std::size_t(k - 1)]);
}

}  // namespace

void add_sample_command(CLI::App& app) {
  struct Options {
    std::string checkpoint, prompt, tokenizer;
    double temperature = 0.8;
    int top_k = 40, max_tokens = 200;
    std::uint64_t seed = 1;
  };
  auto o = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand("sample", "Continue a prompt with a trained checkpoint");
  cmd->add_option("--checkpoint", o->checkpoint, "Checkpoint directory")->required();
  cmd->add_option("--prompt", o->prompt, "Text to continue")->required();
  cmd->add_option("--temperature", o->temperature, "Softmax temperature (0: greedy)")
      ->check(finite_non_negative());
  cmd->add_option("--top-k", o->top_k, "Sample among the k most likely tokens (0: all)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--max-tokens", o->max_tokens, "Tokens to generate")->check(CLI::PositiveNumber);
  cmd->add_option("--seed", o->seed, "Sampling seed")->check(decimal_uint64());
  cmd->add_option("--tokenizer", o->tokenizer,
                  "Tokenizer JSON (default: the checkpoint's copy, else data.tokenizer)");
  cmd->callback([o] {
    const Config cfg = checkpoint_config(o->checkpoint, {});
    std::string tok_path = o->tokenizer;
    if (tok_path.empty()) {
      tok_path = (fs::path(o->checkpoint) / "tokenizer.json").string();
      if (!fs::exists(tok_path)) tok_path = cfg.data.tokenizer;
      if (tok_path.empty())
        throw std::runtime_error(o->checkpoint +
                                 ": no tokenizer.json in the checkpoint and its data.tokenizer is "
                                 "empty (trained without one): pass --tokenizer FILE");
    }
    const Tokenizer tok = Tokenizer::load(tok_path);
    if (tok.vocab_size() > std::uint32_t(cfg.model.vocab_size))
      throw std::runtime_error(tok_path + ": tokenizer has " + std::to_string(tok.vocab_size()) +
                               " tokens, the model only " + std::to_string(cfg.model.vocab_size));
    // Quiet: the sampled text is this command's whole output.
    const Runtime rt = make_runtime(cfg, /*quiet=*/true);
    Backend<float>* be = rt.backend.get();
    auto model = load_checkpoint_model(o->checkpoint, cfg, *be, 1);
    const int T = cfg.model.seq_len, V = cfg.model.vocab_size;
    std::vector<std::uint32_t> ids = {tok.eot_id()};  // documents start after an end-of-text
    tok.encode_append(o->prompt, ids);
    Rng rng(o->seed);
    std::vector<std::int32_t> window(static_cast<std::size_t>(T));
    std::vector<float> row(static_cast<std::size_t>(V));
    std::vector<std::uint32_t> generated;
    for (int i = 0; i < o->max_tokens; ++i) {
      const std::size_t start = ids.size() > std::size_t(T) ? ids.size() - std::size_t(T) : 0;
      const int len = int(ids.size() - start);
      std::fill(window.begin(), window.end(), 0);  // causal: positions after len do not matter
      for (int t = 0; t < len; ++t)
        window[std::size_t(t)] = std::int32_t(ids[start + std::size_t(t)]);
      download_floats(*be, model->forward_logits(window.data(), len - 1), row);
      // Only ids the tokenizer can decode.
      const std::uint32_t next =
          draw(row.data(), int(tok.vocab_size()), o->temperature, o->top_k, rng);
      if (next == tok.eot_id()) break;
      ids.push_back(next);
      generated.push_back(next);
    }
    std::printf("%s%s\n", o->prompt.c_str(), tok.decode(generated).c_str());
  });
}

}  // namespace moetrain::cli
