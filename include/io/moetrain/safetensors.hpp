// The safetensors format: an 8-byte little-endian header length, a JSON header mapping each
// tensor name to {dtype, shape, data_offsets}, then the raw little-endian data. Loadable by the
// `safetensors` Python package, or by json + numpy.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace moetrain {

struct HostTensor {
  std::string dtype;  // "F32", "F64", "I32", "I64"
  std::vector<std::int64_t> shape;
  std::vector<std::uint8_t> data;  // raw little-endian bytes

  static HostTensor f32(std::vector<std::int64_t> shape, const float* values);
  static HostTensor f64(std::vector<std::int64_t> shape, const double* values);
  static HostTensor i32(std::vector<std::int64_t> shape, const std::int32_t* values);
  static HostTensor i64(std::vector<std::int64_t> shape, const std::int64_t* values);
  std::size_t numel() const;
  // Values converted to double / float (F32 or F64 only) and to int64 (I32 or I64 only).
  std::vector<double> to_f64() const;
  std::vector<float> to_f32() const;
  std::vector<std::int64_t> to_i64() const;
};

using TensorMap = std::map<std::string, HostTensor>;

// Writes `path` atomically (temporary name, fsync, rename). `metadata` goes to "__metadata__".
void save_safetensors(const std::string& path, const TensorMap& tensors,
                      const std::map<std::string, std::string>& metadata = {});
// Reads and validates a file (header size, JSON, offsets covering the data exactly); errors are
// std::runtime_error starting with the path.
TensorMap load_safetensors(const std::string& path,
                           std::map<std::string, std::string>* metadata = nullptr);

}  // namespace moetrain
