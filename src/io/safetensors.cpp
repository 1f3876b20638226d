#include "moetrain/safetensors.hpp"

#include <algorithm>
#include <cstring>
#include <fstream>
#include <stdexcept>
#include <tuple>
#include <vector>

#include <nlohmann/json.hpp>

#include "moetrain/atomic_file.hpp"
#include "moetrain/json_file.hpp"

namespace moetrain {

namespace {

std::size_t dtype_size(const std::string& dt) {
  if (dt == "F32" || dt == "I32") return 4;
  if (dt == "F64" || dt == "I64") return 8;
  return 0;
}

template <typename V>
HostTensor make(const char* dtype, std::vector<std::int64_t> shape, const V* values) {
  HostTensor t;
  t.dtype = dtype;
  t.shape = std::move(shape);
  t.data.resize(t.numel() * sizeof(V));
  if (!t.data.empty()) std::memcpy(t.data.data(), values, t.data.size());
  return t;
}

template <typename Out, typename In>
std::vector<Out> convert(const HostTensor& t) {
  std::vector<Out> out(t.numel());
  for (std::size_t i = 0; i < out.size(); ++i) {
    In v;
    std::memcpy(&v, t.data.data() + i * sizeof(In), sizeof(In));
    out[i] = Out(v);
  }
  return out;
}

}  // namespace

HostTensor HostTensor::f32(std::vector<std::int64_t> shape, const float* v) {
  return make("F32", std::move(shape), v);
}
HostTensor HostTensor::f64(std::vector<std::int64_t> shape, const double* v) {
  return make("F64", std::move(shape), v);
}
HostTensor HostTensor::i32(std::vector<std::int64_t> shape, const std::int32_t* v) {
  return make("I32", std::move(shape), v);
}
HostTensor HostTensor::i64(std::vector<std::int64_t> shape, const std::int64_t* v) {
  return make("I64", std::move(shape), v);
}

std::size_t HostTensor::numel() const {
  std::size_t n = 1;
  for (auto s : shape) n *= std::size_t(s);
  return n;
}

std::vector<double> HostTensor::to_f64() const {
  if (dtype == "F32") return convert<double, float>(*this);
  if (dtype == "F64") return convert<double, double>(*this);
  throw std::runtime_error("tensor of dtype " + dtype + " is not floating point");
}

std::vector<float> HostTensor::to_f32() const {
  if (dtype == "F32") return convert<float, float>(*this);
  if (dtype == "F64") return convert<float, double>(*this);
  throw std::runtime_error("tensor of dtype " + dtype + " is not floating point");
}

std::vector<std::int64_t> HostTensor::to_i64() const {
  if (dtype == "I32") return convert<std::int64_t, std::int32_t>(*this);
  if (dtype == "I64") return convert<std::int64_t, std::int64_t>(*this);
  throw std::runtime_error("tensor of dtype " + dtype + " is not an integer type");
}

void save_safetensors(const std::string& path, const TensorMap& tensors,
                      const std::map<std::string, std::string>& metadata) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::size_t off = 0;
  for (const auto& [name, t] : tensors) {
    if (dtype_size(t.dtype) == 0) throw std::runtime_error(path + ": unsupported dtype " + t.dtype);
    if (t.data.size() != t.numel() * dtype_size(t.dtype))
      throw std::runtime_error(path + ": tensor " + name + " has inconsistent size");
    header[name] = {
        {"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {off, off + t.data.size()}}};
    off += t.data.size();
  }
  std::string h = header.dump();
  h.append((8 - h.size() % 8) % 8, ' ');  // align the data section to 8 bytes
  write_file_atomically(path, [&](std::ostream& os) {
    const std::uint64_t n = h.size();
    unsigned char len[8];
    for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>(n >> (8 * i));
    os.write(reinterpret_cast<const char*>(len), 8);
    os.write(h.data(), std::streamsize(h.size()));
    for (const auto& [name, t] : tensors)
      os.write(reinterpret_cast<const char*>(t.data.data()), std::streamsize(t.data.size()));
  });
}

TensorMap load_safetensors(const std::string& path, std::map<std::string, std::string>* metadata) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  if (!f) throw std::runtime_error(path + ": cannot open for reading");
  const std::uint64_t size = std::uint64_t(f.tellg());
  f.seekg(0);
  unsigned char len[8];
  if (size < 8 || !f.read(reinterpret_cast<char*>(len), 8))
    throw std::runtime_error(path + ": truncated (no 8-byte header length)");
  std::uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= std::uint64_t(len[i]) << (8 * i);
  if (n > size - 8)
    throw std::runtime_error(path + ": truncated (header of " + std::to_string(n) +
                             " bytes, file of " + std::to_string(size) + ")");
  std::string h(n, '\0');
  f.read(h.data(), std::streamsize(n));
  const nlohmann::json header = parse_json(h, path + ": header");
  if (!header.is_object()) throw std::runtime_error(path + ": header is not a JSON object");
  const std::uint64_t data_size = size - 8 - n;
  std::vector<std::uint8_t> data(data_size);
  if (data_size && !f.read(reinterpret_cast<char*>(data.data()), std::streamsize(data_size)))
    throw std::runtime_error(path + ": read error");

  TensorMap out;
  std::vector<std::tuple<std::uint64_t, std::uint64_t, std::string>> spans;  // [begin, end), name
  for (const auto& [name, e] : header.items()) {
    if (name == "__metadata__") {
      if (metadata && e.is_object())
        for (const auto& [k, v] : e.items())
          (*metadata)[k] = v.is_string() ? v.get<std::string>() : v.dump();
      continue;
    }
    const std::string where = path + ": tensor '" + name + "'";
    if (!e.is_object() || !e.contains("dtype") || !e.contains("shape") ||
        !e.contains("data_offsets"))
      throw std::runtime_error(where + ": expected {dtype, shape, data_offsets}");
    HostTensor t;
    try {
      t.dtype = e.at("dtype").get<std::string>();
      t.shape = e.at("shape").get<std::vector<std::int64_t>>();
    } catch (const std::exception&) {
      throw std::runtime_error(where + ": malformed dtype or shape");
    }
    const auto offs = e.at("data_offsets");
    if (!offs.is_array() || offs.size() != 2 || !offs[0].is_number_unsigned() ||
        !offs[1].is_number_unsigned())
      throw std::runtime_error(where + ": data_offsets must be two non-negative integers");
    const std::uint64_t b = offs[0].get<std::uint64_t>(), end = offs[1].get<std::uint64_t>();
    if (dtype_size(t.dtype) == 0)
      throw std::runtime_error(where + ": unsupported dtype " + t.dtype);
    for (auto s : t.shape)
      if (s < 0) throw std::runtime_error(where + ": negative dimension");
    if (b > end || end > data_size)
      throw std::runtime_error(where + ": data_offsets [" + std::to_string(b) + ", " +
                               std::to_string(end) + ") outside the " + std::to_string(data_size) +
                               " data bytes (truncated file?)");
    std::uint64_t bytes = dtype_size(t.dtype);
    for (auto s : t.shape)
      if (__builtin_mul_overflow(bytes, std::uint64_t(s), &bytes))
        throw std::runtime_error(where + ": shape too large");
    if (end - b != bytes)
      throw std::runtime_error(where + ": data_offsets do not match dtype and shape");
    t.data.assign(data.begin() + std::ptrdiff_t(b), data.begin() + std::ptrdiff_t(end));
    spans.emplace_back(b, end, name);
    out.emplace(name, std::move(t));
  }
  // The tensors must tile the data region exactly: no overlap (two tensors on the same bytes), no
  // gap, nothing past the last one.
  std::sort(spans.begin(), spans.end());
  std::uint64_t at = 0;
  for (const auto& [b, end, name] : spans) {
    if (b < at)
      throw std::runtime_error(path + ": tensor '" + name +
                               "' overlaps the bytes of another tensor");
    if (b > at)
      throw std::runtime_error(path + ": data bytes [" + std::to_string(at) + ", " +
                               std::to_string(b) + ") belong to no tensor");
    at = end;
  }
  if (at != data_size)
    throw std::runtime_error(path + ": tensors cover " + std::to_string(at) + " of " +
                             std::to_string(data_size) + " data bytes");
  return out;
}

}  // namespace moetrain
