#!/usr/bin/python3
"""Compare moetrain runs: one figure and one table from each run's metrics.jsonl.

    scripts/compare_runs.py RUN_DIR... -o report.png [--target-val-loss X] [--labels a,b]
    scripts/compare_runs.py --self-test

Each RUN_DIR holds metrics.jsonl (one JSON object per step, plus one per evaluation with
val_loss) and config.json (the resolved config; optim.name labels the run, optim.qk_clip_tau
gives the tau line of muonclip runs).

Figure panels: train loss vs tokens, val loss vs tokens, S_max (max over layers) per step with
each muonclip run's tau, clipped heads per step, expert load imbalance (max/mean load, mean over
the MoE layers) per step, and the table below.

Table: per run the final train loss, the best val loss, the tokens needed to reach a common
target val loss (default: the largest of the runs' best val losses, i.e. a loss every run
reached), found by linear interpolation between evaluations, and that token count as a ratio of
the first run's.
"""

import argparse
import gzip
import json
import math
import os
import re
import subprocess
import sys
import tempfile

PROG = "compare_runs"


class RunError(Exception):
    """A problem with the input: the message names the file."""


# --------------------------------------------------------------------------------------------
# Reading runs


def _num(v):
    """A JSON number as float; null, missing, non-numeric -> NaN."""
    if isinstance(v, bool) or v is None:
        return math.nan
    if isinstance(v, (int, float)):
        return float(v)
    return math.nan


def _reduce(values, how):
    """max / mean over the non-null numbers of a list (or a bare number); NaN when none."""
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = [values]
    if not isinstance(values, list):
        return math.nan
    xs = [_num(v) for v in values]
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return math.nan
    return max(xs) if how == "max" else sum(xs) / len(xs)


class Run:
    def __init__(self, path):
        self.path = path
        self.name = os.path.basename(os.path.normpath(path))
        self.optim = None
        self.tau = None
        self.steps = {}  # step -> record (a resumed run's repeated steps: the last one wins)
        self.evals = {}  # step -> (tokens, val_loss)


def load_run(path):
    if not os.path.isdir(path):
        raise RunError(f"{path}: no such run directory")
    run = Run(path)
    metrics = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(metrics) and os.path.isfile(metrics + ".gz"):
        metrics += ".gz"  # a finished run kept compact (compare_optimizers.py --compact)
    if not os.path.isfile(metrics):
        raise RunError(f"{metrics}: file missing (is '{path}' a moetrain run directory?)")
    try:
        opener = gzip.open if metrics.endswith(".gz") else open
        with opener(metrics, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, EOFError) as e:
        raise RunError(f"{metrics}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    last = max((i for i, s in enumerate(lines) if s.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if i == last:  # the torn last line of a run killed while writing
                print(f"{PROG}: warning: {metrics}:{i + 1}: ignoring a truncated last line",
                      file=sys.stderr)
                continue
            raise RunError(f"{metrics}:{i + 1}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            raise RunError(f"{metrics}:{i + 1}: expected a JSON object with an integer 'step'")
        if "val_loss" in rec:
            v = _num(rec.get("val_loss"))
            if not math.isnan(v):
                run.evals[rec["step"]] = (_num(rec.get("tokens")), v)
        elif "loss" in rec:
            run.steps[rec["step"]] = rec
    if not run.steps:
        raise RunError(f"{metrics}: empty metrics: no training step records")

    config = os.path.join(path, "config.json")
    try:
        with open(config, encoding="utf-8") as f:
            cfg = json.load(f)
        optim = cfg.get("optim", {}) if isinstance(cfg, dict) else {}
        run.optim = optim.get("name")
        if run.optim == "muonclip":
            run.tau = _num(optim.get("qk_clip_tau", 100.0))
    except FileNotFoundError:
        print(f"{PROG}: warning: {config}: file missing; labelling the run by its directory name",
              file=sys.stderr)
    except (OSError, json.JSONDecodeError) as e:
        raise RunError(f"{config}: cannot read the config ({e})") from None
    return run


def series(run):
    """Per-step arrays (sorted by step) of everything the figure needs."""
    s = sorted(run.steps)
    recs = [run.steps[k] for k in s]
    return {
        "step": s,
        "tokens": [_num(r.get("tokens")) for r in recs],
        "loss": [_num(r.get("loss")) for r in recs],
        "smax": [_reduce(r.get("smax_max"), "max") for r in recs],
        "clipped": [_num(r.get("clipped_heads")) for r in recs],
        "imbalance": [_reduce(r.get("imbalance"), "mean") for r in recs],
    }


def eval_series(run):
    s = sorted(run.evals)
    return [run.evals[k][0] for k in s], [run.evals[k][1] for k in s]


# --------------------------------------------------------------------------------------------
# The numbers


def tokens_to_reach(tokens, losses, target):
    """Tokens at which the val loss first reaches `target`, interpolating linearly between the
    evaluation before and the first evaluation at or below it; None when never reached. When the
    first evaluation is already at or below it, that evaluation's tokens (an upper bound)."""
    prev = None
    for t, v in zip(tokens, losses):
        if math.isnan(t) or math.isnan(v):
            continue
        if v <= target:
            if prev is None or prev[1] == v:
                return t
            t0, v0 = prev
            return t0 + (v0 - target) / (v0 - v) * (t - t0)
        prev = (t, v)
    return None


def summarize(runs, labels, target=None):
    rows = []
    for run, label in zip(runs, labels):
        s = series(run)
        et, ev = eval_series(run)
        losses = [x for x in s["loss"] if not math.isnan(x)]
        tail = losses[-10:]
        rows.append({
            "label": label,
            "dir": run.path,
            "steps": s["step"][-1],
            "tokens": _reduce(s["tokens"], "max"),
            "final_loss": losses[-1] if losses else math.nan,
            "final_loss10": sum(tail) / len(tail) if tail else math.nan,
            "best_val": min(ev) if ev else math.nan,
            "smax_peak": _reduce(s["smax"], "max"),
            "smax_last": next((x for x in reversed(s["smax"]) if not math.isnan(x)), math.nan),
            "tau": run.tau,
            "clipped_steps": sum(1 for c in s["clipped"] if c > 0),
            "evals": (et, ev),
        })
    bests = [r["best_val"] for r in rows if not math.isnan(r["best_val"])]
    default_target = target is None
    if default_target:
        target = max(bests) if bests else math.nan
    for r in rows:
        r["to_target"] = None if math.isnan(target) else tokens_to_reach(*r["evals"], target)
    base = rows[0]["to_target"]
    for r in rows:
        r["ratio"] = (r["to_target"] / base) if (r["to_target"] is not None and base) else None
    return rows, target, default_target


def _fmt(x, spec):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def format_table(rows, target, default_target):
    how = ("the largest of the runs' best val losses: every run reached it"
           if default_target else "--target-val-loss")
    out = [f"target val loss: {_fmt(target, '.4f')} ({how})"]
    head = ["run", "dir", "steps", "tokens", "final loss", "last-10 loss", "best val",
            "tokens to target", "ratio", "tau", "max S_max", "last S_max", "clip steps"]
    body = []
    for r in rows:
        to = r["to_target"]
        body.append([
            r["label"], r["dir"], str(r["steps"]), _fmt(r["tokens"], ".0f"),
            _fmt(r["final_loss"], ".4f"), _fmt(r["final_loss10"], ".4f"), _fmt(r["best_val"], ".4f"),
            "not reached" if to is None else f"{to:.0f}",
            _fmt(r["ratio"], ".3f"), _fmt(r["tau"], "g"), _fmt(r["smax_peak"], ".2f"),
            _fmt(r["smax_last"], ".2f"), str(r["clipped_steps"]),
        ])
    widths = [max(len(head[i]), *(len(b[i]) for b in body)) for i in range(len(head))]

    def line(cells):
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out.append(line(head))
    out += [line(b) for b in body]
    out.append("ratio: tokens to reach the target val loss / the first run's "
               "(< 1: fewer tokens than the first run)")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# The figure


def _ema(xs, alpha):
    """Bias-corrected exponential moving average (as Adam's moments): m = (1 - alpha) m + alpha x
    from m = 0, divided by 1 - (1 - alpha)^t after t values, so step t weighs the values seen so far
    by alpha (1 - alpha)^age normalised to 1. Seeding m with the first value instead weighs the
    initial loss by (1 - alpha)^t: with alpha = 0.01 still 37 % after 100 steps, which made the
    line trail a falling loss by about a nat. NaN values are skipped (and shown as NaN)."""
    out, m, t = [], 0.0, 0
    for x in xs:
        if math.isnan(x):
            out.append(math.nan)
            continue
        t += 1
        m = (1 - alpha) * m + alpha * x
        out.append(m / (1 - (1 - alpha) ** t))
    return out


def draw(runs, labels, rows, target, table, out_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(3, 2, figsize=(15, 14))
    ax_loss, ax_val, ax_smax, ax_clip, ax_imb, ax_tab = axes.flatten()
    for i, (run, label) in enumerate(zip(runs, labels)):
        c = colors[i % len(colors)]
        s = series(run)
        n = len(s["step"])
        alpha = min(1.0, 10.0 / max(n, 10))
        ax_loss.plot(s["tokens"], s["loss"], color=c, alpha=0.25, lw=0.8)
        ax_loss.plot(s["tokens"], _ema(s["loss"], alpha), color=c, lw=1.6, label=label)
        et, ev = eval_series(run)
        if ev:
            ax_val.plot(et, ev, "o-", color=c, ms=3, lw=1.4, label=label)
        ax_smax.plot(s["step"], s["smax"], color=c, lw=1.2, label=label)
        if run.tau is not None and not math.isnan(run.tau):
            ax_smax.axhline(run.tau, color=c, ls="--", lw=1.0, label=f"tau = {run.tau:g} ({label})")
        ax_clip.step(s["step"], s["clipped"], where="mid", color=c, lw=1.0, label=label)
        ax_imb.plot(s["step"], s["imbalance"], color=c, alpha=0.25, lw=0.8)
        ax_imb.plot(s["step"], _ema(s["imbalance"], alpha), color=c, lw=1.6, label=label)
    if not math.isnan(target):
        ax_val.axhline(target, color="gray", ls=":", lw=1.0, label=f"target {target:.4f}")
        for i, r in enumerate(rows):
            if r["to_target"] is not None:
                ax_val.plot([r["to_target"]], [target], "x", color=colors[i % len(colors)], ms=9)
    titles = [
        (ax_loss, "train loss (objective; light: per step, bold: bias-corrected EMA)", "tokens", "loss"),
        (ax_val, "validation loss (x: target reached)", "tokens", "val loss"),
        (ax_smax, "S_max: max attention logit over layers and heads", "step", "S_max"),
        (ax_clip, "QK-clip: clipped heads per step", "step", "heads"),
        (ax_imb, "expert load imbalance (max/mean load, mean over MoE layers)", "step",
         "max / mean"),
    ]
    for ax, title, xl, yl in titles:
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    ax_tab.axis("off")
    ax_tab.text(0.0, 1.0, table, family="monospace", fontsize=7.5, va="top",
                ha="left", transform=ax_tab.transAxes)
    fig.suptitle("moetrain run comparison: " + ", ".join(labels), fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    out_dir = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(out_dir, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Command line


def make_labels(runs, given):
    if given is not None:
        labels = [x.strip() for x in given.split(",")]
        if len(labels) != len(runs):
            raise RunError(f"--labels: {len(labels)} label(s) for {len(runs)} run(s)")
        return labels
    base = [r.optim or r.name for r in runs]
    return [b if base.count(b) == 1 else f"{b} ({r.name})" for b, r in zip(base, runs)]


def report(run_dirs, out_path, target=None, labels=None):
    runs = [load_run(d) for d in run_dirs]
    labels = make_labels(runs, labels)
    rows, target, default_target = summarize(runs, labels, target)
    table = format_table(rows, target, default_target)
    print(table)
    draw(runs, labels, rows, target, _panel_table(rows, target), out_path)
    print(f"report: {out_path}")
    return rows


def _panel_table(rows, target):
    out = [f"target val loss {_fmt(target, '.4f')}", ""]
    for r in rows:
        to = r["to_target"]
        out += [
            f"{r['label']}  ({r['dir']})",
            f"  {r['steps']} steps, {_fmt(r['tokens'], '.0f')} tokens",
            f"  final train loss {_fmt(r['final_loss'], '.4f')} "
            f"(mean of last 10: {_fmt(r['final_loss10'], '.4f')})",
            f"  best val loss {_fmt(r['best_val'], '.4f')}",
            f"  tokens to target {'not reached' if to is None else f'{to:.0f}'}, "
            f"ratio vs first run {_fmt(r['ratio'], '.3f')}",
            f"  S_max max {_fmt(r['smax_peak'], '.2f')}, last {_fmt(r['smax_last'], '.2f')}"
            + ("" if r["tau"] is None else f" (tau {_fmt(r['tau'], 'g')})")
            + f"; steps with clipped heads {r['clipped_steps']}",
            "",
        ]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Self-test


def _write_synthetic(path, optim, tau, evals, steps_per_eval=4, tokens_per_step=250):
    """A run whose val loss at eval i is evals[i], with step lines interleaved, nulls (dense
    layer, a NaN smax) and a torn last line."""
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"optim": {"name": optim, "qk_clip_tau": tau}}, f)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        step = 0
        for v in evals:
            for _ in range(steps_per_eval):
                step += 1
                rec = {"step": step, "tokens": step * tokens_per_step, "loss": 8.0 - 0.05 * step,
                       "ce": 8.0 - 0.05 * step, "smax_max": [1.0 + step, None if step == 3 else 2.0],
                       "clipped_heads": 1 if (optim == "muonclip" and step % 2) else 0,
                       "imbalance": [None, 1.5, 1.25], "router_entropy": [None, 2.0, 2.0]}
                f.write(json.dumps(rec) + "\n")
            f.write(json.dumps({"step": step, "tokens": step * tokens_per_step, "val_loss": v,
                                "val_ppl": math.exp(v)}) + "\n")
        f.write(json.dumps({"step": step + 1, "tokens": None, "loss": None, "smax_max": None,
                            "clipped_heads": None, "imbalance": None}) + "\n")
        f.write('{"step": 99, "tok')  # torn


def self_test():
    script = os.path.abspath(__file__)
    failures = []

    def check(cond, what):
        print(("ok    " if cond else "FAIL  ") + what)
        if not cond:
            failures.append(what)

    # The smoothing follows the data from the first step: a constant is its own average, the first
    # value is itself, and on a loss falling from 10 to 4 over 20 steps and flat after, the line
    # at step 200 (alpha 0.01) is within 0.35 of the loss: 0.105 above it, where seeding m with the
    # first value left it 0.89 above.
    ema = _ema([3.0] * 5, 0.01)
    check(all(abs(v - 3.0) < 1e-12 for v in ema), "EMA of a constant is the constant")
    falling = [10.0 - 6.0 * min(i, 20) / 20 for i in range(200)]
    ema = _ema(falling, 0.01)
    check(abs(ema[0] - falling[0]) < 1e-12, "EMA starts at the first value")
    check(abs(ema[20] - falling[20]) < 3.5, f"EMA at step 20 {ema[20]:.2f} near the loss "
          f"{falling[20]:.2f} (a running mean of the way down)")
    check(abs(ema[199] - falling[199]) < 0.35, f"EMA at step 200 {ema[199]:.3f} within 0.35 of "
          f"{falling[199]:.3f}")
    check(math.isnan(_ema([1.0, math.nan, 2.0], 0.5)[1]), "NaN stays NaN")

    with tempfile.TemporaryDirectory(prefix="compare_runs_") as tmp:
        a, b = os.path.join(tmp, "run_a"), os.path.join(tmp, "run_b")
        # Evals every 4 steps x 250 tokens = every 1000 tokens.
        _write_synthetic(a, "adamw", 100.0, [6.0, 5.0, 4.0, 3.5])
        _write_synthetic(b, "muonclip", 30.0, [6.5, 5.5, 4.8, 4.2])
        # Default target: max(best) = max(3.5, 4.2) = 4.2. A reaches it between 2000 tokens (5.0)
        # and 3000 (4.0): 2000 + (5.0 - 4.2) / (5.0 - 4.0) * 1000 = 2800; B at 4000 (its best).
        cases = [([], 4.2, 2800.0, 4000.0), (["--target-val-loss", "4.5"], 4.5, 2500.0, 3500.0)]
        for extra, target, ta, tb in cases:
            png = os.path.join(tmp, "report.png")
            p = subprocess.run([sys.executable, script, a, b, "-o", png] + extra,
                               capture_output=True, text=True)
            check(p.returncode == 0, f"exit code 0 {extra}" +
                  ("" if p.returncode == 0 else f" (got {p.returncode}: {p.stderr.strip()})"))
            print(p.stdout)
            rows = {}
            for line in p.stdout.splitlines():
                m = re.match(r"^(adamw|muonclip)\s+\S+\s+(\d+)\s+(\d+)\s+(\S+)\s+(\S+)\s+(\S+)\s+"
                             r"(\d+)\s+(\S+)\s+", line)
                if m:
                    rows[m.group(1)] = (float(m.group(7)), float(m.group(8)))
            expected_ratio = tb / ta
            check(set(rows) == {"adamw", "muonclip"}, f"table has both runs {extra}")
            if set(rows) == {"adamw", "muonclip"}:
                check(abs(rows["adamw"][0] - ta) < 0.5 and abs(rows["muonclip"][0] - tb) < 0.5,
                      f"tokens to target {target}: {rows['adamw'][0]:.0f}, {rows['muonclip'][0]:.0f}"
                      f" (expected {ta:.0f}, {tb:.0f})")
                check(abs(rows["adamw"][1] - 1.0) < 1e-9 and
                      abs(rows["muonclip"][1] - expected_ratio) < 1e-3,
                      f"ratio {rows['muonclip'][1]:.3f} == {tb:.0f}/{ta:.0f} = "
                      f"{expected_ratio:.3f}")
            check(f"target val loss: {target:.4f}" in p.stdout, f"target printed as {target:.4f}")
            check(os.path.getsize(png) > 10000 if os.path.exists(png) else False,
                  f"PNG written {extra}")
            os.remove(png)
        # Errors name the path and exit with 1.
        missing = os.path.join(tmp, "no_such_run")
        empty = os.path.join(tmp, "empty_run")
        os.makedirs(empty)
        open(os.path.join(empty, "metrics.jsonl"), "w").close()
        nometrics = os.path.join(tmp, "no_metrics")
        os.makedirs(nometrics)
        for bad, path_in_msg in [(missing, missing), (empty, os.path.join(empty, "metrics.jsonl")),
                                 (nometrics, os.path.join(nometrics, "metrics.jsonl"))]:
            p = subprocess.run([sys.executable, script, a, bad, "-o",
                                os.path.join(tmp, "x.png")], capture_output=True, text=True)
            check(p.returncode == 1 and path_in_msg in p.stderr,
                  f"error for {os.path.basename(bad)}: exit {p.returncode}, "
                  f"stderr {p.stderr.strip()!r}")
    print("self-test: " + ("passed" if not failures else f"{len(failures)} check(s) FAILED"))
    return 0 if not failures else 1


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="compare_runs.py",
        description="Compare moetrain runs: a PNG of loss, val loss, S_max, clipped heads and "
                    "expert imbalance, and a table of tokens needed to reach a common val loss.")
    ap.add_argument("runs", nargs="*", metavar="RUN_DIR", help="run directories (metrics.jsonl)")
    ap.add_argument("-o", "--output", metavar="PNG", help="the figure to write (PNG)")
    ap.add_argument("--target-val-loss", type=float, metavar="X",
                    help="common target val loss (default: the largest of the runs' best val "
                         "losses, which every run reached)")
    ap.add_argument("--labels", metavar="A,B", help="comma-separated labels, one per run "
                    "(default: optim.name from each run's config.json)")
    ap.add_argument("--self-test", action="store_true",
                    help="check the report on two synthetic runs and exit")
    args = ap.parse_args(argv)
    if args.self_test:
        return self_test()
    if not args.runs:
        ap.error("give at least one RUN_DIR")
    if not args.output:
        ap.error("-o/--output is required")
    try:
        report(args.runs, args.output, args.target_val_loss, args.labels)
    except RunError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
