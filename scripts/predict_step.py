#!/usr/bin/python3
"""Predicts the CUDA backend's training step, phase by phase, on paper (docs/perf.md).

    scripts/predict_step.py configs/gpu_moe_small.json [--grad-accum G] [--ranks R]
                            [--link-gbs BW [--latency-us A] [--bucket-mib M] [--no-overlap]]

For each phase of a step (grad_accum micro-batches and one optimizer step) it counts the FLOPs and
the DRAM bytes the kernels must do and move, takes the floor time against the H200 ceilings this
project measures (bf16 dense GEMM ~788 TFLOP/s, device copy ~4.3 TB/s), and divides by an assumed
efficiency per kind of kernel (the constants below, each with its reason). The result is a
prediction to be replaced by `moetrain bench --profile` on a GPU (scripts/gpu_check.sh), not a
measurement. MFU counts model FLOPs as `moetrain bench` does (src/model/flops.cpp: 3x the forward
matmuls, causal attention, optimizer not counted).

With --link-gbs, the ZeRO-1 communication of R ranks (docs/design.md §5) is modelled too: each rank
sends (R-1)/R of the fp32 gradients in the buckets' reduce-scatters and (R-1)/R of the fp32
parameters in the all-gathers, at BW GB/s per rank in each direction (the ring's slowest link: 450
for NVLink on an H200 node, 50 for one 400 Gb/s NIC per GPU across nodes) times COMM_EFF, plus a
latency per collective. The buckets are the plan's (whole tensors in backward order, M MiB). With
overlap, bucket b's reduce-scatter starts when backward of the last micro-batch completes its
stage, the backward time spread evenly over the layers (2/3 of a micro-batch's compute); the
communication stream runs one collective at a time. What stays exposed is the reduce-scatters'
tail past the end of backward, plus the all-gathers, which follow the optimizer and are not
overlapped.
"""
import argparse
import json

PEAK_FLOPS = 788e12  # H200 dense bf16, measured (device README KINDS.md)
PEAK_BYTES = 4.3e12  # H200 device-to-device copy, measured

# Assumed fractions of the ceiling (the prediction's inputs; gpu_check replaces them).
EFF = {
    # cuBLASLt bf16 GEMMs at these shapes (N = 16 K rows, K and N of 128 to 4096): typical.
    "cublas": 0.65,
    # kernels/grouped_gemm.cu: mma.sync, 64x64x32 tiles, 4 warps, no cp.async pipelining, so
    # loads and MMAs do not overlap; mma.sync peaks well below wgmma on Hopper.
    "grouped": 0.30,
    # kernels/flash_attention.cu: FA2 structure on mma.sync (FA2 reaches ~35% on H100; FA3's
    # wgmma/TMA ~75%); the backward does QK^T and dO V^T twice for a deterministic dQ.
    "flash": 0.35,
    # kernels/symmetric_gemm.cu: like the grouped GEMM (same tiles, no pipelining).
    "symmetric": 0.30,
    # Streaming elementwise kernels: 80-90% of copy bandwidth when enough bytes are in flight.
    "memory": 0.80,
}
BF16, F32 = 2, 4
COMM_EFF = 0.8  # NCCL ring bus bandwidth over the link's: ~80% at multi-MB messages


def load(path):
    with open(path) as f:
        c = json.load(f)
    m = c.get("model", {})
    moe = m.get("moe", {})
    d = m.get("d_model", 256)
    H = m.get("n_heads", 4)
    cfg = {
        "V": m.get("vocab_size", 4096), "d": d, "L": m.get("n_layers", 4), "H": H,
        "Hkv": m.get("n_kv_heads", 4), "hd": m.get("head_dim", 0) or d // H,
        "T": m.get("seq_len", 256), "dense_layers": m.get("dense_layers", 1),
        "dense_ff": m.get("dense_ff", 1024), "E": moe.get("n_experts", 8), "k": moe.get("top_k", 2),
        "ff": moe.get("expert_ff", 512), "shared": moe.get("n_shared_experts", 0),
        "shared_ff": moe.get("shared_ff", 512), "B": c.get("data", {}).get("batch_size", 8),
        "ns_steps": c.get("optim", {}).get("ns_steps", 5),
        "ga": c.get("train", {}).get("grad_accum", 1),
        "tied": m.get("tie_embeddings", False),
        "bucket_mib": c.get("train", {}).get("grad_bucket_mib", 25.0),
    }
    return cfg


def micro_batch(c):
    """Per micro-batch: {phase: (flops, bytes, efficiency kind)}, and its model FLOPs."""
    N, d, T = c["B"] * c["T"], c["d"], c["T"]
    q, kv = c["H"] * c["hd"], c["Hkv"] * c["hd"]
    moe_layers = c["L"] - c["dense_layers"]
    ph = {}
    # Attention core: causal QK^T and PV, 2 x 2 H hd T^2 / 2 per sequence forward; the FA2
    # backward with its separate dQ pass is 3.5x the forward.
    att_fwd = 2 * 2 * c["H"] * c["hd"] * (T + 1) / 2 * N
    rope_bytes = 2 * N * (q + kv) * BF16 * 3  # forward read + write, backward again (x1.5)
    ph["attention"] = (c["L"] * att_fwd * 4.5, c["L"] * rope_bytes, "flash")
    # Routed experts: k of E experts per token, three [ff, d] matrices, forward + 2 backward.
    ph["experts"] = (moe_layers * 3 * 2 * c["k"] * 3 * d * c["ff"] * N, 0, "grouped")
    other = c["L"] * (2 * d * (q + 2 * kv) + 2 * q * d)  # projections
    other += c["dense_layers"] * 2 * 3 * d * c["dense_ff"]
    other += moe_layers * (c["shared"] * 2 * 3 * d * c["shared_ff"] + 2 * d * c["E"])
    other += 2 * d * c["V"]  # lm_head
    ph["other GEMMs"] = (3 * other * N, 0, "cublas")
    # Elementwise bytes, bf16 activations: per layer forward two RMSNorms (read + write [N, d]
    # each), the residual copy and add (~5 [N, d] passes), SwiGLU (read h [rows, 2 ff], write
    # [rows, ff]); MoE: permute (read x, write k copies), unpermute (read k rows, write one), the
    # combine's add (3 passes), router logits and scores in fp32. Backward ~2x forward.
    fwd = c["L"] * (4 + 5) * N * d * BF16
    fwd += c["dense_layers"] * 3 * N * c["dense_ff"] * BF16
    fwd += moe_layers * (3 * N * c["k"] * c["ff"] + c["shared"] * 3 * N * c["shared_ff"]) * BF16
    fwd += moe_layers * ((1 + c["k"]) * N * d * 2 + 3 * N * d) * BF16
    fwd += moe_layers * 3 * N * c["E"] * F32
    head = 3 * N * c["V"] * BF16 + 5 * N * d * BF16  # cross-entropy (2 reads, 1 write), embedding
    ph["elementwise"] = (0, 3 * fwd + head, "memory")
    model = 3 * (c["L"] * att_fwd + N * (other + moe_layers * c["k"] * 2 * 3 * d * c["ff"]))
    return ph, model


def optimizer(c, ranks):
    """One optimizer step over the whole model, divided over `ranks` (ZeRO-1: each matrix's
    update once in the cluster)."""
    d, q, kv = c["d"], c["H"] * c["hd"], c["Hkv"] * c["hd"]
    moe_layers = c["L"] - c["dense_layers"]
    mats = []  # (rows, cols, count)
    mats += [(q, d, 2 * c["L"]), (kv, d, 2 * c["L"])]
    mats += [(c["dense_ff"], d, 2 * c["dense_layers"]), (d, c["dense_ff"], c["dense_layers"])]
    n_ffn = moe_layers * (c["E"] + c["shared"])
    mats += [(c["ff"], d, 2 * n_ffn), (d, c["ff"], n_ffn)]  # shared_ff assumed == expert_ff
    gram = prod = muon_elems = 0
    for r, col, n in mats:
        m, w = min(r, col), max(r, col)
        gram += n * (m * m * w + m ** 3) * c["ns_steps"]  # upper triangles of X X^T and S S
        prod += n * 2 * m * m * w * c["ns_steps"]          # P X
        muon_elems += n * r * col
    adamw_elems = 2 * c["V"] * d + moe_layers * c["E"] * d
    # Bytes per Muon element: momentum (read M, G; write M, U: 16), normalisation (12), update
    # (read W, O; write W and the bf16 copy: 14), grad norm (4), and per NS iteration: the Gram
    # product reads X (4), P X rounds X to bf16 (read 4, write 2), cuBLASLt reads it (2), writes
    # Y (4): 16. AdamW: 30 per element.
    byts = muon_elems * (16 + 12 + 14 + 4 + 16 * c["ns_steps"]) + adamw_elems * (30 + 4)
    t = (gram / (PEAK_FLOPS * EFF["symmetric"]) + prod / (PEAK_FLOPS * EFF["cublas"]) +
         byts / (PEAK_BYTES * EFF["memory"])) / ranks
    return (gram + prod) / ranks, byts / ranks, t


def backward_order(c):
    """(stage, elements) of every parameter tensor in the order backward completes them
    (grad_ready_stage in src/model/param_layout.cpp; layout order within a stage)."""
    d, q, kv, L = c["d"], c["H"] * c["hd"], c["Hkv"] * c["hd"], c["L"]
    out = []
    for l in reversed(range(L)):
        s = L - 1 - l
        out += [(s, d), (s, q * d), (s, kv * d), (s, kv * d), (s, d * q), (s, d)]
        if l < c["dense_layers"]:
            out += [(s, c["dense_ff"] * d)] * 3
        else:
            out += [(s, c["E"] * d)] + [(s, c["ff"] * d)] * (3 * c["E"])
            out += [(s, c["shared_ff"] * d)] * (3 * c["shared"])
        if s == 0:
            out += [(0, d)] + ([] if c["tied"] else [(0, c["V"] * d)])  # final norm, lm_head
    return out + [(L, c["V"] * d)]  # the embedding


def communication(c, ranks, gbs, latency, bucket_mib, overlap, backward_s):
    """The exposed communication of one step (seconds) and what it is made of."""
    tensors = backward_order(c)
    cap = bucket_mib * 2 ** 20 / F32
    buckets, filled = [[0, 0]], 0  # [ready stage, elements]
    for stage, n in tensors:
        if filled >= cap:
            buckets.append([0, 0])
            filled = 0
        buckets[-1][0] = max(buckets[-1][0], stage)
        buckets[-1][1] += n
        filled += n
    bw = gbs * 1e9 * COMM_EFF
    frac = (ranks - 1) / ranks
    # Two collectives per bucket (its AdamW pieces and its matrices).
    times = [2 * latency + frac * F32 * n / bw for _, n in buckets]
    per_stage = backward_s / c["L"]  # stage s completes at (s + 1) per_stage; the embedding at the end
    end = 0.0
    for (stage, _), t in zip(buckets, times):
        ready = min(stage + 1, c["L"]) * per_stage if overlap else backward_s
        end = max(end, ready) + t
    params = sum(n for _, n in tensors)
    gather = (len(buckets) + 1) * latency + frac * F32 * params / bw
    exposed_rs = max(0.0, end - backward_s)
    return {"buckets": len(buckets), "bucket_ms": [t * 1e3 for t in times],
            "bytes": 2 * frac * F32 * params, "reduce_scatter_s": sum(times),
            "exposed_rs_s": exposed_rs, "gather_s": gather, "exposed_s": exposed_rs + gather,
            "backward_s": backward_s}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config")
    ap.add_argument("--grad-accum", type=int, default=0, help="default: the config's")
    ap.add_argument("--ranks", type=int, default=1, help="ZeRO-1 ranks sharing the optimizer")
    ap.add_argument("--eff", action="append", default=[], metavar="KIND=FRACTION",
                    help="override an assumed efficiency (what-if), e.g. grouped=0.7")
    ap.add_argument("--elementwise-scale", type=float, default=1.0,
                    help="scale the elementwise bytes (what-if: fusions that remove passes)")
    ap.add_argument("--link-gbs", type=float, default=0.0,
                    help="model the ZeRO-1 communication at this many GB/s per rank and direction")
    ap.add_argument("--latency-us", type=float, default=10.0, help="per collective")
    ap.add_argument("--bucket-mib", type=float, default=0.0, help="default: the config's")
    ap.add_argument("--no-overlap", action="store_true",
                    help="reduce-scatters after backward (train.overlap_grad_reduce false)")
    a = ap.parse_args()
    for kv in a.eff:
        kind, value = kv.split("=")
        if kind not in EFF:
            ap.error(f"--eff: unknown kind {kind!r} (one of {', '.join(EFF)})")
        EFF[kind] = float(value)
    c = load(a.config)
    ga = a.grad_accum or c["ga"]
    ph, model = micro_batch(c)
    fl, by, kind = ph["elementwise"]
    ph["elementwise"] = (fl, by * a.elementwise_scale, kind)
    rows, total = [], 0.0
    for name, (fl, by, kind) in ph.items():
        floor = max(fl / PEAK_FLOPS, by / PEAK_BYTES)
        t = fl / (PEAK_FLOPS * EFF[kind]) if fl else by / (PEAK_BYTES * EFF[kind])
        rows.append((name, fl * ga, by * ga, floor * ga, kind, t * ga))
        total += t * ga
    micro_s = total / ga
    ofl, oby, ot = optimizer(c, a.ranks)
    rows.append(("optimizer", ofl, oby, max(ofl / PEAK_FLOPS, oby / PEAK_BYTES), "mixed", ot))
    total += ot
    comm = None
    if a.link_gbs > 0 and a.ranks > 1:
        comm = communication(c, a.ranks, a.link_gbs, a.latency_us * 1e-6,
                             a.bucket_mib or c["bucket_mib"], not a.no_overlap, micro_s * 2 / 3)
        rows.append(("communication (exposed)", 0, comm["bytes"], comm["bytes"] / (a.link_gbs * 1e9),
                     "link", comm["exposed_s"]))
        total += comm["exposed_s"]
    else:
        rows.append(("communication", 0, 0, 0, "-", 0.0))
    N = c["B"] * c["T"]
    print(f"{a.config}: grad_accum {ga}, {ga * N} tokens per step on one GPU, "
          f"optimizer over {a.ranks} rank(s)\n")
    print("| phase | TFLOP | GB | floor ms | efficiency | predicted ms | share |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, fl, by, floor, kind, t in rows:
        eff = f"{EFF[kind]:.2f} ({kind})" if kind in EFF else kind
        print(f"| {name} | {fl / 1e12:.2f} | {by / 1e9:.2f} | {floor * 1e3:.2f} | {eff} | "
              f"{t * 1e3:.2f} | {100 * t / total:.1f}% |")
    print(f"| **step** | | | | | **{total * 1e3:.1f}** | |\n")
    mfu = model * ga / total / PEAK_FLOPS
    print(f"model FLOPs {model * ga / 1e12:.2f} TFLOP per step -> {model * ga / total / 1e12:.0f} "
          f"TFLOP/s, MFU {100 * mfu:.1f}% of {PEAK_FLOPS / 1e12:.0f} TFLOP/s; Newton-Schulz "
          f"{100 * ot / total:.1f}% of the step")
    if comm:
        ms = comm["bucket_ms"]
        print(f"\nZeRO-1 over {a.ranks} ranks at {a.link_gbs:g} GB/s x {COMM_EFF} per rank, "
              f"{a.latency_us:g} us per collective: {comm['bytes'] / 1e9:.3f} GB sent per rank per "
              f"step; {comm['buckets']} buckets of {a.bucket_mib or c['bucket_mib']:g} MiB, "
              f"{min(ms):.3f} to {max(ms):.3f} ms each; reduce-scatters "
              f"{comm['reduce_scatter_s'] * 1e3:.2f} ms against the last micro-batch's backward "
              f"of {comm['backward_s'] * 1e3:.2f} ms ({'overlapped' if not a.no_overlap else 'after it'}): "
              f"{comm['exposed_rs_s'] * 1e3:.2f} ms exposed; all-gathers "
              f"{comm['gather_s'] * 1e3:.2f} ms, exposed")


if __name__ == "__main__":
    main()
