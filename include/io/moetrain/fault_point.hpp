// Deterministic kill points for the fault tests (tests/test_faults.cpp): every file operation of a
// checkpoint (each file written, each rename, each directory removed) passes a fault point. When
// the environment sets MOETRAIN_KILL_AT_FILE_OP=N, the N-th fault point of the process (1-based)
// kills it with SIGKILL, so a test can stop a run at exactly that operation — the same as a kill
// from outside at that moment, with nothing flushed or cleaned up. MOETRAIN_TRACE_FILE_OPS=1
// prints "file operation N: <what>" for each, so a test can choose its kill points. Unset, a
// fault point costs one counter increment.
#pragma once

namespace moetrain {

// `what` names the operation about to happen (printed to stderr just before the kill).
void file_fault_point(const char* what);

}  // namespace moetrain
