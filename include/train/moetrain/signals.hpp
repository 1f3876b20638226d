// Stop signals (SIGINT, SIGTERM). During start-up — building the model and optimizer, loading a
// checkpoint, nothing yet worth saving — a signal ends the process at once (exit code 128 +
// signal). Once training starts, a signal asks the loop to write a checkpoint and stop after the
// step in progress (the loop polls stop_requested() once per step). The signals are taken by a
// thread of their own (sigwait), never by a thread that computes.
#pragma once

namespace moetrain {

// Blocks SIGINT and SIGTERM in the calling thread and starts the thread that takes them, in
// start-up mode (exit at once). Call it before any other thread is created (they inherit the
// block); a second call does nothing.
void install_stop_signal_handlers();

// From now on a stop signal asks for a checkpoint and a graceful stop instead.
void stop_signals_save_from_now();

// Whether SIGINT or SIGTERM arrived since stop_signals_save_from_now().
bool stop_requested();

}  // namespace moetrain
