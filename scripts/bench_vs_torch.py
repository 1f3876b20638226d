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

The twin's matmuls run on Debian's OpenBLAS, which picks its kernels from the CPU's model. On one
it does not recognise it picks kernels below what the CPU can run: on a virtual machine's "Intel(R)
Xeon(R) Processor" its Prescott kernels (SSE3, no AVX, measured 2.6x slower on the twin), on an AMD
Zen 5 (family 26, AVX-512) its Haswell kernels (AVX2: 201 GFLOP/s at 2048^3 against SkylakeX's 365
on 2 cores), either of which would inflate the ratio. So the script asks OpenBLAS which core it
chose; when that core uses a narrower instruction set than the CPU has (no AVX, AVX2 or AVX-512) it
sets OPENBLAS_CORETYPE to the OpenBLAS core of the CPU's widest one (Haswell for AVX2 with FMA,
SkylakeX for AVX-512) for both programs, says so, and quotes the core in the result. An
OPENBLAS_CORETYPE already set is kept where it is as wide as the CPU; a narrower one (this
machine's image pinned Haswell on the Zen 5) is unset, so OpenBLAS chooses (Cooperlake there), or
replaced where OpenBLAS's own choice is narrower too. A core this script does not know is kept.

Usage (normally through scripts/bench_vs_torch.sh, which builds moetrain first):
  bench_vs_torch.py CONFIG [--rounds R] [--steps S] [--warmup W] [--threads T] [--binary PATH]
      [--set path=value ...] [--json OUT.json]
  bench_vs_torch.py --self-test      # checks the OpenBLAS core choice on known CPUs
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


# OpenBLAS's x86 cores by the widest instruction set their sgemm kernels use: 0 = no AVX (what it
# falls back to on a CPU it does not know), 1 = AVX2 with FMA, 2 = AVX-512. AVX-only and FMA4
# cores (Sandy Bridge, Bulldozer..Steamroller) count as 0: their kernels are as far below an AVX2
# CPU's as the generic ones.
CORE_TIER = {**{c: 0 for c in ("prescott", "core2", "penryn", "dunnington", "nehalem", "atom",
                               "katmai", "coppermine", "northwood", "banias", "sandybridge",
                               "bulldozer", "piledriver", "steamroller")},
             **{c: 1 for c in ("haswell", "zen", "excavator")},
             **{c: 2 for c in ("skylakex", "cooperlake", "sapphirerapids")}}
# The core each tier's CPU is given when OpenBLAS picked a lower one.
TIER_CORE = {1: "Haswell", 2: "SkylakeX"}
TIER_ISA = {0: "no AVX2", 1: "AVX2", 2: "AVX-512"}


def cpu_tier(flags):
    """The widest instruction set OpenBLAS has kernels for that a CPU with these flags runs."""
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
        return 2
    if {"avx2", "fma"} <= flags:
        return 1
    return 0


def pick_core(core, flags):
    """The OPENBLAS_CORETYPE to set for a CPU with these /proc/cpuinfo flags on which OpenBLAS chose
    `core`, or None to keep OpenBLAS's choice (it is already the widest, or unknown here)."""
    tier = CORE_TIER.get(core.lower())
    want = cpu_tier(flags)
    if tier is None or tier >= want:
        return None
    return TIER_CORE[want]


CORE_PROBE = ("import ctypes, torch\n"
              "lib = ctypes.CDLL('libopenblas.so.0')\n"
              "lib.openblas_get_corename.restype = ctypes.c_char_p\n"
              "print(lib.openblas_get_corename().decode())")


def openblas_core(env):
    """The kernels OpenBLAS picks in the twin's interpreter (with torch loaded), or '?'."""
    p = subprocess.run(["/usr/bin/python3", "-c", CORE_PROBE], capture_output=True, text=True,
                       env=env)
    return p.stdout.strip() if p.returncode == 0 and p.stdout.strip() else "?"


def cpu_flags():
    """The flags of /proc/cpuinfo's first CPU, or None where it cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def blas_env():
    """os.environ, with OPENBLAS_CORETYPE set (or unset) where OpenBLAS would run narrower kernels
    than the CPU has (pick_core); and the core the twin then runs on."""
    env = dict(os.environ)
    core = openblas_core(env)
    flags = cpu_flags()
    pick = pick_core(core, flags) if flags is not None else None
    if pick is None:
        return env, core
    # A preset narrower than the CPU (a machine image may pin one) goes; OpenBLAS's own choice is
    # then kept where it is already the CPU's widest, else the widest core is set.
    preset = env.pop("OPENBLAS_CORETYPE", None)
    own = openblas_core(env) if preset is not None else core
    if preset is not None and own.lower() in CORE_TIER and pick_core(own, flags) is None:
        chosen, action = own, "unset for both programs (OpenBLAS then chooses %s)" % own
    else:
        env["OPENBLAS_CORETYPE"] = pick
        chosen = openblas_core(env)
        action = "OPENBLAS_CORETYPE=%s for both programs (now %s)" % (pick, chosen)
    why = ("OPENBLAS_CORETYPE=%s in the environment gives the twin" % preset if preset is not None
           else "OpenBLAS chose")
    print("%s: %s its %s kernels (%s) on this CPU, which has %s: %s"
          % (PROG, why, core, TIER_ISA[CORE_TIER[core.lower()]], TIER_ISA[cpu_tier(flags)],
             action), flush=True)
    return env, chosen


def self_test():
    """pick_core on the CPUs this script has met, and on the cases around them."""
    avx2 = {"avx", "avx2", "fma", "sse4_2"}
    avx512 = avx2 | {"avx512f", "avx512bw", "avx512dq", "avx512vl"}
    cases = [  # (what, OpenBLAS's core, flags, expected OPENBLAS_CORETYPE)
        ("Xeon VM OpenBLAS does not know, AVX-512", "Prescott", avx512, "SkylakeX"),
        ("unknown Intel CPU with AVX2 only", "Prescott", avx2, "Haswell"),
        ("Zen 5 (family 26), AVX-512, given Haswell", "Haswell", avx512, "SkylakeX"),
        ("Zen 3, AVX2 only, given Zen", "Zen", avx2, None),
        ("Zen 4 given Zen although it has AVX-512", "Zen", avx512, "SkylakeX"),
        ("Sapphire Rapids recognised", "SapphireRapids", avx512, None),
        ("Cooper Lake recognised", "Cooperlake", avx512, None),
        ("Skylake-X recognised", "SkylakeX", avx512, None),
        ("Sandy Bridge kernels on an AVX2 CPU", "Sandybridge", avx2, "Haswell"),
        ("a CPU without AVX2 keeps the generic core", "Prescott", {"sse4_2", "avx"}, None),
        ("AVX-512F without BW/VL is not SkylakeX's ISA", "Haswell", avx2 | {"avx512f"}, None),
        ("a core this script does not know is kept", "NeoverseN2", avx512, None),
    ]
    failures = 0
    for what, core, flags, want in cases:
        got = pick_core(core, flags)
        ok = got == want
        failures += not ok
        print("%s  %s: %s -> %s (expected %s)" % ("ok  " if ok else "FAIL", what, core, got, want))
    print("self-test: " + ("passed" if not failures else "%d check(s) FAILED" % failures))
    return 1 if failures else 0


def run(cmd, threads, what, base_env):
    env = dict(base_env, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise BenchError("%s failed (exit %d):\n%s" % (what, p.returncode,
                                                       (p.stderr or p.stdout)[-2000:]))
    return last_json(p.stdout, what)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", nargs="?")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--binary", default=os.path.join(os.environ.get("MOETRAIN_BUILD_DIR", "build"),
                                                     "moetrain"))
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="PATH=VALUE")
    ap.add_argument("--json", dest="json_out", metavar="OUT.json")
    ap.add_argument("--self-test", action="store_true",
                    help="check the OpenBLAS core choice on known CPUs and exit")
    a = ap.parse_args(argv)
    if a.self_test:
        return self_test()
    if a.config is None:
        ap.error("the following arguments are required: config")
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
