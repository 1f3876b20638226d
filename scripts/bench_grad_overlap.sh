#!/usr/bin/env bash
# The communication a 2-rank step exposes, with the gradient buckets' reduce-scatters overlapped
# with backward (train.overlap_grad_reduce=true) and started after it (false), in alternating runs
# of the same job. Per run: the mean over steps (the first left out: it warms caches and pools) of
# rank 0's step time and of comm_blocked_ms, the host time inside communicator calls: on the CPU
# every MPI call waits for its data, so that is the exposed communication (waits for the slower
# rank included). Then the medians and the time overlap saves.
# Usage: scripts/bench_grad_overlap.sh [CONFIG=configs/tiny.json] [STEPS=8] [ROUNDS=3]
#                                      [--set path=value ...]   (given to every run)
# Needs data/brown (scripts/get_corpus.sh) for the default config; the bucket size defaults to
# 1 MiB here (--set train.grad_bucket_mib=... overrides it) so that a small model has several.
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-configs/tiny.json}
steps=${2:-8}
rounds=${3:-3}
shift $(($# < 3 ? $# : 3))
bin=${MOETRAIN_BUILD_DIR:-build}/moetrain
ranks=2
global=$(/usr/bin/python3 -c "import json; print(json.load(open('$config'))['data']['batch_size'])")
if ((global % ranks)); then
  echo "batch_size $global is not divisible by $ranks ranks" >&2
  exit 1
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
common=(--config "$config" --set train.steps="$steps" --set optim.warmup_steps=1
        --set train.eval_interval=0 --set train.checkpoint_interval=0
        --set train.grad_bucket_mib=1 --set data.batch_size=$((global / ranks)) "$@")

run() {  # run NAME OVERLAP
  OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
    mpirun -np $ranks --oversubscribe --bind-to none -x OMP_NUM_THREADS=1 \
    "$bin" train "${common[@]}" --set train.overlap_grad_reduce="$2" \
    --set train.out_dir="$out/$1" >"$out/$1.log" 2>&1 || {
    cat "$out/$1.log" >&2
    exit 1
  }
}
for ((i = 0; i < rounds; ++i)); do
  run "on$i" true
  run "off$i" false
done

/usr/bin/python3 - "$out" "$rounds" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def stats(run):
    rows = [json.loads(l) for l in open(f"{out}/{run}/metrics.jsonl") if '"loss"' in l][1:]
    z = json.load(open(f"{out}/{run}/zero1_rank0.json"))
    return (statistics.mean(r["step_ms"] for r in rows),
            statistics.mean(r["comm_blocked_ms"] for r in rows), z["grad_buckets"],
            rows[-1]["comm_bytes"])
print("round   overlap: step ms  exposed comm ms   |   serial: step ms  exposed comm ms")
on, off = [], []
for i in range(rounds):
    a, b = stats(f"on{i}"), stats(f"off{i}")
    on.append(a); off.append(b)
    print(f"{i:5d}   {a[0]:17.1f}  {a[1]:15.1f}   |   {b[0]:16.1f}  {b[1]:15.1f}")
med = lambda v, k: statistics.median(x[k] for x in v)
print(f"median  {med(on, 0):17.1f}  {med(on, 1):15.1f}   |   {med(off, 0):16.1f}  {med(off, 1):15.1f}")
print(f"{on[0][2]} gradient buckets, {on[0][3] / 1e6:.1f} MB sent per rank per step; "
      f"overlap hides {med(off, 1) - med(on, 1):.1f} ms of exposed communication per step "
      f"({(med(off, 1) - med(on, 1)) / med(off, 1) * 100:.0f}%), step time ratio serial/overlap "
      f"{med(off, 0) / med(on, 0):.3f}")
PY
