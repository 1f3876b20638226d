// Graceful stop: SIGINT and SIGTERM ask the running training loop to write a checkpoint and stop
// after the step in progress (the loop polls stop_requested() once per step).
#pragma once

namespace moetrain {

// Installs SIGINT/SIGTERM handlers that ask the running training loop to checkpoint and stop.
void install_stop_signal_handlers();

// Whether SIGINT or SIGTERM arrived since the handlers were installed.
bool stop_requested();

}  // namespace moetrain
