#!/usr/bin/env python3
"""Our causal GQA attention against PyTorch's scaled_dot_product_attention, on the same inputs.

    attention_vs_torch.py --dump build/moetrain_attention_dump --out DIR [--backends cuda-fp32,...]

For each shape, random fused qkv rows (the layout of moetrain's AttentionShape) are written to a
file; `moetrain_attention_dump` runs our attention forward on each backend and writes its output;
the reference is torch.nn.functional.scaled_dot_product_attention (causal, enable_gqa) in float64
on the CPU. Reported per shape and backend: relative error ||ours - ref|| / ||ref||, max |ours -
ref|, S_max against the reference's, and the time per forward next to SDPA's on the GPU (fp32 and
bf16, CUDA events), as causal TFLOP/s (2 B H T^2 hd per forward) and as a ratio to SDPA bf16;
with PyTorch, the same for the backward (dqkv against autograd through the float64 reference;
2.5 times the forward's FLOPs; SDPA's backward time is its forward + backward less its forward). With --matmul-peak, also PyTorch's bf16 8192^3 matmul rate (the ceiling that
`moetrain bench`'s MFU can be read against). Without PyTorch the reference is plain Python (small
shapes only), so the comparison runs anywhere. Writes DIR/attention.json and DIR/attention.md.
"""
import argparse
import array
import json
import math
import os
import random
import subprocess
import sys

try:
    import torch
except ImportError:  # the development machine: plain-Python reference, small shapes
    torch = None

# (batch, seq, heads, kv_heads, head_dim): a small odd one, then gpu_moe_small.json's attention,
# then issue 14's timing shape (B=4, H=16, T=2048, hd=128; timed only: its float64 reference would
# take most of the step's budget).
SHAPES = [(1, 37, 4, 2, 16), (2, 1024, 8, 2, 64), (4, 2048, 16, 4, 128)]
TIMING_ONLY = {(4, 2048, 16, 4, 128)}


def causal_tflops(shape, ms):
    """TFLOP/s of a causal attention forward taking `ms`: 2 B H T^2 hd FLOPs (the causal half of
    QK^T and PV)."""
    b, t, h, _, hd = shape
    return 2.0 * b * h * t * t * hd / (ms / 1e3) / 1e12 if ms > 0 else 0.0


def make_qkv(shape, seed):
    b, t, h, hkv, hd = shape
    n = b * t * (h + 2 * hkv) * hd
    if torch is not None:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(n, generator=g, dtype=torch.float32)
    rng = random.Random(seed)
    return array.array("f", (rng.gauss(0.0, 1.0) for _ in range(n)))


def write_floats(values, path):
    if torch is not None:
        values.numpy().tofile(path)
    else:
        with open(path, "wb") as f:
            values.tofile(f)


def read_floats(path):
    a = array.array("f")
    with open(path, "rb") as f:
        a.frombytes(f.read())
    return a


def split_heads(qkv, shape):
    """q [b, h, t, hd], k and v [b, hkv, t, hd] of the fused rows (torch tensors)."""
    b, t, h, hkv, hd = shape
    x = qkv.view(b, t, h + 2 * hkv, hd)
    q, k, v = x[:, :, :h], x[:, :, h:h + hkv], x[:, :, h + hkv:]
    return [y.transpose(1, 2).contiguous() for y in (q, k, v)]


def torch_reference(qkv, shape):
    """Output rows and S_max per head in float64; SDPA's output where this PyTorch has it."""
    b, t, h, hkv, hd = shape
    q, k, v = split_heads(qkv.double(), shape)
    kk, vv = (x.repeat_interleave(h // hkv, dim=1) for x in (k, v))
    s = q @ kk.transpose(-1, -2) / math.sqrt(hd)
    s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), -math.inf)
    smax = s.amax(dim=(0, 2, 3))
    sdpa = getattr(torch.nn.functional, "scaled_dot_product_attention", None)
    if sdpa is not None:
        try:
            out = sdpa(q, k, v, is_causal=True, enable_gqa=True)
        except TypeError:  # before PyTorch 2.5: no enable_gqa
            out = sdpa(q, kk, vv, is_causal=True)
        how = "scaled_dot_product_attention, float64, CPU"
    else:
        out = torch.softmax(s, dim=-1) @ vv
        how = f"softmax(QK^T/sqrt(d)) V in float64 (PyTorch {torch.__version__} has no SDPA)"
    return out.transpose(1, 2).reshape(-1).tolist(), smax.tolist(), how


def torch_grads(qkv, dout, shape):
    """dqkv in the fused layout, by autograd through the float64 reference."""
    b, t, h, hkv, hd = shape
    x = qkv.double().view(b, t, h + 2 * hkv, hd).clone().requires_grad_(True)
    q, k, v = (y.transpose(1, 2) for y in (x[:, :, :h], x[:, :, h:h + hkv], x[:, :, h + hkv:]))
    kk, vv = (y.repeat_interleave(h // hkv, dim=1) for y in (k, v))
    s = q @ kk.transpose(-1, -2) / math.sqrt(hd)
    s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), -math.inf)
    out = (torch.softmax(s, dim=-1) @ vv).transpose(1, 2)
    out.backward(dout.double().view(b, t, h, hd))
    return x.grad.reshape(-1).tolist()


def python_reference(qkv, shape):
    b, t, h, hkv, hd = shape
    w = (h + 2 * hkv) * hd
    out = [0.0] * (b * t * h * hd)
    smax = [-math.inf] * h
    for bi in range(b):
        for hi in range(h):
            kv = hi // (h // hkv)
            for i in range(t):
                qo = (bi * t + i) * w + hi * hd
                s = []
                for j in range(i + 1):
                    ko = (bi * t + j) * w + (h + kv) * hd
                    s.append(sum(qkv[qo + d] * qkv[ko + d] for d in range(hd)) / math.sqrt(hd))
                m = max(s)
                smax[hi] = max(smax[hi], m)
                p = [math.exp(x - m) for x in s]
                z = sum(p)
                oo = (bi * t + i) * h * hd + hi * hd
                for d in range(hd):
                    acc = 0.0
                    for j in range(i + 1):
                        acc += p[j] * qkv[(bi * t + j) * w + (h + hkv + kv) * hd + d]
                    out[oo + d] = acc / z
    return out, smax, "plain Python, float64"


def errors(got, ref):
    num = sum((float(g) - r) ** 2 for g, r in zip(got, ref))
    den = sum(r * r for r in ref)
    worst = max(abs(float(g) - r) for g, r in zip(got, ref))
    bad = sum(1 for g in got if not math.isfinite(g))
    return math.sqrt(num / den) if den > 0 else math.sqrt(num), worst, bad


def time_sdpa(qkv, shape, dtype, iters, backward=False):
    """ms per SDPA forward, or per forward + backward."""
    q, k, v = (x.to("cuda", dtype).requires_grad_(backward) for x in split_heads(qkv, shape))
    f = torch.nn.functional.scaled_dot_product_attention
    dout = torch.randn_like(q) if backward else None

    def once():
        out = f(q, k, v, is_causal=True, enable_gqa=True)
        if backward:
            out.backward(dout)

    for _ in range(3):
        once()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        once()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def matmul_peak():
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 / (start.elapsed_time(end) / 10 / 1e3) / 1e12


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dump", required=True, help="path of moetrain_attention_dump")
    ap.add_argument("--out", required=True, help="folder for inputs, outputs and the results")
    ap.add_argument("--backends", default="cuda-fp32,cuda-bf16,cpu")
    ap.add_argument("--iters", type=int, default=20, help="timed forwards per backend")
    ap.add_argument("--matmul-peak", action="store_true", help="also time a bf16 8192^3 matmul")
    ap.add_argument("--max-python-rows", type=int, default=64,
                    help="without PyTorch, skip shapes of more rows than this")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    gpu = torch is not None and torch.cuda.is_available()
    res = {"torch": torch.__version__ if torch is not None else None, "cuda": gpu, "shapes": []}
    if gpu:
        p = torch.cuda.get_device_properties(0)
        res["device"] = f"{p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, " \
                        f"{p.total_memory / 2**30:.1f} GiB"
    if gpu and args.matmul_peak:
        res["torch_bf16_matmul_tflops"] = matmul_peak()
    ok = True
    for idx, shape in enumerate(SHAPES):
        b, t, h, hkv, hd = shape
        entry = {"shape": dict(zip(["batch", "seq", "heads", "kv_heads", "head_dim"], shape)),
                 "results": []}
        res["shapes"].append(entry)
        if torch is None and b * t > args.max_python_rows:
            entry["skipped"] = "no PyTorch: the plain-Python reference is for small shapes"
            continue
        timing_only = shape in TIMING_ONLY
        if timing_only and not gpu:
            entry["skipped"] = "a timing shape: needs a GPU"
            continue
        qkv = make_qkv(shape, 1000 + idx)
        path_in = os.path.join(args.out, f"qkv_{idx}.f32")
        write_floats(qkv, path_in)
        if not timing_only:
            ref, ref_smax, entry["reference"] = (torch_reference if torch is not None else
                                                 python_reference)(qkv, shape)
        else:
            entry["reference"] = "none (timed only)"
        # The backward needs PyTorch (autograd reference, and the output gradient's generator).
        extra = []
        ref_grad = None
        if torch is not None:
            g = torch.Generator().manual_seed(2000 + idx)
            dout = torch.randn(b * t * h * hd, generator=g, dtype=torch.float32)
            path_dout = os.path.join(args.out, f"dout_{idx}.f32")
            write_floats(dout, path_dout)
            extra = [path_dout]
            if not timing_only:
                ref_grad = torch_grads(qkv, dout, shape)
        if gpu:
            entry["sdpa_ms_fp32"] = time_sdpa(qkv, shape, torch.float32, args.iters)
            entry["sdpa_ms_bf16"] = time_sdpa(qkv, shape, torch.bfloat16, args.iters)
            entry["sdpa_tflops_bf16"] = causal_tflops(shape, entry["sdpa_ms_bf16"])
            both = time_sdpa(qkv, shape, torch.bfloat16, args.iters, backward=True)
            entry["sdpa_ms_backward_bf16"] = max(both - entry["sdpa_ms_bf16"], 0.0)
            entry["sdpa_tflops_backward_bf16"] = 2.5 * causal_tflops(
                shape, entry["sdpa_ms_backward_bf16"])
        for backend in args.backends.split(","):
            if timing_only and not backend.startswith("cuda"):
                continue
            path_out = os.path.join(args.out, f"out_{idx}_{backend}.f32")
            iters = args.iters if backend.startswith("cuda") else min(args.iters, 3)
            cmd = [args.dump, backend, *map(str, shape), path_in, path_out, str(iters)]
            path_dqkv = os.path.join(args.out, f"dqkv_{idx}_{backend}.f32")
            if extra:
                cmd += [extra[0], path_dqkv]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            item = {"backend": backend}
            entry["results"].append(item)
            if r.returncode != 0:
                item["error"] = (r.stderr or r.stdout).strip()[-500:]
                ok = False
                continue
            info = json.loads(r.stdout.strip().splitlines()[-1])
            item["ms_per_forward"] = info["ms_per_forward"]
            item["tflops"] = causal_tflops(shape, info["ms_per_forward"])
            if "sdpa_ms_bf16" in entry and info["ms_per_forward"] > 0:
                item["vs_sdpa_bf16"] = entry["sdpa_ms_bf16"] / info["ms_per_forward"]
            if extra and info.get("ms_per_backward", 0) > 0:
                item["ms_per_backward"] = info["ms_per_backward"]
                item["tflops_backward"] = 2.5 * causal_tflops(shape, info["ms_per_backward"])
                if entry.get("sdpa_ms_backward_bf16", 0) > 0:
                    item["backward_vs_sdpa_bf16"] = (entry["sdpa_ms_backward_bf16"]
                                                     / info["ms_per_backward"])
            if timing_only:
                item["ok"] = True
                continue
            rel, worst, bad = errors(read_floats(path_out), ref)
            item.update(ms_per_forward=info["ms_per_forward"], rel_error=rel, max_abs_error=worst,
                        nonfinite=bad,
                        smax_max_abs_error=max(abs(a - c) for a, c in zip(info["smax"], ref_smax)))
            # The CUDA backend's flash kernels read bf16 q, k, v in both modes (about 2^-8 relative
            # per operand); the CPU's fp32 path differs by summation order only.
            tol = 2e-2 if backend.startswith("cuda") else 1e-5
            item["ok"] = bad == 0 and rel <= tol
            if ref_grad is not None:
                grel, gworst, gbad = errors(read_floats(path_dqkv), ref_grad)
                item.update(grad_rel_error=grel, grad_max_abs_error=gworst, grad_nonfinite=gbad)
                item["ok"] = item["ok"] and gbad == 0 and grel <= tol
            ok = ok and item["ok"]
    res["ok"] = ok
    with open(os.path.join(args.out, "attention.json"), "w") as f:
        json.dump(res, f, indent=2)
    lines = [f"PyTorch {res['torch'] or 'absent (plain-Python reference)'}"
             + (f", {res['device']}" if gpu else ", no GPU")]
    if "torch_bf16_matmul_tflops" in res:
        lines.append(f"PyTorch bf16 matmul 8192^3: {res['torch_bf16_matmul_tflops']:.0f} TFLOP/s")
    for e in res["shapes"]:
        s = e["shape"]
        name = "B={batch} T={seq} H={heads}/{kv_heads} hd={head_dim}".format(**s)
        if "skipped" in e:
            lines.append(f"{name}: skipped ({e['skipped']})")
            continue
        lines.append(f"{name}: reference {e['reference']}")
        if "sdpa_ms_fp32" in e:
            lines.append(f"{name}: SDPA {e['sdpa_ms_fp32']:.3f} ms fp32, "
                         f"{e['sdpa_ms_bf16']:.3f} ms bf16 ({e['sdpa_tflops_bf16']:.0f} TFLOP/s); "
                         f"backward bf16 {e['sdpa_ms_backward_bf16']:.3f} ms "
                         f"({e['sdpa_tflops_backward_bf16']:.0f} TFLOP/s)")
        for it in e["results"]:
            if "error" in it:
                lines.append(f"{name} {it['backend']}: FAILED: {it['error']}")
            elif "rel_error" not in it:
                lines.append(f"{name} {it['backend']}: {it['ms_per_forward']:.3f} ms per forward, "
                             f"{it['tflops']:.3g} TFLOP/s"
                             + (f", {it['vs_sdpa_bf16']:.2f}x SDPA bf16's speed"
                                if "vs_sdpa_bf16" in it else "")
                             + (f"; backward {it['ms_per_backward']:.3f} ms, "
                                f"{it['tflops_backward']:.3g} TFLOP/s"
                                + (f", {it['backward_vs_sdpa_bf16']:.2f}x SDPA bf16's speed"
                                   if "backward_vs_sdpa_bf16" in it else "")
                                if "ms_per_backward" in it else ""))
            else:
                lines.append(
                    f"{name} {it['backend']}: rel error {it['rel_error']:.2e}, max abs "
                    f"{it['max_abs_error']:.2e}, S_max error {it['smax_max_abs_error']:.2e}, "
                    f"{it['ms_per_forward']:.3f} ms per forward ({it['tflops']:.3g} TFLOP/s"
                    + (f", {it['vs_sdpa_bf16']:.2f}x SDPA bf16's speed" if "vs_sdpa_bf16" in it
                       else "") + ")"
                    + (f"; dqkv rel error {it['grad_rel_error']:.2e}" if "grad_rel_error" in it
                       else "")
                    + (f"; backward {it['ms_per_backward']:.3f} ms ({it['tflops_backward']:.3g} "
                       "TFLOP/s" + (f", {it['backward_vs_sdpa_bf16']:.2f}x SDPA bf16's speed"
                                    if "backward_vs_sdpa_bf16" in it else "") + ")"
                       if "ms_per_backward" in it else "")
                    + ("" if it["ok"] else "  <-- over tolerance or non-finite"))
    with open(os.path.join(args.out, "attention.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
