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

source scripts/train_pair.sh
train_pair muon_vs_adamw brown_ runs/muon_vs_adamw.png \
  configs/brown_adamw.json configs/brown_muonclip.json "$@"
