#!/usr/bin/env bash
# Muon(Clip) vs AdamW on the Brown corpus: trains configs/brown_adamw.json and
# configs/brown_muonclip.json (the same MoE model, data, learning rate and schedule; only
# optim.name and out_dir differ) from scratch, one after the other, then compares them with
# scripts/compare_runs.py into runs/muon_vs_adamw.png (and prints the table).
#
# Usage: scripts/muon_vs_adamw.sh [--set path=value ...]   (overrides go to both runs, e.g.
#        --set train.steps=50 for a quick check)
# Set-up and build: scripts/setup.sh; the corpus: scripts/get_corpus.sh when data/brown is missing.
# Each run starts fresh: its out_dir (runs/brown_*, read from the config) is removed first.
set -euo pipefail
cd "$(dirname "$0")/.."

configs=(configs/brown_adamw.json configs/brown_muonclip.json)
out_pattern='^runs/brown_[A-Za-z0-9_.-]+$'  # the only directories this script deletes
report=runs/muon_vs_adamw.png

start=$SECONDS
scripts/setup.sh
binary=${MOETRAIN_BUILD_DIR:-build}/moetrain
if [ ! -f data/brown/train_000000.bin ] || [ ! -f data/brown/val_000000.bin ] ||
   [ ! -f data/brown/tokenizer.json ]; then
  scripts/get_corpus.sh
fi

run_dirs=()
for cfg in "${configs[@]}"; do
  # The resolved out_dir (after any --set overrides), as the trainer will see it.
  out=$("$binary" config --check "$cfg" "$@" |
        /usr/bin/python3 -c 'import json, sys; s = sys.stdin.read()
print(json.loads(s[s.index("{"):])["train"]["out_dir"])')
  if [[ ! "$out" =~ $out_pattern ]]; then
    echo "muon_vs_adamw: $cfg: train.out_dir '$out' is not a runs/brown_* directory; refusing to" \
         "replace it" >&2
    exit 1
  fi
  rm -rf -- "$out"
  echo "muon_vs_adamw: training $cfg -> $out"
  t0=$SECONDS
  "$binary" train --config "$cfg" "$@"
  echo "muon_vs_adamw: $cfg took $((SECONDS - t0)) s"
  run_dirs+=("$out")
done

scripts/compare_runs.py "${run_dirs[@]}" -o "$report"
echo "muon_vs_adamw: report in $report (runs: ${run_dirs[*]}); wall time $((SECONDS - start)) s"
