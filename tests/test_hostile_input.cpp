// Hostile and broken input (issue 12): JSON nested 100k levels deep at every place moetrain reads
// JSON, duplicate keys, numbers out of range, files that are not regular or are too large,
// non-finite or out-of-range sampling flags, a non-finite eval loss, and a missing tokenizer. Each
// must end in a clean error (exit code 1, not a signal) whose message names the input and says
// what was wrong.
#include <catch2/catch.hpp>

#include <sys/stat.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include <limits>
#include <string>
#include <vector>

#include "cli_fixture.hpp"
#include "moetrain/config.hpp"
#include "moetrain/json_file.hpp"
#include "moetrain/safetensors.hpp"
#include "moetrain/tokenizer.hpp"

using namespace moetrain;
using namespace moetrain::test;
using Catch::Contains;

namespace {

constexpr int kDeep = 100000;

// `levels` nested arrays: [[[...]]].
std::string deep_array(int levels, bool closed = true) {
  return std::string(std::size_t(levels), '[') +
         (closed ? std::string(std::size_t(levels), ']') : std::string());
}

std::string write_text(const TempDir& dir, const std::string& name, const std::string& text) {
  const std::string path = dir.file(name);
  std::ofstream(path, std::ios::binary) << text;
  return path;
}

std::string message_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "(no exception)";
}

// A command of ours, killed after 20 s: a hang is a failure, not a stuck test run.
CommandResult run_bounded(const std::string& args) {
  return run_command("timeout 20 " + binary() + " " + args);
}

// A safetensors file holding only `header`.
std::string write_safetensors_header(const TempDir& dir, const std::string& name,
                                     const std::string& header) {
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[std::size_t(i)] = char((header.size() >> (8 * i)) & 0xFF);
  return write_text(dir, name, bytes + header);
}

// A short CI run with one checkpoint at step 2; returns the checkpoint directory.
std::string short_run(const TempDir& dir, const std::string& extra = "") {
  const std::string run = dir.file("run");
  const auto r = run_command(binary() + " train" + ci_args(run) +
                             " --set optim.warmup_steps=1 --set train.steps=2"
                             " --set train.checkpoint_interval=2 --set train.eval_interval=0 " +
                             extra);
  INFO(r.output);
  REQUIRE(r.exit_code == 0);
  return (fs::path(run) / "checkpoints" / "step_00000002").string();
}

}  // namespace

TEST_CASE("hostile input: parse_json bounds the depth and names the JSON path", "[faults][json]") {
  SECTION("64 levels are read, 65 are refused") {
    CHECK(parse_json(deep_array(64), "t").is_array());
    const std::string msg = message_of([] { parse_json(deep_array(65), "t.json"); });
    CHECK(msg ==
          "t.json: [0][0][0][0]...[0][0][0]: nested deeper than 64 levels of arrays and "
          "objects");
  }
  SECTION("the path names keys and indices") {
    const std::string text = R"({"a": [1, {"b": )" + deep_array(kDeep) + "}]}";
    const std::string msg = message_of([&] { parse_json(text, "t.json"); });
    CHECK_THAT(msg, Contains("t.json: a[1].b[0]...[0][0][0]: nested deeper than 64 levels"));
  }
  SECTION("the limit is a parameter") {
    CHECK_THROWS_WITH(parse_json("[[1]]", "s", JsonLimits{1}), Contains("nested deeper than 1"));
    CHECK(parse_json("[[1]]", "s", JsonLimits{2}) == nlohmann::json::array({{1}}));
  }
  SECTION("duplicate keys are refused, at any depth") {
    CHECK_THROWS_WITH(parse_json(R"({"x": {"y": [{"k": 1, "k": 1}]}})", "s"),
                      Contains("s: x.y[0].k: duplicate key \"k\""));
    CHECK(parse_json(R"({"k": {"k": 1}})", "s") == nlohmann::json{{"k", {{"k", 1}}}});
  }
  SECTION("syntax errors and overflowing numbers give source, position and path") {
    CHECK(message_of([] { parse_json("{\"a\": {\"b\": 1e400}}", "s"); }) ==
          "s: invalid JSON at byte 17, line 1, column 17 (in a.b): number overflow parsing "
          "'1e400'");
    CHECK_THAT(message_of([] { parse_json("{\"a\":\n  [1, 2,]}", "s"); }),
               Contains("s: invalid JSON at byte 15, line 2, column 9 (in a[2]): syntax error"));
    CHECK_THAT(message_of([] { parse_json("[1] x", "s"); }), Contains("expected end of input"));
    // nlohmann alone stops at a NUL byte and accepts what came before it.
    CHECK(message_of([] { parse_json(std::string("{}\0{", 4), "s"); }) ==
          "s: invalid JSON at byte 3, line 1, column 3: a NUL byte (JSON text holds none)");
  }
}

TEST_CASE("hostile input: a 100k-deep config file is refused cleanly", "[faults][config]") {
  TempDir dir("hostile_cfg");
  for (const std::string& text :
       {deep_array(kDeep), R"({"model": {"d_model": )" + deep_array(kDeep) + "}}"}) {
    const std::string path = write_text(dir, "deep.json", text);
    const auto r = run_bounded("config --check " + path);
    INFO(r.output.substr(0, 2000));
    CHECK(r.exit_code == 1);
    CHECK_THAT(r.output, Contains("error: " + path + ": "));
    CHECK_THAT(r.output, Contains(": nested deeper than 64 levels of arrays and objects"));
  }
}

TEST_CASE("hostile input: a 100k-deep --set value is refused cleanly", "[faults][config]") {
  SECTION("in process") {
    nlohmann::json j = nlohmann::json::object();
    for (const char* field : {"model.d_model", "data.tokenizer"}) {
      INFO(field);
      const std::string msg =
          message_of([&] { apply_override(j, std::string(field) + "=" + deep_array(kDeep)); });
      CHECK_THAT(msg, Contains("--set " + std::string(field) +
                               ": [0][0][0][0]...[0][0][0]: "
                               "nested deeper than 64 levels"));
    }
  }
  SECTION("through the CLI") {
    // One argument may be at most 128 KiB (MAX_ARG_STRLEN): 60k levels, closed.
    const auto r = run_bounded("config --check " + source_dir() +
                               "/configs/ci.json --set 'model.d_model=" + deep_array(60000) + "'");
    INFO(r.output.substr(0, 2000));
    CHECK(r.exit_code == 1);
    CHECK_THAT(r.output, Contains("error: --set model.d_model: [0][0][0][0]...[0][0][0]: nested "
                                  "deeper than 64 levels"));
  }
  SECTION("text that is not JSON is still taken as text") {
    nlohmann::json j = nlohmann::json::object();
    apply_override(j, "train.out_dir=[runs/x");
    CHECK(j["train"]["out_dir"] == "[runs/x");
  }
}

TEST_CASE("hostile input: a checkpoint with a 100k-deep trainer_state.json is refused cleanly",
          "[faults][checkpoint]") {
  TempDir dir("hostile_ckpt");
  const fs::path ck = dir.path / "step_00000001";
  fs::create_directories(ck);
  const std::string state =
      write_text(dir, "step_00000001/trainer_state.json",
                 R"({"format": "moetrain-checkpoint", "config": )" + deep_array(kDeep) + "}");
  const auto r = run_bounded("eval --checkpoint " + ck.string());
  INFO(r.output.substr(0, 2000));
  CHECK(r.exit_code == 1);
  CHECK_THAT(r.output, Contains("error: " + state +
                                ": config[0][0][0]...[0][0][0]: nested deeper "
                                "than 64 levels"));
}

TEST_CASE("hostile input: a 100k-deep tokenizer file is refused cleanly", "[faults][tokenizer]") {
  TempDir dir("hostile_tok");
  const std::string path =
      write_text(dir, "tokenizer.json", R"({"type": )" + deep_array(kDeep) + ", \"version\": 1}");
  CHECK_THROWS_WITH(Tokenizer::load(path),
                    Contains(path + ": type[0][0][0]...[0][0][0]: nested deeper than 64 levels"));
}

TEST_CASE("hostile input: a 100k-deep safetensors header is refused cleanly",
          "[faults][safetensors]") {
  TempDir dir("hostile_st");
  const std::string path = write_safetensors_header(
      dir, "deep.safetensors", R"({"__metadata__": {"k": )" + deep_array(kDeep) + "}}");
  std::map<std::string, std::string> metadata;
  CHECK_THROWS_WITH(load_safetensors(path, &metadata),
                    Contains(path + ": header: __metadata__.k[0][0]...[0][0][0]: nested deeper "
                                    "than 64 levels"));
  const std::string dup = write_safetensors_header(
      dir, "dup.safetensors",
      R"({"w": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}, "w": {}})");
  CHECK_THROWS_WITH(load_safetensors(dup), Contains(dup + ": header: w: duplicate key \"w\""));
}

TEST_CASE("hostile input: duplicate keys and overflowing numbers in a config name file and field",
          "[faults][config]") {
  TempDir dir("hostile_dup");
  SECTION("a repeated key is refused (it was: the last one won)") {
    const std::string path =
        write_text(dir, "dup.json", R"({"model": {"d_model": 0, "d_model": 64}})");
    const auto r = run_bounded("config --check " + path);
    CHECK(r.exit_code == 1);
    CHECK_THAT(r.output, Contains("error: " + path + ": model.d_model: duplicate key \"d_model\""));
  }
  SECTION("a repeated key in a --set value is refused") {
    const auto r = run_bounded("config --check " + source_dir() +
                               "/configs/ci.json --set 'train.out_dir={\"a\": 1, \"a\": 2}'");
    CHECK(r.exit_code == 1);
    CHECK_THAT(r.output, Contains("error: --set train.out_dir: a: duplicate key \"a\""));
  }
  SECTION("1e400") {
    const std::string path = write_text(dir, "big.json", "{\n  \"optim\": {\"lr\": 1e400}\n}\n");
    const auto r = run_bounded("config --check " + path);
    CHECK(r.exit_code == 1);
    CHECK_THAT(r.output, Contains("error: " + path +
                                  ": invalid JSON at byte 25, line 2, column 23 (in optim.lr): "
                                  "number overflow parsing '1e400'"));
  }
}

TEST_CASE("hostile input: config files that are not regular files or are too large",
          "[faults][config]") {
  TempDir dir("hostile_files");
  SECTION("/dev/zero") {
    const auto r = run_bounded("config --check /dev/zero");
    CHECK(r.exit_code == 1);
    CHECK_THAT(r.output, Contains("error: /dev/zero: cannot read config file: not a regular file "
                                  "(a character device)"));
  }
  SECTION("a FIFO without a writer") {
    const std::string fifo = dir.file("fifo.json");
    REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
    const auto r = run_bounded("config --check " + fifo);
    CHECK(r.exit_code == 1);
    CHECK_THAT(r.output, Contains(fifo + ": cannot read config file: not a regular file (a FIFO)"));
    CHECK_THROWS_WITH(read_json_file(fifo, "trainer state", 1 << 20),
                      Contains(fifo + ": cannot read trainer state: not a regular file (a FIFO)"));
  }
  SECTION("a directory") {
    CHECK_THROWS_WITH(
        read_json_file(dir.str(), "tokenizer file", 1 << 20),
        Contains(dir.str() + ": cannot read tokenizer file: not a regular file (a directory)"));
  }
  SECTION("above the size bound") {
    const std::string big = dir.file("big.json");
    std::ofstream(big) << "{}";
    fs::resize_file(big, kMaxConfigFileBytes + 1);  // sparse: costs no disk
    const auto r = run_bounded("config --check " + big);
    CHECK(r.exit_code == 1);
    CHECK_THAT(r.output, Contains(big + ": cannot read config file: 4194305 bytes, more than the 4 "
                                        "MiB allowed for a config file"));
    fs::resize_file(big, kMaxConfigFileBytes);  // at the bound: read (and found not to be JSON)
    CHECK_THAT(run_bounded("config --check " + big).output, Contains(big + ": invalid JSON"));
  }
}

namespace {

// `moetrain <base> --seed S` refuses each S as outside [0, 2^64 - 1], naming the flag.
void check_seeds_refused(const std::string& base, std::initializer_list<const char*> seeds) {
  for (const char* s : seeds) {
    INFO(s);
    const auto r = run_bounded(base + "--seed " + s);
    CHECK(r.exit_code != 0);
    CHECK_THAT(r.output, Contains("--seed") && Contains("expected a decimal integer in [0, "
                                                        "18446744073709551615]"));
  }
}

}  // namespace

TEST_CASE("hostile input: sample refuses non-finite temperatures and seeds above 2^64-1",
          "[faults][sample]") {
  const std::string base = "sample --checkpoint /nonexistent/ck --prompt x ";
  for (const char* t : {"nan", "inf", "-inf", "1e400", "-0.5"}) {
    INFO(t);
    const auto r = run_bounded(base + "--temperature " + t);
    CHECK(r.exit_code != 0);
    CHECK_THAT(r.output, Contains("--temperature") && Contains("expected a finite number >= 0"));
  }
  check_seeds_refused(base, {"18446744073709551616", "99999999999999999999999", "-1"});
  // The largest seed and a finite temperature pass the flags; the missing checkpoint stops it.
  const auto ok = run_bounded(base + "--temperature 0.5 --seed 18446744073709551615");
  CHECK(ok.exit_code == 1);
  CHECK_THAT(ok.output, Contains("--checkpoint '/nonexistent/ck'"));
}

TEST_CASE("hostile input: prepare-data refuses seeds above 2^64-1 and a nan val fraction",
          "[faults][prepare]") {
  const std::string base =
      "prepare-data --input /nonexistent/in --out /nonexistent/out --vocab-size 512 ";
  check_seeds_refused(base, {"18446744073709551616", "-1"});
  const auto nan = run_bounded(base + "--val-fraction nan");
  CHECK(nan.exit_code != 0);
  CHECK_THAT(nan.output, Contains("--val-fraction"));
  // The largest seed passes the flag; the missing input stops it.
  const auto ok = run_bounded(base + "--seed 18446744073709551615");
  CHECK(ok.exit_code == 1);
  CHECK_THAT(ok.output, Contains("/nonexistent/in"));
}

TEST_CASE("hostile input: eval of non-finite weights is an error, and the loss is printed in full",
          "[faults][eval]") {
  TempDir dir("hostile_eval");
  const std::string ck = short_run(dir);
  {  // A healthy checkpoint: the short form and the round-trip value agree.
    const auto r = run_bounded("eval --checkpoint " + ck);
    INFO(r.output);
    REQUIRE(r.exit_code == 0);
    const auto short_at = r.output.find(": val loss ");
    const auto full_at = r.output.find("; val loss ");
    REQUIRE(short_at != std::string::npos);
    REQUIRE(full_at != std::string::npos);
    const double shown = std::strtod(r.output.c_str() + short_at + 11, nullptr);
    char* end = nullptr;
    const double full = std::strtod(r.output.c_str() + full_at + 11, &end);
    const std::string full_text(r.output.c_str() + full_at + 11, static_cast<const char*>(end));
    CHECK(std::isfinite(full));
    CHECK(std::abs(full - shown) <= 0.5e-4);
    char buf[40];
    std::snprintf(buf, sizeof buf, "%.17g", full);
    CHECK(full_text == buf);  // every digit of the double
    CHECK(full_text.size() > 7);
  }
  {  // The same checkpoint with NaN weights (one training run for both: a second each).
    const std::string weights = (fs::path(ck) / "model.safetensors").string();
    TensorMap t = load_safetensors(weights);
    for (auto& [name, tensor] : t) {
      std::vector<float> v = tensor.to_f32();
      std::fill(v.begin(), v.end(), std::numeric_limits<float>::quiet_NaN());
      tensor = HostTensor::f32(tensor.shape, v.data());
    }
    save_safetensors(weights, t);
    const auto r = run_bounded("eval --checkpoint " + ck);
    INFO(r.output);
    CHECK(r.exit_code == 1);
    CHECK_THAT(r.output, Contains("error: " + ck + ": val loss is ") &&
                             Contains("the checkpoint's weights are not usable"));
    CHECK(r.output.find("perplexity") == std::string::npos);
  }
}

TEST_CASE("hostile input: a data.tokenizer that does not exist is refused at start-up",
          "[faults][train]") {
  TempDir dir("hostile_tokpath");
  const std::string run = dir.file("run");
  const std::string args =
      " train" + ci_args(run) + " --set train.steps=1 --set optim.warmup_steps=1";
  SECTION("a missing file") {
    const std::string missing = dir.file("no/tokenizer.json");
    const auto r = run_command(binary() + args + " --set data.tokenizer=" + missing);
    CHECK(r.exit_code == 1);
    CHECK_THAT(r.output, Contains("error: data.tokenizer: '" + missing + "': no such file") &&
                             Contains("or to \"\" to train without a tokenizer"));
    CHECK(!fs::exists(run));  // refused before anything was written
  }
  SECTION("a directory") {
    const auto r = run_command(binary() + args + " --set data.tokenizer=" + dir.str());
    CHECK(r.exit_code == 1);
    CHECK_THAT(r.output, Contains("data.tokenizer: '" + dir.str() + "': not a regular file"));
  }
  SECTION("empty: trains without one, and sample then asks for --tokenizer") {
    const auto r =
        run_command(binary() + args + " --set data.tokenizer= --set train.checkpoint_interval=1");
    INFO(r.output);
    REQUIRE(r.exit_code == 0);
    const fs::path ck = fs::path(run) / "checkpoints" / "step_00000001";
    CHECK(!fs::exists(fs::path(run) / "tokenizer.json"));
    CHECK(!fs::exists(ck / "tokenizer.json"));
    const auto s = run_bounded("sample --checkpoint " + ck.string() + " --prompt x");
    CHECK(s.exit_code == 1);
    CHECK_THAT(s.output, Contains("pass --tokenizer FILE"));
    const auto with =
        run_bounded("sample --checkpoint " + ck.string() + " --prompt x --tokenizer " +
                    prepared_corpus() + "/tokenizer.json --max-tokens 3");
    INFO(with.output);
    CHECK(with.exit_code == 0);
  }
}
