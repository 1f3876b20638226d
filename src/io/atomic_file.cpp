#include "moetrain/atomic_file.hpp"

#include "moetrain/fault_point.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <sstream>
#include <stdexcept>

namespace moetrain {

namespace {
std::runtime_error sys_error(const std::string& path, const char* what) {
  return std::runtime_error(path + ": " + what + ": " + std::strerror(errno));
}
}  // namespace

void fsync_directory(const std::string& dir) {
  const int fd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd < 0) throw sys_error(dir, "cannot open directory");
  ::fsync(fd);
  ::close(fd);
}

void write_file_atomically(const std::string& path,
                           const std::function<void(std::ostream&)>& write) {
  std::ostringstream buf;
  write(buf);
  const std::string data = std::move(buf).str();
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  file_fault_point(("write " + tmp).c_str());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) throw sys_error(tmp, "cannot create");
  std::size_t done = 0;
  while (done < data.size()) {
    const ssize_t n = ::write(fd, data.data() + done, data.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      const auto err = sys_error(tmp, "write failed");
      ::close(fd);
      ::unlink(tmp.c_str());
      throw err;
    }
    done += std::size_t(n);
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0) {
    const auto err = sys_error(tmp, "fsync/close failed");
    ::unlink(tmp.c_str());
    throw err;
  }
  file_fault_point(("rename " + tmp + " to " + path).c_str());
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const auto err = sys_error(path, "rename failed");
    ::unlink(tmp.c_str());
    throw err;
  }
  fsync_directory(std::filesystem::path(path).parent_path().string());
}

void write_text_atomically(const std::string& path, const std::string& text) {
  write_file_atomically(path, [&](std::ostream& os) { os << text; });
}

}  // namespace moetrain
