#!/usr/bin/env bash
# Data-parallel scaling on this machine: the same global batch trained by 1 rank using every core
# (OpenMP) and by N ranks (mpirun, one core each), tokens/s compared in the same run.
# Usage: scripts/bench_data_parallel.sh [CONFIG=configs/tiny.json] [STEPS=8] [RANKS=$(nproc)]
#                                       [--set path=value ...]   (given to both runs)
# Needs data/brown (scripts/get_corpus.sh) for the default config.
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-configs/tiny.json}
steps=${2:-8}
ranks=${3:-$(nproc)}
shift $(($# < 3 ? $# : 3))
bin=${MOETRAIN_BUILD_DIR:-build}/moetrain
global=$(/usr/bin/python3 -c "import json; print(json.load(open('$config'))['data']['batch_size'])")
if (( global % ranks )); then echo "batch_size $global is not divisible by $ranks ranks" >&2; exit 1; fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
common=(--config "$config" --set train.steps="$steps" --set optim.warmup_steps=1
        --set train.eval_interval=0 --set train.checkpoint_interval=0 "$@")

OMP_NUM_THREADS=$(nproc) "$bin" train "${common[@]}" --set train.out_dir="$out/one" > "$out/one.log" 2>&1
OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
  mpirun -np "$ranks" --oversubscribe --bind-to none -x OMP_NUM_THREADS=1 \
  "$bin" train "${common[@]}" --set data.batch_size=$((global / ranks)) \
  --set train.out_dir="$out/many" > "$out/many.log" 2>&1

/usr/bin/python3 - "$out" "$ranks" <<'PY'
import json, statistics, sys
out, ranks = sys.argv[1], int(sys.argv[2])
def rate(run):
    rows = [json.loads(l) for l in open(f"{out}/{run}/metrics.jsonl") if '"loss"' in l]
    steps = rows[1:]  # the first step warms caches and thread pools
    return statistics.mean(r["tokens_per_s"] for r in steps), rows[-1].get("comm_bytes", 0)
one, _ = rate("one")
many, comm = rate("many")
print(f"1 rank x all cores : {one:9.0f} tokens/s")
print(f"{ranks} ranks x 1 core  : {many:9.0f} tokens/s  ({comm / 1e6:.1f} MB sent per rank per step)")
print(f"ratio              : {many / one:.3f}")
PY
