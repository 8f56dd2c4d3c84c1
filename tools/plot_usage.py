#!/usr/bin/python3
"""Expert usage over training steps, from an infmoe stats file (stats.h5).

    /usr/bin/python3 tools/plot_usage.py checkpoints/tiny-topk/stats.h5 -o usage.png
    /usr/bin/python3 tools/plot_usage.py stats.h5 --layers 0,5 --steps 100:500

Writes one PNG with a heatmap per MoE layer: x the step, y the expert (or unit
block), colour the bucket's load relative to an even share (tokens x buckets /
all kept tokens of the row: 1 = even, white; red above, blue below), with the
layer's max/mean load drawn over it. Layers that store a histogram of the
sampled z (∞-MoE) get a second PNG, <out>-z.png: the share of samples per z bin
over the steps. The file may be read while a run appends to it (HDF5 SWMR).

Needs Debian's python3-h5py and python3-matplotlib (run with /usr/bin/python3).
Format: docs/stats.md.
"""
import argparse
import os
import sys


def fail(msg):
    print(f"plot_usage: {msg}", file=sys.stderr)
    sys.exit(1)


def parse_layers(text):
    out = []
    for part in text.split(","):
        part = part.strip().removeprefix("h.")
        if "-" in part:
            a, b = part.split("-", 1)
            out.extend(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    return out


def parse_steps(text):
    a, _, b = text.partition(":")
    return (int(a) if a else None, int(b) if b else None)


def open_stats(path):
    import h5py

    if not os.path.exists(path):
        fail(f"{path}: no such file")
    try:
        f = h5py.File(path, "r", swmr=True, locking=False)
    except OSError:
        try:
            f = h5py.File(path, "r", locking=False)
        except OSError:
            fail(f"{path}: not an HDF5 file")
    fmt = f.attrs.get("format")
    if isinstance(fmt, bytes):
        fmt = fmt.decode()
    if fmt != "infmoe-stats":
        fail(f"{path}: an HDF5 file but not an infmoe stats file")
    return f


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("file", help="stats.h5 of a run")
    ap.add_argument("-o", "--out", help="PNG to write (default: usage.png beside the file)")
    ap.add_argument("--layers", help="layers to plot: 0,3 or h.0,h.3 or 0-2 (default: all)")
    ap.add_argument("--steps", help="FROM:TO, either side may be empty")
    ap.add_argument("--dpi", type=int, default=100)
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    f = open_stats(args.file)
    steps = f["step"][:]
    names = sorted(f["layers"].keys(), key=lambda n: int(n.split(".")[1]))
    if args.layers:
        want = parse_layers(args.layers)
        missing = [w for w in want if f"h.{w}" not in names]
        if missing:
            fail(f"{args.file}: no MoE layer {missing[0]} (layers: {','.join(n[2:] for n in names)})")
        names = [n for n in names if int(n[2:]) in want]
    if not names:
        fail(f"{args.file}: no MoE layers")
    # rows every dataset holds (a running writer may be one dataset ahead)
    layers = {}
    n = len(steps)
    for name in names:
        g = f["layers"][name]
        rows = g["rows"][:]
        n = min(n, len(rows))
        z = rows["z_hist"] if "z_hist" in rows.dtype.names else None
        layers[name] = (g, rows["tokens"], rows, z)
    sel = np.arange(n)
    if args.steps:
        lo, hi = parse_steps(args.steps)
        keep = np.ones(n, bool)
        if lo is not None:
            keep &= steps[:n] >= lo
        if hi is not None:
            keep &= steps[:n] <= hi
        sel = sel[keep]
    if len(sel) == 0:
        fail(f"{args.file}: no rows" + (" within --steps" if args.steps else " yet"))
    x = steps[sel]
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.file)), "usage.png")

    def extent():
        dx = (x[1] - x[0]) if len(x) > 1 else 1
        return [x[0] - dx / 2, x[-1] + dx / 2]

    fig, axes = plt.subplots(len(names), 1, figsize=(8, 0.8 + 1.2 * len(names)), sharex=True,
                             squeeze=False, constrained_layout=True)
    vmax = 1.0
    rel = {}
    for name in names:
        g, tokens, metrics, _ = layers[name]
        t = tokens[sel].astype(float)
        total = t.sum(axis=1, keepdims=True)
        r = np.divide(t * t.shape[1], total, out=np.zeros_like(t), where=total > 0)
        rel[name] = r
        vmax = max(vmax, float(r.max()))
    vmax = max(vmax, 1.05)
    norm = TwoSlopeNorm(vmin=max(0.0, 2.0 - vmax), vcenter=1.0, vmax=vmax)
    for ax, name in zip(axes[:, 0], names):
        g, tokens, metrics, _ = layers[name]
        r = rel[name]
        nb = r.shape[1]
        bucket = g.attrs.get("bucket", b"expert")
        bucket = bucket.decode() if isinstance(bucket, bytes) else str(bucket)
        kind = g.attrs.get("kind", b"")
        kind = kind.decode() if isinstance(kind, bytes) else str(kind)
        x0, x1 = extent()
        im = ax.imshow(r.T, aspect="auto", origin="lower", cmap="RdBu_r", norm=norm,
                       extent=[x0, x1, -0.5, nb - 0.5], interpolation="nearest")
        ax.set_ylabel(f"{name}\n{bucket}", fontsize=8)
        if nb <= 16:
            ax.set_yticks(range(nb))
        ax.tick_params(labelsize=7)
        mm = metrics["max_over_mean"][sel]
        ax2 = ax.twinx()
        ax2.plot(x, mm, color="black", lw=0.9)
        ax2.set_ylim(0.9, max(2.0, float(mm.max()) * 1.05))
        ax2.tick_params(labelsize=7)
        ax2.set_ylabel("max/mean", fontsize=7)
        ax.set_title(f"{name}: {kind}, {nb} {bucket}s", fontsize=8, loc="left")
    axes[-1, 0].set_xlabel("step")
    fig.colorbar(im, ax=axes[:, 0].tolist(), label="load / even share", shrink=0.9, pad=0.02,
                 aspect=30)
    fig.suptitle(f"{os.path.basename(args.file)}: expert usage per step (line: max/mean, right axis)",
                 fontsize=9)
    fig.savefig(out, dpi=args.dpi)
    plt.close(fig)
    print(f"plot_usage: {out}: {len(names)} layers, steps {x[0]}..{x[-1]} ({len(x)} rows)")

    with_z = [nm for nm in names if layers[nm][3] is not None]
    if with_z:
        zout = os.path.splitext(out)[0] + "-z.png"
        fig, axes = plt.subplots(len(with_z), 1, figsize=(8, 0.8 + 1.2 * len(with_z)), sharex=True,
                                 squeeze=False, constrained_layout=True)
        for ax, name in zip(axes[:, 0], with_z):
            g, _, _, z = layers[name]
            zh = z[sel].astype(float)
            share = zh / np.maximum(zh.sum(axis=1, keepdims=True), 1)
            lo = float(g["rows"].attrs.get("z_lo", 0.0))
            hi = float(g["rows"].attrs.get("z_hi", 1.0))
            x0, x1 = extent()
            im = ax.imshow(share.T, aspect="auto", origin="lower", cmap="viridis",
                           extent=[x0, x1, lo, hi], interpolation="nearest")
            ax.set_ylabel(f"{name}\nz", fontsize=8)
            ax.tick_params(labelsize=7)
            fig.colorbar(im, ax=ax, label="share of samples", pad=0.02)
        axes[-1, 0].set_xlabel("step")
        fig.suptitle(f"{os.path.basename(args.file)}: histogram of the sampled z per step", fontsize=9)
        fig.savefig(zout, dpi=args.dpi)
        plt.close(fig)
        print(f"plot_usage: {zout}: z histograms of {len(with_z)} layers")


if __name__ == "__main__":
    main()
