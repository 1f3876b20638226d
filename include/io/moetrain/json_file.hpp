// The one way moetrain reads JSON it did not build itself (configs, --set values, trainer state,
// tokenizers, safetensors headers; docs/design.md §7): nlohmann's SAX parser with a DOM builder of
// our own that bounds the nesting depth and refuses duplicate object keys, and error messages that
// name the source, the JSON path being parsed and, where there is one, the line and column.
// Nothing here dumps a value, so no input can make an error message recurse.
#pragma once

#include <cstddef>
#include <stdexcept>
#include <string>

#include <nlohmann/json.hpp>

namespace moetrain {

class JsonError : public std::runtime_error {
 public:
  enum class Kind {
    File,          // the file cannot be read, is not a regular file, or is too large
    Syntax,        // not JSON (including a number out of range, such as 1e400)
    TooDeep,       // nested deeper than JsonLimits::max_depth
    DuplicateKey,  // an object holds the same key twice
  };
  JsonError(Kind kind, const std::string& message) : std::runtime_error(message), kind_(kind) {}
  Kind kind() const { return kind_; }

 private:
  Kind kind_;
};

struct JsonLimits {
  // Open arrays and objects at once; the top-level value is level 1.
  std::size_t max_depth = 64;
};

// Parses `text` (one JSON value, nothing but whitespace after it). `source` names it in errors:
// a file name, or "--set model.d_model". Throws JsonError.
nlohmann::json parse_json(const std::string& text, const std::string& source,
                          const JsonLimits& limits = {});

// Reads and parses the regular file `path`, of at most `max_bytes` bytes; `what` names the kind of
// file in errors ("config file", "trainer state"). Directories, FIFOs and devices are refused
// before anything is read. Throws JsonError.
nlohmann::json read_json_file(const std::string& path, const std::string& what,
                              std::size_t max_bytes, const JsonLimits& limits = {});

// Reads the regular file `path` of at most `max_bytes` bytes, with read_json_file's checks and
// messages. Throws JsonError (Kind::File).
std::string read_bounded_file(const std::string& path, const std::string& what,
                              std::size_t max_bytes);

// `n` bytes for a message: "4 MiB" when a whole number of MiB, else "N bytes".
std::string describe_bytes(std::size_t n);

}  // namespace moetrain
