#!/usr/bin/env bash
# The one test command: set-up (apt + build), then every test through CTest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh "$@"
cd "${MOETRAIN_BUILD_DIR:-build}"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)} ctest --output-on-failure
