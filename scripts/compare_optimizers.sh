#!/usr/bin/env bash
# Learning-rate sweeps of several optimizers on one base config, and a report comparing them at
# each one's best learning rate (scripts/compare_optimizers.py; its docstring has every option).
#
#   scripts/compare_optimizers.sh --quick                  # Brown corpus, 6 optimizers x 3 lrs
#   scripts/compare_optimizers.sh                          # the default sweep: 6 x 5 lrs, 800 steps
#   scripts/compare_optimizers.sh --out results/optimizer_sweep --compact   # ... continuing the
#                                                          # committed one (README, "Choosing an optimizer")
#   scripts/compare_optimizers.sh --optimizers adamw,muon --lrs adamw=1e-3,3e-3 --out runs/x
#
# Sets up and builds first (scripts/setup.sh) and fetches the Brown corpus when data/brown is
# missing. Running it again with the same --out continues a half-finished sweep.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if [ ! -f data/brown/train_000000.bin ] || [ ! -f data/brown/val_000000.bin ] ||
   [ ! -f data/brown/tokenizer.json ]; then
  scripts/get_corpus.sh
fi
exec /usr/bin/python3 scripts/compare_optimizers.py \
  --binary "${MOETRAIN_BUILD_DIR:-build}/moetrain" "$@"
