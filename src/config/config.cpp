// Config schema, parsing and validation.
//
// Every field is declared once, in the table of fields(): its JSON path (which is also the C++
// member path), its kind and accepted range, and a one-line description. That table drives
// parsing, the defaults document, config_to_json, --set overrides and the documentation.

#include "moetrain/config.hpp"

#include "moetrain/json_file.hpp"

#include <algorithm>
#include <array>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <type_traits>
#include <utility>

namespace moetrain {
namespace {

using nlohmann::json;

// ---- Accepted ranges ------------------------------------------------------------------------

struct Range {
  std::optional<double> lo, hi;
  bool lo_open = false, hi_open = false;
};

Range at_least(double lo) {
  return Range{lo, std::nullopt, false, false};
}
Range above(double lo) {
  return Range{lo, std::nullopt, true, false};
}
Range closed(double lo, double hi) {
  return Range{lo, hi, false, false};
}
Range half_open(double lo, double hi) {
  return Range{lo, hi, false, true};
}

std::string format_number(double x) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", x);
  return buf;
}

bool in_range(double x, const Range& r) {
  if (r.lo && (r.lo_open ? !(x > *r.lo) : !(x >= *r.lo))) return false;
  if (r.hi && (r.hi_open ? !(x < *r.hi) : !(x <= *r.hi))) return false;
  return true;
}

std::string describe(const Range& r) {
  if (r.lo && r.hi) {
    return std::string("in ") + (r.lo_open ? "(" : "[") + format_number(*r.lo) + ", " +
           format_number(*r.hi) + (r.hi_open ? ")" : "]");
  }
  if (r.lo) return (r.lo_open ? "> " : ">= ") + format_number(*r.lo);
  if (r.hi) return (r.hi_open ? "< " : "<= ") + format_number(*r.hi);
  return "";
}

std::string with_constraint(std::string form, const std::string& constraint) {
  if (!constraint.empty()) form += " " + constraint;
  return form;
}

// A JSON value for an error message: compact, and cut short when long. Written element by
// element, stopping once long enough and abbreviating what is nested deeper than a few levels, so
// a huge or deep value costs no more than a short one.
constexpr std::size_t kShowMax = 80;
constexpr int kShowDepth = 8;

void show_into(const json& v, int depth, std::string& out) {
  if (!v.is_array() && !v.is_object()) {
    out += v.dump(-1, ' ', false, json::error_handler_t::replace);
    return;
  }
  if (depth >= kShowDepth) {
    out += v.is_array() ? "[...]" : "{...}";
    return;
  }
  out += v.is_array() ? '[' : '{';
  for (auto it = v.begin(); it != v.end() && out.size() <= kShowMax; ++it) {
    if (it != v.begin()) out += ',';
    if (v.is_object())
      out += json(it.key()).dump(-1, ' ', false, json::error_handler_t::replace) + ':';
    show_into(*it, depth + 1, out);
  }
  out += v.is_array() ? ']' : '}';
}

std::string show(const json& v) {
  std::string s;
  show_into(v, 0, s);
  if (s.size() > kShowMax) {
    std::size_t cut = kShowMax - 3;
    while (cut > 0 && (static_cast<unsigned char>(s[cut]) & 0xC0) == 0x80) --cut;  // UTF-8
    s = s.substr(0, cut) + "...";
  }
  return s;
}

[[noreturn]] void fail(const std::string& source, const std::string& path,
                       const std::string& expected, const std::string& got) {
  throw ConfigError(source + ": " + path + ": expected " + expected + ", got " + got);
}

// An integral JSON value as int64, if it is one and fits.
std::optional<std::int64_t> as_int64(const json& v) {
  if (v.is_number_unsigned()) {
    const auto u = v.get<std::uint64_t>();
    if (u > static_cast<std::uint64_t>(INT64_MAX)) return std::nullopt;
    return static_cast<std::int64_t>(u);
  }
  if (v.is_number_integer()) return v.get<std::int64_t>();
  return std::nullopt;
}

// ---- Field descriptors ----------------------------------------------------------------------

struct Field {
  std::string path;
  std::string type;        // schema type text
  std::string constraint;  // schema constraint text
  std::string description;
  bool is_text = false;  // string or enum field (for --set)
  // The expected form if `v` is not acceptable, else nullopt.
  std::function<std::optional<std::string>(const json& v)> check;
  std::function<json(const Config&)> get;
  std::function<void(Config&, const json&)> set;  // `v` has passed check()
};

template <class Access>
using MemberOf = std::remove_reference_t<decltype(std::declval<Access>()(std::declval<Config&>()))>;

template <class Access>
Field integer(const char* path, Access access, Range range, const char* description) {
  using T = MemberOf<Access>;
  static_assert(std::is_same_v<T, int> || std::is_same_v<T, std::uint64_t>);
  Field f;
  f.path = path;
  f.type = "integer";
  f.constraint = describe(range);
  f.description = description;
  const std::string form = with_constraint("an integer", f.constraint);
  f.check = [range, form](const json& v) -> std::optional<std::string> {
    if (!v.is_number_integer()) return form;
    if constexpr (std::is_same_v<T, std::uint64_t>) {
      // Non-negative literals parse as unsigned; a signed one here is negative unless it was
      // built in code (json(0)).
      if (!v.is_number_unsigned() && !(as_int64(v) && *as_int64(v) >= 0)) return form;
      return in_range(double(v.get<std::uint64_t>()), range) ? std::nullopt
                                                             : std::optional<std::string>(form);
    } else {
      const auto x = as_int64(v);
      if (!x || *x > INT_MAX) return form + " (at most " + std::to_string(INT_MAX) + ")";
      if (*x < INT_MIN || !in_range(double(*x), range)) return form;
      return std::nullopt;
    }
  };
  f.get = [access](const Config& c) { return json(access(c)); };
  f.set = [access](Config& c, const json& v) { access(c) = v.get<T>(); };
  return f;
}

template <class Access>
Field number(const char* path, Access access, Range range, const char* description) {
  static_assert(std::is_same_v<MemberOf<Access>, double>);
  Field f;
  f.path = path;
  f.type = "number";
  f.constraint = describe(range);
  f.description = description;
  const std::string form = with_constraint("a number", f.constraint);
  f.check = [range, form](const json& v) -> std::optional<std::string> {
    if (!v.is_number()) return form;
    const double x = v.get<double>();
    if (!std::isfinite(x) || !in_range(x, range)) return form;
    return std::nullopt;
  };
  f.get = [access](const Config& c) { return json(access(c)); };
  f.set = [access](Config& c, const json& v) { access(c) = v.get<double>(); };
  return f;
}

template <class Access>
Field boolean(const char* path, Access access, const char* description) {
  static_assert(std::is_same_v<MemberOf<Access>, bool>);
  Field f;
  f.path = path;
  f.type = "boolean";
  f.description = description;
  f.check = [](const json& v) -> std::optional<std::string> {
    if (!v.is_boolean()) return "true or false";
    return std::nullopt;
  };
  f.get = [access](const Config& c) { return json(access(c)); };
  f.set = [access](Config& c, const json& v) { access(c) = v.get<bool>(); };
  return f;
}

// A string (file paths and globs): non-empty unless may_be_empty.
template <class Access>
Field path_string(const char* path, Access access, const char* description,
                  bool may_be_empty = false) {
  static_assert(std::is_same_v<MemberOf<Access>, std::string>);
  Field f;
  f.path = path;
  f.type = "string";
  f.constraint = may_be_empty ? "optional" : "non-empty";
  f.description = description;
  f.is_text = true;
  f.check = [may_be_empty](const json& v) -> std::optional<std::string> {
    if (!v.is_string()) return may_be_empty ? "a string" : "a non-empty string";
    if (!may_be_empty && v.get_ref<const std::string&>().empty()) return "a non-empty string";
    return std::nullopt;
  };
  f.get = [access](const Config& c) { return json(access(c)); };
  f.set = [access](Config& c, const json& v) { access(c) = v.get<std::string>(); };
  return f;
}

// One of a fixed set of names, stored as a string or as an enum whose enumerators are declared
// in the order of `choices`.
template <class Access>
Field one_of(const char* path, Access access, std::vector<std::string> choices,
             const char* description) {
  using T = MemberOf<Access>;
  static_assert(std::is_same_v<T, std::string> || std::is_enum_v<T>);
  Field f;
  f.path = path;
  f.description = description;
  f.is_text = true;
  std::string bar, quoted;
  for (const auto& s : choices) {
    bar += (bar.empty() ? "" : "|") + s;
    quoted += (quoted.empty() ? "" : ", ") + ("\"" + s + "\"");
  }
  f.type = "one of " + bar;
  const std::string form = "one of " + quoted;
  f.check = [choices, form](const json& v) -> std::optional<std::string> {
    if (v.is_string()) {
      for (const auto& s : choices) {
        if (s == v.get_ref<const std::string&>()) return std::nullopt;
      }
    }
    return form;
  };
  f.get = [access, choices](const Config& c) {
    const T& value = access(c);
    if constexpr (std::is_enum_v<T>) {
      return json(choices.at(static_cast<std::size_t>(value)));
    } else {
      return json(value);
    }
  };
  f.set = [access, choices](Config& c, const json& v) {
    const auto& s = v.get_ref<const std::string&>();
    if constexpr (std::is_enum_v<T>) {
      for (std::size_t i = 0; i < choices.size(); ++i) {
        if (choices[i] == s) access(c) = static_cast<T>(i);
      }
    } else {
      access(c) = s;
    }
  };
  return f;
}

// The config spellings of the enums, in enumerator order (config.hpp).
constexpr std::array<const char*, 6> kOptimizerNames = {"adamw",   "muon",    "muonclip",
                                                        "normuon", "adamuon", "soap"};
constexpr std::array<const char*, 2> kMuonScales = {"match_rms_adamw", "original"};
constexpr std::array<const char*, 2> kNsCoefficients = {"muon", "polar_express"};
constexpr std::array<const char*, 3> kLrSchedules = {"cosine", "wsd", "constant"};

template <std::size_t N>
std::vector<std::string> spellings(const std::array<const char*, N>& names) {
  return {names.begin(), names.end()};
}

// The JSON path and the member it names, written once.
#define MOETRAIN_FIELD(member)    \
#member, [](auto& c) -> auto& { \
    return c.member;              \
  }

const std::vector<Field>& fields() {
  static const std::vector<Field> table = [] {
    std::vector<Field> t;
    // model
    t.push_back(integer(MOETRAIN_FIELD(model.vocab_size), at_least(1),
                        "Vocabulary size (rows of the embedding and of lm_head)"));
    t.push_back(
        integer(MOETRAIN_FIELD(model.d_model), at_least(1), "Width of the residual stream"));
    t.push_back(integer(MOETRAIN_FIELD(model.n_layers), at_least(1), "Transformer layers"));
    t.push_back(integer(MOETRAIN_FIELD(model.n_heads), at_least(1), "Attention query heads"));
    t.push_back(integer(MOETRAIN_FIELD(model.n_kv_heads), at_least(1),
                        "Key/value heads (GQA); must divide model.n_heads"));
    t.push_back(
        integer(MOETRAIN_FIELD(model.head_dim), at_least(0),
                "Dimension of each head, even (RoPE); 0 means model.d_model / model.n_heads"));
    t.push_back(
        integer(MOETRAIN_FIELD(model.seq_len), at_least(1), "Tokens per training sequence"));
    t.push_back(number(MOETRAIN_FIELD(model.rope_theta), above(0), "RoPE base frequency (theta)"));
    t.push_back(number(MOETRAIN_FIELD(model.norm_eps), above(0), "RMSNorm epsilon"));
    t.push_back(number(MOETRAIN_FIELD(model.init_std), above(0),
                       "Std of the normal init (o_proj and w2: divided by sqrt(2 * n_layers))"));
    t.push_back(boolean(MOETRAIN_FIELD(model.tie_embeddings), "Share the embedding with lm_head"));
    t.push_back(integer(MOETRAIN_FIELD(model.dense_layers), at_least(0),
                        "Leading layers with a dense SwiGLU FFN instead of MoE"));
    t.push_back(integer(MOETRAIN_FIELD(model.dense_ff), at_least(1),
                        "Hidden width of the dense SwiGLU FFN"));
    // model.moe
    t.push_back(
        integer(MOETRAIN_FIELD(model.moe.n_experts), at_least(1), "Routed experts per MoE layer"));
    t.push_back(integer(MOETRAIN_FIELD(model.moe.top_k), at_least(1),
                        "Experts per token; at most model.moe.n_experts"));
    t.push_back(integer(MOETRAIN_FIELD(model.moe.expert_ff), at_least(1),
                        "Hidden width of each routed SwiGLU expert"));
    t.push_back(integer(MOETRAIN_FIELD(model.moe.n_shared_experts), at_least(0),
                        "Shared experts applied to every token (0: none)"));
    t.push_back(integer(MOETRAIN_FIELD(model.moe.shared_ff), at_least(1),
                        "Hidden width of each shared expert"));
    t.push_back(one_of(MOETRAIN_FIELD(model.moe.router), {"softmax_topk", "sigmoid_bias"},
                       "Router: softmax then top-k (Mixtral), or sigmoid + balancing bias "
                       "(DeepSeek-V3)"));
    t.push_back(number(MOETRAIN_FIELD(model.moe.route_scale), above(0),
                       "Scale of the routing weights (sigmoid_bias router)"));
    t.push_back(number(MOETRAIN_FIELD(model.moe.aux_loss_coef), at_least(0),
                       "Load-balancing loss coefficient per MoE layer (0 disables)"));
    t.push_back(number(MOETRAIN_FIELD(model.moe.z_loss_coef), at_least(0),
                       "Router z-loss coefficient per MoE layer (0 disables)"));
    t.push_back(number(MOETRAIN_FIELD(model.moe.bias_update_rate), at_least(0),
                       "Expert-bias update rate per step (sigmoid_bias router)"));
    // data
    t.push_back(path_string(MOETRAIN_FIELD(data.train_pattern), "Glob of the training shards"));
    t.push_back(path_string(MOETRAIN_FIELD(data.val_pattern), "Glob of the validation shards"));
    t.push_back(path_string(MOETRAIN_FIELD(data.tokenizer),
                            "Tokenizer JSON file, copied into the run and its checkpoints; it "
                            "must exist when set (empty: train without one)",
                            /*may_be_empty=*/true));
    t.push_back(integer(MOETRAIN_FIELD(data.batch_size), at_least(1),
                        "Sequences per micro-batch per rank"));
    t.push_back(boolean(MOETRAIN_FIELD(data.shuffle), "Shuffle the order of training sequences"));
    // optim
    t.push_back(
        one_of(MOETRAIN_FIELD(optim.name), spellings(kOptimizerNames),
               "Optimizer of the 2D hidden weights (the rest always uses AdamW): adamw, muon, "
               "muonclip (muon + QK-clip), normuon, adamuon or soap"));
    t.push_back(number(MOETRAIN_FIELD(optim.lr), above(0), "Peak learning rate"));
    t.push_back(number(MOETRAIN_FIELD(optim.muon_group.lr_scale), above(0),
                       "Muon group (2D hidden weights): learning-rate multiplier"));
    t.push_back(number(MOETRAIN_FIELD(optim.muon_group.weight_decay), at_least(0),
                       "Muon group: decoupled weight decay"));
    t.push_back(
        number(MOETRAIN_FIELD(optim.adamw_group.lr_scale), above(0),
               "AdamW group (embeddings, lm_head, norms, routers): learning-rate multiplier"));
    t.push_back(number(MOETRAIN_FIELD(optim.adamw_group.weight_decay), at_least(0),
                       "AdamW group: decoupled weight decay (RMSNorm gains: none)"));
    t.push_back(number(MOETRAIN_FIELD(optim.beta1), half_open(0, 1), "AdamW beta1"));
    t.push_back(number(MOETRAIN_FIELD(optim.beta2), half_open(0, 1), "AdamW beta2"));
    t.push_back(
        number(MOETRAIN_FIELD(optim.eps), above(0), "AdamW epsilon (also AdaMuon's and SOAP's)"));
    t.push_back(
        number(MOETRAIN_FIELD(optim.momentum), half_open(0, 1),
               "Momentum of Muon, NorMuon and AdaMuon (AdaMuon: also its second moment's decay)"));
    t.push_back(
        boolean(MOETRAIN_FIELD(optim.nesterov), "Muon, NorMuon, AdaMuon: Nesterov momentum"));
    t.push_back(integer(MOETRAIN_FIELD(optim.ns_steps), at_least(1),
                        "Muon, NorMuon, AdaMuon: Newton-Schulz iterations"));
    t.push_back(one_of(
        MOETRAIN_FIELD(optim.ns_coefficients), spellings(kNsCoefficients),
        "Newton-Schulz polynomials: muon (3.4445, -4.775, 2.0315) every iteration after X / "
        "(||X||_F + 1e-7); polar_express, the 5 per-iteration polynomials of Polar Express "
        "(arXiv 2505.16932, as modded-nanogpt and Dion use them) after X / (1.02 ||X||_F + 1e-6), "
        "iterations past the fifth repeating the last"));
    t.push_back(one_of(MOETRAIN_FIELD(optim.muon_scale), spellings(kMuonScales),
                       "Muon scale: 0.2*sqrt(max(A,B)) (AdamW-like RMS) or sqrt(max(1,A/B))"));
    t.push_back(number(MOETRAIN_FIELD(optim.normuon_beta2), half_open(0, 1),
                       "NorMuon: decay of the per-row second moment of the orthogonalised update"));
    t.push_back(one_of(MOETRAIN_FIELD(optim.normuon_scale), spellings(kMuonScales),
                       "NorMuon scale: original (the reference code: the Frobenius norm of the "
                       "orthogonalised update kept, times sqrt(max(1,A/B))) or match_rms_adamw "
                       "(the paper: rescaled to RMS 0.2, as AdamW's)"));
    t.push_back(number(MOETRAIN_FIELD(optim.soap_beta1), half_open(0, 1),
                       "SOAP: first-moment decay (in the original basis)"));
    t.push_back(number(MOETRAIN_FIELD(optim.soap_beta2), half_open(0, 1),
                       "SOAP: second-moment decay (in the eigenbasis)"));
    t.push_back(number(MOETRAIN_FIELD(optim.soap_shampoo_beta), half_open(-1, 1),
                       "SOAP: decay of the factors G G^T and G^T G; negative: optim.soap_beta2"));
    t.push_back(integer(MOETRAIN_FIELD(optim.soap_precondition_frequency), at_least(1),
                        "SOAP: steps between eigenbasis refreshes (one power iteration and QR)"));
    t.push_back(integer(MOETRAIN_FIELD(optim.soap_max_precond_dim), at_least(1),
                        "SOAP: a side longer than this is not rotated (identity basis)"));
    t.push_back(boolean(MOETRAIN_FIELD(optim.qk_clip),
                        "QK-clip after the update of any optimizer (adamw + QK-clip, muon + "
                        "QK-clip = muonclip); muonclip always clips"));
    t.push_back(number(MOETRAIN_FIELD(optim.qk_clip_tau), above(0),
                       "QK-clip: attention-logit threshold tau"));
    t.push_back(number(MOETRAIN_FIELD(optim.qk_clip_alpha), closed(0, 1),
                       "QK-clip: share of the clip applied to q (the rest to k)"));
    t.push_back(number(MOETRAIN_FIELD(optim.grad_clip), at_least(0),
                       "Global gradient-norm clip (0 disables)"));
    t.push_back(one_of(MOETRAIN_FIELD(optim.schedule), spellings(kLrSchedules),
                       "LR schedule after warmup: cosine, warmup-stable-decay or constant"));
    t.push_back(integer(MOETRAIN_FIELD(optim.warmup_steps), at_least(0),
                        "Linear warmup steps; at most train.steps"));
    t.push_back(number(MOETRAIN_FIELD(optim.min_lr_ratio), closed(0, 1),
                       "Final LR as a fraction of optim.lr (cosine, wsd)"));
    t.push_back(number(MOETRAIN_FIELD(optim.decay_fraction), closed(0, 1),
                       "wsd: share of the steps spent decaying"));
    // train
    t.push_back(integer(MOETRAIN_FIELD(train.steps), at_least(1), "Optimizer steps"));
    t.push_back(integer(MOETRAIN_FIELD(train.grad_accum), at_least(1),
                        "Micro-batches accumulated per optimizer step"));
    t.push_back(integer(MOETRAIN_FIELD(train.seed), at_least(0),
                        "Seed of the weight init and the data order"));
    t.push_back(integer(MOETRAIN_FIELD(train.eval_interval), at_least(0),
                        "Steps between evaluations (0 disables)"));
    t.push_back(integer(MOETRAIN_FIELD(train.eval_batches), at_least(0),
                        "Micro-batches per evaluation (0: the whole val split)"));
    t.push_back(
        integer(MOETRAIN_FIELD(train.log_interval), at_least(1), "Steps between log lines"));
    t.push_back(integer(MOETRAIN_FIELD(train.checkpoint_interval), at_least(0),
                        "Steps between checkpoints (0 disables)"));
    t.push_back(integer(MOETRAIN_FIELD(train.keep_checkpoints), at_least(1),
                        "Checkpoints kept on disk (older ones are deleted)"));
    t.push_back(
        path_string(MOETRAIN_FIELD(train.out_dir), "Directory of logs, metrics and checkpoints"));
    t.push_back(one_of(MOETRAIN_FIELD(train.backend), {"auto", "cpu", "cuda"},
                       "Compute backend; auto: cuda when a GPU is present, else cpu"));
    t.push_back(one_of(MOETRAIN_FIELD(train.precision), {"auto", "bf16", "fp32"},
                       "GEMM operands, fp32 master weights and accumulation either way; auto: bf16 "
                       "on cuda, fp32 on cpu. cuda bf16 also stores activations in bf16 "
                       "(attention's flash kernels read bf16 in all modes); cpu bf16 rounds only "
                       "the operands of the model GEMMs (oneDNN, the CPU's BF16 units) and of "
                       "attention's tile products (AVX-512-BF16)"));
    t.push_back(one_of(
        MOETRAIN_FIELD(train.bf16_weight_rounding), {"nearest", "stochastic"},
        "Rounding of the bf16 copy of the fp32 master weights that bf16 GEMMs read (cuda): "
        "nearest is deterministic (a resume repeats it exactly); stochastic is unbiased, so the "
        "copy's rounding errors average out over steps instead of repeating (the masters stay "
        "fp32 either way, so no update is lost)"));
    t.push_back(boolean(MOETRAIN_FIELD(train.cuda_graphs),
                        "Capture each micro-batch's forward+backward as a CUDA graph once and "
                        "replay it (cuda): one launch per micro-batch instead of thousands; false "
                        "runs every op eagerly (for debugging and per-op profiles)"));
    t.push_back(number(MOETRAIN_FIELD(train.grad_bucket_mib), above(0),
                       "Size of ZeRO-1's gradient buckets in MiB: whole tensors in the order "
                       "backward completes them, one reduce-scatter per bucket; the shard layout "
                       "depends on it, so a resume must keep it"));
    t.push_back(boolean(MOETRAIN_FIELD(train.overlap_grad_reduce),
                        "With more than one rank, start each bucket's reduce-scatter as soon as "
                        "backward has produced it (the last micro-batch's), overlapping the "
                        "communication with the rest of backward; the same bits as false"));
    t.push_back(number(MOETRAIN_FIELD(train.peak_gflops), at_least(0),
                       "MFU's denominator: GFLOP/s per rank (e.g. the accelerator's datasheet "
                       "peak); 0 measures the backend's 2048^3 GEMM at start-up, in the run's GEMM "
                       "precision"));
    t.push_back(number(MOETRAIN_FIELD(train.spike_std), above(0),
                       "Loss-spike counter: a loss above its running mean by this many stds"));
    t.push_back(integer(MOETRAIN_FIELD(train.watchdog_seconds), at_least(0),
                        "Exit when a step makes no progress this long (a peer rank died or hung); "
                        "0 disables"));
    return t;
  }();
  return table;
}

#undef MOETRAIN_FIELD

// ---- The tree of sections, derived from the field paths -------------------------------------

struct Tree {
  std::map<std::string, std::size_t> field_index;            // path -> index in fields()
  std::set<std::string> sections;                            // "" is the top level
  std::map<std::string, std::vector<std::string>> children;  // section -> keys, in table order
};

std::string join_path(const std::string& prefix, const std::string& key) {
  return prefix.empty() ? key : prefix + "." + key;
}

const Tree& tree() {
  static const Tree t = [] {
    Tree r;
    r.sections.insert("");
    const auto& fs = fields();
    for (std::size_t i = 0; i < fs.size(); ++i) {
      r.field_index[fs[i].path] = i;
      std::string prefix;
      std::size_t start = 0;
      for (;;) {
        const std::size_t dot = fs[i].path.find('.', start);
        const std::string key = fs[i].path.substr(start, dot - start);
        auto& keys = r.children[prefix];
        if (std::find(keys.begin(), keys.end(), key) == keys.end()) keys.push_back(key);
        if (dot == std::string::npos) break;
        prefix = join_path(prefix, key);
        r.sections.insert(prefix);
        start = dot + 1;
      }
    }
    return r;
  }();
  return t;
}

const Field* find_field(const std::string& path) {
  const auto& t = tree();
  const auto it = t.field_index.find(path);
  return it == t.field_index.end() ? nullptr : &fields()[it->second];
}

std::string join(const std::vector<std::string>& items, const char* sep) {
  std::string s;
  for (const auto& x : items) s += (s.empty() ? "" : sep) + x;
  return s;
}

std::string where(const std::string& path) {
  return path.empty() ? "top level" : path;
}

void parse_section(const json& obj, const std::string& prefix, const std::string& source,
                   Config& c) {
  const auto& t = tree();
  if (!obj.is_object()) fail(source, where(prefix), "an object", show(obj));
  const auto& keys = t.children.at(prefix);
  for (const auto& [key, value] : obj.items()) {
    const std::string path = join_path(prefix, key);
    if (std::find(keys.begin(), keys.end(), key) == keys.end()) {
      throw ConfigError(source + ": " + path +
                        ": unknown key (known keys here: " + join(keys, ", ") + ")");
    }
    if (t.sections.count(path)) {
      parse_section(value, path, source, c);
      continue;
    }
    const Field& f = *find_field(path);
    if (auto expected = f.check(value)) fail(source, path, *expected, show(value));
    f.set(c, value);
  }
}

// Rules that involve more than one field; resolves head_dim.
void validate_and_resolve(Config& c, const std::string& source) {
  ModelConfig& m = c.model;
  const auto num = [](auto x) { return std::to_string(x); };
  if (m.n_heads % m.n_kv_heads != 0) {
    fail(source, "model.n_kv_heads", "a divisor of model.n_heads (= " + num(m.n_heads) + ")",
         num(m.n_kv_heads));
  }
  if (m.head_dim == 0) {
    if (m.d_model % m.n_heads != 0) {
      fail(source, "model.d_model",
           "a multiple of model.n_heads (= " + num(m.n_heads) +
               ") because model.head_dim is 0 (= model.d_model / model.n_heads)",
           num(m.d_model) + "; set model.head_dim explicitly or change one of them");
    }
    const int resolved = m.d_model / m.n_heads;
    if (resolved % 2 != 0) {
      fail(source, "model.head_dim", "an even integer (RoPE rotates pairs of dimensions)",
           "0, which resolves to model.d_model / model.n_heads = " + num(m.d_model) + " / " +
               num(m.n_heads) + " = " + num(resolved));
    }
    m.head_dim = resolved;
  } else if (m.head_dim % 2 != 0) {
    fail(source, "model.head_dim", "an even integer (RoPE rotates pairs of dimensions)",
         num(m.head_dim));
  }
  // Products the code keeps in int (row counts, widths, GEMM dimensions) are checked in 64 bits.
  const auto fits_int = [&](const std::string& fields, std::int64_t value) {
    if (value > std::numeric_limits<int>::max())
      throw ConfigError(source + ": " + fields + " = " + num(value) + " exceeds " +
                        num(std::numeric_limits<int>::max()) +
                        ", the largest size this build represents in int");
  };
  const std::int64_t hd = m.head_dim, tokens = std::int64_t(c.data.batch_size) * m.seq_len;
  fits_int("model.n_heads * model.head_dim", m.n_heads * hd);
  fits_int("(model.n_heads + 2 * model.n_kv_heads) * model.head_dim",
           (m.n_heads + 2 * std::int64_t(m.n_kv_heads)) * hd);
  fits_int("data.batch_size * model.seq_len", tokens);
  fits_int("data.batch_size * model.n_heads", std::int64_t(c.data.batch_size) * m.n_heads);
  fits_int("2 * model.dense_ff", 2 * std::int64_t(m.dense_ff));
  if (m.n_layers > m.dense_layers) {
    fits_int("data.batch_size * model.seq_len * model.moe.top_k", tokens * m.moe.top_k);
    fits_int("2 * model.moe.expert_ff", 2 * std::int64_t(m.moe.expert_ff));
    fits_int("2 * model.moe.shared_ff", 2 * std::int64_t(m.moe.shared_ff));
  }
  if (m.moe.top_k > m.moe.n_experts) {
    fail(source, "model.moe.top_k",
         "an integer <= model.moe.n_experts (= " + num(m.moe.n_experts) + ")", num(m.moe.top_k));
  }
  if (m.dense_layers > m.n_layers) {
    fail(source, "model.dense_layers", "an integer <= model.n_layers (= " + num(m.n_layers) + ")",
         num(m.dense_layers));
  }
  if (c.optim.warmup_steps > c.train.steps) {
    fail(source, "optim.warmup_steps", "an integer <= train.steps (= " + num(c.train.steps) + ")",
         num(c.optim.warmup_steps));
  }
}

json to_json(const Config& c) {
  json j = json::object();
  for (const auto& f : fields()) {
    std::string pointer = "/" + f.path;
    std::replace(pointer.begin(), pointer.end(), '.', '/');
    j[json::json_pointer(pointer)] = f.get(c);
  }
  return j;
}

std::string trim(const std::string& s) {
  const auto b = s.find_first_not_of(" \t");
  if (b == std::string::npos) return "";
  const auto e = s.find_last_not_of(" \t");
  return s.substr(b, e - b + 1);
}

}  // namespace

const char* to_string(OptimizerName v) {
  return kOptimizerNames.at(static_cast<std::size_t>(v));
}
const char* to_string(MuonScale v) {
  return kMuonScales.at(static_cast<std::size_t>(v));
}
const char* to_string(NsCoefficients v) {
  return kNsCoefficients.at(static_cast<std::size_t>(v));
}
const char* to_string(LrSchedule v) {
  return kLrSchedules.at(static_cast<std::size_t>(v));
}

const std::vector<ConfigField>& config_schema() {
  static const std::vector<ConfigField> schema = [] {
    const Config defaults;
    std::vector<ConfigField> s;
    for (const auto& f : fields()) {
      s.push_back(ConfigField{f.path, f.type, f.get(defaults), f.description, f.constraint});
    }
    return s;
  }();
  return schema;
}

json default_config_json() {
  return to_json(Config{});
}

json config_to_json(const Config& c) {
  return to_json(c);
}

Config config_from_json(const json& j, const std::string& source) {
  Config c;
  parse_section(j, "", source, c);
  validate_and_resolve(c, source);
  return c;
}

json read_config_json(const std::string& path) {
  json j;
  try {
    j = read_json_file(path, "config file", kMaxConfigFileBytes);
  } catch (const JsonError& e) {
    throw ConfigError(e.what());
  }
  if (!j.is_object()) fail(path, "top level", "an object", show(j));
  return j;
}

Config load_config(const std::string& path) {
  return config_from_json(read_config_json(path), path);
}

Config load_config(const std::string& path, const std::vector<std::string>& overrides) {
  json j = read_config_json(path);
  for (const auto& o : overrides) apply_override(j, o);
  return config_from_json(j, overrides.empty() ? path : path + " (with --set overrides)");
}

void apply_override(json& j, const std::string& assignment) {
  const auto eq = assignment.find('=');
  const std::string path = eq == std::string::npos ? "" : trim(assignment.substr(0, eq));
  if (path.empty()) {
    throw ConfigError("--set: expected key=value (e.g. model.d_model=128), got " +
                      show(json(assignment)));
  }
  const Field* f = find_field(path);
  if (!f) {
    throw ConfigError("--set " + path +
                      ": unknown config field (`moetrain config --defaults` lists them)");
  }
  const std::string text = assignment.substr(eq + 1);
  // Not JSON: taken as the text itself (`--set train.out_dir=runs/x`). JSON nested too deep or
  // with a repeated key is refused.
  json value;
  try {
    value = parse_json(text, "--set " + path);
  } catch (const JsonError& e) {
    if (e.kind() != JsonError::Kind::Syntax) throw ConfigError(e.what());
    value = text;
  }
  if (f->is_text && !value.is_string()) value = text;
  if (auto expected = f->check(value)) fail("--set", path, *expected, show(value));

  if (j.is_null()) j = json::object();
  json* node = &j;
  std::string prefix;
  std::size_t start = 0;
  for (std::size_t dot; (dot = path.find('.', start)) != std::string::npos; start = dot + 1) {
    if (!node->is_object()) {
      fail("--set " + path, where(prefix), "an object in the config", show(*node));
    }
    const std::string key = path.substr(start, dot - start);
    prefix = join_path(prefix, key);
    node = &(*node)[key];
    if (node->is_null()) *node = json::object();
  }
  if (!node->is_object())
    fail("--set " + path, where(prefix), "an object in the config", show(*node));
  (*node)[path.substr(start)] = std::move(value);
}

}  // namespace moetrain
