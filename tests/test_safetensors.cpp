// The safetensors format (docs/design.md §7): round trips, the byte layout parsed independently,
// errors that name the file, atomic writes, and a file read back by json + numpy in Debian's
// python.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "moetrain/safetensors.hpp"
#include "test_util.hpp"

using namespace moetrain;
using moetrain::test::TempDir;
namespace fs = std::filesystem;

namespace {

std::vector<std::uint8_t> read_bytes(const std::string& p) {
  std::ifstream in(p, std::ios::binary);
  return std::vector<std::uint8_t>(std::istreambuf_iterator<char>(in),
                                   std::istreambuf_iterator<char>());
}

void write_bytes(const std::string& p, const std::vector<std::uint8_t>& b) {
  std::ofstream out(p, std::ios::binary);
  out.write(reinterpret_cast<const char*>(b.data()), std::streamsize(b.size()));
}

// A file in the safetensors layout, built by hand: 8-byte LE length, header, data.
std::vector<std::uint8_t> make_file(const std::string& header,
                                    const std::vector<std::uint8_t>& data,
                                    std::uint64_t length_field) {
  std::vector<std::uint8_t> b;
  for (int i = 0; i < 8; ++i) b.push_back(std::uint8_t(length_field >> (8 * i)));
  b.insert(b.end(), header.begin(), header.end());
  b.insert(b.end(), data.begin(), data.end());
  return b;
}
std::vector<std::uint8_t> make_file(const std::string& header,
                                    const std::vector<std::uint8_t>& data) {
  return make_file(header, data, header.size());
}

// Little-endian bytes of a value, assembled by shifts (independent of the host's byte order).
template <typename U>
std::vector<std::uint8_t> le_bytes(U bits) {
  std::vector<std::uint8_t> b;
  for (std::size_t i = 0; i < sizeof(U); ++i) b.push_back(std::uint8_t(bits >> (8 * i)));
  return b;
}
std::vector<std::uint8_t> le(float v) {
  std::uint32_t u;
  std::memcpy(&u, &v, 4);
  return le_bytes(u);
}
std::vector<std::uint8_t> le(double v) {
  std::uint64_t u;
  std::memcpy(&u, &v, 8);
  return le_bytes(u);
}
std::vector<std::uint8_t> le(std::int32_t v) {
  return le_bytes(std::uint32_t(v));
}
std::vector<std::uint8_t> le(std::int64_t v) {
  return le_bytes(std::uint64_t(v));
}

template <typename V>
std::vector<std::uint8_t> le_all(const std::vector<V>& v) {
  std::vector<std::uint8_t> out;
  for (V x : v) {
    const auto b = le(x);
    out.insert(out.end(), b.begin(), b.end());
  }
  return out;
}

struct Sample {
  std::vector<float> f32 = {1.5f, -2.25f, 3e-8f, 1e30f, 0.0f, -0.0f};
  std::vector<double> f64 = {3.141592653589793, -1e-300, 2.5e300, 7.0};
  std::vector<std::int32_t> i32 = {0, -1, 2147483647, -2147483647 - 1, 42};
  std::vector<std::int64_t> i64 = {std::int64_t(1) << 62, -5, 0};
  TensorMap tensors() const {
    TensorMap t;
    t["layers.0.w"] = HostTensor::f32({2, 3}, f32.data());
    t["b.f64"] = HostTensor::f64({4}, f64.data());
    t["ints"] = HostTensor::i32({5, 1}, i32.data());
    t["step"] = HostTensor::i64({3}, i64.data());
    return t;
  }
};

// A small valid file (one F32 tensor [2, 2]) and its header and data, for corruption tests.
const std::vector<float> kFour = {1, 2, 3, 4};
std::string four_header(const std::string& dtype = "F32", const std::string& shape = "[2,2]",
                        const std::string& offsets = "[0,16]") {
  return R"({"w":{"dtype":")" + dtype + R"(","shape":)" + shape + R"(,"data_offsets":)" + offsets +
         "}}";
}

}  // namespace

TEST_CASE("safetensors: round trip of F32/F64/I32/I64 with metadata", "[io]") {
  TempDir dir("safetensors");
  const std::string path = dir.file("model.safetensors");
  const Sample s;
  const std::map<std::string, std::string> meta = {{"format", "pt"}, {"step", "17"}};
  save_safetensors(path, s.tensors(), meta);
  std::map<std::string, std::string> meta_back;
  const TensorMap back = load_safetensors(path, &meta_back);
  CHECK(meta_back == meta);
  const TensorMap orig = s.tensors();
  REQUIRE(back.size() == orig.size());
  for (const auto& [name, t] : orig) {
    INFO(name);
    REQUIRE(back.count(name) == 1);
    CHECK(back.at(name).dtype == t.dtype);
    CHECK(back.at(name).shape == t.shape);
    CHECK(back.at(name).data == t.data);
  }
  // Values, including the float special cases, compared bit for bit through the accessors.
  const std::vector<float> f = back.at("layers.0.w").to_f32();
  REQUIRE(f.size() == s.f32.size());
  CHECK(std::memcmp(f.data(), s.f32.data(), f.size() * sizeof(float)) == 0);
  CHECK(back.at("b.f64").to_f64() == s.f64);
  CHECK(back.at("ints").to_i64() == std::vector<std::int64_t>(s.i32.begin(), s.i32.end()));
  CHECK(back.at("step").to_i64() == s.i64);
  // Without a metadata sink the file still loads.
  CHECK(load_safetensors(path).size() == orig.size());
}

TEST_CASE("safetensors: empty tensors, scalars and an empty map round trip", "[io]") {
  TempDir dir("safetensors");
  TensorMap t;
  const float one = 1.0f;
  t["scalar"] = HostTensor::f32({}, &one);
  t["empty"] = HostTensor::f64({0, 3}, nullptr);
  save_safetensors(dir.file("a.safetensors"), t);
  const TensorMap back = load_safetensors(dir.file("a.safetensors"));
  REQUIRE(back.size() == 2);
  CHECK(back.at("scalar").shape.empty());
  CHECK(back.at("scalar").to_f32() == std::vector<float>{1.0f});
  CHECK(back.at("empty").shape == std::vector<std::int64_t>{0, 3});
  CHECK(back.at("empty").numel() == 0);
  save_safetensors(dir.file("b.safetensors"), {});
  CHECK(load_safetensors(dir.file("b.safetensors")).empty());
}

TEST_CASE("safetensors: the bytes follow the format spec", "[io]") {
  TempDir dir("safetensors");
  const std::string path = dir.file("layout.safetensors");
  const Sample s;
  save_safetensors(path, s.tensors(), {{"format", "pt"}});
  const std::vector<std::uint8_t> bytes = read_bytes(path);
  REQUIRE(bytes.size() >= 8);
  std::uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= std::uint64_t(bytes[std::size_t(i)]) << (8 * i);
  REQUIRE(8 + n <= bytes.size());
  const std::string header(bytes.begin() + 8, bytes.begin() + 8 + std::ptrdiff_t(n));
  CHECK(header.front() == '{');  // the Rust loader requires the header to start with '{'
  const nlohmann::json h = nlohmann::json::parse(header);  // trailing spaces are allowed
  const std::size_t data_start = 8 + n;
  const std::size_t data_size = bytes.size() - data_start;

  CHECK(h.at("__metadata__") == nlohmann::json{{"format", "pt"}});
  struct Expect {
    std::string name, dtype;
    std::vector<std::int64_t> shape;
    std::vector<std::uint8_t> data;
  };
  const std::vector<Expect> expect = {
      {"layers.0.w", "F32", {2, 3}, le_all(s.f32)},
      {"b.f64", "F64", {4}, le_all(s.f64)},
      {"ints", "I32", {5, 1}, le_all(s.i32)},
      {"step", "I64", {3}, le_all(s.i64)},
  };
  CHECK(h.size() == expect.size() + 1);
  // Intervals must tile [0, data_size) with no gap and no overlap.
  std::vector<std::pair<std::uint64_t, std::uint64_t>> spans;
  for (const Expect& e : expect) {
    INFO(e.name);
    const nlohmann::json& t = h.at(e.name);
    CHECK(t.at("dtype") == e.dtype);
    CHECK(t.at("shape").get<std::vector<std::int64_t>>() == e.shape);
    const auto off = t.at("data_offsets").get<std::vector<std::uint64_t>>();
    REQUIRE(off.size() == 2);
    REQUIRE(off[0] <= off[1]);
    REQUIRE(off[1] <= data_size);
    const std::vector<std::uint8_t> got(bytes.begin() + std::ptrdiff_t(data_start + off[0]),
                                        bytes.begin() + std::ptrdiff_t(data_start + off[1]));
    CHECK(got == e.data);
    spans.emplace_back(off[0], off[1]);
  }
  std::sort(spans.begin(), spans.end());
  std::uint64_t at = 0;
  for (const auto& [b, e] : spans) {
    CHECK(b == at);
    at = e;
  }
  CHECK(at == data_size);
}

TEST_CASE("safetensors: errors name the file", "[io]") {
  TempDir dir("safetensors");
  const std::vector<std::uint8_t> four = le_all(kFour);

  SECTION("missing file") {
    const std::string path = dir.file("nope.safetensors");
    REQUIRE_THROWS_WITH(load_safetensors(path), Catch::StartsWith(path));
  }
  SECTION("a directory instead of a file") {
    REQUIRE_THROWS_WITH(load_safetensors(dir.path.string()), Catch::Contains(dir.path.string()));
  }
  SECTION("truncated at several points") {
    const std::string good = dir.file("good.safetensors");
    save_safetensors(good, Sample().tensors());
    const std::vector<std::uint8_t> bytes = read_bytes(good);
    std::uint64_t n = 0;
    for (int i = 0; i < 8; ++i) n |= std::uint64_t(bytes[std::size_t(i)]) << (8 * i);
    const std::size_t cuts[] = {0,
                                3,
                                7,  // inside the length
                                8,
                                8 + std::size_t(n) / 2,
                                8 + std::size_t(n) - 1,  // inside the header
                                8 + std::size_t(n) + 1,
                                bytes.size() / 2 + 8 + std::size_t(n) / 2,
                                bytes.size() - 1};  // inside the data
    for (const std::size_t cut : cuts) {
      INFO("cut at " << cut << " of " << bytes.size());
      REQUIRE(cut < bytes.size());
      const std::string path = dir.file("cut_" + std::to_string(cut) + ".safetensors");
      write_bytes(path,
                  std::vector<std::uint8_t>(bytes.begin(), bytes.begin() + std::ptrdiff_t(cut)));
      REQUIRE_THROWS_WITH(load_safetensors(path), Catch::StartsWith(path));
    }
  }
  SECTION("header length larger than the file") {
    const std::string path = dir.file("long.safetensors");
    write_bytes(path, make_file(four_header(), four, 1000));
    REQUIRE_THROWS_WITH(load_safetensors(path), Catch::StartsWith(path));
    // A length near 2^64 must not wrap around in the size arithmetic.
    write_bytes(path, make_file(four_header(), four, ~std::uint64_t(0) - 4));
    REQUIRE_THROWS_WITH(load_safetensors(path), Catch::StartsWith(path));
  }
  SECTION("invalid JSON") {
    const std::string path = dir.file("json.safetensors");
    write_bytes(path, make_file(R"({"w":{"dtype":"F32",)", four));
    REQUIRE_THROWS_WITH(load_safetensors(path), Catch::StartsWith(path));
  }
  SECTION("a header that is not an object, or an entry that is not a tensor") {
    const std::string path = dir.file("shape.safetensors");
    write_bytes(path, make_file("[1,2,3]", {}));
    REQUIRE_THROWS_WITH(load_safetensors(path), Catch::StartsWith(path));
    write_bytes(path, make_file(R"({"w":{"dtype":"F32","shape":[4]}})", four));
    REQUIRE_THROWS_WITH(load_safetensors(path), Catch::StartsWith(path) && Catch::Contains("w"));
  }
  SECTION("offsets out of range") {
    const std::string path = dir.file("range.safetensors");
    write_bytes(path, make_file(four_header("F32", "[2,2]", "[8,24]"), four));
    REQUIRE_THROWS_WITH(load_safetensors(path), Catch::StartsWith(path) && Catch::Contains("'w'"));
    write_bytes(path, make_file(four_header("F32", "[2,2]", "[16,0]"), four));
    REQUIRE_THROWS_WITH(load_safetensors(path), Catch::StartsWith(path) && Catch::Contains("'w'"));
    write_bytes(path, make_file(four_header("F32", "[2,2]", "[-4,12]"), four));
    REQUIRE_THROWS_WITH(load_safetensors(path), Catch::StartsWith(path) && Catch::Contains("'w'"));
  }
  SECTION("offsets that do not match dtype * shape") {
    const std::string path = dir.file("size.safetensors");
    write_bytes(path, make_file(four_header("F32", "[2,3]"), four));  // 24 bytes expected
    REQUIRE_THROWS_WITH(load_safetensors(path), Catch::StartsWith(path) && Catch::Contains("'w'"));
    write_bytes(path, make_file(four_header("F64", "[2,2]"), four));  // 32 bytes expected
    REQUIRE_THROWS_WITH(load_safetensors(path), Catch::StartsWith(path) && Catch::Contains("'w'"));
  }
  SECTION("data not covered by any tensor") {
    const std::string path = dir.file("gap.safetensors");
    std::vector<std::uint8_t> extra = four;
    extra.insert(extra.end(), {0, 0, 0, 0});
    write_bytes(path, make_file(four_header(), extra));
    REQUIRE_THROWS_WITH(load_safetensors(path), Catch::StartsWith(path));
  }
  SECTION("unsupported dtype") {
    const std::string path = dir.file("dtype.safetensors");
    write_bytes(path, make_file(four_header("BF16", "[2,4]"), four));
    REQUIRE_THROWS_WITH(load_safetensors(path), Catch::StartsWith(path) && Catch::Contains("'w'") &&
                                                    Catch::Contains("BF16"));
  }
  SECTION("a hand-built valid file loads (the corruption tests start from a good base)") {
    const std::string path = dir.file("ok.safetensors");
    write_bytes(path, make_file(four_header(), four));
    const TensorMap t = load_safetensors(path);
    CHECK(t.at("w").to_f32() == kFour);
  }
}

TEST_CASE("safetensors: a failed write throws and loses nothing", "[io]") {
  TempDir dir("safetensors");
  const Sample s;
  auto listing = [&] {
    std::set<std::string> names;
    for (const auto& e : fs::directory_iterator(dir.path)) names.insert(e.path().filename());
    return names;
  };

  SECTION("target directory missing") {
    const std::string path = (dir.path / "no_such_dir" / "model.safetensors").string();
    REQUIRE_THROWS_WITH(save_safetensors(path, s.tensors()), Catch::Contains(path));
    CHECK(listing().empty());
  }
  SECTION("an existing file survives a write that fails before any byte is written") {
    const std::string path = dir.file("model.safetensors");
    save_safetensors(path, s.tensors());
    const std::vector<std::uint8_t> before = read_bytes(path);
    TensorMap bad = s.tensors();
    bad["broken"].dtype = "F32";
    bad["broken"].shape = {3};
    bad["broken"].data = {1, 2, 3};  // 3 bytes for 3 floats
    REQUIRE_THROWS_WITH(save_safetensors(path, bad), Catch::StartsWith(path));
    TensorMap odd = s.tensors();
    odd["half"].dtype = "F16";
    odd["half"].shape = {1};
    odd["half"].data = {0, 0};
    REQUIRE_THROWS_WITH(save_safetensors(path, odd), Catch::StartsWith(path));
    CHECK(read_bytes(path) == before);
    CHECK(listing() == std::set<std::string>{"model.safetensors"});
  }
  SECTION("an existing directory at the target survives a failed rename") {
    // The final rename fails (a directory is in the way): nothing is replaced and no temporary
    // file is left behind.
    const std::string path = dir.file("model.safetensors");
    fs::create_directories(path);
    std::ofstream(dir.path / "model.safetensors" / "keep.txt") << "precious";
    REQUIRE_THROWS_WITH(save_safetensors(path, s.tensors()), Catch::Contains(path));
    CHECK(fs::is_directory(path));
    CHECK(read_bytes((dir.path / "model.safetensors" / "keep.txt").string()).size() == 8);
    CHECK(listing() == std::set<std::string>{"model.safetensors"});
  }
  SECTION("overwriting replaces the whole file") {
    const std::string path = dir.file("model.safetensors");
    save_safetensors(path, s.tensors());
    TensorMap small;
    const double x = 2.0;
    small["x"] = HostTensor::f64({1}, &x);
    save_safetensors(path, small);
    const TensorMap back = load_safetensors(path);
    REQUIRE(back.size() == 1);
    CHECK(back.at("x").to_f64() == std::vector<double>{2.0});
    CHECK(listing() == std::set<std::string>{"model.safetensors"});
  }
}

TEST_CASE("safetensors: Debian's python3 reads our file with json + numpy", "[io]") {
  TempDir dir("safetensors");
  const std::string path = dir.file("py.safetensors");
  std::vector<float> v(12);
  for (int i = 0; i < 12; ++i) v[std::size_t(i)] = 0.25f * float(i) - 1.0f;
  TensorMap t;
  t["w"] = HostTensor::f32({3, 4}, v.data());
  const std::int64_t step = 9;
  t["step"] = HostTensor::i64({1}, &step);
  save_safetensors(path, t, {{"format", "pt"}});

  const int has_numpy = std::system("/usr/bin/python3 -c 'import numpy' 2>/dev/null");
  if (has_numpy != 0)
    FAIL(
        "/usr/bin/python3 with numpy is required (Debian: apt-get install python3-numpy); "
        "docs/design.md §7 promises that json + numpy can read our checkpoints");

  // Expected values written independently in python: w[i][j] = 0.25 * (4 i + j) - 1.
  const std::string script =
      "import json, struct, sys, numpy as np\n"
      "b = open(sys.argv[1], 'rb').read()\n"
      "n = struct.unpack('<Q', b[:8])[0]\n"
      "h = json.loads(b[8:8 + n])\n"
      "d = b[8 + n:]\n"
      "e = h['w']\n"
      "s, t = e['data_offsets']\n"
      "w = np.frombuffer(d[s:t], dtype='<f4').reshape(e['shape'])\n"
      "ref = np.array([[0.25 * (4 * i + j) - 1 for j in range(4)] for i in range(3)], "
      "dtype=np.float32)\n"
      "s2, t2 = h['step']['data_offsets']\n"
      "step = np.frombuffer(d[s2:t2], dtype='<i8')\n"
      "ok = (e['dtype'] == 'F32' and e['shape'] == [3, 4] and w.shape == (3, 4)\n"
      "      and np.array_equal(w, ref) and h['step']['dtype'] == 'I64' and list(step) == [9]\n"
      "      and h['__metadata__'] == {'format': 'pt'})\n"
      "sys.exit(0 if ok else 1)\n";
  const std::string script_path = dir.file("check.py");
  std::ofstream(script_path) << script;
  const int rc = std::system(("/usr/bin/python3 " + script_path + " " + path).c_str());
  CHECK(rc == 0);
}
