#!/usr/bin/env bash
# moetrain's forward+backward against its PyTorch twin's on this machine, alternating rounds
# (scripts/bench_vs_torch.py; its docstring has every option):
#
#   scripts/bench_vs_torch.sh configs/tiny.json                       # 3 rounds, all cores
#   scripts/bench_vs_torch.sh configs/tiny.json --rounds 5 --threads 1
#
# Sets up and builds first (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
exec /usr/bin/python3 scripts/bench_vs_torch.py --binary "${MOETRAIN_BUILD_DIR:-build}/moetrain" "$@"
