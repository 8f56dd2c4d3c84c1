#!/usr/bin/python3
"""The ∞-MoE inference knob: val loss and multiple-choice accuracy against FFN cost,
one point per sample count K, from the CSV files 'infmoe eval --sweep' writes.

    /usr/bin/python3 tools/plot_sweep.py sweep.csv -o sweep.png
    /usr/bin/python3 tools/plot_sweep.py a/sweep.csv b/sweep.csv -o cmp.png

Two panels over FFN GFLOPs per token as run (the units a token used, the union of
its samples): validation loss, and acc (solid) and acc_norm (dashed). Each point is
labelled with its K (a star: 'det', the deterministic sample). Several CSVs share the axes,
labelled by their file names. Needs Debian's python3-matplotlib.
"""
import argparse
import csv
import math
import sys


def fail(msg):
    print(f"plot_sweep: {msg}", file=sys.stderr)
    sys.exit(1)


def read(path):
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        fail(f"{path}: {e.strerror.lower() if e.strerror else e}")
    need = {"samples", "val_loss", "acc", "acc_norm", "ffn_gflop_per_token"}
    if not rows or not need <= set(rows[0]):
        fail(f"{path}: not a sweep CSV of 'infmoe eval --sweep' (columns {', '.join(sorted(need))})")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", nargs="+")
    ap.add_argument("-o", "--out", default="sweep.png")
    args = ap.parse_args()
    runs = [(p, read(p)) for p in args.csv]
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (name, rows) in enumerate(runs):
        colour = f"C{i}"
        x = [float(r["ffn_gflop_per_token"]) for r in rows]
        for ax, key, style in ((ax_loss, "val_loss", "-o"), (ax_acc, "acc", "-o"), (ax_acc, "acc_norm", "--s")):
            y = [float(r[key]) for r in rows]
            pts = [(a, b, r["samples"]) for a, b, r in zip(x, y, rows) if not math.isnan(b)]
            if not pts:
                continue
            label = name if key != "acc_norm" else f"{name} (acc_norm)"
            line = sorted((p for p in pts if p[2] != "det"), key=lambda p: int(p[2]))
            ax.plot([p[0] for p in line], [p[1] for p in line], style, color=colour, label=label, ms=4)
            for a, b, _ in (p for p in pts if p[2] == "det"):
                ax.plot([a], [b], "*", color=colour, ms=9)
            if key != "acc_norm":
                for a, b, k in pts:
                    ax.annotate(f"K={k}" if k != "det" else "det", (a, b), textcoords="offset points",
                                xytext=(4, 4), fontsize=8)
    ax_loss.set_title("validation loss")
    ax_acc.set_title("multiple-choice accuracy")
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("FFN GFLOPs per token (as run)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(args.out, dpi=110)
    except OSError as e:
        fail(f"{args.out}: {e.strerror.lower() if e.strerror else e}")
    print(f"plot_sweep: wrote {args.out} ({len(runs)} sweep{'s' if len(runs) > 1 else ''})")


if __name__ == "__main__":
    main()
