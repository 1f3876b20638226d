// prepare-data: text files -> byte-level BPE tokenizer + llm.c token shards.
//
// Each input file is one document. Documents are split into train and val by a seeded hash of
// their index (document granularity), the tokenizer is trained on the train documents (or loaded
// from PrepareDataOptions::tokenizer), and every document is encoded as
// [<|endoftext|>] + tokens(document), like llm.c's fineweb script, into shards of `shard_tokens`
// tokens:
//   OUT/tokenizer.json, OUT/train_000000.bin ..., OUT/val_000000.bin ..., OUT/prepare_data.json
// OUT may hold a previous prepare-data output (it is replaced) but nothing else, except the
// inputs themselves (e.g. --input data/brown/text --out data/brown).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace moetrain {

struct PrepareDataOptions {
  std::vector<std::string> inputs;  // files, or folders (recursive, sorted, hidden names skipped)
  std::string out;
  int vocab_size = 0;  // 0: take the vocabulary of `tokenizer`
  double val_fraction = 0.05;
  std::uint64_t seed = 0;
  std::int64_t shard_tokens = 100000000;
  std::string tokenizer;  // "": train one on the train documents
};

struct PrepareDataSplit {
  std::size_t documents = 0;
  std::uint64_t bytes = 0;
  std::uint64_t tokens = 0;
  std::vector<std::string> shards;  // file names in OUT
};

struct PrepareDataSummary {
  PrepareDataSplit train, val;
  std::uint32_t vocab_size = 0;
  int token_bytes = 0;  // 2 (uint16 shards) or 4
  double bytes_per_token = 0;
  double tokenizer_seconds = 0;  // training the tokenizer (0 when loaded)
  double encode_seconds = 0;
  double mb_per_s = 0;  // encoding throughput
};

// Does the work; reports progress and warnings on stderr. Errors are std::runtime_error naming
// the file or option at fault.
PrepareDataSummary prepare_data(const PrepareDataOptions& o);

}  // namespace moetrain
