// `moetrain prepare-data`: text files -> byte-level BPE tokenizer + llm.c token shards (the
// pipeline is moetrain::prepare_data; this file parses the flags and prints the summary).
#include <cstdint>
#include <cstdio>
#include <limits>
#include <memory>

#include "cli/commands.hpp"
#include "cli/common.hpp"
#include "moetrain/prepare_data.hpp"
#include "moetrain/tokenizer.hpp"

namespace moetrain::cli {

namespace {

void print_summary(const PrepareDataOptions& o, const PrepareDataSummary& s) {
  const PrepareDataSplit& tr = s.train;
  const PrepareDataSplit& va = s.val;
  std::printf("prepare-data: wrote %s\n", o.out.c_str());
  std::printf("  documents    %zu (train %zu, val %zu)\n", tr.documents + va.documents,
              tr.documents, va.documents);
  std::printf("  bytes        %llu (train %llu, val %llu)\n",
              (unsigned long long)(tr.bytes + va.bytes), (unsigned long long)tr.bytes,
              (unsigned long long)va.bytes);
  std::printf("  tokens       %llu (train %llu, val %llu)\n",
              (unsigned long long)(tr.tokens + va.tokens), (unsigned long long)tr.tokens,
              (unsigned long long)va.tokens);
  std::printf("  bytes/token  %.3f\n", s.bytes_per_token);
  if (o.tokenizer.empty())
    std::printf("  tokenizer    vocab %u, trained in %.2f s\n", s.vocab_size, s.tokenizer_seconds);
  else
    std::printf("  tokenizer    vocab %u, loaded from %s\n", s.vocab_size, o.tokenizer.c_str());
  std::printf("  encoding     %.2f s, %.1f MB/s\n", s.encode_seconds, s.mb_per_s);
  std::printf("  shards       %zu train, %zu val (uint%d tokens, at most %lld per shard)\n",
              tr.shards.size(), va.shards.size(), s.token_bytes * 8, (long long)o.shard_tokens);
  std::fflush(stdout);
}

}  // namespace

void add_prepare_data_command(CLI::App& app) {
  auto opts = std::make_shared<PrepareDataOptions>();
  CLI::App* cmd = app.add_subcommand(
      "prepare-data", "Train a byte-level BPE tokenizer and write llm.c token shards");
  cmd->add_option("--input", opts->inputs,
                  "Text files or folders (recursive, sorted by path, hidden names skipped); each "
                  "file is one document")
      ->required();
  cmd->add_option("--out", opts->out,
                  "Output folder: tokenizer.json, train_NNNNNN.bin, val_NNNNNN.bin, "
                  "prepare_data.json")
      ->required();
  cmd->add_option("--vocab-size", opts->vocab_size,
                  "Tokenizer vocabulary: 256 bytes + merges + <|endoftext|>")
      ->check(CLI::Range(Tokenizer::kMinVocabSize, std::numeric_limits<std::int32_t>::max()));
  cmd->add_option("--val-fraction", opts->val_fraction,
                  "Fraction of the documents held out for validation, in [0, 1)")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 1.0));
  cmd->add_option("--seed", opts->seed, "Seed of the train/val split")
      ->capture_default_str()
      ->check(decimal_uint64());
  cmd->add_option("--shard-tokens", opts->shard_tokens, "Tokens per shard file")
      ->capture_default_str()
      ->check(CLI::Range(std::int64_t(1), std::int64_t(std::numeric_limits<std::int32_t>::max())));
  cmd->add_option("--tokenizer", opts->tokenizer,
                  "Use this tokenizer.json instead of training one");
  cmd->callback([opts] { print_summary(*opts, prepare_data(*opts)); });
}

}  // namespace moetrain::cli
