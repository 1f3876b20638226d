#!/usr/bin/env bash
# The main job: set-up (apt + build), then the model benchmark on configs/tiny.json.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
"${MOETRAIN_BUILD_DIR:-build}/moetrain" bench --config configs/tiny.json "$@"
