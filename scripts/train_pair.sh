# Sourced by the comparison scripts (muon_vs_adamw.sh, logit_growth.sh): trains two configs from
# scratch, one after the other, and compares them with scripts/compare_runs.py.
#
#   train_pair NAME OUT_PREFIX REPORT CONFIG_A CONFIG_B [--set path=value ...]
#
# Sets up and builds (scripts/setup.sh), fetches the corpus when data/brown is missing, removes
# each run's out_dir first (only when it is runs/OUT_PREFIX*: nothing else is ever deleted), and
# leaves the two run directories in the array RUN_DIRS. Overrides go to both runs.
train_pair() {
  local name=$1 prefix=$2 report=$3 cfg_a=$4 cfg_b=$5
  shift 5
  local pattern="^runs/${prefix}[A-Za-z0-9_.-]+$" start=$SECONDS
  scripts/setup.sh
  local binary=${MOETRAIN_BUILD_DIR:-build}/moetrain
  if [ ! -f data/brown/train_000000.bin ] || [ ! -f data/brown/val_000000.bin ] ||
     [ ! -f data/brown/tokenizer.json ]; then
    scripts/get_corpus.sh
  fi
  RUN_DIRS=()
  local cfg out t0
  for cfg in "$cfg_a" "$cfg_b"; do
    # The resolved out_dir (after any --set overrides), as the trainer will see it.
    out=$("$binary" config --check "$cfg" "$@" |
          /usr/bin/python3 -c 'import json, sys; s = sys.stdin.read()
print(json.loads(s[s.index("{"):])["train"]["out_dir"])')
    if [[ ! "$out" =~ $pattern ]]; then
      echo "$name: $cfg: train.out_dir '$out' is not a runs/${prefix}* directory; refusing to" \
           "replace it" >&2
      return 1
    fi
    rm -rf -- "$out"
    echo "$name: training $cfg -> $out"
    t0=$SECONDS
    "$binary" train --config "$cfg" "$@"
    echo "$name: $cfg took $((SECONDS - t0)) s"
    RUN_DIRS+=("$out")
  done
  scripts/compare_runs.py "${RUN_DIRS[@]}" -o "$report"
  echo "$name: report in $report (runs: ${RUN_DIRS[*]}); training wall time $((SECONDS - start)) s"
}
