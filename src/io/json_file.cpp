// JSON reading with bounded nesting, no duplicate keys and located errors (json_file.hpp).
#include "moetrain/json_file.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <utility>
#include <vector>

namespace moetrain {
namespace {

using nlohmann::json;

// `s` cut to at most `max` bytes (on a UTF-8 boundary), "..." marking the cut.
std::string cut_short(std::string s, std::size_t max) {
  if (s.size() <= max) return s;
  std::size_t cut = max - 3;
  while (cut > 0 && (static_cast<unsigned char>(s[cut]) & 0xC0) == 0x80) --cut;
  return s.substr(0, cut) + "...";
}

// Builds the DOM from nlohmann's SAX events, as nlohmann's own DOM parser does, but refuses two
// things that one accepts: nesting beyond the limit and repeated keys. It also knows, at every
// event, the JSON path of the value being parsed, for the error messages.
class BoundedDomBuilder final : public nlohmann::json_sax<json> {
 public:
  BoundedDomBuilder(const std::string& text, const std::string& source, const JsonLimits& limits)
      : text_(text), source_(source), limits_(limits) {}

  json take() { return std::move(root_); }

  bool null() override { return place(json(nullptr)) != nullptr; }
  bool boolean(bool v) override { return place(json(v)) != nullptr; }
  bool number_integer(number_integer_t v) override { return place(json(v)) != nullptr; }
  bool number_unsigned(number_unsigned_t v) override { return place(json(v)) != nullptr; }
  bool number_float(number_float_t v, const string_t&) override {
    return place(json(v)) != nullptr;
  }
  bool string(string_t& v) override { return place(json(std::move(v))) != nullptr; }
  bool binary(binary_t& v) override { return place(json(std::move(v))) != nullptr; }

  bool start_object(std::size_t) override { return open(json::object()); }
  bool start_array(std::size_t) override { return open(json::array()); }
  bool end_object() override { return close(); }
  bool end_array() override { return close(); }

  bool key(string_t& k) override {
    Level& level = levels_.back();
    level.key = k;
    level.has_key = true;
    if (level.node->contains(k)) {
      throw JsonError(JsonError::Kind::DuplicateKey,
                      source_ + ": " + path() + ": duplicate key \"" + cut_short(k, kMaxKey) +
                          "\" (an object may hold a key once)");
    }
    slot_ = &(*level.node)[k];
    return true;
  }

  bool parse_error(std::size_t position, const std::string&,
                   const nlohmann::detail::exception& e) override {
    // e.what(): "[json.exception.parse_error.101] parse error at line L, column C: <detail>", or
    // "[json.exception.out_of_range.406] number overflow parsing '1e400'" (no location).
    std::string detail = e.what();
    if (const auto p = detail.find("] ");
        detail.rfind("[json.exception.", 0) == 0 && p != detail.npos)
      detail = detail.substr(p + 2);
    std::size_t line = 0, column = 0;
    int consumed = 0;
    if (detail.rfind("parse error", 0) == 0) {
      detail = detail.substr(std::strlen("parse error"));
      if (std::sscanf(detail.c_str(), " at line %zu, column %zu: %n", &line, &column, &consumed) ==
              2 &&
          consumed > 0) {
        detail = detail.substr(std::size_t(consumed));
      } else {
        line = 0;
        if (detail.rfind(": ", 0) == 0) detail = detail.substr(2);
      }
    }
    if (line == 0) locate(position, line, column);
    syntax_error(position, line, column, detail);
  }

  // A syntax error at byte `position` (1-based) found before parsing.
  [[noreturn]] void fail_at(std::size_t position, const std::string& detail) const {
    std::size_t line = 0, column = 0;
    locate(position, line, column);
    syntax_error(position, line, column, detail);
  }

 private:
  static constexpr std::size_t kMaxKey = 40, kMaxDetail = 200, kPathHead = 4, kPathTail = 3;

  struct Level {
    json* node;  // an array or object under construction
    std::string key;
    bool has_key = false;
  };

  [[noreturn]] void syntax_error(std::size_t position, std::size_t line, std::size_t column,
                                 const std::string& detail) const {
    std::string in;
    if (!levels_.empty()) in = " (in " + path() + ")";
    throw JsonError(JsonError::Kind::Syntax,
                    source_ + ": invalid JSON at byte " + std::to_string(position) + ", line " +
                        std::to_string(line) + ", column " + std::to_string(column) + in + ": " +
                        cut_short(detail, kMaxDetail));
  }

  // Puts `v` where the next value goes; returns where it went.
  json* place(json&& v) {
    if (levels_.empty()) {
      root_ = std::move(v);
      return &root_;
    }
    json& top = *levels_.back().node;
    if (top.is_array()) {
      top.push_back(std::move(v));
      return &top.back();
    }
    *slot_ = std::move(v);
    return slot_;
  }

  bool open(json&& container) {
    if (levels_.size() >= limits_.max_depth) {
      throw JsonError(JsonError::Kind::TooDeep, source_ + ": " + path() + ": nested deeper than " +
                                                    std::to_string(limits_.max_depth) +
                                                    " levels of arrays and objects");
    }
    json* node = place(std::move(container));
    levels_.push_back(Level{node, {}, false});
    return true;
  }

  bool close() {
    levels_.pop_back();
    return true;
  }

  // The JSON path of the value being parsed (model.moe.top_k, layers[3]), "top level" outside
  // every container; a long one keeps its first and last components.
  std::string path() const {
    struct Part {
      std::string text;
      bool is_key;
    };
    std::vector<Part> parts;
    for (std::size_t i = 0; i < levels_.size(); ++i) {
      const json& node = *levels_[i].node;
      if (node.is_array()) {
        // An open child is the last element; else the element being parsed comes next.
        const std::size_t index = i + 1 < levels_.size() ? node.size() - 1 : node.size();
        std::string text(1, '[');  // (not "[" + ...: GCC 12 warns falsely, -Wrestrict)
        text += std::to_string(index);
        text += ']';
        parts.push_back({std::move(text), false});
      } else if (levels_[i].has_key) {
        parts.push_back({cut_short(levels_[i].key, kMaxKey), true});
      }
    }
    if (parts.empty()) return "top level";
    std::string s;
    bool after_cut = false;
    for (std::size_t i = 0; i < parts.size(); ++i) {
      if (parts.size() > kPathHead + kPathTail + 1 && i == kPathHead) {
        s.append("...");
        after_cut = true;
        i = parts.size() - kPathTail - 1;
        continue;
      }
      if (parts[i].is_key && !s.empty() && !after_cut) s.push_back('.');
      s.append(parts[i].text);
      after_cut = false;
    }
    return s;
  }

  // Line and column (1-based) of byte `position` (1-based: the last byte read) of the text.
  void locate(std::size_t position, std::size_t& line, std::size_t& column) const {
    const std::size_t end = std::min(position, text_.size());
    line = 1;
    std::size_t line_start = 0;
    for (std::size_t i = 0; i + 1 < end; ++i) {
      if (text_[i] == '\n') {
        ++line;
        line_start = i + 1;
      }
    }
    column = end - line_start;
  }

  const std::string& text_;
  const std::string& source_;
  const JsonLimits& limits_;
  json root_;
  std::vector<Level> levels_;
  json* slot_ = nullptr;  // the object member whose key was just read
};

const char* file_kind(mode_t mode) {
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISFIFO(mode)) return "a FIFO";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  if (S_ISSOCK(mode)) return "a socket";
  return "not a plain file";
}

[[noreturn]] void file_error(const std::string& path, const std::string& what,
                             const std::string& why) {
  throw JsonError(JsonError::Kind::File, path + ": cannot read " + what + ": " + why);
}

struct Fd {
  int fd;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

}  // namespace

std::string describe_bytes(std::size_t n) {
  constexpr std::size_t kMiB = std::size_t(1) << 20;
  if (n >= kMiB && n % kMiB == 0) return std::to_string(n / kMiB) + " MiB";
  return std::to_string(n) + " bytes";
}

json parse_json(const std::string& text, const std::string& source, const JsonLimits& limits) {
  BoundedDomBuilder builder(text, source, limits);
  // nlohmann's lexer takes a NUL byte for the end of the input, so "{}\0<anything>" would pass;
  // JSON text holds none (not even in a string), so the first one is a syntax error.
  if (const auto nul = text.find('\0'); nul != std::string::npos)
    builder.fail_at(nul + 1, "a NUL byte (JSON text holds none)");
  json::sax_parse(text, &builder, nlohmann::detail::input_format_t::json, /*strict=*/true);
  return builder.take();
}

std::string read_bounded_file(const std::string& path, const std::string& what,
                              std::size_t max_bytes) {
  // O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below.
  const Fd f{::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC)};
  if (f.fd < 0) file_error(path, what, std::strerror(errno));
  struct stat st {};
  if (::fstat(f.fd, &st) != 0) file_error(path, what, std::strerror(errno));
  if (!S_ISREG(st.st_mode))
    file_error(path, what, std::string("not a regular file (") + file_kind(st.st_mode) + ")");
  const auto too_large = [&](const std::string& size) {
    file_error(path, what,
               size + ", more than the " + describe_bytes(max_bytes) + " allowed for a " + what);
  };
  if (std::uint64_t(st.st_size) > max_bytes) too_large(std::to_string(st.st_size) + " bytes");
  std::string text(std::size_t(st.st_size), '\0');
  std::size_t got = 0;
  for (;;) {
    if (got == text.size()) {
      if (text.size() > max_bytes) too_large("over " + describe_bytes(max_bytes));
      text.resize(std::min(text.size() + 65536, max_bytes + 1));  // the file may have grown
    }
    const ssize_t n = ::read(f.fd, text.data() + got, text.size() - got);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) file_error(path, what, std::strerror(errno));
    if (n == 0) break;
    got += std::size_t(n);
  }
  text.resize(got);
  return text;
}

json read_json_file(const std::string& path, const std::string& what, std::size_t max_bytes,
                    const JsonLimits& limits) {
  return parse_json(read_bounded_file(path, what, max_bytes), path, limits);
}

}  // namespace moetrain
