#!/usr/bin/python3
"""Learning-rate sweeps of several optimizers on one base config, and their report.

Every (optimizer, learning rate) pair is trained with the same base config: the same model, data
order, seed and token budget; only optim.name and optim.lr differ. A report directory collects
the runs and the comparison:

  OUT/runs/<optimizer>_lr<lr>/   each run (a moetrain run directory, plus harness.json once done)
  OUT/report.md                  the table and the figures below
  OUT/lr_sensitivity.png         final val loss against lr, one line per optimizer
  OUT/val_loss.png               val loss against tokens at each optimizer's best lr
  OUT/smax.png                   the largest attention logit S_max per step at each best lr

Run again with the same OUT, a half-finished sweep continues: finished runs are kept, an
interrupted run resumes from its last checkpoint (or starts over without one).
--compact: each finished run keeps only what the report reads (config.json, harness.json,
metrics.jsonl.gz, its log gzipped; no checkpoints, about 200 KB a run), so that a sweep's results
can be committed and a sweep continued from them on another machine (results/optimizer_sweep).

Usage (normally through scripts/compare_optimizers.sh, which builds moetrain first):
  compare_optimizers.py [--config BASE.json] [--optimizers adamw,muon,...]
      [--lrs OPT=LR,LR,... ...] [--out DIR] [--quick] [--mpirun N] [--binary PATH]
      [--compact] [--set path=value ...]
  compare_optimizers.py --report-only [--compact] --out DIR
  compare_optimizers.py --self-test

Default learning-rate grid: 5 values a factor 2 apart (x1/4 ... x4) around each optimizer's
default, which is the base config's optim.lr times the optimizer's scale (LR_SCALE: NorMuon's
original scale leaves updates about 2.5x smaller in RMS than match_rms_adamw's 0.2).
--quick: the Brown corpus config (configs/brown_muonclip.json) for 120 steps, 3 values per grid
(x1/2, x1, x2): about 20 minutes on 2 CPU cores.
"""

import argparse
import gzip
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import compare_runs  # noqa: E402  (load_run, series, eval_series, tokens_to_reach)

PROG = "compare_optimizers"
OPTIMIZERS = ("adamw", "muon", "muonclip", "normuon", "adamuon", "soap")
# Default lr of each optimizer relative to the base config's optim.lr.
LR_SCALE = {"adamw": 1.0, "muon": 1.0, "muonclip": 1.0, "normuon": 2.5, "adamuon": 1.0,
            "soap": 1.0}
GRID = (0.25, 0.5, 1.0, 2.0, 4.0)
QUICK_GRID = (0.5, 1.0, 2.0)
QUICK_SETS = ["train.steps=120", "train.eval_interval=20", "train.eval_batches=4",
              "train.checkpoint_interval=40", "optim.warmup_steps=10"]


class SweepError(Exception):
    pass


def lr_tag(lr):
    return "%.3g" % lr


def run_dir(out, opt, lr):
    return os.path.join(out, "runs", "%s_lr%s" % (opt, lr_tag(lr)))


def parse_lrs(items, optimizers):
    grids = {}
    for item in items or []:
        if "=" not in item:
            raise SweepError("--lrs: expected OPTIMIZER=LR,LR,..., got %r" % item)
        opt, values = item.split("=", 1)
        if opt not in optimizers:
            raise SweepError("--lrs: %r is not one of the swept optimizers (%s)"
                             % (opt, ",".join(optimizers)))
        try:
            lrs = [float(v) for v in values.split(",") if v]
        except ValueError:
            raise SweepError("--lrs: %s: learning rates must be numbers, got %r" % (opt, values))
        if not lrs or any(not (lr > 0 and math.isfinite(lr)) for lr in lrs):
            raise SweepError("--lrs: %s: expected positive learning rates, got %r" % (opt, values))
        grids[opt] = lrs
    return grids


def resolved_config(binary, config, sets):
    cmd = [binary, "config", "--check", config]
    for s in sets:
        cmd += ["--set", s]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SweepError("%s: %s" % (config, (p.stderr or p.stdout).strip()))
    text = p.stdout
    return json.loads(text[text.index("{"):])


def default_grid(base_lr, opt, normuon_scale, quick):
    scale = LR_SCALE[opt] if not (opt == "normuon" and normuon_scale != "original") else 1.0
    return [base_lr * scale * f for f in (QUICK_GRID if quick else GRID)]


def read_done(path):
    try:
        with open(os.path.join(path, "harness.json"), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def compact_run(path):
    """Shrinks a finished run to what the report reads; idempotent."""
    metrics = os.path.join(path, "metrics.jsonl")
    for src in (metrics, path + ".log"):
        if os.path.isfile(src):
            with open(src, "rb") as fin, gzip.open(src + ".gz.tmp", "wb") as fout:
                shutil.copyfileobj(fin, fout)
            os.replace(src + ".gz.tmp", src + ".gz")
            os.remove(src)
    shutil.rmtree(os.path.join(path, "checkpoints"), ignore_errors=True)
    for name in ("tokenizer.json", "train.lock"):
        if os.path.isfile(os.path.join(path, name)):
            os.remove(os.path.join(path, name))


def compact_finished(out, jobs):
    """compact_run on every run of `jobs` that finished successfully."""
    for o, lr in jobs:
        rec = read_done(run_dir(out, o, lr))
        if rec is not None and rec.get("exit_code") == 0:
            compact_run(run_dir(out, o, lr))


def train_one(a, opt, lr, path, sets):
    """Trains (or resumes) one run; returns its harness record."""
    cmd = [a.binary, "train", "--config", a.config]
    for s in sets + ["optim.name=%s" % opt, "optim.lr=%r" % lr, "train.out_dir=%s" % path]:
        cmd += ["--set", s]
    has_checkpoint = os.path.isdir(os.path.join(path, "checkpoints")) and any(
        not e.endswith(".tmp") for e in os.listdir(os.path.join(path, "checkpoints")))
    if os.path.isdir(path) and not has_checkpoint:
        shutil.rmtree(path)  # an interrupted run without a checkpoint starts over
    if has_checkpoint:
        cmd.append("--resume")
    if a.mpirun > 1:
        cmd = ["mpirun", "-np", str(a.mpirun), "--oversubscribe", "--bind-to", "none"] + cmd
    os.makedirs(os.path.dirname(path), exist_ok=True)
    log = path + ".log"
    t0 = time.time()
    with open(log, "a", encoding="utf-8") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    rec = {"optimizer": opt, "lr": lr, "exit_code": rc, "seconds": time.time() - t0,
           "command": cmd}
    if rc != 0:
        with open(log, encoding="utf-8", errors="replace") as f:
            rec["log_tail"] = f.read()[-2000:]
    if os.path.isdir(path):
        with open(os.path.join(path, "harness.json"), "w", encoding="utf-8") as f:
            json.dump(rec, f, indent=1)
    else:  # failed before creating its directory (a bad override): nothing to resume
        raise SweepError("%s lr %s: moetrain failed before starting (exit %d), see %s"
                         % (opt, lr_tag(lr), rc, log))
    return rec


def sweep(a):
    base = resolved_config(a.binary, a.config, a.sets)
    if base["train"]["eval_interval"] <= 0:
        raise SweepError("%s: train.eval_interval must be > 0: the sweep compares val losses"
                         % a.config)
    grids = {o: default_grid(base["optim"]["lr"], o, base["optim"].get("normuon_scale"), a.quick)
             for o in a.optimizers}
    grids.update(a.lr_grids)
    sets = list(a.sets)
    if a.mpirun > 1:
        b = base["data"]["batch_size"]
        if b % a.mpirun:
            raise SweepError("--mpirun %d: data.batch_size %d does not split evenly over the ranks"
                             % (a.mpirun, b))
        sets.append("data.batch_size=%d" % (b // a.mpirun))  # the same global batch
    jobs = [(o, lr) for o in a.optimizers for lr in grids[o]]
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "sweep.json"), "w", encoding="utf-8") as f:
        json.dump({"config": a.config, "sets": sets, "grids": grids, "mpirun": a.mpirun}, f,
                  indent=1)
    todo = [(o, lr) for o, lr in jobs if read_done(run_dir(a.out, o, lr)) is None]
    if a.compact:
        compact_finished(a.out, jobs)
    done = len(jobs) - len(todo)
    print("%s: %d runs (%d done before), report in %s" % (PROG, len(jobs), done, a.out),
          flush=True)
    spent = []
    for o, lr in todo:
        rec = train_one(a, o, lr, run_dir(a.out, o, lr), sets)
        if a.compact and rec["exit_code"] == 0:
            compact_run(run_dir(a.out, o, lr))
        done += 1
        spent.append(rec["seconds"])
        eta = sum(spent) / len(spent) * (len(jobs) - done)
        status = "ok" if rec["exit_code"] == 0 else "FAILED (exit %d)" % rec["exit_code"]
        print("%s: [%d/%d] %s lr %s: %s in %.0f s; ETA %.0f min" %
              (PROG, done, len(jobs), o, lr_tag(lr), status, rec["seconds"], eta / 60), flush=True)
    return jobs


# --------------------------------------------------------------------------------------------
# The report


def summarize_run(path, rec):
    r = {"dir": path, "exit_code": rec.get("exit_code", 1), "seconds": rec.get("seconds", math.nan)}
    try:
        run = compare_runs.load_run(path)
    except compare_runs.RunError:
        run = None
    if run is None:
        r.update(final_val=math.nan, best_val=math.nan, evals=([], []), smax=math.nan,
                 clipped_steps=0, spikes=0, opt_share=math.nan, series=None)
        return r
    s = compare_runs.series(run)
    et, ev = compare_runs.eval_series(run)
    recs = [run.steps[k] for k in sorted(run.steps)]
    opt_ms = sum(compare_runs._num(x.get("optimizer_ms")) for x in recs)
    step_ms = sum(compare_runs._num(x.get("step_ms")) for x in recs)
    finite = [v for v in ev if math.isfinite(v)]
    r.update(final_val=ev[-1] if ev else math.nan, best_val=min(finite) if finite else math.nan,
             evals=(et, ev), smax=compare_runs._reduce(s["smax"], "max"),
             clipped_steps=sum(1 for c in s["clipped"] if c > 0),
             spikes=int(max((compare_runs._num(x.get("loss_spikes")) for x in recs), default=0)),
             opt_share=opt_ms / step_ms if step_ms > 0 else math.nan, series=s,
             steps=s["step"][-1])
    if r["exit_code"] == 0 and math.isnan(r["final_val"]):
        r["exit_code"] = -1
    return r


def build_report(out, jobs):
    runs = {}
    for o, lr in jobs:
        path = run_dir(out, o, lr)
        rec = read_done(path)
        if rec is not None:
            runs.setdefault(o, []).append((lr, summarize_run(path, rec)))
    if not runs:
        raise SweepError("%s: no finished run to report" % out)
    best = {}
    for o, lst in runs.items():
        ok = [(lr, r) for lr, r in lst if r["exit_code"] == 0 and math.isfinite(r["best_val"])]
        if ok:
            best[o] = min(ok, key=lambda x: x[1]["best_val"])
    target = best["adamw"][1]["best_val"] if "adamw" in best else math.nan
    base_tokens = (compare_runs.tokens_to_reach(*best["adamw"][1]["evals"], target)
                   if "adamw" in best else None)
    rows = []
    for o in [o for o, _ in jobs if o in runs]:
        if any(row["optimizer"] == o for row in rows):
            continue
        lst = runs[o]
        if o not in best:
            rows.append({"optimizer": o, "lr": None, "runs": len(lst),
                         "failed": sum(1 for _, r in lst if r["exit_code"] != 0)})
            continue
        lr, r = best[o]
        tok = compare_runs.tokens_to_reach(*r["evals"], target) if math.isfinite(target) else None
        rows.append({"optimizer": o, "lr": lr, "best_val": r["best_val"], "tokens": tok,
                     "ratio": tok / base_tokens if tok is not None and base_tokens else None,
                     "seconds": r["seconds"], "opt_share": r["opt_share"], "smax": r["smax"],
                     "clipped_steps": r["clipped_steps"], "spikes": r["spikes"],
                     "runs": len(lst), "failed": sum(1 for _, x in lst if x["exit_code"] != 0),
                     "edge": lr in (min(x for x, _ in lst), max(x for x, _ in lst))})
    draw(out, runs, best)
    write_markdown(out, rows, runs, target)
    return rows, target


def fmt(x, spec):
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def write_markdown(out, rows, runs, target):
    with open(os.path.join(out, "sweep.json"), encoding="utf-8") as f:
        meta = json.load(f)
    lines = ["# Optimizer comparison", "",
             "Base config `%s`%s; every run trains the same model on the same data order, seed "
             "and token budget, only `optim.name` and `optim.lr` differ. Each optimizer's row is "
             "its best learning rate (lowest val loss) of its grid." %
             (meta["config"], (" with " + ", ".join("`%s`" % s for s in meta["sets"]))
              if meta["sets"] else ""), "",
             "| optimizer | best lr | best val loss | tokens to AdamW's best (%s) | ratio | wall time "
             "| optimizer share | max S_max | clipped-head steps | loss spikes |" %
             fmt(target, ".4f"),
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["lr"] is None:
            lines.append("| %s | every run failed (%d) | | | | | | | | |" % (r["optimizer"], r["runs"]))
            continue
        lines.append("| %s | %s%s | %s | %s | %s | %s s | %s | %s | %d | %d |" % (
            r["optimizer"], lr_tag(r["lr"]), " (grid edge)" if r["edge"] else "",
            fmt(r["best_val"], ".4f"), fmt(r["tokens"], ",.0f"), fmt(r["ratio"], ".2f"),
            fmt(r["seconds"], ".0f"), fmt(100 * r["opt_share"] if r["opt_share"] == r["opt_share"]
                                          else None, ".1f") + "%",
            fmt(r["smax"], ".1f"), r["clipped_steps"], r["spikes"]))
    lines += ["", "Tokens to AdamW's best: the first evaluation (interpolated) at or below AdamW's "
              "best val loss; '-' when never reached. Optimizer share: the optimizer's time over "
              "the step's, summed over the run. A best lr on the grid's edge means the grid should "
              "be widened on that side.", "", "## Every run", "",
              "| optimizer | lr | final val loss | best val loss | spikes | status |",
              "| --- | --- | --- | --- | --- | --- |"]
    for o, lst in runs.items():
        for lr, r in sorted(lst, key=lambda x: x[0]):
            status = "ok" if r["exit_code"] == 0 else "failed (exit %d)" % r["exit_code"]
            lines.append("| %s | %s | %s | %s | %d | %s |" % (
                o, lr_tag(lr), fmt(r["final_val"], ".4f"), fmt(r["best_val"], ".4f"),
                r["spikes"], status))
    lines += ["", "![lr sensitivity](lr_sensitivity.png)", "", "![val loss](val_loss.png)", "",
              "![S_max](smax.png)", ""]
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


def draw(out, runs, best):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for o, lst in runs.items():
        pts = sorted((lr, r["final_val"]) for lr, r in lst if math.isfinite(r["final_val"]))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=o)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final val loss")
    ax.set_title("learning-rate sensitivity")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "lr_sensitivity.png"), dpi=120)
    plt.close(fig)
    for name, key in (("val_loss.png", "val"), ("smax.png", "smax")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for o, (lr, r) in best.items():
            label = "%s (lr %s)" % (o, lr_tag(lr))
            if key == "val":
                ax.plot(r["evals"][0], r["evals"][1], label=label)
            elif r["series"] is not None:
                ax.plot(r["series"]["tokens"], r["series"]["smax"], label=label)
        ax.set_xlabel("tokens")
        ax.set_ylabel("val loss" if key == "val" else "max S_max over layers and heads")
        ax.set_title("at each optimizer's best learning rate")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out, name), dpi=120)
        plt.close(fig)


# --------------------------------------------------------------------------------------------
# Self-test: the report from synthetic run directories.


def _synthetic(path, opt, lr, evals, smax=1.0, tokens_per_step=100, exit_code=0):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"optim": {"name": opt, "lr": lr}}, f)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for i, v in enumerate(evals):
            step = 10 * (i + 1)
            f.write(json.dumps({"step": step, "loss": v + 0.1, "tokens": step * tokens_per_step,
                                "smax_max": [smax], "clipped_heads": 1 if opt == "muonclip" else 0,
                                "loss_spikes": 1 if v > 9 else 0, "optimizer_ms": 1.0,
                                "step_ms": 4.0}) + "\n")
            f.write(json.dumps({"step": step, "val_loss": v, "tokens": step * tokens_per_step})
                    + "\n")
    with open(os.path.join(path, "harness.json"), "w") as f:
        json.dump({"optimizer": opt, "lr": lr, "exit_code": exit_code, "seconds": 12.0}, f)


def self_test():
    ok = True

    def check(cond, what):
        nonlocal ok
        print("%s: %s" % ("ok" if cond else "FAILED", what))
        ok &= bool(cond)

    with tempfile.TemporaryDirectory() as out:
        with open(os.path.join(out, "sweep.json"), "w") as f:
            json.dump({"config": "base.json", "sets": [], "grids": {}, "mpirun": 1}, f)
        jobs = []
        # AdamW: best at lr 2e-3 with val 5.0 reached at 300 tokens; muon reaches 5.0 at 150.
        for lr, ev in ((1e-3, [6.0, 5.5, 5.2]), (2e-3, [6.0, 5.5, 5.0]), (4e-3, [6.5, 6.0, 5.8])):
            _synthetic(run_dir(out, "adamw", lr), "adamw", lr, ev)
            jobs.append(("adamw", lr))
        for lr, ev in ((1e-3, [5.5, 4.5, 4.4]), (2e-3, [5.0, 4.0, 3.9])):
            _synthetic(run_dir(out, "muon", lr), "muon", lr, ev, smax=7.5)
            jobs.append(("muon", lr))
        _synthetic(run_dir(out, "soap", 1e-3), "soap", 1e-3, [10.0, float("nan")], exit_code=1)
        jobs.append(("soap", 1e-3))
        rows, target = build_report(out, jobs)
        by = {r["optimizer"]: r for r in rows}
        check(abs(target - 5.0) < 1e-12, "target is AdamW's best val loss")
        check(by["adamw"]["lr"] == 2e-3 and by["muon"]["lr"] == 2e-3, "best lr per optimizer")
        check(abs(by["adamw"]["tokens"] - 3000) < 1e-9, "AdamW reaches its best at 3000 tokens")
        # muon: 5.0 at 1000 tokens (first eval already below) -> ratio 1/3.
        check(abs(by["muon"]["ratio"] - 1000 / 3000) < 1e-9, "token ratio against AdamW")
        check(by["muon"]["edge"] and not by["adamw"]["edge"], "grid-edge flag")
        check(abs(by["muon"]["smax"] - 7.5) < 1e-12, "max S_max")
        check(abs(by["adamw"]["opt_share"] - 0.25) < 1e-12, "optimizer share")
        check(by["soap"]["lr"] is None and by["soap"]["failed"] == 1, "a failed optimizer is listed")
        md = open(os.path.join(out, "report.md")).read()
        check("| muon | 0.002 (grid edge) | 3.9000 |" in md, "report row")
        muon = run_dir(out, "muon", 2e-3)
        os.makedirs(os.path.join(muon, "checkpoints", "step_20"))
        compact_run(muon)
        compact_run(muon)  # idempotent
        check(sorted(os.listdir(muon)) == ["config.json", "harness.json", "metrics.jsonl.gz"],
              "a compacted run keeps config, harness record and gzipped metrics")
        rows2, _ = build_report(out, jobs)
        check(rows2 == rows, "the report from a compacted run is the same")
        check(all(os.path.isfile(os.path.join(out, n)) for n in
                  ("lr_sensitivity.png", "val_loss.png", "smax.png")), "figures written")
        try:
            parse_lrs(["adamw=1e-3,x"], ["adamw"])
            check(False, "a bad --lrs value is refused")
        except SweepError as e:
            check("adamw" in str(e) and "numbers" in str(e), "a bad --lrs value is refused")
        try:
            parse_lrs(["sgd=1e-3"], ["adamw"])
            check(False, "an unknown --lrs optimizer is refused")
        except SweepError as e:
            check("sgd" in str(e), "an unknown --lrs optimizer is refused")
    print("self-test %s" % ("PASSED" if ok else "FAILED"))
    return 0 if ok else 1


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config")
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    ap.add_argument("--lrs", nargs="+", metavar="OPT=LR,LR")
    ap.add_argument("--out")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--mpirun", type=int, default=1)
    ap.add_argument("--binary", default=os.path.join(os.environ.get("MOETRAIN_BUILD_DIR", "build"),
                                                     "moetrain"))
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="PATH=VALUE")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--compact", action="store_true")
    ap.add_argument("--self-test", action="store_true")
    a = ap.parse_args(argv)
    if a.self_test:
        return self_test()
    try:
        a.optimizers = [o for o in a.optimizers.split(",") if o]
        bad = [o for o in a.optimizers if o not in OPTIMIZERS]
        if bad or not a.optimizers:
            raise SweepError("--optimizers: expected a comma list of %s, got %r"
                             % ("|".join(OPTIMIZERS), ",".join(bad) or "nothing"))
        if a.mpirun < 1:
            raise SweepError("--mpirun: expected a number of ranks >= 1, got %d" % a.mpirun)
        a.lr_grids = parse_lrs(a.lrs, a.optimizers)
        if a.config is None:
            a.config = "configs/brown_muonclip.json"
        a.out = a.out or ("runs/optimizer_sweep_quick" if a.quick else "runs/optimizer_sweep")
        if a.quick:
            a.sets = QUICK_SETS + a.sets
        if a.report_only:
            with open(os.path.join(a.out, "sweep.json"), encoding="utf-8") as f:
                grids = json.load(f)["grids"]
            jobs = [(o, lr) for o in grids for lr in grids[o]]
            if a.compact:
                compact_finished(a.out, jobs)
        else:
            if not os.path.isfile(a.binary):
                raise SweepError("%s: no moetrain binary (build it, or pass --binary)" % a.binary)
            jobs = sweep(a)
        rows, target = build_report(a.out, jobs)
    except (SweepError, OSError) as e:
        print("%s: error: %s" % (PROG, e), file=sys.stderr)
        return 2
    print(open(os.path.join(a.out, "report.md"), encoding="utf-8").read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
