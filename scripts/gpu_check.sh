#!/usr/bin/env bash
# Everything a GPU machine should tell us, in one command (README.md, "Checking on a GPU machine").
#
#   scripts/gpu_check.sh --prepare [BUNDLE]   on a development machine (CUDA toolkit, Debian 12
#                                             packages of scripts/setup.sh): builds for sm_90 and
#                                             fills BUNDLE (default gpu_bundle/, git-ignored)
#   scripts/gpu_check.sh --run OUTDIR         on the GPU machine, in a copy of the repository with
#                                             the bundle at gpu_bundle/ (or $MOETRAIN_GPU_BUNDLE):
#                                             writes OUTDIR/gpu_report.md, gpu_report.json and
#                                             gpu_logs.tar.gz (the rest stays in a work folder,
#                                             $MOETRAIN_GPU_CHECK_WORK or a new one under /tmp)
#   scripts/gpu_check.sh --rebuild BUNDLE DIR  what --run does when the carried binaries do not
#                                             start: builds them into DIR from the bundle's headers
#
# The bundle (< 64 MiB) holds the binaries (bin/), the non-CUDA shared libraries they need as ldd
# finds them here (OpenBLAS, gfortran, spdlog, fmt, MPI and its libraries, gomp, ...; cudart too,
# it is small) under usr/lib/x86_64-linux-gnu/, and the headers and CMake packages of the libraries
# the build finds with find_package (nlohmann/json, CLI11, Catch2, spdlog, fmt) plus cblas.h and
# mpi.h under usr/, so the GPU machine (CUDA, CMake, ninja, g++, PyTorch; no Debian dev packages)
# can rebuild when the carried binaries do not start. cuBLASLt and NCCL (hundreds of MB) are not
# bundled: --run takes them from the GPU machine's CUDA toolkit or PyTorch's nvidia-* packages.
#
# --run: each step has its own timeout and the whole run a budget ($MOETRAIN_GPU_CHECK_BUDGET,
# default 470 s, so it ends within 8 minutes); a failed step is recorded and the next one runs.
# Without a CUDA device it stops after the device query and reports that (exit 0), unless
# MOETRAIN_GPU_CHECK_ALL=1. Its exit code is 0 when the report was written.
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)

usage() {
  sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
}

# ---- --prepare --------------------------------------------------------------------------------
# Libraries that every Linux has (glibc, the C++ runtime) or that the GPU machine brings (driver,
# cuBLAS, NCCL) are not bundled.
is_system_lib() {
  case "$1" in
    linux-vdso* | ld-linux* | libc.so* | libm.so* | libdl.so* | libpthread.so* | librt.so* | \
      libstdc++.so* | libgcc_s.so* | libcuda.so* | libcublas* | libnccl* | libnvidia*) return 0 ;;
  esac
  return 1
}

prepare() {
  set -e
  local bundle=${1:-$repo/gpu_bundle}
  local build=${MOETRAIN_GPU_BUILD_DIR:-$repo/build-gpu}
  local jobs=${MOETRAIN_JOBS:-$(nproc)}
  local targets=(moetrain moetrain_gpu_tests moetrain_attention_dump)
  cmake -S "$repo" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMOETRAIN_CUDA=ON \
    -DMOETRAIN_CUDA_ARCHS=90 -DMOETRAIN_NATIVE=OFF >/dev/null
  cmake --build "$build" -j "$jobs" --target "${targets[@]}"

  rm -rf "$bundle"
  local libdir=$bundle/usr/lib/x86_64-linux-gnu
  mkdir -p "$bundle/bin" "$libdir" "$bundle/usr/include"
  for t in "${targets[@]}"; do
    cp "$build/$t" "$bundle/bin/"
    strip --strip-unneeded "$bundle/bin/$t"
  done

  # Shared libraries, by soname, as the loader resolves them here; the real file's name and the
  # linker's name (libX.so) as links to it, for CMake packages and a rebuild.
  local lib path real
  while read -r lib path; do
    is_system_lib "$lib" && continue
    [ -e "$libdir/$lib" ] && continue
    cp -L "$path" "$libdir/$lib"
    real=$(basename "$(readlink -f "$path")")
    [ "$real" = "$lib" ] || [ -e "$libdir/$real" ] || ln -s "$lib" "$libdir/$real"
    # No libcudart.so: a rebuild's CMake must find the machine's toolkit, not this copy.
    [ "${lib%%.so*}" = libcudart ] || [ -e "$libdir/${lib%%.so*}.so" ] ||
      ln -s "$lib" "$libdir/${lib%%.so*}.so"
  done < <(for t in "${targets[@]}"; do ldd "$build/$t"; done |
    awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}' | sort -u)

  # Headers and CMake packages (Debian 12's paths, mirrored under usr/).
  local d
  for d in nlohmann spdlog fmt CLI catch2; do cp -r "/usr/include/$d" "$bundle/usr/include/"; done
  mkdir -p "$bundle/usr/include/openblas" "$bundle/usr/include/openmpi"
  cp /usr/include/x86_64-linux-gnu/openblas-openmp/*.h "$bundle/usr/include/openblas/"
  cp /usr/lib/x86_64-linux-gnu/openmpi/include/*.h "$bundle/usr/include/openmpi/"
  [ -d /usr/lib/x86_64-linux-gnu/openmpi/include/openmpi ] &&
    cp -r /usr/lib/x86_64-linux-gnu/openmpi/include/openmpi "$bundle/usr/include/openmpi/"
  mkdir -p "$libdir/cmake" "$bundle/usr/share/cmake" "$bundle/usr/lib/cmake"
  cp -r /usr/lib/x86_64-linux-gnu/cmake/spdlog /usr/lib/x86_64-linux-gnu/cmake/fmt "$libdir/cmake/"
  cp -r /usr/share/cmake/nlohmann_json /usr/share/cmake/CLI11 "$bundle/usr/share/cmake/"
  cp -r /usr/lib/cmake/Catch2 "$bundle/usr/lib/cmake/"
  # Catch2's CMake package checks that this library exists; nothing links it (tests/main.cpp and
  # tests/gpu/main.cpp are the mains): an empty archive.
  printf '!<arch>\n' >"$bundle/usr/lib/libCatch2WithMain.a"

  {
    echo "moetrain gpu bundle: made $(date -u +%FT%TZ) on $(hostname) from commit" \
      "$(git -C "$repo" rev-parse --short HEAD)$(git -C "$repo" diff --quiet HEAD || echo '+changes')"
    echo "binaries (sm_90): ${targets[*]}"
    echo "libraries:"
    (cd "$libdir" && find . -maxdepth 1 -type f -printf '  %f %s\n' | sort)
  } >"$bundle/MANIFEST.txt"
  local bytes
  bytes=$(du -sb "$bundle" | cut -f1)
  echo "gpu_check: bundle $bundle: $((bytes / 1024 / 1024)) MiB ($bytes bytes)"
  if ((bytes >= 64 * 1024 * 1024)); then
    echo "gpu_check: the bundle is over 64 MiB" >&2
    exit 1
  fi
  echo "gpu_check: on the GPU machine, with the repository and $(basename "$bundle")/ there:"
  echo "  scripts/gpu_check.sh --run OUTDIR"
}

# ---- --run ------------------------------------------------------------------------------------
out=""
steps=""      # OUTDIR/steps.jsonl: one JSON object per step
deadline=0

now() { date +%s; }

# step NAME TIMEOUT CMD...: runs CMD with its output in OUTDIR/logs/NAME.log, within TIMEOUT
# seconds and the remaining budget; records status (ok, failed, timeout), exit code and seconds.
# Returns CMD's exit code (124 on timeout).
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((deadline - $(now)))
  ((left < limit)) && limit=$left
  local log=$out/logs/$name.log t0 rc status
  if ((limit < 5)); then
    echo "budget spent" >"$log"
    record "$name" skipped 0 0 "budget spent"
    return 124
  fi
  t0=$(now)
  echo "gpu_check: $name (timeout ${limit}s)"
  timeout --kill-after=5 "$limit" "$@" >"$log" 2>&1
  rc=$?
  status=ok
  ((rc != 0)) && status=failed
  ((rc == 124 || rc == 137)) && status=timeout
  record "$name" "$status" "$rc" "$(($(now) - t0))" ""
  return $rc
}

# record NAME STATUS RC SECONDS NOTE
record() {
  printf '{"name": "%s", "status": "%s", "rc": %d, "seconds": %d, "note": "%s"}\n' \
    "$1" "$2" "$3" "$4" "$5" >>"$steps"
}

# The CUDA libraries the binaries do not carry: the toolkit's, else PyTorch's nvidia-* packages.
cuda_lib_path() {
  local dirs=() d
  for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [ -d "$d" ] && dirs+=("$d")
  done
  if command -v python3 >/dev/null; then
    while read -r d; do [ -n "$d" ] && dirs+=("$d"); done < <(timeout 30 python3 - <<'EOF' 2>/dev/null
import glob, os
try:
    import nvidia
    for root in nvidia.__path__:
        for d in sorted(glob.glob(os.path.join(root, "*", "lib"))):
            print(d)
except Exception:
    pass
EOF
    )
  fi
  local IFS=:
  echo "${dirs[*]}"
}

# --rebuild BUNDLE BUILD: the three binaries built on this machine into BUILD, with the bundle's
# headers, CMake packages and libraries (for a machine without the Debian packages).
rebuild() {
  local bundle=$1 build=$2
  local u=$bundle/usr libdir=$bundle/usr/lib/x86_64-linux-gnu
  # cuBLASLt and NCCL: the toolkit's, else PyTorch's nvidia-* packages (found by cuda_lib_path).
  local extra=() d f
  local IFS=:
  for d in $(cuda_lib_path); do
    f=$(find "$d" -maxdepth 1 -name "libcublasLt.so*" | sort | head -1)
    [ -n "$f" ] && [ ! -e /usr/local/cuda/lib64/libcublasLt.so ] && extra+=("-DCUDA_cublasLt_LIBRARY=$f")
    f=$(find "$d" -maxdepth 1 -name "libnccl.so*" | sort | head -1)
    [ -n "$f" ] && [ ! -e /usr/local/cuda/lib64/libnccl.so ] && extra+=("-DNCCL_LIB=$f")
    [ -f "$d/../include/nccl.h" ] && [ ! -e /usr/local/cuda/include/nccl.h ] &&
      extra+=("-DNCCL_INCLUDE=$d/../include")
  done
  unset IFS
  cmake -S "$repo" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMOETRAIN_CUDA=ON \
    -DMOETRAIN_CUDA_ARCHS=90 -DMOETRAIN_NATIVE=OFF \
    "-DCMAKE_PREFIX_PATH=$u;$libdir/cmake;$u/share/cmake;$u/lib/cmake" \
    "-DOPENBLAS_LIB=$libdir/libopenblas.so.0" "-DOPENBLAS_INCLUDE=$u/include/openblas" \
    -DMPI_CXX_COMPILER=MPI_CXX_COMPILER-NOTFOUND "-DMPI_CXX_HEADER_DIR=$u/include/openmpi" \
    -DMPI_CXX_LIB_NAMES=mpi "-DMPI_mpi_LIBRARY=$libdir/libmpi.so" -DMPI_CXX_SKIP_MPICXX=ON \
    "${extra[@]}" &&
    cmake --build "$build" -j "$(nproc)" --target moetrain moetrain_gpu_tests moetrain_attention_dump
}

run_check() {
  local report_dir=$1
  mkdir -p "$report_dir" || exit 1
  report_dir=$(cd "$report_dir" && pwd)
  # Everything but the report goes to a work folder, so OUTDIR holds three files.
  out=${MOETRAIN_GPU_CHECK_WORK:-$(mktemp -d /tmp/moetrain-gpu-check.XXXXXX)}
  mkdir -p "$out/logs" || exit 1
  out=$(cd "$out" && pwd)
  steps=$out/steps.jsonl
  : >"$steps"
  deadline=$(($(now) + ${MOETRAIN_GPU_CHECK_BUDGET:-470}))
  cd "$repo" || exit 1
  local bundle=${MOETRAIN_GPU_BUNDLE:-$repo/gpu_bundle}
  local bin=$bundle/bin
  local cuda_libs
  cuda_libs=$(cuda_lib_path)
  # Our binaries get the bundle's and the CUDA libraries; python3 (PyTorch brings its own) does not.
  local py_env=(env "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}")
  export LD_LIBRARY_PATH="$bundle/usr/lib/x86_64-linux-gnu${cuda_libs:+:$cuda_libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
  {
    echo "host $(hostname), $(nproc) cores, $(uname -r); work folder $out"
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    [ -f "$bundle/MANIFEST.txt" ] && head -2 "$bundle/MANIFEST.txt"
  } >"$out/environment.txt"

  # 1. The device: nvidia-smi, then our own cudaGetDeviceProperties line.
  local smi
  smi=$(command -v nvidia-smi || echo /usr/local/nvidia/bin/nvidia-smi)
  step nvidia_smi 20 "$smi" --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit,compute_cap --format=csv

  # 2. Do the carried binaries start? If not, rebuild here (cmake + ninja, the bundle's headers).
  local t
  for t in moetrain moetrain_gpu_tests moetrain_attention_dump; do
    ldd "$bin/$t" 2>&1 | sed "s|^|$t: |"
  done >"$out/ldd.txt"
  if ! step binaries_start 20 bash -c "'$bin/moetrain' --help >/dev/null && '$bin/moetrain_gpu_tests' -h >/dev/null"; then
    if step rebuild 300 "$repo/scripts/gpu_check.sh" --rebuild "$bundle" "$out/build"; then
      bin=$out/build
    fi
  fi

  step device_query 20 "$bin/moetrain_gpu_tests" --device-query
  local have_device=0
  grep -q "^moetrain_gpu_tests: device 0" "$out/logs/device_query.log" && have_device=1
  # MOETRAIN_GPU_CHECK_ALL=1 runs every step without a device too (to test this script: the GPU
  # steps fail, the CPU ones run).
  if ((have_device)) || [ "${MOETRAIN_GPU_CHECK_ALL:-0}" = 1 ]; then
    # 3. The kernel tests and CudaBackend vs CpuBackend; then sanitizers on a subset.
    step gpu_tests 100 "$bin/moetrain_gpu_tests" -r compact
    local sanitizer
    sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
    step racecheck 50 "$sanitizer" --tool racecheck --error-exitcode 1 \
      "$bin/moetrain_gpu_tests" "flash attention*,mma*,rmsnorm kernels:*,cross_entropy kernel:*,router kernels:*"
    step memcheck 50 "$sanitizer" --tool memcheck --error-exitcode 1 \
      "$bin/moetrain_gpu_tests" "cuda backend: bf16 activations*,moe_permute kernels:*,embedding kernels:*"

    # 4. bench on the GPU-scale config: MFU against the GEMM peak measured through the backend.
    step bench 45 "$bin/moetrain" bench --config configs/gpu_moe_small.json --steps 5 --warmup 2 \
      --peak-size 8192 --json
    # Per-phase device time (CUDA events around each op, ops eager), launches and syncs per step.
    step bench_profile 30 "$bin/moetrain" bench --config configs/gpu_moe_small.json --steps 3 \
      --warmup 2 --profile

    # 5. 50 steps of configs/ci.json on cuda (bf16 and fp32 GEMMs) and on cpu, on a corpus made of
    # the repository's docs; then the loss differences.
    mkdir -p "$out/corpus"
    cp README.md docs/*.md "$out/corpus/"
    cp kernels/README.md "$out/corpus/kernels_README.md"
    step prepare_data 30 "$bin/moetrain" prepare-data --input "$out/corpus" --out "$out/data" \
      --vocab-size 512 --val-fraction 0.1
    local mode backend precision
    for mode in cuda-bf16 cuda-fp32 cpu; do
      backend=${mode%%-*}
      precision=${mode#*-}
      [ "$precision" = "$mode" ] && precision=fp32
      rm -rf "$out/train_$mode"
      step "train_$mode" 25 "$bin/moetrain" train --config configs/ci.json \
        --set "data.train_pattern=$out/data/train_*.bin" --set "data.val_pattern=$out/data/val_*.bin" \
        --set "data.tokenizer=$out/data/tokenizer.json" --set "train.out_dir=$out/train_$mode" \
        --set train.steps=50 --set train.eval_interval=0 --set train.checkpoint_interval=0 \
        --set "train.backend=$backend" --set "train.precision=$precision"
    done

    # 6. Our attention against PyTorch's scaled_dot_product_attention.
    printf '#!/usr/bin/env bash\nLD_LIBRARY_PATH=%q exec %q "$@"\n' "$LD_LIBRARY_PATH" \
      "$bin/moetrain_attention_dump" >"$out/attention_dump.sh"
    chmod +x "$out/attention_dump.sh"
    step attention_vs_torch 60 "${py_env[@]}" python3 scripts/attention_vs_torch.py \
      --dump "$out/attention_dump.sh" --out "$out/attention" --matmul-peak
  else
    record gpu_tests skipped 0 0 "no CUDA device"
  fi
  step report 20 "${py_env[@]}" python3 - "$out" "$have_device" "$report_dir" <<'EOF'
import json, os, sys

out, have_device, report_dir = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
steps = [json.loads(l) for l in open(os.path.join(out, "steps.jsonl")) if l.strip()]


def log(name):
    p = os.path.join(out, "logs", name + ".log")
    return open(p, errors="replace").read() if os.path.exists(p) else ""


def tail(name, n=15):
    return "\n".join(log(name).rstrip().splitlines()[-n:])


def losses(mode):
    p = os.path.join(out, f"train_{mode}", "metrics.jsonl")
    if not os.path.exists(p):
        return []
    rows = [json.loads(l) for l in open(p) if l.strip()]
    return [r["loss"] for r in rows if "loss" in r and "step" in r and "val_loss" not in r]


report = {"have_device": have_device, "steps": steps}
md = ["# moetrain GPU check", ""]
md.append(open(os.path.join(out, "environment.txt")).read().strip().replace("\n", "  \n"))
md += ["", "| step | status | seconds |", "| --- | --- | --- |"]
md += [f"| {s['name']} | {s['status']}{' (' + s['note'] + ')' if s['note'] else ''} "
       f"(rc {s['rc']}) | {s['seconds']} |" for s in steps if s["name"] != "report"]
md.append("")
md += ["## Device", "", "```", log("nvidia_smi").strip(), log("device_query").strip(), "```", ""]
ran = any(s["name"] == "gpu_tests" and s["status"] != "skipped" for s in steps)
if not have_device:
    md += ["No CUDA device" + (" (MOETRAIN_GPU_CHECK_ALL=1: the steps ran anyway)." if ran else
                               ": nothing else was run."), ""]
if ran:
    md += ["## moetrain_gpu_tests", "", "```", tail("gpu_tests", 20), "```", ""]
    for tool in ("racecheck", "memcheck"):
        md += [f"## compute-sanitizer --tool {tool}", "", "```", tail(tool, 8), "```", ""]
    try:
        text = log("bench")  # log lines, then bench's JSON from a line holding "{" alone
        bench = json.loads(text[text.index("{\n") if text.startswith("{\n") else
                                text.index("\n{\n") + 1:])
        report["bench"] = bench
        md += ["## bench (configs/gpu_moe_small.json)", "",
               f"- {bench['tokens_per_second']:.0f} tokens/s, {bench['achieved_gflops']:.0f} "
               f"GFLOP/s of model FLOPs; step {bench['step_seconds_mean'] * 1e3:.1f} ms "
               f"(fwd+bwd, batch x seq = {bench['tokens_per_step']} tokens)",
               f"- GEMM peak through the backend (8192^3): {bench['sgemm_peak_gflops']:.0f} "
               f"GFLOP/s; MFU {100 * bench['mfu']:.1f}% of it",
               f"- optimizer ({bench['optimizer']}) step {bench['optimizer_seconds'] * 1e3:.1f} ms",
               f"- host: {bench.get('host_launches_per_step', float('nan')):.0f} launches and "
               f"{bench.get('host_syncs_per_step', float('nan')):.1f} syncs per step (CUDA graphs)",
               ""]
    except (ValueError, KeyError) as e:
        md += ["## bench", "", f"no result ({e}):", "```", tail("bench"), "```", ""]
    md += ["## bench --profile (device time per phase and per op, CUDA events)", "", "```",
           tail("bench_profile", 60),
           "```", ""]
    tr = {m: losses(m) for m in ("cuda-bf16", "cuda-fp32", "cpu")}
    report["train_losses"] = tr
    md += ["## 50 steps of configs/ci.json", ""]
    for m, ls in tr.items():
        md.append(f"- {m}: {len(ls)} steps" + (f", loss {ls[0]:.4f} -> {ls[-1]:.4f}" if ls else
                                                f" (no metrics; see logs/train_{m}.log)"))
    for m in ("cuda-bf16", "cuda-fp32"):
        a, b = tr[m], tr["cpu"]
        if a and b and len(a) == len(b):
            d = [abs(x - y) for x, y in zip(a, b)]
            report[f"loss_diff_{m}_vs_cpu"] = {"max": max(d), "last": d[-1]}
            md.append(f"- {m} vs cpu: max |loss difference| {max(d):.2e}, at the last step "
                      f"{d[-1]:.2e}")
    md.append("")
    att = os.path.join(out, "attention", "attention.md")
    md += ["## attention vs torch scaled_dot_product_attention", "", "```",
           open(att).read().strip() if os.path.exists(att) else tail("attention_vs_torch"), "```",
           ""]
    ajson = os.path.join(out, "attention", "attention.json")
    if os.path.exists(ajson):
        report["attention"] = json.load(open(ajson))
json.dump(report, open(os.path.join(report_dir, "gpu_report.json"), "w"), indent=2)
open(os.path.join(report_dir, "gpu_report.md"), "w").write("\n".join(md) + "\n")
EOF
  # The logs and small results, for a closer look.
  (cd "$out" && tar -czf "$report_dir/gpu_logs.tar.gz" --ignore-failed-read logs steps.jsonl \
    environment.txt ldd.txt train_*/metrics.jsonl attention/attention.json attention/attention.md \
    2>/dev/null)
  if [ -f "$report_dir/gpu_report.md" ]; then
    echo "gpu_check: wrote $report_dir/gpu_report.md, gpu_report.json and gpu_logs.tar.gz" \
      "(work folder $out)"
    return 0
  fi
  echo "gpu_check: no report written (see $out/logs/report.log)" >&2
  return 1
}

case "${1:-}" in
  --prepare) prepare "${2:-}" ;;
  --run)
    [ -n "${2:-}" ] || usage
    run_check "$2"
    ;;
  --rebuild)
    [ -n "${3:-}" ] || usage
    rebuild "$(cd "$2" && pwd)" "$3"
    ;;
  *) usage ;;
esac
