#!/usr/bin/python3
"""Generate tests/golden/tiny.bin, the PyTorch reference ("twin") for infmoe.

This script builds a tiny GPT-2 (L=2, C=32, NH=4, T=16, V=250 padded to 256,
B=4) with seeded random parameters and records, for one fixed random batch:
the initial parameters, the inputs/targets, the logits, the loss, the
gradient of every parameter, the losses of 10 hand-written AdamW steps and the
parameters after those steps. The C tests load the file and compare.

All math runs in float64; everything stored is float32 (the initial params are
rounded to float32 first, so the C side starts from the very same numbers).

It is run by hand, NOT by `make test`; the generated tiny.bin is committed.
Needs Debian's python3-torch (apt-get install python3-torch):

    /usr/bin/python3 tests/golden/gen_golden.py
"""
import math
import os
import struct

import torch

torch.set_num_threads(1)

# ---- configuration -------------------------------------------------------
L, C, NH, T, V, VP, B = 2, 32, 4, 16, 250, 256, 4
HS, H = C // NH, 4 * C
SEED = 0
STEPS, LR, WARMUP, MIN_LR = 10, 1e-3, 3, 1e-4
WD, CLIP, B1, B2, EPS = 0.1, 1.0, 0.9, 0.95, 1e-8

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.bin")
MAGIC = b"IMGOLD01"
F32, I32 = 0, 1


def param_specs():
    """(name, shape, kind) in the exact order the C side uses.
    kind: 'wte', 'mat', 'bias', 'lnw', 'lnb'."""
    specs = [("wte", (VP, C), "wte"), ("wpe", (T, C), "mat")]
    for l in range(L):
        p = f"h.{l}."
        specs += [
            (p + "ln1.w", (C,), "lnw"), (p + "ln1.b", (C,), "lnb"),
            (p + "attn.qkv.w", (3 * C, C), "mat"), (p + "attn.qkv.b", (3 * C,), "bias"),
            (p + "attn.proj.w", (C, C), "mat"), (p + "attn.proj.b", (C,), "bias"),
            (p + "ln2.w", (C,), "lnw"), (p + "ln2.b", (C,), "lnb"),
            (p + "ffn.fc.w", (H, C), "mat"), (p + "ffn.fc.b", (H,), "bias"),
            (p + "ffn.proj.w", (C, H), "mat"), (p + "ffn.proj.b", (C,), "bias"),
        ]
    specs += [("lnf.w", (C,), "lnw"), ("lnf.b", (C,), "lnb")]
    return specs


def decays(name, kind):
    """Weight decay for wte, wpe and 2-D matrices; not for biases or LayerNorm."""
    return kind in ("wte", "mat")


def init_params(gen):
    std = {"wte": 0.05, "mat": 0.02, "bias": 0.02, "lnw": 0.1, "lnb": 0.05}
    params = {}
    for name, shape, kind in param_specs():
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * std[kind]
        if kind == "lnw":
            x = x + 1.0
        # round to float32 so the C side loads exactly these values
        params[name] = x.float().double()
    return params


# ---- model ---------------------------------------------------------------
def layernorm(x, w, b):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)  # biased variance
    return (x - mean) / torch.sqrt(var + 1e-5) * w + b


def gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def attention(x, p, pre):
    qkv = x @ p[pre + "qkv.w"].T + p[pre + "qkv.b"]           # (B,T,3C)
    q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]

    def heads(z):  # (B,T,C) -> (B,NH,T,HS); head h = columns h*HS:(h+1)*HS
        return z.view(B, T, NH, HS).transpose(1, 2)

    q, k, v = heads(q), heads(k), heads(v)
    scores = q @ k.transpose(-1, -2) / math.sqrt(HS)           # (B,NH,T,T)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    y = torch.softmax(scores, dim=-1) @ v                      # (B,NH,T,HS)
    y = y.transpose(1, 2).reshape(B, T, C)
    return y @ p[pre + "proj.w"].T + p[pre + "proj.b"]


def ffn(x, p, pre):
    h = x @ p[pre + "fc.w"].T + p[pre + "fc.b"]
    return gelu_tanh(h) @ p[pre + "proj.w"].T + p[pre + "proj.b"]


def forward(p, inputs, targets):
    x = p["wte"][inputs] + p["wpe"][torch.arange(T)]
    for l in range(L):
        pre = f"h.{l}."
        x = x + attention(layernorm(x, p[pre + "ln1.w"], p[pre + "ln1.b"]), p, pre + "attn.")
        x = x + ffn(layernorm(x, p[pre + "ln2.w"], p[pre + "ln2.b"]), p, pre + "ffn.")
    x = layernorm(x, p["lnf.w"], p["lnf.b"])
    logits = x @ p["wte"].T                                    # (B,T,VP)
    # cross-entropy over the first V columns only; padding columns are ignored
    loss = torch.nn.functional.cross_entropy(
        logits[..., :V].reshape(B * T, V), targets.reshape(B * T))
    return logits, loss


def loss_and_grads(p, inputs, targets):
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in p.items()}
    logits, loss = forward(leaves, inputs, targets)
    loss.backward()
    return logits.detach(), loss.item(), {n: t.grad.detach() for n, t in leaves.items()}


# ---- optimizer (hand-written AdamW with warmup + cosine, global clip) ------
def lr_at(s):
    if s < WARMUP:
        return LR * (s + 1) / WARMUP
    d = min(1.0, (s - WARMUP) / (STEPS - WARMUP))
    return MIN_LR + (LR - MIN_LR) * 0.5 * (1.0 + math.cos(math.pi * d))


def train(p, inputs, targets):
    p = {n: t.clone() for n, t in p.items()}
    m = {n: torch.zeros_like(t) for n, t in p.items()}
    v = {n: torch.zeros_like(t) for n, t in p.items()}
    kinds = {n: k for n, _, k in param_specs()}
    losses, clipped = [], 0
    for s in range(STEPS):
        _, loss, g = loss_and_grads(p, inputs, targets)
        losses.append(loss)
        norm = math.sqrt(sum(float((t * t).sum()) for t in g.values()))
        scale = 1.0
        if CLIP > 0 and norm > CLIP:
            scale = CLIP / (norm + 1e-6)
            clipped += 1
        lr_s, t = lr_at(s), s + 1
        print(f"step {s}: loss {loss:.6f}  grad norm {norm:.6f}  lr {lr_s:.6e}"
              + ("  (clipped)" if scale != 1.0 else ""))
        for n in p:
            gn = g[n] * scale
            m[n] = B1 * m[n] + (1 - B1) * gn
            v[n] = B2 * v[n] + (1 - B2) * gn * gn
            mhat = m[n] / (1 - B1 ** t)
            vhat = v[n] / (1 - B2 ** t)
            wd = WD if decays(n, kinds[n]) else 0.0
            p[n] = p[n] - lr_s * (mhat / (torch.sqrt(vhat) + EPS) + wd * p[n])
    assert clipped > 0, "gradient clipping never triggered"
    assert losses[-1] < losses[0], "loss did not fall"
    return losses, p


# ---- file format -----------------------------------------------------------
# Little-endian: magic b"IMGOLD01", int32 record count, then per record:
# int32 name_len, name bytes (UTF-8, no NUL), int32 dtype (0=f32, 1=i32),
# int32 ndim, int64 dims[ndim], prod(dims) 4-byte elements, row-major.
def write_records(path, records):
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<i", len(records)))
        for name, t in records:
            nb = name.encode("utf-8")
            dtype = I32 if t.dtype == torch.int32 else F32
            arr = t.to(torch.int32 if dtype == I32 else torch.float32).contiguous()
            f.write(struct.pack("<i", len(nb)) + nb)
            f.write(struct.pack("<ii", dtype, arr.dim()))
            f.write(struct.pack(f"<{arr.dim()}q", *arr.shape))
            f.write(arr.numpy().astype("<" + ("i4" if dtype == I32 else "f4")).tobytes())


def read_records(path):
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == MAGIC, "bad magic"
    (count,), off, out = struct.unpack_from("<i", data, 8), 12, {}
    for _ in range(count):
        (nlen,) = struct.unpack_from("<i", data, off); off += 4
        name = data[off:off + nlen].decode("utf-8"); off += nlen
        dtype, ndim = struct.unpack_from("<ii", data, off); off += 8
        dims = struct.unpack_from(f"<{ndim}q", data, off); off += 8 * ndim
        n = math.prod(dims)
        fmt = "<%d%s" % (n, "i" if dtype == I32 else "f")
        out[name] = (dtype, tuple(dims), struct.unpack_from(fmt, data, off)); off += 4 * n
    assert off == len(data), "trailing bytes"
    return out


def main():
    gen = torch.Generator().manual_seed(SEED)
    params = init_params(gen)
    inputs = torch.randint(0, V, (B, T), generator=gen, dtype=torch.int64)
    targets = torch.randint(0, V, (B, T), generator=gen, dtype=torch.int64)

    logits, loss, grads = loss_and_grads(params, inputs, targets)
    print(f"loss at init: {loss:.6f}  (ln(V) = {math.log(V):.6f})")
    losses, final = train(params, inputs, targets)
    print("adamw losses:", " ".join(f"{x:.6f}" for x in losses))

    names = [n for n, _, _ in param_specs()]
    records = [("param/" + n, params[n]) for n in names]
    records += [("inputs", inputs.int()), ("targets", targets.int()),
                ("logits", logits), ("loss", torch.tensor([loss]))]
    records += [("grad/" + n, grads[n]) for n in names]
    records += [("adamw_losses", torch.tensor(losses))]
    records += [("final/" + n, final[n]) for n in names]
    write_records(OUT, records)

    # self-check: re-read the file and verify every record's name, type, shape
    back = read_records(OUT)
    assert list(back) == [n for n, _ in records], "record names/order differ"
    for name, t in records:
        dtype, dims, vals = back[name]
        assert dims == tuple(t.shape), name
        assert dtype == (I32 if t.dtype == torch.int32 else F32), name
        ref = t.to(torch.float32 if dtype == F32 else torch.int32).flatten().tolist()
        assert list(vals) == ref, name
    assert back["logits"][1] == (B, T, VP) and back["adamw_losses"][1] == (STEPS,)
    print(f"wrote {OUT}: {len(back)} records, {os.path.getsize(OUT)} bytes")


if __name__ == "__main__":
    main()
