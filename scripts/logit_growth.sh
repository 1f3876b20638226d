#!/usr/bin/env bash
# Attention-logit growth and QK-clip: trains configs/logit_growth_muon.json (plain Muon) and
# configs/logit_growth_muonclip.json (MuonClip; only optim.name and out_dir differ) from scratch,
# one after the other, then compares them with scripts/compare_runs.py into
# runs/logit_growth.png and checks the claim: plain Muon's S_max (max over layers and heads)
# climbs above tau (optim.qk_clip_tau), while MuonClip holds it at about tau and clips heads.
#
# Usage: scripts/logit_growth.sh [--set path=value ...]   (overrides go to both runs)
# Set-up and build: scripts/setup.sh; the corpus: scripts/get_corpus.sh when data/brown is missing.
# Each run starts fresh: its out_dir (runs/logit_growth_*, read from the config) is removed first.
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/train_pair.sh
train_pair logit_growth logit_growth_ runs/logit_growth.png \
  configs/logit_growth_muon.json configs/logit_growth_muonclip.json "$@"
run_dirs=("${RUN_DIRS[@]}")

# The claim, from the metrics: S_max = max over layers of smax_max, per step.
claim=0
/usr/bin/python3 - "${run_dirs[@]}" <<'PY' || claim=$?
import json, sys

def load(d):
    steps = []
    for line in open(f"{d}/metrics.jsonl"):
        if line.strip():
            r = json.loads(line)
            if "loss" in r:
                s = [v for v in (r.get("smax_max") or []) if v is not None]
                steps.append((max(s) if s else float("nan"), r.get("clipped_heads") or 0))
    return steps

muon_dir, clip_dir = sys.argv[1], sys.argv[2]
tau = json.load(open(f"{clip_dir}/config.json"))["optim"]["qk_clip_tau"]
muon, clip = load(muon_dir), load(clip_dir)
m_peak, m_last = max(s for s, _ in muon), muon[-1][0]
c_peak, c_last = max(s for s, _ in clip), clip[-1][0]
# The second half: after plain Muon has crossed tau (MuonClip clips a step's weights with that
# step's S_max, so the next batch can land a little above tau: judge the median, bound the max).
tail = sorted(s for s, _ in clip[len(clip) // 2:])
c_median, c_tail_max = tail[len(tail) // 2], tail[-1]
clip_steps = sum(1 for _, c in clip if c > 0)
first_above = next((i + 1 for i, (s, _) in enumerate(muon) if s > tau), None)
first_clip = next((i + 1 for i, (_, c) in enumerate(clip) if c > 0), None)
print(f"logit_growth: tau = {tau:g}")
print(f"logit_growth: muon     S_max peak {m_peak:.2f} ({m_peak / tau:.1f} tau), last "
      f"{m_last:.2f}, first above tau at step {first_above}")
print(f"logit_growth: muonclip S_max peak {c_peak:.2f}, last {c_last:.2f}; second half: median "
      f"{c_median:.2f} ({c_median / tau:.2f} tau), max {c_tail_max:.2f} "
      f"({c_tail_max / tau:.2f} tau); steps with clipped heads {clip_steps} of {len(clip)} "
      f"(first at step {first_clip})")
ok = m_peak > 2 * tau and c_median <= 1.15 * tau and c_tail_max <= 1.5 * tau and clip_steps > 0
print("logit_growth: claim " + ("holds" if ok else "does NOT hold") +
      ": plain Muon's S_max exceeds 2 tau; MuonClip clips heads and holds S_max at about tau "
      "(median of the second half <= 1.15 tau, max <= 1.5 tau)")
sys.exit(0 if ok else 1)
PY
exit "$claim"
