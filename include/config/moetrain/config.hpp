// Run configuration: the typed form of a JSON config file.
//
// Every field has a default and a one-line description (see config_schema()). A config file may
// set any subset of fields; unknown keys, wrong types and impossible values are rejected with a
// ConfigError that names the file, the JSON path and the expected form.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "moetrain/op_shapes.hpp"

namespace moetrain {

struct MoeConfig {
  int n_experts = 8;
  int top_k = 2;
  int expert_ff = 512;
  int n_shared_experts = 0;
  int shared_ff = 512;
  RouterType router = RouterType::SoftmaxTopK;
  double route_scale = 1.0;
  double aux_loss_coef = 0.01;
  double z_loss_coef = 0.0;
  double bias_update_rate = 1e-3;
};

struct ModelConfig {
  int vocab_size = 4096;
  int d_model = 256;
  int n_layers = 4;
  int n_heads = 4;
  int n_kv_heads = 4;
  int head_dim = 0;  // 0: d_model / n_heads (resolved by validation)
  int seq_len = 256;
  double rope_theta = 10000.0;
  double norm_eps = 1e-6;
  double init_std = 0.02;
  bool tie_embeddings = false;
  int dense_layers = 1;
  int dense_ff = 1024;
  MoeConfig moe;
};

struct DataConfig {
  std::string train_pattern = "data/brown/train_*.bin";
  std::string val_pattern = "data/brown/val_*.bin";
  std::string tokenizer = "data/brown/tokenizer.json";
  int batch_size = 8;  // sequences per micro-batch per rank
  bool shuffle = true;
};

// Settings of one parameter group (docs/design.md §4): the Muon group (2D hidden weights) or the
// AdamW group (embeddings, lm_head, norm gains, routers). RMSNorm gains never decay.
struct GroupConfig {
  double lr_scale = 1.0;  // the group's lr = optim.lr * lr_scale
  double weight_decay = 0.1;
};

// Enumerators in the order of the schema's choices (src/config/config.cpp); to_string gives the
// config spelling.
enum class OptimizerName { AdamW, Muon, MuonClip, NorMuon, AdaMuon, Soap };
enum class MuonScale { MatchRmsAdamW, Original };
enum class NsCoefficients { Muon, PolarExpress };
enum class LrSchedule { Cosine, Wsd, Constant };
const char* to_string(OptimizerName v);
const char* to_string(MuonScale v);
const char* to_string(NsCoefficients v);
const char* to_string(LrSchedule v);

struct OptimConfig {
  OptimizerName name = OptimizerName::MuonClip;
  double lr = 3e-3;
  GroupConfig muon_group;
  GroupConfig adamw_group;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double momentum = 0.95;
  bool nesterov = true;
  int ns_steps = 5;
  NsCoefficients ns_coefficients = NsCoefficients::Muon;
  MuonScale muon_scale = MuonScale::MatchRmsAdamW;
  // NorMuon (../shared/OPTIMIZERS.md §2): the per-row second moment's decay, and the scale:
  // original (the reference code: ||O||_F kept, times sqrt(max(1, A/B))) or match_rms_adamw (the
  // paper: 0.2 sqrt(AB) / ||O_hat||_F, an update RMS of 0.2 as AdamW's).
  double normuon_beta2 = 0.95;
  MuonScale normuon_scale = MuonScale::Original;
  // SOAP (§4): Adam in the eigenbasis of the Shampoo factors L = EMA(G G^T), R = EMA(G^T G).
  double soap_beta1 = 0.95;
  double soap_beta2 = 0.95;
  double soap_shampoo_beta = -1;  // the factors' decay; negative: soap_beta2
  int soap_precondition_frequency = 10;
  int soap_max_precond_dim = 10000;  // a longer side is not rotated
  bool qk_clip = false;              // QK-clip after any optimizer's update (muonclip: always)
  double qk_clip_tau = 100.0;
  double qk_clip_alpha = 0.5;
  double grad_clip = 1.0;  // 0 disables
  LrSchedule schedule = LrSchedule::Cosine;
  int warmup_steps = 20;
  double min_lr_ratio = 0.1;
  double decay_fraction = 0.2;  // wsd: share of steps spent decaying
};

struct TrainConfig {
  int steps = 200;
  int grad_accum = 1;
  std::uint64_t seed = 1234;
  int eval_interval = 50;
  int eval_batches = 0;  // 0: the whole val split
  int log_interval = 1;
  int checkpoint_interval = 100;
  int keep_checkpoints = 2;
  std::string out_dir = "runs/default";
  std::string backend = "auto";    // auto | cpu | cuda
  std::string precision = "auto";  // auto | bf16 | fp32: GEMM operands (auto: bf16 on cuda)
  // nearest | stochastic: how the cuda backend rounds its bf16 copy of the master weights
  std::string bf16_weight_rounding = "nearest";
  bool cuda_graphs = true;  // replay each micro-batch's forward+backward as a CUDA graph
  // ZeRO-1's gradient buckets (docs/design.md §5.2): whole tensors in the order backward completes
  // them, about this many MiB each; with overlap, each bucket's reduce-scatter starts as soon as
  // backward has produced it.
  double grad_bucket_mib = 25.0;
  bool overlap_grad_reduce = true;
  double spike_std = 3.0;  // a loss above its running mean by this many running stds
  // MFU's denominator per rank in GFLOP/s; 0: measured at start-up (the backend's 2048^3 GEMM)
  double peak_gflops = 0.0;
  int watchdog_seconds = 600;  // exit if a step or evaluation makes no progress this long
};

struct Config {
  ModelConfig model;
  DataConfig data;
  OptimConfig optim;
  TrainConfig train;
};

// Whether train.precision gives the backend bf16 GEMM operands: bf16 does, fp32 does not, auto does
// on cuda (its tensor cores) and not on the cpu (fp32: the CPU's reference numbers).
inline bool bf16_gemms(const TrainConfig& t, bool cuda) {
  return t.precision == "bf16" || (t.precision == "auto" && cuda);
}

// A config problem: `what()` names the source (file or flag), the JSON path and the expected form.
class ConfigError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// One entry of the schema: used for parsing, validation, defaults and documentation alike.
struct ConfigField {
  std::string path;  // e.g. "model.moe.top_k"
  std::string type;  // "integer", "number", "boolean", "string", or "one of a|b|c"
  nlohmann::json default_value;
  std::string description;  // one line
  // The accepted range, e.g. ">= 1", "in [0, 1)", "non-empty"; empty when the type says it all.
  std::string constraint;
};

// Every field, in document order.
const std::vector<ConfigField>& config_schema();

// Defaults as a JSON document (a valid config file).
nlohmann::json default_config_json();

// Parses `j` (any subset of fields) over the defaults and validates; `source` names the origin
// (file name) in error messages.
Config config_from_json(const nlohmann::json& j, const std::string& source);

// Reads and parses a JSON file; errors name the file.
Config load_config(const std::string& path);

// Reads the file, applies the overrides in order, then parses and validates. Prefer this to
// overriding config_to_json(load_config(path)), where head_dim is already resolved.
Config load_config(const std::string& path, const std::vector<std::string>& overrides);

// The largest config file read (a file above it is refused, naming the bound).
inline constexpr std::size_t kMaxConfigFileBytes = std::size_t(4) << 20;

// Reads a JSON file without validating its fields (the top level must be an object) through
// read_json_file (moetrain/json_file.hpp: a regular file of at most kMaxConfigFileBytes, nesting
// bounded, no duplicate keys); errors name the file, and for syntax errors the byte position, line,
// column and JSON path.
nlohmann::json read_config_json(const std::string& path);

// Applies "a.b.c=value" overrides (value parsed as JSON, else taken as a string) to `j`.
// The path must be a schema field and the value must fit the field's type and range (errors
// name `--set`); for string fields a value that parses as another JSON type is taken as text.
// A value that is JSON nested too deep or with a repeated key is refused, whatever the field.
void apply_override(nlohmann::json& j, const std::string& assignment);

// The full, resolved config (head_dim filled in) as JSON.
nlohmann::json config_to_json(const Config& c);

// Derived quantities.
// Whether the step applies QK-clip: optim.qk_clip, or optim.name muonclip (Muon + QK-clip).
inline bool qk_clip_enabled(const OptimConfig& o) {
  return o.qk_clip || o.name == OptimizerName::MuonClip;
}

inline bool is_moe_layer(const ModelConfig& m, int layer) {
  return layer >= m.dense_layers;
}

}  // namespace moetrain
