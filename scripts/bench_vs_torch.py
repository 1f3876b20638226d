#!/usr/bin/python3
"""moetrain's forward+backward against its PyTorch twin's, side by side on this machine.

Both time the same model (the config), the same weights and the same batch (`moetrain bench
--dump` writes them, scripts/torch_reference.py --bench-steps reads them; their losses must agree)
with the same number of threads, in float32. Rounds alternate which one runs first, so a drift of
the machine's speed falls on both. Per round: both tokens/s, both MFU against the GEMM peak that
moetrain bench measured in that round (the backend's gemm in the run's precision: with
--set train.precision=bf16 on the CPU, oneDNN's bf16 matmul, against which the float32 twin's MFU
is then quoted too), and the ratio; then the median. The twin always runs in float32; its loss
must agree with moetrain's to 1e-3 relative (1e-2 with bf16 GEMM operands).

The twin's matmuls run on Debian's OpenBLAS, which picks its kernels from the CPU's model: on one it
does not recognise (a virtual machine's "Intel(R) Xeon(R) Processor", say) it falls back to its
Prescott kernels (SSE3, no AVX), measured 2.6x slower on the twin here, which would inflate the
ratio. So the script asks OpenBLAS which core it chose; when that is a generic one on a CPU with
AVX-512 (or AVX2) it sets OPENBLAS_CORETYPE=SkylakeX (or Haswell) for both programs, says so, and
quotes the core in the result. An OPENBLAS_CORETYPE already set is kept.

Usage (normally through scripts/bench_vs_torch.sh, which builds moetrain first):
  bench_vs_torch.py CONFIG [--rounds R] [--steps S] [--warmup W] [--threads T] [--binary PATH]
      [--set path=value ...] [--json OUT.json]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
PROG = "bench_vs_torch"


class BenchError(Exception):
    pass


def last_json(text, what):
    """The JSON object a command printed last (after any log lines)."""
    i = text.rfind("{\n")
    if i < 0:
        raise BenchError("%s printed no JSON:\n%s" % (what, text[-2000:]))
    try:
        return json.loads(text[i:])
    except json.JSONDecodeError as e:
        raise BenchError("%s: unreadable JSON (%s):\n%s" % (what, e, text[-2000:])) from None


# OpenBLAS cores that use no AVX: what it falls back to on a CPU it does not know.
GENERIC_CORES = {"prescott", "core2", "penryn", "dunnington", "nehalem", "atom", "katmai",
                 "coppermine", "northwood", "banias"}
CORE_PROBE = ("import ctypes, torch\n"
              "lib = ctypes.CDLL('libopenblas.so.0')\n"
              "lib.openblas_get_corename.restype = ctypes.c_char_p\n"
              "print(lib.openblas_get_corename().decode())")


def openblas_core(env):
    """The kernels OpenBLAS picks in the twin's interpreter (with torch loaded), or '?'."""
    p = subprocess.run(["/usr/bin/python3", "-c", CORE_PROBE], capture_output=True, text=True,
                       env=env)
    return p.stdout.strip() if p.returncode == 0 and p.stdout.strip() else "?"


def blas_env():
    """os.environ, with OPENBLAS_CORETYPE set where OpenBLAS would fall back to generic kernels on
    a CPU with AVX-512 or AVX2; and the core the twin then runs on."""
    env = dict(os.environ)
    core = openblas_core(env)
    if "OPENBLAS_CORETYPE" in env or core.lower() not in GENERIC_CORES:
        return env, core
    flags = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        return env, core
    pick = ("SkylakeX" if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags
            else "Haswell" if {"avx2", "fma"} <= flags else None)
    if pick is None:
        return env, core
    env["OPENBLAS_CORETYPE"] = pick
    chosen = openblas_core(env)
    print("%s: OpenBLAS chose its generic %s kernels on this CPU, which has %s: "
          "OPENBLAS_CORETYPE=%s for both programs (now %s)"
          % (PROG, core, "AVX-512" if pick == "SkylakeX" else "AVX2", pick, chosen), flush=True)
    return env, chosen


def run(cmd, threads, what, base_env):
    env = dict(base_env, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise BenchError("%s failed (exit %d):\n%s" % (what, p.returncode,
                                                       (p.stderr or p.stdout)[-2000:]))
    return last_json(p.stdout, what)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--binary", default=os.path.join(os.environ.get("MOETRAIN_BUILD_DIR", "build"),
                                                     "moetrain"))
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="PATH=VALUE")
    ap.add_argument("--json", dest="json_out", metavar="OUT.json")
    a = ap.parse_args(argv)
    try:
        for flag, v, low in (("--rounds", a.rounds, 1), ("--steps", a.steps, 1),
                             ("--warmup", a.warmup, 0), ("--threads", a.threads, 1)):
            if v < low:
                raise BenchError("%s: expected an integer >= %d, got %d" % (flag, low, v))
        if not os.path.isfile(a.binary):
            raise BenchError("%s: no moetrain binary (build it, or pass --binary)" % a.binary)
        sets = [x for s in a.sets for x in ("--set", s)]
        with tempfile.TemporaryDirectory(prefix="bench_vs_torch_") as tmp:
            p = subprocess.run([a.binary, "config", "--check", a.config] + sets,
                               capture_output=True, text=True)
            if p.returncode != 0:
                raise BenchError((p.stderr or p.stdout).strip())
            cfg = json.loads(p.stdout[p.stdout.index("{"):p.stdout.rindex("}") + 1])
            cfg_path = os.path.join(tmp, "config.json")
            with open(cfg_path, "w", encoding="utf-8") as f:
                json.dump(cfg, f)
            base = [a.binary, "bench", "--config", a.config] + sets
            env, core = blas_env()
            run(base + ["--steps", "1", "--warmup", "0", "--peak-size", "64", "--json",
                        "--dump", tmp], a.threads, "moetrain bench --dump", env)
            torch_cmd = ["/usr/bin/python3", os.path.join(HERE, "torch_reference.py"),
                         "--bench-steps", str(a.steps), "--warmup", str(a.warmup),
                         "--threads", str(a.threads), "--config", cfg_path,
                         "--weights", os.path.join(tmp, "weights.safetensors"),
                         "--batch", os.path.join(tmp, "batch.safetensors")]
            moe_cmd = base + ["--steps", str(a.steps), "--warmup", str(a.warmup), "--json"]
            rounds = []
            print("%s: %s, %d tokens per step, %d threads, %d rounds of %d steps (+%d warm-up)"
                  % (PROG, a.config, cfg["data"]["batch_size"] * cfg["model"]["seq_len"],
                     a.threads, a.rounds, a.steps, a.warmup), flush=True)
            print("round  first     moetrain tok/s  MFU     torch tok/s  MFU     ratio", flush=True)
            for r in range(a.rounds):
                order = ("moetrain", "torch") if r % 2 == 0 else ("torch", "moetrain")
                res = {}
                for who in order:
                    res[who] = (run(moe_cmd, a.threads, "moetrain bench", env) if who == "moetrain"
                                else run(torch_cmd, a.threads, "torch_reference.py --bench-steps",
                                         env))
                m, t = res["moetrain"], res["torch"]
                bf16 = "bf16" in m.get("backend", "")
                if abs(m["loss"] - t["loss"]) > (1e-2 if bf16 else 1e-3) * abs(m["loss"]):
                    raise BenchError("the two losses differ (moetrain %.6f, torch %.6f): not the "
                                     "same model, weights or batch" % (m["loss"], t["loss"]))
                peak = m["sgemm_peak_gflops"] * 1e9
                row = {"round": r + 1, "first": order[0],
                       "moetrain_tokens_per_s": m["tokens_per_second"], "moetrain_mfu": m["mfu"],
                       "torch_tokens_per_s": t["tokens_per_second"],
                       "torch_mfu": t["tokens_per_second"] * m["flops_per_token"] / peak,
                       "sgemm_peak_gflops": m["sgemm_peak_gflops"],
                       "ratio": m["tokens_per_second"] / t["tokens_per_second"],
                       "loss_moetrain": m["loss"], "loss_torch": t["loss"]}
                rounds.append(row)
                print("%5d  %-8s  %14.0f  %5.1f%%  %11.0f  %5.1f%%  %5.2fx"
                      % (row["round"], row["first"], row["moetrain_tokens_per_s"],
                         100 * row["moetrain_mfu"], row["torch_tokens_per_s"],
                         100 * row["torch_mfu"], row["ratio"]), flush=True)
            med = statistics.median(x["ratio"] for x in rounds)
            print("%s: median ratio %.2fx (moetrain %s tokens/s over PyTorch %s's float32 on "
                  "OpenBLAS %s kernels, forward+backward); GEMM peak %.1f GFLOP/s (%s, median of "
                  "the rounds)"
                  % (PROG, med, m.get("backend", "?"), t.get("torch", "?"), core,
                     statistics.median(x["sgemm_peak_gflops"] for x in rounds),
                     "bf16 operands" if bf16 else "fp32"))
            if a.json_out:
                with open(a.json_out, "w", encoding="utf-8") as f:
                    json.dump({"config": a.config, "sets": a.sets, "threads": a.threads,
                               "torch_openblas_core": core, "rounds": rounds,
                               "median_ratio": med}, f, indent=1)
    except (BenchError, OSError, ValueError) as e:
        print("%s: error: %s" % (PROG, e), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
