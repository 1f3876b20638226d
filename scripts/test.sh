#!/usr/bin/env bash
# The one test command: set-up (apt + build), then every test through CTest — the main build's, and
# the SIMT simulator build's (kernels/ compiled as C++ with AddressSanitizer, no nvcc; docs/design.md §6).
# Where the CUDA toolkit is found (/usr/local/cuda), the main build is the CUDA build: it compiles the
# kernels with nvcc and builds moetrain_gpu_tests (label gpu), which without a GPU prints one line
# saying so and passes (§6.4).
# Usage: scripts/test.sh [extra cmake -D options for both builds, e.g. -DMOETRAIN_NATIVE=OFF]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh "$@"
build_dir=${MOETRAIN_BUILD_DIR:-build}
simt_dir=${MOETRAIN_SIMT_BUILD_DIR:-build-simt}
threads=${OMP_NUM_THREADS:-$(nproc)}

cmake -S . -B "$simt_dir" -DCMAKE_BUILD_TYPE=Release "$@" -DMOETRAIN_SIMT=ON -DMOETRAIN_CUDA=OFF
cmake --build "$simt_dir" --target moetrain_simt_tests moetrain_simt moetrain_simt_distributed_tests \
  -j "$(nproc)"

status=0
# Two tests at a time: most are single-threaded for stretches (process start-up, the simulator), so
# the cores stay busy; the timed fault tests' bounds leave room for it.
jobs=${MOETRAIN_TEST_JOBS:-2}
# Each test runs two OpenMP threads (CMakeLists.txt sets OMP_NUM_THREADS per test) beside another
# test: idle threads must sleep, not spin, or one test's barrier burns the core the other needs
# (under GOMP's default spin a test took 5x its time alone).
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}
(cd "$build_dir" && OMP_NUM_THREADS=$threads ctest -j "$jobs" --output-on-failure) || status=1
(cd "$simt_dir" && OMP_NUM_THREADS=$threads ctest -L simt -j "$jobs" --output-on-failure) || status=1
exit $status
