// Crash-safe file writes: the content goes to a temporary name in the same directory, is fsynced,
// then renamed over the target (and the directory fsynced), so a reader sees either the old file
// or the complete new one, never a torn write.
#pragma once

#include <functional>
#include <ostream>
#include <string>

namespace moetrain {

void write_file_atomically(const std::string& path,
                           const std::function<void(std::ostream&)>& write);
void write_text_atomically(const std::string& path, const std::string& text);
// fsync a directory, so that renames inside it are durable.
void fsync_directory(const std::string& dir);

}  // namespace moetrain
