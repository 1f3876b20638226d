// One trainer per run directory: an exclusive flock on <out_dir>/train.lock, held for the whole
// run and released by the kernel on any exit (a crash or kill included), so a stale lock never
// blocks the next run. The file holds the holder's PID, for the refusal message.
#pragma once

#include <string>

namespace moetrain {

class RunLock {
 public:
  // Creates out_dir if needed and takes the lock; throws std::runtime_error naming the lock file
  // and the PID of the process that holds it.
  explicit RunLock(const std::string& out_dir);
  ~RunLock();
  RunLock(const RunLock&) = delete;
  RunLock& operator=(const RunLock&) = delete;

 private:
  int fd_ = -1;
};

}  // namespace moetrain
