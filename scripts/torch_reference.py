#!/usr/bin/python3
"""PyTorch twin of moetrain's model and optimizers (docs/design.md §3 and §4).

Written from the spec, in plain PyTorch with autograd, so that it is an independent reference
for moetrain's hand-written forward/backward and optimizers. Computes in float64 by default.

  /usr/bin/python3 scripts/torch_reference.py --config CFG.json --weights W.safetensors \
      --batch BATCH.safetensors --lr LR --out OUT.safetensors [--dtype float64|float32]
  /usr/bin/python3 scripts/torch_reference.py --self-test
  /usr/bin/python3 scripts/torch_reference.py --optimizer-steps normuon|adamuon|soap \
      --config CFG.json --params P.safetensors --state S.safetensors --grads G1 [G2 ...] \
      --lr LR --out OUT.safetensors
  /usr/bin/python3 scripts/torch_reference.py --bench-steps N [--warmup W] [--threads T] \
      --config CFG.json --weights W.safetensors --batch BATCH.safetensors   (timing, float32)

Inputs
  CFG.json            a moetrain config (nested sections, or flat "a.b.c" keys), head_dim resolved
                      (0 is resolved to d_model / n_heads here as well).
  W.safetensors       parameters under moetrain's names (F32 or F64).
  BATCH.safetensors   I32 "tokens" [B,T], I32 "targets" [B,T] (negative = padding),
                      F32 "expert_bias" [n_layers, n_experts] (sigmoid_bias selection bias;
                      optional, zeros when absent).
Output (F64 unless noted)
  objective, ce, grad_norm [1]; aux, z [n_layers]; smax [n_layers, n_heads];
  load I64 [n_layers, n_experts]; grad.<name>; adamw.<name>, muon.<name>, muonclip.<name>,
  adamw_qk_clip.<name>, normuon.<name>, adamuon.<name>, soap.<name> (every parameter after one
  optimizer step from fresh state; soap's first step leaves the matrices as they are).
--optimizer-steps: the matrix group's matrices and their optimizer state under moetrain's names
  (normuon.momentum.<name>, soap.QL.<name>, ...) after one step per gradient file, from the
  optimizer state moetrain saved (Optimizer::state: its tensors and "step").

Objective = CE mean over non-padding targets + sum_l aux_coef * L_aux_l + sum_l z_coef * L_z_l,
with the top-k selection and the load fractions f_e held constant.

Optimizers: global grad-norm clipping first (g *= min(1, grad_clip / (norm + 1e-6)), as torch's
clip_grad_norm_; 0 disables). Parameter groups by role: optim.muon_group (q/k/v/o and every
SwiGLU w1/w2/w3) and optim.adamw_group (embed, lm_head, norm gains, routers), each with lr_scale
and weight_decay (absent sections: lr_scale 1 and the legacy optim.weight_decay, default 0.1);
norm gains never decay. "adamw" updates every tensor with AdamW under its group's settings.
"""

import argparse
import json
import math
import os
import struct
import sys
import tempfile

import numpy as np

try:
    import torch
    import torch.nn.functional as F
except ImportError as exc:  # pragma: no cover - reported to the caller
    sys.stderr.write("torch_reference.py: PyTorch is not importable by %s (%s); install Debian's "
                     "python3-torch\n" % (sys.executable, exc))
    sys.exit(3)


# ---------------------------------------------------------------------------------------------
# safetensors (json + numpy; the `safetensors` package is not available on Debian 12)
# ---------------------------------------------------------------------------------------------

_DTYPES = {"F32": np.dtype("<f4"), "F64": np.dtype("<f8"), "I32": np.dtype("<i4"),
           "I64": np.dtype("<i8")}


def load_safetensors(path):
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        raise ValueError("%s: too short for a safetensors file" % path)
    (n,) = struct.unpack("<Q", blob[:8])
    if 8 + n > len(blob):
        raise ValueError("%s: header length %d exceeds the file size" % (path, n))
    header = json.loads(blob[8:8 + n].decode("utf-8"))
    data = memoryview(blob)[8 + n:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = _DTYPES.get(info["dtype"])
        if dt is None:
            raise ValueError("%s: tensor %s has unsupported dtype %s" % (path, name, info["dtype"]))
        b, e = info["data_offsets"]
        shape = [int(s) for s in info["shape"]]
        count = int(np.prod(shape)) if shape else 1
        if e - b != count * dt.itemsize or e > len(data):
            raise ValueError("%s: tensor %s has bad data_offsets %s" % (path, name, [b, e]))
        out[name] = np.frombuffer(data[b:e], dtype=dt).reshape(shape).copy()
    return out


def save_safetensors(path, tensors, metadata=None):
    header = {}
    chunks = []
    offset = 0
    for name in sorted(tensors):
        a = np.asarray(tensors[name])
        if a.dtype.kind == "f":
            a = a.astype("<f8") if a.dtype.itemsize == 8 else a.astype("<f4")
            code = "F64" if a.dtype.itemsize == 8 else "F32"
        elif a.dtype.kind in "iu":
            a = a.astype("<i8") if a.dtype.itemsize == 8 else a.astype("<i4")
            code = "I64" if a.dtype.itemsize == 8 else "I32"
        else:
            raise ValueError("cannot store %s with dtype %s" % (name, a.dtype))
        raw = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": code, "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * ((8 - len(hb) % 8) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for c in chunks:
            f.write(c)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

def flatten(j, prefix=""):
    flat = {}
    for k, v in j.items():
        key = prefix + k
        if isinstance(v, dict):
            flat.update(flatten(v, key + "."))
        else:
            flat[key] = v
    return flat


class Cfg:
    """The fields the twin needs, read from a nested or flat moetrain config document."""

    DEFAULTS = {
        "model.vocab_size": 4096, "model.d_model": 256, "model.n_layers": 4, "model.n_heads": 4,
        "model.n_kv_heads": 4, "model.head_dim": 0, "model.seq_len": 256,
        "model.rope_theta": 10000.0, "model.norm_eps": 1e-6, "model.tie_embeddings": False,
        "model.dense_layers": 1, "model.dense_ff": 1024,
        "model.moe.n_experts": 8, "model.moe.top_k": 2, "model.moe.expert_ff": 512,
        "model.moe.n_shared_experts": 0, "model.moe.shared_ff": 512,
        "model.moe.router": "softmax_topk", "model.moe.route_scale": 1.0,
        "model.moe.aux_loss_coef": 0.01, "model.moe.z_loss_coef": 0.0,
        "optim.weight_decay": 0.1, "optim.beta1": 0.9, "optim.beta2": 0.95, "optim.eps": 1e-8,
        "optim.momentum": 0.95, "optim.nesterov": True, "optim.ns_steps": 5,
        "optim.ns_coefficients": "muon",
        "optim.muon_scale": "match_rms_adamw", "optim.qk_clip_tau": 100.0,
        "optim.qk_clip_alpha": 0.5, "optim.grad_clip": 1.0,
        "optim.normuon_beta2": 0.95, "optim.normuon_scale": "original",
        "optim.soap_beta1": 0.95, "optim.soap_beta2": 0.95, "optim.soap_shampoo_beta": -1.0,
        "optim.soap_precondition_frequency": 10, "optim.soap_max_precond_dim": 10000,
    }

    def __init__(self, doc):
        self.flat = dict(self.DEFAULTS)
        self.flat.update(flatten(doc))
        g = self.flat.get
        self.V, self.d, self.L = int(g("model.vocab_size")), int(g("model.d_model")), int(g("model.n_layers"))
        self.H, self.Hkv = int(g("model.n_heads")), int(g("model.n_kv_heads"))
        self.hd = int(g("model.head_dim")) or self.d // self.H
        self.theta, self.eps = float(g("model.rope_theta")), float(g("model.norm_eps"))
        self.tied = bool(g("model.tie_embeddings"))
        self.dense_layers, self.dense_ff = int(g("model.dense_layers")), int(g("model.dense_ff"))
        self.E, self.k = int(g("model.moe.n_experts")), int(g("model.moe.top_k"))
        self.expert_ff = int(g("model.moe.expert_ff"))
        self.n_shared, self.shared_ff = int(g("model.moe.n_shared_experts")), int(g("model.moe.shared_ff"))
        self.router = str(g("model.moe.router"))
        if self.router not in ("softmax_topk", "sigmoid_bias"):
            raise ValueError("model.moe.router: unknown router %r" % self.router)
        self.route_scale = float(g("model.moe.route_scale"))
        self.aux_coef, self.z_coef = float(g("model.moe.aux_loss_coef")), float(g("model.moe.z_loss_coef"))
        o = lambda key: g("optim." + key)
        self.wd, self.beta1, self.beta2, self.adam_eps = float(o("weight_decay")), float(o("beta1")), float(o("beta2")), float(o("eps"))
        self.momentum, self.nesterov, self.ns_steps = float(o("momentum")), bool(o("nesterov")), int(o("ns_steps"))
        self.ns_coefficients = str(o("ns_coefficients"))
        if self.ns_coefficients not in ("muon", "polar_express"):
            raise ValueError("optim.ns_coefficients: unknown value %r" % self.ns_coefficients)
        self.muon_scale = str(o("muon_scale"))
        if self.muon_scale not in ("match_rms_adamw", "original"):
            raise ValueError("optim.muon_scale: unknown value %r" % self.muon_scale)
        self.normuon_beta2 = float(o("normuon_beta2"))
        self.normuon_scale = str(o("normuon_scale"))
        if self.normuon_scale not in ("match_rms_adamw", "original"):
            raise ValueError("optim.normuon_scale: unknown value %r" % self.normuon_scale)
        self.soap_beta1, self.soap_beta2 = float(o("soap_beta1")), float(o("soap_beta2"))
        sb = float(o("soap_shampoo_beta"))
        self.soap_shampoo_beta = self.soap_beta2 if sb < 0 else sb
        self.soap_f = int(o("soap_precondition_frequency"))
        self.soap_max_dim = int(o("soap_max_precond_dim"))
        self.tau, self.alpha, self.grad_clip = float(o("qk_clip_tau")), float(o("qk_clip_alpha")), float(o("grad_clip"))
        # Per-group overrides (optional sections optim.muon_group / optim.adamw_group).
        self.groups = {}
        for grp in ("muon_group", "adamw_group"):
            self.groups[grp] = {
                "lr_scale": float(g("optim.%s.lr_scale" % grp, 1.0)),
                "weight_decay": float(g("optim.%s.weight_decay" % grp, self.wd)),
                "beta1": float(g("optim.%s.beta1" % grp, self.beta1)),
                "beta2": float(g("optim.%s.beta2" % grp, self.beta2)),
                "eps": float(g("optim.%s.eps" % grp, self.adam_eps)),
            }
        if self.H % self.Hkv != 0:
            raise ValueError("model.n_kv_heads must divide model.n_heads")

    def is_moe(self, layer):
        return layer >= self.dense_layers


# ---------------------------------------------------------------------------------------------
# Parameter names and shapes (docs/design.md §3; Linear weights are [out, in])
# ---------------------------------------------------------------------------------------------

def param_shapes(c):
    """Ordered list of (name, shape, role); role in embed|norm|q|k|v|o|w1|w2|w3|router|lm_head."""
    out = [("embed.weight", (c.V, c.d), "embed")]

    def swiglu(prefix, ff):
        return [(prefix + ".w1.weight", (ff, c.d), "w1"), (prefix + ".w3.weight", (ff, c.d), "w3"),
                (prefix + ".w2.weight", (c.d, ff), "w2")]

    for l in range(c.L):
        p = "layers.%d" % l
        out += [(p + ".attn_norm.weight", (c.d,), "norm"),
                (p + ".attn.q_proj.weight", (c.H * c.hd, c.d), "q"),
                (p + ".attn.k_proj.weight", (c.Hkv * c.hd, c.d), "k"),
                (p + ".attn.v_proj.weight", (c.Hkv * c.hd, c.d), "v"),
                (p + ".attn.o_proj.weight", (c.d, c.H * c.hd), "o"),
                (p + ".ffn_norm.weight", (c.d,), "norm")]
        if not c.is_moe(l):
            out += swiglu(p + ".mlp", c.dense_ff)
        else:
            out.append((p + ".moe.router.weight", (c.E, c.d), "router"))
            for e in range(c.E):
                out += swiglu(p + ".moe.experts.%d" % e, c.expert_ff)
            for s in range(c.n_shared):
                out += swiglu(p + ".moe.shared_experts.%d" % s, c.shared_ff)
    out.append(("norm.weight", (c.d,), "norm"))
    if not c.tied:
        out.append(("lm_head.weight", (c.V, c.d), "lm_head"))
    return out


MUON_ROLES = ("q", "k", "v", "o", "w1", "w2", "w3")


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------

def rms_norm(x, g, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g


def rope_tables(T, hd, theta, dtype):
    half = hd // 2
    inv_freq = theta ** (-2.0 * torch.arange(half, dtype=torch.float64) / hd)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None, :]  # [T, hd/2]
    ang = torch.cat([ang, ang], dim=-1)  # dimension i and i + hd/2 share a frequency
    return ang.cos().to(dtype), ang.sin().to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x, cos, sin):  # x [B, heads, T, hd]
    return x * cos + rotate_half(x) * sin


def swiglu(P, prefix, x):
    return F.linear(F.silu(F.linear(x, P[prefix + ".w1.weight"])) * F.linear(x, P[prefix + ".w3.weight"]),
                    P[prefix + ".w2.weight"])


def topk_lower_index(key, k):
    """Top-k along the last dim; ties go to the lower index (stable sort of -key)."""
    order = torch.sort(-key, dim=-1, stable=True).indices
    return order[..., :k]


def attention(c, P, l, x, cos, sin, smax_out):
    B, T, _ = x.shape
    p = "layers.%d.attn." % l
    q = F.linear(x, P[p + "q_proj.weight"]).view(B, T, c.H, c.hd).transpose(1, 2)
    k = F.linear(x, P[p + "k_proj.weight"]).view(B, T, c.Hkv, c.hd).transpose(1, 2)
    v = F.linear(x, P[p + "v_proj.weight"]).view(B, T, c.Hkv, c.hd).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    rep = c.H // c.Hkv
    k = k.repeat_interleave(rep, dim=1)  # query head h uses kv head h // rep (HF repeat_kv)
    v = v.repeat_interleave(rep, dim=1)
    s = q @ k.transpose(-1, -2) / math.sqrt(c.hd)  # [B, H, T, T]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    s = s.masked_fill(~causal, float("-inf"))
    smax_out[l] = s.detach().amax(dim=(0, 2, 3))
    o = torch.softmax(s, dim=-1) @ v  # [B, H, T, hd]
    return F.linear(o.transpose(1, 2).reshape(B, T, c.H * c.hd), P[p + "o_proj.weight"])


def moe(c, P, l, x, expert_bias, stats):
    B, T, d = x.shape
    xt = x.reshape(B * T, d)
    N = xt.shape[0]
    p = "layers.%d.moe." % l
    logits = F.linear(xt, P[p + "router.weight"])  # [N, E]
    if c.router == "softmax_topk":
        scores = torch.softmax(logits, dim=-1)
        key = scores.detach()
        dist = scores
    else:
        scores = torch.sigmoid(logits)
        key = scores.detach() + expert_bias[l].to(scores.dtype)
        dist = scores / scores.sum(-1, keepdim=True)
    sel = topk_lower_index(key, c.k)  # [N, k], constant
    chosen = scores.gather(-1, sel)
    gates = chosen / chosen.sum(-1, keepdim=True)
    if c.router == "sigmoid_bias":
        gates = gates * c.route_scale

    counts = torch.bincount(sel.reshape(-1), minlength=c.E)
    f = counts.to(scores.dtype) / (N * c.k)  # constant
    P_e = dist.mean(0)
    aux = c.E * (f * P_e).sum()
    z = torch.logsumexp(logits, dim=-1).pow(2).mean()
    stats["aux"][l], stats["z"][l], stats["load"][l] = aux, z, counts

    y = torch.zeros_like(xt)
    for e in range(c.E):
        tok, slot = (sel == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        out = swiglu(P, p + "experts.%d" % e, xt[tok]) * gates[tok, slot][:, None]
        y = y.index_add(0, tok, out)
    for s in range(c.n_shared):
        y = y + swiglu(P, p + "shared_experts.%d" % s, xt)
    return y.view(B, T, d), aux, z


def forward(c, P, tokens, targets, expert_bias):
    """Returns (objective, stats) with stats of ce, aux, z (tensors per layer), smax, load."""
    B, T = tokens.shape
    dtype = P["embed.weight"].dtype
    cos, sin = rope_tables(T, c.hd, c.theta, dtype)
    stats = {"aux": [torch.zeros((), dtype=dtype)] * c.L, "z": [torch.zeros((), dtype=dtype)] * c.L,
             "load": [torch.zeros(c.E, dtype=torch.int64)] * c.L, "smax": [None] * c.L}
    x = F.embedding(tokens, P["embed.weight"])
    reg = torch.zeros((), dtype=dtype)
    for l in range(c.L):
        pre = "layers.%d." % l
        x = x + attention(c, P, l, rms_norm(x, P[pre + "attn_norm.weight"], c.eps), cos, sin, stats["smax"])
        h = rms_norm(x, P[pre + "ffn_norm.weight"], c.eps)
        if not c.is_moe(l):
            x = x + swiglu(P, pre + "mlp", h)
        else:
            y, aux, z = moe(c, P, l, h, expert_bias, stats)
            x = x + y
            reg = reg + c.aux_coef * aux + c.z_coef * z
    x = rms_norm(x, P["norm.weight"], c.eps)
    logits = F.linear(x, P["embed.weight"] if c.tied else P["lm_head.weight"])
    valid = targets >= 0
    if bool(valid.any()):
        ce = F.cross_entropy(logits[valid], targets[valid].long(), reduction="mean")
    else:
        ce = torch.zeros((), dtype=dtype)
    stats["ce"] = ce
    return ce + reg, stats


# ---------------------------------------------------------------------------------------------
# Optimizers (one step from fresh state, t = 1; written for general t)
# ---------------------------------------------------------------------------------------------

NS_COEFS = (3.4445, -4.7750, 2.0315)
# Polar Express (arXiv 2505.16932) as modded-nanogpt and Dion list it; ../shared/OPTIMIZERS.md §1.
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def newton_schulz(U, steps, coefficients="muon"):
    if coefficients == "polar_express":
        X = U / (1.02 * torch.linalg.norm(U) + 1e-6)
        coefs = [POLAR_EXPRESS[min(i, len(POLAR_EXPRESS) - 1)] for i in range(steps)]
    else:
        X = U / (torch.linalg.norm(U) + 1e-7)
        coefs = [NS_COEFS] * steps
    transposed = X.shape[0] > X.shape[1]
    if transposed:
        X = X.T
    for a, b, cc in coefs:
        S = X @ X.T
        X = a * X + (b * S + cc * S @ S) @ X
    return X.T if transposed else X


def clip_grads(c, grads):
    """Global L2 norm (returned, before clipping) and the rule of torch.nn.utils.clip_grad_norm_:
    g *= min(1, grad_clip / (norm + 1e-6)); grad_clip 0 disables clipping."""
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
    if c.grad_clip > 0:
        coef = torch.clamp(c.grad_clip / (norm + 1e-6), max=1.0)
        grads = {n: g * coef for n, g in grads.items()}
    return grads, float(norm)


def adamw_update(p, g, lr, wd, b1, b2, eps, t=1):
    m = (1 - b1) * g  # from m = 0
    v = (1 - b2) * g * g
    mhat, vhat = m / (1 - b1 ** t), v / (1 - b2 ** t)
    return p - lr * (mhat / (vhat.sqrt() + eps) + wd * p)


def muon_update(c, p, g, lr, wd):
    M = g  # M = mu * 0 + G
    U = g + c.momentum * M if c.nesterov else M
    O = newton_schulz(U, c.ns_steps, c.ns_coefficients)
    A, B = p.shape
    s = 0.2 * math.sqrt(max(A, B)) if c.muon_scale == "match_rms_adamw" else math.sqrt(max(1.0, A / B))
    return p - lr * (s * O + wd * p)


# The matrix optimizers of ../shared/OPTIMIZERS.md §2-4 as their reference code writes them (the
# lerp momentum M = mu M + (1 - mu) G, U = (1 - mu) G + mu M; SOAP's first moment kept in the
# rotated basis), on one matrix and its state dict (empty: fresh), returning the new matrix.
# moetrain keeps M = mu M + G and SOAP's m unrotated; matrix_state_in / matrix_state_out convert.

def lerp_momentum(c, st, g):
    mu = c.momentum
    M = st.get("M", torch.zeros_like(g))
    M = mu * M + (1 - mu) * g
    st["M"] = M
    return (1 - mu) * g + mu * M if c.nesterov else M


def normuon_update(c, p, g, lr, wd, st):
    U = lerp_momentum(c, st, g)
    O = newton_schulz(U, c.ns_steps, c.ns_coefficients)
    A, B = p.shape
    v = st.get("v", torch.zeros(A, 1, dtype=p.dtype))
    v = c.normuon_beta2 * v + (1 - c.normuon_beta2) * (O * O).mean(dim=1, keepdim=True)
    st["v"] = v
    Oh = O / (v.sqrt() + 1e-10)
    if c.normuon_scale == "original":
        Oh = Oh * torch.linalg.norm(O) / (torch.linalg.norm(Oh) + 1e-10) * math.sqrt(max(1.0, A / B))
    else:  # the paper's: RMS 0.2
        Oh = Oh * 0.2 * math.sqrt(A * B) / torch.linalg.norm(Oh)
    return p * (1 - lr * wd) - lr * Oh


def adamuon_update(c, p, g, lr, wd, st):
    U = lerp_momentum(c, st, g)
    O = newton_schulz(torch.sign(U), c.ns_steps, c.ns_coefficients)
    A, B = p.shape
    V = st.get("V", torch.zeros_like(p))
    V = c.momentum * V + (1 - c.momentum) * O * O
    st["V"] = V
    eps = c.adam_eps
    Oh = O / (V.sqrt() + eps)
    Oh = Oh * 0.2 * math.sqrt(A * B) / (torch.linalg.norm(Oh) + eps)
    return p * (1 - lr * wd) - lr * Oh


def soap_update(c, p, g, lr, wd, st):
    """soap.py's step on one matrix: st holds m (rotated), v, L, R, QL, QR (absent: not rotated)
    and the step count t (the first call only initialises)."""
    A, B = p.shape
    bs, b1, b2, eps = c.soap_shampoo_beta, c.soap_beta1, c.soap_beta2, c.adam_eps
    sides = [("L", "QL", A, g @ g.T), ("R", "QR", B, g.T @ g)]

    def rot(x):  # into the eigenbasis
        if "QL" in st:
            x = st["QL"].T @ x
        return x @ st["QR"] if "QR" in st else x

    def unrot(x):
        if "QL" in st:
            x = st["QL"] @ x
        return x @ st["QR"].T if "QR" in st else x

    if "t" not in st:  # the first call: factors and eigenbases, no update
        for P, Q, n, gg in sides:
            if n <= c.soap_max_dim:
                st[P] = (1 - bs) * gg
                w, vec = torch.linalg.eigh(st[P])
                st[Q] = torch.flip(vec, dims=[1])  # descending eigenvalues
        st["t"], st["m"], st["v"] = 0, torch.zeros_like(p), torch.zeros_like(p)
        return p
    st["t"] += 1
    t = st["t"]
    gt = rot(g)
    st["m"] = b1 * st["m"] + (1 - b1) * gt
    st["v"] = b2 * st["v"] + (1 - b2) * gt * gt
    N = unrot(st["m"] / (st["v"].sqrt() + eps))
    p = p - lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) * N
    p = p - lr * wd * p
    m_o = unrot(st["m"])
    for P, Q, n, gg in sides:
        if P in st:
            st[P] = bs * st[P] + (1 - bs) * gg
    if t % c.soap_f == 0:
        for axis, (P, Q, n, gg) in enumerate(sides):
            if P not in st:
                continue
            est = torch.diag(st[Q].T @ st[P] @ st[Q])
            order = torch.argsort(est, descending=True, stable=True)
            st["v"] = st["v"].index_select(axis, order)
            st[Q], _ = torch.linalg.qr(st[P] @ st[Q][:, order])
    st["m"] = rot(m_o)
    return p


MATRIX_UPDATES = {"normuon": normuon_update, "adamuon": adamuon_update, "soap": soap_update}
# moetrain's state tensor names per optimizer: (its name, the twin's key).
MATRIX_STATE = {"normuon": (("momentum", "M"), ("v", "v")),
                "adamuon": (("momentum", "M"), ("v", "V")),
                "soap": (("m", "m"), ("v", "v"), ("L", "L"), ("R", "R"), ("QL", "QL"), ("QR", "QR"))}


def matrix_state_in(c, opt, name, state, step, dtype):
    """The twin's state of matrix `name` from moetrain's state tensors (optimizer step `step`)."""
    st = {}
    for ours, key in MATRIX_STATE[opt]:
        full = "%s.%s.%s" % (opt, ours, name)
        if full in state:
            st[key] = torch.tensor(state[full], dtype=dtype)
    if "v" in st and opt == "normuon":
        st["v"] = st["v"].reshape(-1, 1)
    if "M" in st:
        st["M"] = (1 - c.momentum) * st["M"]
    if opt == "soap" and step >= 1:
        st["t"] = step - 1
        rot = st["m"]
        if "QL" in st:
            rot = st["QL"].T @ rot
        st["m"] = rot @ st["QR"] if "QR" in st else rot
    return st


def matrix_state_out(c, opt, name, st):
    out = {}
    st = dict(st)
    if "M" in st:
        st["M"] = st["M"] / (1 - c.momentum)
    if opt == "soap":
        raw = st["m"]
        if "QL" in st:
            raw = st["QL"] @ raw
        st["m"] = raw @ st["QR"].T if "QR" in st else raw
    for ours, key in MATRIX_STATE[opt]:
        if key in st:
            out["%s.%s.%s" % (opt, ours, name)] = st[key].double().numpy()
    return out


def optimizer_step(c, name, params, grads, lr, smax, roles, adamw_groups_by_role=True):
    """params, grads: {name: tensor}; returns the new parameters. name: adamw | muon | muonclip |
    adamw_qk_clip (AdamW, then QK-clip: optim.qk_clip with adamw).

    Groups are by role (docs/design.md §4): hidden matrices form the Muon group (lr_scale and weight
    decay of optim.muon_group), the rest the AdamW group (optim.adamw_group); norm gains never
    decay. With name == adamw every tensor is updated by AdamW but keeps its group's settings.
    """
    grads, _ = clip_grads(c, grads)
    new = {}
    for n, p in params.items():
        role = roles[n]
        grp = c.groups["muon_group" if role in MUON_ROLES else "adamw_group"]
        lr_g = lr * grp["lr_scale"]
        wd = 0.0 if role == "norm" else grp["weight_decay"]
        if name in ("muon", "muonclip") and role in MUON_ROLES:
            new[n] = muon_update(c, p, grads[n], lr_g, wd)
        elif name in MATRIX_UPDATES and role in MUON_ROLES:
            new[n] = MATRIX_UPDATES[name](c, p, grads[n], lr_g, wd, {})
        else:
            b1, b2, eps = grp["beta1"], grp["beta2"], grp["eps"]
            new[n] = adamw_update(p, grads[n], lr_g, wd, b1, b2, eps)
    if name in ("muonclip", "adamw_qk_clip"):
        qk_clip(c, new, smax)
    return new


def qk_clip(c, params, smax):
    rep = c.H // c.Hkv
    for l in range(c.L):
        gam = []
        for h in range(c.H):
            s = float(smax[l][h])
            gam.append(c.tau / s if s > c.tau else 1.0)
        qn, kn = "layers.%d.attn.q_proj.weight" % l, "layers.%d.attn.k_proj.weight" % l
        q, k = params[qn].clone(), params[kn].clone()
        for h in range(c.H):
            if gam[h] < 1.0:
                q[h * c.hd:(h + 1) * c.hd] *= gam[h] ** c.alpha
        for gidx in range(c.Hkv):
            gmin = min(gam[gidx * rep:(gidx + 1) * rep])
            if gmin < 1.0:
                k[gidx * c.hd:(gidx + 1) * c.hd] *= gmin ** (1.0 - c.alpha)
        params[qn], params[kn] = q, k


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

def run(cfg_doc, weights, batch, lr, dtype):
    c = Cfg(cfg_doc)
    shapes = param_shapes(c)
    roles = {n: r for n, _, r in shapes}
    P = {}
    for n, shape, _ in shapes:
        if n not in weights:
            raise KeyError("weights: missing tensor %s" % n)
        if tuple(weights[n].shape) != tuple(shape):
            raise ValueError("weights: %s has shape %s, expected %s" % (n, list(weights[n].shape), list(shape)))
        P[n] = torch.tensor(weights[n], dtype=dtype, requires_grad=True)
    extra = sorted(set(weights) - set(P))
    if extra:
        raise KeyError("weights: unexpected tensors %s" % extra)
    tokens = torch.tensor(batch["tokens"].astype(np.int64))
    targets = torch.tensor(batch["targets"].astype(np.int64))
    if "expert_bias" in batch:
        expert_bias = torch.tensor(batch["expert_bias"].astype(np.float64)).reshape(c.L, c.E)
    else:
        expert_bias = torch.zeros(c.L, c.E, dtype=torch.float64)

    obj, st = forward(c, P, tokens, targets, expert_bias)
    obj.backward()
    # A tensor that took no part (an expert no token chose) has a zero gradient.
    grads = {n: P[n].grad.detach() if P[n].grad is not None else torch.zeros_like(P[n]).detach() for n in P}
    smax = torch.stack(st["smax"]).double()

    out = {
        "objective": np.array([obj.item()], dtype=np.float64),
        "ce": np.array([st["ce"].item()], dtype=np.float64),
        "aux": np.array([float(a) for a in st["aux"]], dtype=np.float64),
        "z": np.array([float(z) for z in st["z"]], dtype=np.float64),
        "smax": smax.numpy().astype(np.float64),
        "load": torch.stack(st["load"]).numpy().astype(np.int64),
    }
    _, gnorm = clip_grads(c, grads)
    out["grad_norm"] = np.array([gnorm], dtype=np.float64)
    for n in P:
        out["grad." + n] = grads[n].double().numpy()
    with torch.no_grad():
        params = {n: P[n].detach() for n in P}
        for opt in ("adamw", "muon", "muonclip", "adamw_qk_clip", "normuon", "adamuon", "soap"):
            new = optimizer_step(c, opt, params, grads, lr, smax, roles)
            for n in P:
                out[opt + "." + n] = new[n].double().numpy()
    return out


def run_optimizer_steps(cfg_doc, params, state, grads, lr, opt, dtype):
    """`len(grads)` steps of matrix optimizer `opt` on every matrix of the matrix group, from
    moetrain's parameters and optimizer state (no gradient clipping: optim.grad_clip must be 0).
    Returns the matrices and their state in moetrain's names."""
    c = Cfg(cfg_doc)
    if c.grad_clip != 0:
        raise ValueError("--optimizer-steps: optim.grad_clip must be 0 (the matrices alone are stepped)")
    if opt not in MATRIX_UPDATES:
        raise ValueError("--optimizer-steps: unknown optimizer %r" % opt)
    step = int(np.asarray(state["step"]).reshape(-1)[0])
    grp = c.groups["muon_group"]
    out = {}
    for n, shape, role in param_shapes(c):
        if role not in MUON_ROLES:
            continue
        p = torch.tensor(params[n], dtype=dtype)
        st = matrix_state_in(c, opt, n, state, step, dtype)
        for g in grads:
            p = MATRIX_UPDATES[opt](c, p, torch.tensor(g[n], dtype=dtype), lr * grp["lr_scale"],
                                    grp["weight_decay"], st)
        out[n] = p.double().numpy()
        out.update(matrix_state_out(c, opt, n, st))
    return out


# ---------------------------------------------------------------------------------------------
# Self-test
# ---------------------------------------------------------------------------------------------

def tiny_config(router, heads, kv_heads, shared, dense_layers, tied):
    return {
        "model": {"vocab_size": 13, "d_model": 8, "n_layers": 2, "n_heads": heads,
                  "n_kv_heads": kv_heads, "head_dim": 4, "seq_len": 5, "rope_theta": 10000.0,
                  "norm_eps": 1e-6, "tie_embeddings": tied, "dense_layers": dense_layers,
                  "dense_ff": 6,
                  "moe": {"n_experts": 4, "top_k": 2, "expert_ff": 5, "n_shared_experts": shared,
                          "shared_ff": 3, "router": router,
                          "route_scale": 2.5 if router == "sigmoid_bias" else 1.0,
                          "aux_loss_coef": 0.07, "z_loss_coef": 0.03}},
        "optim": {"muon_group": {"lr_scale": 0.7, "weight_decay": 0.05},
                  "adamw_group": {"lr_scale": 1.5, "weight_decay": 0.2},
                  "grad_clip": 1.0, "qk_clip_tau": 100.0},
    }


def random_weights(c, gen, std=0.4):
    W = {}
    for n, shape, role in param_shapes(c):
        if role == "norm":
            W[n] = 1.0 + 0.2 * torch.randn(shape, generator=gen, dtype=torch.float64)
        else:
            W[n] = std * torch.randn(shape, generator=gen, dtype=torch.float64)
    return W


def self_test():
    ok = True
    torch.manual_seed(0)

    # 1. Tie rule of the top-k selection: equal keys go to the lower expert index.
    key = torch.tensor([[0.5, 0.9, 0.9, 0.1, 0.9], [0.2, 0.2, 0.2, 0.2, 0.2],
                        [1.0, 0.0, 1.0, 0.0, 3.0]], dtype=torch.float64)
    got = topk_lower_index(key, 3).tolist()
    want = [[1, 2, 4], [0, 1, 2], [4, 0, 2]]
    print("tie rule: %s (got %s)" % ("ok" if got == want else "FAIL", got))
    ok &= got == want
    big = torch.zeros(7, 300, dtype=torch.float64)  # a long row of ties: still lowest indices
    got_big = topk_lower_index(big, 5)
    ok_big = bool((got_big == torch.arange(5)).all())
    print("tie rule (300 equal keys): %s" % ("ok" if ok_big else "FAIL"))
    ok &= ok_big

    # 2. Gradients against central finite differences, on several architecture variants.
    variants = [("softmax_topk", 2, 2, 0, 1, False), ("sigmoid_bias", 4, 2, 1, 0, False),
                ("sigmoid_bias", 2, 1, 2, 1, True)]
    gen = torch.Generator().manual_seed(7)
    worst = 0.0
    for vi, var in enumerate(variants):
        c = Cfg(tiny_config(*var))
        W = random_weights(c, gen)
        B, T = 2, 5
        tokens = torch.randint(0, c.V, (B, T), generator=gen)
        targets = torch.randint(0, c.V, (B, T), generator=gen)
        targets[0, 1] = -1  # padding
        targets[1, 4] = -100
        bias = 0.3 * torch.randn(c.L, c.E, generator=gen, dtype=torch.float64)
        P = {n: w.clone().requires_grad_(True) for n, w in W.items()}
        obj, st = forward(c, P, tokens, targets, bias)
        obj.backward()
        base_load = [x.clone() for x in st["load"]]

        def f(Pd):
            with torch.no_grad():
                o, s = forward(c, Pd, tokens, targets, bias)
            same = all(bool((a == b).all()) for a, b in zip(s["load"], base_load))
            return o.item(), same

        h = 1e-6
        n_checked, var_worst = 0, 0.0
        for n, shape, _ in param_shapes(c):
            flat = W[n].reshape(-1)
            for idx in torch.randperm(flat.numel(), generator=gen)[:3].tolist():
                Pd = {m: w.clone() for m, w in W.items()}
                Pd[n].view(-1)[idx] += h
                fp, s1 = f(Pd)
                Pd[n].view(-1)[idx] -= 2 * h
                fm, s2 = f(Pd)
                if not (s1 and s2):
                    continue  # the selection moved: not differentiable there
                fd = (fp - fm) / (2 * h)
                an = P[n].grad.reshape(-1)[idx].item() if P[n].grad is not None else 0.0
                err = abs(fd - an) / max(abs(fd), abs(an), 1e-3)  # FD noise is ~1e-10 absolute
                if err > 1e-6:
                    print("  grad mismatch %s[%d]: autograd %.10g fd %.10g" % (n, idx, an, fd))
                    ok = False
                var_worst = max(var_worst, err)
                n_checked += 1
        # The regularisers are really part of the objective (nonzero gradient contribution).
        aux_sum = sum(float(a) for a in st["aux"])
        print("gradcheck variant %d %s heads %d/%d shared %d dense %d tied %s: %d entries, "
              "worst rel err %.2e, aux %.4f" % (vi, *var, n_checked, var_worst, aux_sum))
        worst = max(worst, var_worst)
        ok &= n_checked > 0 and aux_sum > 0

    # 3. Newton-Schulz: orthogonalisation pushes singular values into about [0.5, 1.3].
    U = torch.randn(12, 7, generator=gen, dtype=torch.float64)
    sv = torch.linalg.svdvals(newton_schulz(U, 5))
    ns_ok = bool(sv.min() > 0.5 and sv.max() < 1.3)
    print("Newton-Schulz singular values in [%.3f, %.3f]: %s" % (sv.min(), sv.max(), "ok" if ns_ok else "FAIL"))
    ok &= ns_ok

    # 4. The CLI path end to end through safetensors files, with QK-clip active on some heads.
    with tempfile.TemporaryDirectory() as tmp:
        doc = tiny_config("sigmoid_bias", 4, 2, 1, 1, False)
        c = Cfg(doc)
        W = random_weights(c, gen)
        tokens = torch.randint(0, c.V, (2, 5), generator=gen)
        targets = torch.randint(0, c.V, (2, 5), generator=gen)
        bias = 0.1 * torch.randn(c.L, c.E, generator=gen)
        with torch.no_grad():
            _, st = forward(c, W, tokens, targets, bias.double())
        sm = torch.stack(st["smax"])
        doc["optim"]["qk_clip_tau"] = float(sm.median())
        paths = {k: os.path.join(tmp, k) for k in ("cfg.json", "w.st", "b.st", "out.st")}
        with open(paths["cfg.json"], "w") as fh:
            json.dump(doc, fh)
        save_safetensors(paths["w.st"], {n: w.float().numpy() for n, w in W.items()})
        save_safetensors(paths["b.st"], {"tokens": tokens.int().numpy(), "targets": targets.int().numpy(),
                                         "expert_bias": bias.float().numpy()})
        main(["--config", paths["cfg.json"], "--weights", paths["w.st"], "--batch", paths["b.st"],
              "--lr", "0.01", "--out", paths["out.st"]])
        out = load_safetensors(paths["out.st"])
        names = [n for n, _, _ in param_shapes(c)]
        need = ["objective", "ce", "aux", "z", "smax", "load", "grad_norm"] + \
               ["%s.%s" % (p, n) for p in ("grad", "adamw", "muon", "muonclip", "adamw_qk_clip")
                for n in names]
        missing = [n for n in need if n not in out]
        q0 = "layers.0.attn.q_proj.weight"
        clipped = [l for l in range(c.L)
                   if not np.array_equal(out["muon.layers.%d.attn.q_proj.weight" % l],
                                         out["muonclip.layers.%d.attn.q_proj.weight" % l])]
        cli_ok = (not missing and out["load"].dtype == np.int64 and out["load"].sum() == (c.L - c.dense_layers) * 10 * c.k
                  and len(clipped) > 0 and np.array_equal(out["adamw." + "norm.weight"], out["muon.norm.weight"])
                  and not np.array_equal(out["adamw." + q0], out["muon." + q0]))
        print("CLI round trip: %s (missing %s, clipped layers %s)" % ("ok" if cli_ok else "FAIL", missing[:5], clipped))
        ok &= cli_ok

    print("self-test %s" % ("PASSED" if ok else "FAILED"))
    return 0 if ok else 1


def bench(cfg_doc, weights, batch, steps, warmup, threads):
    """Times forward+backward in float32 on `threads` threads: the PyTorch side of
    scripts/bench_vs_torch.py (the same weights and batch as `moetrain bench --dump`)."""
    import time
    torch.set_num_threads(threads)
    c = Cfg(cfg_doc)
    P = {n: torch.tensor(weights[n], dtype=torch.float32, requires_grad=True)
         for n, _, _ in param_shapes(c)}
    tokens = torch.tensor(batch["tokens"].astype(np.int64))
    targets = torch.tensor(batch["targets"].astype(np.int64))
    expert_bias = torch.zeros(c.L, c.E, dtype=torch.float32)
    times, loss = [], None
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        for p in P.values():
            p.grad = None
        obj, _ = forward(c, P, tokens, targets, expert_bias)
        obj.backward()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        loss = obj.item()
    n = tokens.numel()
    mean = sum(times) / len(times)
    return {"tokens_per_step": n, "step_seconds_mean": mean, "step_seconds_best": min(times),
            "tokens_per_second": n / mean, "loss": loss, "threads": threads,
            "torch": torch.__version__}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config")
    ap.add_argument("--weights")
    ap.add_argument("--batch")
    ap.add_argument("--lr", type=float)
    ap.add_argument("--out")
    ap.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    ap.add_argument("--self-test", action="store_true", help="check autograd against finite differences")
    ap.add_argument("--optimizer-steps", metavar="NAME", choices=sorted(MATRIX_UPDATES),
                    help="step the matrices with this optimizer from --params and --state, one step "
                         "per gradient file of --grads")
    ap.add_argument("--params")
    ap.add_argument("--state")
    ap.add_argument("--grads", nargs="+")
    ap.add_argument("--bench-steps", type=int, metavar="N",
                    help="time N forward+backward passes in float32 of --weights on --batch, print "
                         "JSON (scripts/bench_vs_torch.py)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    if a.self_test:
        return self_test()
    if a.bench_steps is not None:
        for req in ("config", "weights", "batch"):
            if getattr(a, req) is None:
                ap.error("--%s is required with --bench-steps" % req)
        if a.bench_steps < 1 or a.warmup < 0 or a.threads < 1:
            ap.error("--bench-steps and --threads must be >= 1, --warmup >= 0")
        with open(a.config) as fh:
            cfg_doc = json.load(fh)
        print(json.dumps(bench(cfg_doc, load_safetensors(a.weights), load_safetensors(a.batch),
                               a.bench_steps, a.warmup, a.threads), indent=1))
        return 0
    if a.optimizer_steps:
        for req in ("config", "params", "state", "grads", "lr", "out"):
            if getattr(a, req) is None:
                ap.error("--%s is required with --optimizer-steps" % req)
        with open(a.config) as fh:
            cfg_doc = json.load(fh)
        dtype = torch.float64 if a.dtype == "float64" else torch.float32
        out = run_optimizer_steps(cfg_doc, load_safetensors(a.params), load_safetensors(a.state),
                                  [load_safetensors(g) for g in a.grads], a.lr, a.optimizer_steps,
                                  dtype)
        save_safetensors(a.out, out, {"producer": "scripts/torch_reference.py", "dtype": a.dtype})
        return 0
    for req in ("config", "weights", "batch", "lr", "out"):
        if getattr(a, req) is None:
            ap.error("--%s is required" % req)
    with open(a.config) as fh:
        cfg_doc = json.load(fh)
    dtype = torch.float64 if a.dtype == "float64" else torch.float32
    out = run(cfg_doc, load_safetensors(a.weights), load_safetensors(a.batch), a.lr, dtype)
    save_safetensors(a.out, out, {"producer": "scripts/torch_reference.py", "dtype": a.dtype})
    return 0


if __name__ == "__main__":
    sys.exit(main())
