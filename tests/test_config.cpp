// Config schema, parsing, validation, overrides, and the `moetrain config` subcommand.

#include <sys/wait.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <set>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "moetrain/config.hpp"
#include "test_util.hpp"

using Catch::Matchers::Contains;
using Catch::Matchers::StartsWith;
using moetrain::Config;
using moetrain::config_from_json;
using moetrain::ConfigError;
using moetrain::test::TempDir;
using nlohmann::json;

namespace {

namespace fs = std::filesystem;

// "a.b.c" -> the JSON pointer "/a/b/c".
json::json_pointer pointer(const std::string& path) {
  std::string s = "/" + path;
  for (auto& ch : s) {
    if (ch == '.') ch = '/';
  }
  return json::json_pointer(s);
}

// {"a": {"b": value}} (merged into `j`) for the path "a.b".
json with(const std::string& path, const json& value, json j = json::object()) {
  j[pointer(path)] = value;
  return j;
}

std::string message_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "(no ConfigError thrown)";
}

std::string error_from(const json& j) {
  return message_of([&] { config_from_json(j, "test.json"); });
}

// The message of a value that the per-field rules reject.
std::string rejection(const std::string& path, const json& value, const std::string& form) {
  return "test.json: " + path + ": expected " + form + ", got " + value.dump();
}

void require_accepted(const json& j) {
  INFO(j.dump());
  CHECK_NOTHROW(config_from_json(j, "test.json"));
}

// Leaves of a JSON object as "a.b.c" paths.
void leaves(const json& j, const std::string& prefix, std::vector<std::string>& out) {
  for (const auto& [k, v] : j.items()) {
    const std::string p = prefix.empty() ? k : prefix + "." + k;
    if (v.is_object()) {
      leaves(v, p, out);
    } else {
      out.push_back(p);
    }
  }
}

struct RunResult {
  int status = -1;
  std::string output;
};

// Runs a shell command; `status` is its exit code.
RunResult run(const std::string& command) {
  RunResult r;
  FILE* pipe = ::popen(command.c_str(), "r");
  REQUIRE(pipe != nullptr);
  char buf[4096];
  std::size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, pipe)) > 0) r.output.append(buf, n);
  const int raw = ::pclose(pipe);
  r.status = WIFEXITED(raw) ? WEXITSTATUS(raw) : -1;
  return r;
}

std::string quoted(const std::string& s) {
  return "'" + s + "'";
}

}  // namespace

TEST_CASE("config: defaults are valid and head_dim is resolved", "[config]") {
  const Config c = config_from_json(json::object(), "defaults");
  CHECK(c.model.head_dim == c.model.d_model / c.model.n_heads);
  CHECK(c.model.head_dim % 2 == 0);
  const Config d = config_from_json(moetrain::default_config_json(), "defaults");
  CHECK(moetrain::config_to_json(d) == moetrain::config_to_json(c));
  // The unresolved default document keeps head_dim 0; the resolved one has it filled in.
  CHECK(moetrain::default_config_json()["model"]["head_dim"] == 0);
  CHECK(moetrain::config_to_json(c)["model"]["head_dim"] == c.model.head_dim);
}

TEST_CASE("config: the configs shipped in configs/ validate", "[config]") {
  const fs::path dir = fs::path(MOETRAIN_SOURCE_DIR) / "configs";
  REQUIRE(fs::is_directory(dir));
  int n = 0;
  for (const auto& entry : fs::directory_iterator(dir)) {
    if (entry.path().extension() != ".json") continue;
    INFO(entry.path().string());
    CHECK_NOTHROW(moetrain::load_config(entry.path().string()));
    ++n;
  }
  CHECK(n > 0);
}

TEST_CASE("config: the schema documents every field once, with its default", "[config]") {
  const auto& schema = moetrain::config_schema();
  const json defaults = moetrain::default_config_json();
  std::vector<std::string> doc_paths;
  leaves(defaults, "", doc_paths);
  std::set<std::string> seen;
  for (const auto& f : schema) {
    INFO(f.path);
    CHECK(seen.insert(f.path).second);
    CHECK(defaults.at(pointer(f.path)) == f.default_value);
    CHECK(!f.description.empty());
    CHECK(f.description.find('\n') == std::string::npos);
    const bool known_type = f.type == "integer" || f.type == "number" || f.type == "boolean" ||
                            f.type == "string" || f.type.rfind("one of ", 0) == 0;
    CHECK(known_type);
  }
  CHECK(std::set<std::string>(doc_paths.begin(), doc_paths.end()) == seen);
  CHECK(doc_paths.size() == schema.size());

  const auto type_of = [&](const std::string& path) {
    for (const auto& f : schema) {
      if (f.path == path) return f.type;
    }
    return std::string("(missing)");
  };
  CHECK(type_of("model.moe.router") == "one of softmax_topk|sigmoid_bias");
  CHECK(type_of("optim.name") == "one of adamw|muon|muonclip|normuon|adamuon|soap");
  CHECK(type_of("optim.muon_scale") == "one of match_rms_adamw|original");
  CHECK(type_of("optim.schedule") == "one of cosine|wsd|constant");
  CHECK(type_of("train.backend") == "one of auto|cpu|cuda");
  CHECK(type_of("train.precision") == "one of auto|bf16|fp32");
  CHECK(type_of("model.d_model") == "integer");
  CHECK(type_of("optim.lr") == "number");
  CHECK(type_of("data.shuffle") == "boolean");
  CHECK(type_of("data.tokenizer") == "string");
  CHECK(defaults["model"]["moe"]["router"] == "softmax_topk");
  CHECK(defaults["optim"]["name"] == "muonclip");
}

TEST_CASE("config: config_to_json -> config_from_json round trip", "[config]") {
  SECTION("defaults") {
    const Config c = config_from_json(json::object(), "a");
    const json j = moetrain::config_to_json(c);
    CHECK(moetrain::config_to_json(config_from_json(j, "b")) == j);
  }
  SECTION("every field off its default") {
    const json j = json::parse(R"({
      "model": {"vocab_size": 1000, "d_model": 96, "n_layers": 3, "n_heads": 6, "n_kv_heads": 2,
                "head_dim": 32, "seq_len": 128, "rope_theta": 500000.0, "norm_eps": 1e-5,
                "init_std": 0.01, "tie_embeddings": true, "dense_layers": 0, "dense_ff": 200,
                "moe": {"n_experts": 16, "top_k": 4, "expert_ff": 64, "n_shared_experts": 2,
                        "shared_ff": 48, "router": "sigmoid_bias", "route_scale": 2.5,
                        "aux_loss_coef": 0.0, "z_loss_coef": 0.001, "bias_update_rate": 0.0}},
      "data": {"train_pattern": "a/*.bin", "val_pattern": "b/*.bin", "tokenizer": "t.json",
               "batch_size": 3, "shuffle": false},
      "optim": {"name": "adamw", "lr": 0.0005, "muon_group": {"lr_scale": 0.5, "weight_decay": 0.0}, "adamw_group": {"lr_scale": 2.0, "weight_decay": 0.05}, "beta1": 0.8, "beta2": 0.99,
                "eps": 1e-10, "momentum": 0.9, "nesterov": false, "ns_steps": 6,
                "ns_coefficients": "polar_express",
                "muon_scale": "original", "normuon_beta2": 0.9, "normuon_scale": "match_rms_adamw",
                "soap_beta1": 0.9, "soap_beta2": 0.99, "soap_shampoo_beta": 0.5,
                "soap_precondition_frequency": 4, "soap_max_precond_dim": 64, "qk_clip": true, "qk_clip_tau": 50.0, "qk_clip_alpha": 1.0,
                "grad_clip": 0.0, "schedule": "wsd", "warmup_steps": 0, "min_lr_ratio": 0.0,
                "decay_fraction": 1.0},
      "train": {"steps": 7, "grad_accum": 2, "seed": 18446744073709551615, "eval_interval": 0,
                "eval_batches": 1, "log_interval": 5, "checkpoint_interval": 0,
                "keep_checkpoints": 1, "out_dir": "runs/x", "backend": "cpu", "precision": "fp32",
                "bf16_weight_rounding": "stochastic", "cuda_graphs": false,
                "grad_bucket_mib": 0.5, "overlap_grad_reduce": false, "spike_std": 2.5,
                "peak_gflops": 989.5, "watchdog_seconds": 30}})");
    const Config c = config_from_json(j, "all.json");
    CHECK(c.model.moe.router == moetrain::RouterType::SigmoidBias);
    CHECK(c.model.head_dim == 32);
    CHECK(c.train.seed == 18446744073709551615ull);
    CHECK(c.optim.name == moetrain::OptimizerName::AdamW);
    const json back = moetrain::config_to_json(c);
    CHECK(back == j);
    for (const auto& f : moetrain::config_schema()) {
      INFO(f.path);
      CHECK(back.at(pointer(f.path)) != f.default_value);
    }
  }
  SECTION("a partial file keeps the other defaults") {
    const Config c = config_from_json(with("model.moe.top_k", 1), "p.json");
    CHECK(c.model.moe.top_k == 1);
    CHECK(c.model.moe.n_experts == Config{}.model.moe.n_experts);
    CHECK(c.optim.lr == Config{}.optim.lr);
  }
}

TEST_CASE("config: unknown keys are rejected", "[config]") {
  SECTION("top level") {
    CHECK(error_from({{"modle", json::object()}}) ==
          "test.json: modle: unknown key (known keys here: model, data, optim, train)");
  }
  SECTION("nested in a section") {
    CHECK_THAT(error_from(with("optim.learning_rate", 0.1)),
               StartsWith("test.json: optim.learning_rate: unknown key (known keys here: name, "
                          "lr, muon_group, adamw_group,"));
  }
  SECTION("nested two levels deep") {
    CHECK_THAT(error_from(with("model.moe.n_expert", 4)),
               StartsWith("test.json: model.moe.n_expert: unknown key (known keys here: "
                          "n_experts, top_k,"));
  }
  SECTION("a dotted key is not a path") {
    CHECK_THAT(error_from({{"model.d_model", 128}}),
               StartsWith("test.json: model.d_model: unknown key (known keys here: model,"));
    CHECK_THAT(error_from({{"model.moe", json::object()}}),
               StartsWith("test.json: model.moe: unknown key"));
  }
}

TEST_CASE("config: wrong JSON types are rejected", "[config]") {
  SECTION("integer fields take only JSON integers") {
    for (const json& v :
         {json(128.0), json(128.5), json("128"), json(true), json(nullptr), json::array({128})}) {
      CHECK(error_from(with("model.d_model", v)) ==
            rejection("model.d_model", v, "an integer >= 1"));
    }
    CHECK_THAT(error_from(with("model.d_model", 3000000000LL)),
               Contains("test.json: model.d_model: expected an integer >= 1 (at most "
                        "2147483647), got 3000000000"));
  }
  SECTION("number fields take integers and floats") {
    for (const json& v : {json("0.001"), json(false), json(nullptr), json::object()}) {
      CHECK(error_from(with("optim.lr", v)) == rejection("optim.lr", v, "a number > 0"));
    }
    require_accepted(with("optim.lr", 1));
    require_accepted(with("model.rope_theta", 500000));
  }
  SECTION("boolean fields take only true or false") {
    for (const json& v : {json(1), json(0), json("true"), json(nullptr)}) {
      CHECK(error_from(with("model.tie_embeddings", v)) ==
            rejection("model.tie_embeddings", v, "true or false"));
    }
  }
  SECTION("string fields") {
    for (const json& v : {json(5), json(nullptr), json::array({"a"})}) {
      CHECK(error_from(with("data.val_pattern", v)) ==
            rejection("data.val_pattern", v, "a non-empty string"));
      CHECK(error_from(with("data.tokenizer", v)) == rejection("data.tokenizer", v, "a string"));
    }
  }
  SECTION("enum fields") {
    CHECK(error_from(with("optim.name", "sgd")) ==
          rejection("optim.name", "sgd",
                    R"(one of "adamw", "muon", "muonclip", "normuon", "adamuon", "soap")"));
    CHECK(error_from(with("optim.name", 1)) ==
          rejection("optim.name", 1,
                    R"(one of "adamw", "muon", "muonclip", "normuon", "adamuon", "soap")"));
    CHECK(error_from(with("model.moe.router", "topk")) ==
          rejection("model.moe.router", "topk", R"(one of "softmax_topk", "sigmoid_bias")"));
    CHECK(error_from(with("optim.muon_scale", "rms")) ==
          rejection("optim.muon_scale", "rms", R"(one of "match_rms_adamw", "original")"));
    CHECK(error_from(with("optim.schedule", "linear")) ==
          rejection("optim.schedule", "linear", R"(one of "cosine", "wsd", "constant")"));
    CHECK(error_from(with("train.backend", "gpu")) ==
          rejection("train.backend", "gpu", R"(one of "auto", "cpu", "cuda")"));
    CHECK(error_from(with("train.precision", "fp16")) ==
          rejection("train.precision", "fp16", R"(one of "auto", "bf16", "fp32")"));
    CHECK(config_from_json(with("model.moe.router", "sigmoid_bias"), "t").model.moe.router ==
          moetrain::RouterType::SigmoidBias);
  }
  SECTION("sections must be objects") {
    CHECK(error_from({{"model", 3}}) == "test.json: model: expected an object, got 3");
    CHECK(error_from(with("model.moe", json::array())) ==
          "test.json: model.moe: expected an object, got []");
    CHECK(error_from({{"train", nullptr}}) == "test.json: train: expected an object, got null");
  }
  SECTION("the top level must be an object") {
    CHECK(error_from(json::array({1, 2})) == "test.json: top level: expected an object, got [1,2]");
  }
  SECTION("long values are shortened in messages") {
    const std::string long_text(500, 'x');
    const std::string msg = error_from(with("model.d_model", long_text));
    CHECK_THAT(msg, StartsWith("test.json: model.d_model: expected an integer >= 1, got \"xxx"));
    CHECK_THAT(msg, Catch::Matchers::EndsWith("..."));
    CHECK(msg.size() < 200);
  }
}

TEST_CASE("config: per-field ranges", "[config]") {
  SECTION("sizes are >= 1") {
    for (const char* path :
         {"model.vocab_size", "model.d_model", "model.n_layers", "model.n_heads",
          "model.n_kv_heads", "model.seq_len", "model.moe.n_experts", "model.moe.top_k",
          "model.moe.expert_ff", "model.dense_ff", "data.batch_size", "train.steps",
          "train.grad_accum", "optim.ns_steps", "train.log_interval", "model.moe.shared_ff",
          "train.keep_checkpoints"}) {
      INFO(path);
      CHECK(error_from(with(path, 0)) == rejection(path, 0, "an integer >= 1"));
      CHECK(error_from(with(path, -3)) == rejection(path, -3, "an integer >= 1"));
    }
  }
  SECTION("counts where 0 means none or disabled are >= 0") {
    for (const char* path :
         {"model.head_dim", "model.dense_layers", "model.moe.n_shared_experts",
          "optim.warmup_steps", "train.eval_interval", "train.checkpoint_interval", "train.seed"}) {
      INFO(path);
      CHECK(error_from(with(path, -1)) == rejection(path, -1, "an integer >= 0"));
      require_accepted(with(path, 0));
    }
  }
  SECTION("positive numbers are > 0") {
    for (const char* path : {"optim.lr", "optim.eps", "model.norm_eps", "model.init_std",
                             "model.rope_theta", "model.moe.route_scale", "optim.qk_clip_tau"}) {
      INFO(path);
      CHECK(error_from(with(path, 0)) == rejection(path, 0, "a number > 0"));
      CHECK(error_from(with(path, -0.5)) == rejection(path, -0.5, "a number > 0"));
    }
  }
  SECTION("coefficients and rates are >= 0") {
    for (const char* path :
         {"optim.muon_group.weight_decay", "optim.adamw_group.weight_decay",
          "model.moe.aux_loss_coef", "model.moe.z_loss_coef", "model.moe.bias_update_rate",
          "optim.grad_clip", "train.peak_gflops"}) {
      INFO(path);
      CHECK(error_from(with(path, -0.1)) == rejection(path, -0.1, "a number >= 0"));
      require_accepted(with(path, 0));
      require_accepted(with(path, 0.0));
    }
  }
  SECTION("betas and momentum are in [0, 1)") {
    for (const char* path : {"optim.beta1", "optim.beta2", "optim.momentum"}) {
      INFO(path);
      CHECK(error_from(with(path, 1.0)) == rejection(path, 1.0, "a number in [0, 1)"));
      CHECK(error_from(with(path, 1)) == rejection(path, 1, "a number in [0, 1)"));
      CHECK(error_from(with(path, -0.01)) == rejection(path, -0.01, "a number in [0, 1)"));
      require_accepted(with(path, 0));
      require_accepted(with(path, 0.999));
    }
  }
  SECTION("fractions are in [0, 1]") {
    for (const char* path : {"optim.qk_clip_alpha", "optim.min_lr_ratio", "optim.decay_fraction"}) {
      INFO(path);
      CHECK(error_from(with(path, 1.5)) == rejection(path, 1.5, "a number in [0, 1]"));
      CHECK(error_from(with(path, -0.5)) == rejection(path, -0.5, "a number in [0, 1]"));
      require_accepted(with(path, 0));
      require_accepted(with(path, 1));
    }
  }
  SECTION("seed is a non-negative integer") {
    CHECK(error_from(with("train.seed", 1.5)) == rejection("train.seed", 1.5, "an integer >= 0"));
    require_accepted(with("train.seed", 18446744073709551615ull));
  }
  SECTION("paths are non-empty strings") {
    for (const char* path : {"data.train_pattern", "data.val_pattern", "train.out_dir"}) {
      INFO(path);
      CHECK(error_from(with(path, "")) == rejection(path, "", "a non-empty string"));
    }
    require_accepted(with("data.tokenizer", ""));  // empty: train without a tokenizer
  }
}

TEST_CASE("config: cross-field rules", "[config]") {
  SECTION("n_kv_heads divides n_heads") {
    json j = with("model.n_heads", 4);
    j = with("model.n_kv_heads", 3, j);
    CHECK(error_from(j) ==
          "test.json: model.n_kv_heads: expected a divisor of model.n_heads (= 4), got 3");
    require_accepted(with("model.n_kv_heads", 2, j));
    require_accepted(with("model.n_kv_heads", 1, j));
    // With the default n_heads (4), a larger n_kv_heads does not divide it.
    CHECK_THAT(error_from(with("model.n_kv_heads", 8)),
               StartsWith("test.json: model.n_kv_heads: expected a divisor of model.n_heads"));
  }
  SECTION("top_k <= n_experts") {
    json j = with("model.moe.n_experts", 8);
    CHECK(error_from(with("model.moe.top_k", 9, j)) ==
          "test.json: model.moe.top_k: expected an integer <= model.moe.n_experts (= 8), got 9");
    require_accepted(with("model.moe.top_k", 8, j));
  }
  SECTION("head_dim 0 needs d_model divisible by n_heads") {
    json j = with("model.d_model", 100);
    j = with("model.n_heads", 3, j);
    j = with("model.n_kv_heads", 1, j);
    CHECK_THAT(error_from(j), StartsWith("test.json: model.d_model: expected a multiple of "
                                         "model.n_heads (= 3) because model.head_dim is 0"));
    CHECK_THAT(error_from(j), Contains("got 100"));
    // An explicit head_dim lifts the requirement.
    const Config c = config_from_json(with("model.head_dim", 32, j), "t");
    CHECK(c.model.head_dim == 32);
  }
  SECTION("head_dim must be even (resolved)") {
    json j = with("model.d_model", 132);
    CHECK_THAT(error_from(j),
               StartsWith("test.json: model.head_dim: expected an even integer (RoPE rotates "
                          "pairs of dimensions), got 0"));
    CHECK_THAT(error_from(j), Contains("model.d_model / model.n_heads = 132 / 4 = 33"));
  }
  SECTION("head_dim must be even (explicit)") {
    CHECK(error_from(with("model.head_dim", 33)) ==
          "test.json: model.head_dim: expected an even integer (RoPE rotates pairs of "
          "dimensions), got 33");
    CHECK(config_from_json(with("model.head_dim", 48), "t").model.head_dim == 48);
  }
  SECTION("dense_layers <= n_layers") {
    json j = with("model.n_layers", 4);
    CHECK(error_from(with("model.dense_layers", 5, j)) ==
          "test.json: model.dense_layers: expected an integer <= model.n_layers (= 4), got 5");
    require_accepted(with("model.dense_layers", 4, j));
  }
  SECTION("warmup_steps <= train.steps") {
    json j = with("train.steps", 200);
    CHECK(error_from(with("optim.warmup_steps", 300, j)) ==
          "test.json: optim.warmup_steps: expected an integer <= train.steps (= 200), got 300");
    require_accepted(with("optim.warmup_steps", 200, j));
  }
  SECTION("intervals may be 0") {
    json j = with("train.eval_interval", 0);
    j = with("train.checkpoint_interval", 0, j);
    require_accepted(j);
  }
}

TEST_CASE("config: load_config", "[config]") {
  TempDir tmp("config");
  SECTION("a missing file") {
    const std::string path = (tmp.path / "nope.json").string();
    CHECK(message_of([&] { moetrain::load_config(path); }) ==
          path + ": cannot read config file: No such file or directory");
  }
  SECTION("a directory") {
    const std::string path = tmp.path.string();
    CHECK_THAT(message_of([&] { moetrain::load_config(path); }),
               StartsWith(path + ": cannot read config file"));
  }
  SECTION("a JSON syntax error names the file and the byte position") {
    const std::string text = "{\n  \"model\": {\"d_model\": 128,}\n}\n";
    const std::string path = tmp.write("syntax.json", text);
    std::size_t byte = 0;
    try {
      const json ignored = json::parse(text);
      (void)ignored;
    } catch (const json::parse_error& e) {
      byte = e.byte;
    }
    REQUIRE(byte > 0);
    const std::string msg = message_of([&] { moetrain::load_config(path); });
    CHECK_THAT(msg, StartsWith(path + ": invalid JSON at byte " + std::to_string(byte) +
                               ", line 2, column "));
    CHECK_THAT(msg, Contains("syntax error"));
  }
  SECTION("an empty file") {
    const std::string path = tmp.write("empty.json", "");
    CHECK_THAT(message_of([&] { moetrain::load_config(path); }),
               StartsWith(path + ": invalid JSON at byte "));
  }
  SECTION("the top level must be an object") {
    const std::string path = tmp.write("array.json", "[1, 2, 3]");
    CHECK(message_of([&] { moetrain::load_config(path); }) ==
          path + ": top level: expected an object, got [1,2,3]");
  }
  SECTION("field errors name the file") {
    const std::string path = tmp.write("bad.json", R"({"optim": {"beta2": 1.5}})");
    CHECK(message_of([&] { moetrain::load_config(path); }) ==
          path + ": optim.beta2: expected a number in [0, 1), got 1.5");
  }
  SECTION("a valid file") {
    const std::string path = tmp.write("ok.json", R"({"model": {"d_model": 128}})");
    const Config c = moetrain::load_config(path);
    CHECK(c.model.d_model == 128);
    CHECK(c.model.head_dim == 32);
  }
  SECTION("with overrides") {
    const std::string path = tmp.write("ok.json", R"({"model": {"d_model": 128}})");
    const Config c = moetrain::load_config(path, {"model.d_model=64", "optim.name=adamw"});
    CHECK(c.model.d_model == 64);
    CHECK(c.model.head_dim == 16);  // resolved after the override
    CHECK(c.optim.name == moetrain::OptimizerName::AdamW);
    CHECK_THAT(message_of([&] { moetrain::load_config(path, {"model.moe.top_k=9"}); }),
               StartsWith(path + " (with --set overrides): model.moe.top_k: expected an integer "
                                 "<= model.moe.n_experts (= 8), got 9"));
  }
}

TEST_CASE("config: apply_override", "[config]") {
  SECTION("values are parsed as JSON, else taken as strings") {
    json j = json::object();
    moetrain::apply_override(j, "model.d_model=128");
    moetrain::apply_override(j, "optim.lr=1e-3");
    moetrain::apply_override(j, "data.shuffle=false");
    moetrain::apply_override(j, "optim.name=adamw");
    moetrain::apply_override(j, "model.moe.router=\"sigmoid_bias\"");
    moetrain::apply_override(j, "train.out_dir=2024");            // a string field keeps the text
    moetrain::apply_override(j, "data.train_pattern=a=b/*.bin");  // split at the first '='
    CHECK(j["model"]["d_model"] == 128);
    CHECK(j["model"]["d_model"].is_number_integer());
    CHECK(j["optim"]["lr"] == 1e-3);
    CHECK(j["data"]["shuffle"] == false);
    CHECK(j["optim"]["name"] == "adamw");
    CHECK(j["model"]["moe"]["router"] == "sigmoid_bias");
    CHECK(j["train"]["out_dir"] == "2024");
    CHECK(j["data"]["train_pattern"] == "a=b/*.bin");
    const Config c = config_from_json(j, "overrides");
    CHECK(c.model.d_model == 128);
    CHECK(c.model.moe.router == moetrain::RouterType::SigmoidBias);
  }
  SECTION("an override replaces a value from the file and keeps its siblings") {
    json j = json::parse(R"({"model": {"d_model": 64, "n_layers": 2}})");
    moetrain::apply_override(j, "model.d_model=32");
    CHECK(j == json::parse(R"({"model": {"d_model": 32, "n_layers": 2}})"));
  }
  SECTION("a missing '=' names the flag") {
    json j = json::object();
    CHECK(message_of([&] { moetrain::apply_override(j, "model.d_model"); }) ==
          R"(--set: expected key=value (e.g. model.d_model=128), got "model.d_model")");
    CHECK_THAT(message_of([&] { moetrain::apply_override(j, "=5"); }),
               StartsWith("--set: expected key=value"));
  }
  SECTION("the path must be a schema field") {
    json j = json::object();
    CHECK_THAT(message_of([&] { moetrain::apply_override(j, "model.d_modle=1"); }),
               StartsWith("--set model.d_modle: unknown config field"));
    CHECK_THAT(message_of([&] { moetrain::apply_override(j, "model={}"); }),
               StartsWith("--set model: unknown config field"));
    CHECK(j == json::object());
  }
  SECTION("the value must fit the field") {
    json j = json::object();
    CHECK(message_of([&] { moetrain::apply_override(j, "model.d_model=0"); }) ==
          "--set: model.d_model: expected an integer >= 1, got 0");
    CHECK(message_of([&] { moetrain::apply_override(j, "model.d_model=abc"); }) ==
          R"(--set: model.d_model: expected an integer >= 1, got "abc")");
    CHECK(
        message_of([&] { moetrain::apply_override(j, "optim.name=sgd"); }) ==
        R"(--set: optim.name: expected one of "adamw", "muon", "muonclip", "normuon", "adamuon", "soap", got "sgd")");
    CHECK(j == json::object());
  }
  SECTION("a section that is not an object") {
    json j = json::parse(R"({"model": 3})");
    CHECK(message_of([&] { moetrain::apply_override(j, "model.d_model=1"); }) ==
          "--set model.d_model: model: expected an object in the config, got 3");
  }
}

TEST_CASE("config: the `moetrain config` subcommand", "[config][cli]") {
  const std::string bin = quoted(MOETRAIN_BINARY);
  TempDir tmp("config");
  SECTION("--check on a bad file exits non-zero naming the file and the path") {
    const std::string path =
        tmp.write("bad.json", R"({"model": {"moe": {"top_k": "two"}}, "data": {}})");
    const RunResult r = run(bin + " config --check " + quoted(path) + " 2>&1");
    CHECK(r.status != 0);
    CHECK_THAT(r.output, Contains("error: " + path +
                                  R"(: model.moe.top_k: expected an integer >= 1, got "two")"));
  }
  SECTION("--check on a syntax error") {
    const std::string path = tmp.write("syntax.json", "{\"model\": }");
    const RunResult r = run(bin + " config --check " + quoted(path) + " 2>&1");
    CHECK(r.status != 0);
    CHECK_THAT(r.output, Contains("error: " + path + ": invalid JSON at byte "));
  }
  SECTION("--check on a good file prints ok and the resolved config") {
    const std::string path = tmp.write("good.json", R"({"model": {"d_model": 128}})");
    const RunResult r =
        run(bin + " config --check " + quoted(path) + " --set model.n_layers=3 2>/dev/null");
    REQUIRE(r.status == 0);
    const std::string first_line = path + ": ok\n";
    REQUIRE_THAT(r.output, StartsWith(first_line));
    const json j = json::parse(r.output.substr(first_line.size()));
    CHECK(j["model"]["d_model"] == 128);
    CHECK(j["model"]["n_layers"] == 3);
    CHECK(j["model"]["head_dim"] == 32);
  }
  SECTION("--set errors name the flag") {
    const std::string path = tmp.write("good.json", "{}");
    const RunResult r = run(bin + " config --check " + quoted(path) + " --set model.nope=1 2>&1");
    CHECK(r.status != 0);
    CHECK_THAT(r.output, Contains("error: --set model.nope: unknown config field"));
  }
  SECTION("--defaults --json prints the defaults as JSON") {
    const RunResult r = run(bin + " config --defaults --json 2>/dev/null");
    REQUIRE(r.status == 0);
    CHECK(json::parse(r.output) == moetrain::default_config_json());
  }
  SECTION("--defaults prints one line per field") {
    const RunResult r = run(bin + " config --defaults 2>/dev/null");
    REQUIRE(r.status == 0);
    std::vector<std::string> lines;
    std::size_t start = 0;
    for (std::size_t nl; (nl = r.output.find('\n', start)) != std::string::npos; start = nl + 1) {
      lines.push_back(r.output.substr(start, nl - start));
    }
    const auto& schema = moetrain::config_schema();
    REQUIRE(lines.size() == schema.size() + 1);
    CHECK_THAT(lines[0], StartsWith("PATH"));
    for (std::size_t i = 0; i < schema.size(); ++i) {
      CHECK_THAT(lines[i + 1], StartsWith(schema[i].path + " "));
      CHECK_THAT(lines[i + 1], Contains(schema[i].description));
    }
  }
  SECTION("exactly one of --defaults / --check") {
    const RunResult none = run(bin + " config 2>&1");
    CHECK(none.status != 0);
    CHECK_THAT(none.output, Contains("--defaults"));
    CHECK_THAT(none.output, Contains("--check"));
    const RunResult both = run(bin + " config --defaults --check x.json 2>&1");
    CHECK(both.status != 0);
    CHECK_THAT(both.output, Contains("excludes"));
  }
}
