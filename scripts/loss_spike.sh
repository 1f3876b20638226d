#!/usr/bin/env bash
# Loss spikes and QK-clip: the logit-growth pair pushed further. Trains configs/loss_spike_muon.json
# (plain Muon, hidden-matrix lr 0.05 = optim.lr 0.004 x muon_group.lr_scale 12.5, no decay,
# constant schedule, 700 steps) and configs/loss_spike_muonclip.json (the same with QK-clip at
# tau = 30) from scratch, one after the other, compares them with scripts/compare_runs.py into
# runs/loss_spike.png (loss and S_max curves of both), and checks the claim: plain Muon's loss
# spikes (the trainer's counter: a loss above its running mean by train.spike_std running stds)
# while its S_max runs away, and MuonClip has no spike and ends at a val loss no worse than Muon's
# best. Prints what each run did whether or not the claim holds; exits 1 when it does not.
#
# Usage: scripts/loss_spike.sh [--set path=value ...]   (overrides go to both runs)
# Set-up and build: scripts/setup.sh; the corpus: scripts/get_corpus.sh when data/brown is missing.
# Each run starts fresh: its out_dir (runs/loss_spike_*, read from the config) is removed first.
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/train_pair.sh
train_pair loss_spike loss_spike_ runs/loss_spike.png \
  configs/loss_spike_muon.json configs/loss_spike_muonclip.json "$@"
run_dirs=("${RUN_DIRS[@]}")

claim=0
/usr/bin/python3 - "${run_dirs[@]}" <<'PY' || claim=$?
import json, math, sys

def load(d):
    steps, evals = {}, []
    for line in open(f"{d}/metrics.jsonl"):
        if not line.strip():
            continue
        r = json.loads(line)
        if "val_loss" in r:
            evals.append(r["val_loss"])
        elif "loss" in r:
            s = [v for v in (r.get("smax_max") or []) if v is not None]
            steps[r["step"]] = {"loss": r["loss"], "smax": max(s) if s else float("nan"),
                                "spike": bool(r.get("spike")), "spikes": r.get("loss_spikes") or 0}
    return steps, evals

def jump(steps, at, window=20):
    """How many stds of the previous `window` losses the loss at `at` lies above their mean."""
    prev = [steps[s]["loss"] for s in range(at - window, at) if s in steps]
    mean = sum(prev) / len(prev)
    std = math.sqrt(sum((x - mean) ** 2 for x in prev) / len(prev))
    return (steps[at]["loss"] - mean) / max(std, 1e-12)

muon_dir, clip_dir = sys.argv[1], sys.argv[2]
cfg = json.load(open(f"{clip_dir}/config.json"))
tau, k = cfg["optim"]["qk_clip_tau"], cfg["train"]["spike_std"]
runs = {name: load(d) for name, d in (("muon", muon_dir), ("muonclip", clip_dir))}
result = {}
for name, (steps, evals) in runs.items():
    last = steps[max(steps)]
    result[name] = dict(spikes=last["spikes"], at=[s for s in sorted(steps) if steps[s]["spike"]],
                        peak=max(v["smax"] for v in steps.values()), last=last["smax"],
                        best=min(evals), final=evals[-1])
    r = result[name]
    print(f"loss_spike: {name:8s} loss spikes {r['spikes']} (steps {r['at'][:10]}), S_max peak "
          f"{r['peak']:.0f} ({r['peak'] / tau:.1f} tau), last {r['last']:.0f}; val loss best "
          f"{r['best']:.4f}, final {r['final']:.4f}")
m, c = result["muon"], result["muonclip"]
# A spike of plain Muon's that MuonClip's run shares (its loss on the same batch also jumps by more
# than 2 of its stds) is a hard batch, not the optimizer's instability: only the others count.
own = []
for at in m["at"]:
    other = jump(runs["muonclip"][0], at)
    print(f"loss_spike: muon spike at step {at}: {jump(runs['muon'][0], at):.1f} stds above its "
          f"last 20 steps; MuonClip on the same batch {other:+.1f} stds"
          f"{' (a hard batch for both)' if other > 2 else ''}")
    if other <= 2:
        own.append(at)
ok = len(own) > 0 and c["spikes"] == 0 and c["final"] <= m["best"]
print(f"loss_spike: claim {'holds' if ok else 'does NOT hold'}: plain Muon's loss spikes "
      f"(> {k:g} running stds, not shared by MuonClip's run) while MuonClip has none and ends at a "
      f"val loss no worse than Muon's best ({c['final']:.4f} vs {m['best']:.4f})")
sys.exit(0 if ok else 1)
PY
exit "$claim"
