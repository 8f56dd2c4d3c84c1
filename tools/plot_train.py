#!/usr/bin/python3
"""Training curves from infmoe train.log files: loss, tokens/s and MFU against steps.

    /usr/bin/python3 tools/plot_train.py checkpoints/tiny-topk/train.log -o train.png
    /usr/bin/python3 tools/plot_train.py runs/dense/train.log runs/topk/train.log -o cmp.png

Writes one PNG with three panels over the optimizer step: train loss (solid) and
validation loss (dots, from the `eval` lines), tokens/s, and MFU. Several logs go
on the same axes, one colour each, labelled by their run directory, so runs can be
compared. A resumed run's log holds each segment in order; a step logged twice
(a branch) keeps its last value. Line format: docs/formats.md ("train.log").

Needs Debian's python3-matplotlib (run with /usr/bin/python3).
"""
import argparse
import os
import re
import sys

STEP = re.compile(r"^step (\d+)/\d+ \| loss (\S+) \|.*\| tok/s (\S+) \| mfu (\S+)%")
EVAL = re.compile(r"^eval (\d+)/\d+ \| val_loss (\S+)")


def fail(msg):
    print(f"plot_train: {msg}", file=sys.stderr)
    sys.exit(1)


def read_log(path):
    """{'train': {step: (loss, tok_s, mfu)}, 'val': {step: loss}} of one train.log."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError as e:
        fail(f"{path}: {e.strerror.lower() if e.strerror else e}")
    train, val = {}, {}
    for line in lines:
        m = STEP.match(line)
        if m:
            train[int(m.group(1))] = tuple(float(m.group(i)) for i in (2, 3, 4))
            continue
        m = EVAL.match(line)
        if m:
            val[int(m.group(1))] = float(m.group(2))
    if not train:
        fail(f"{path}: no 'step N/M | loss ...' lines: not an infmoe train.log")
    return {"train": train, "val": val}


def label_of(path):
    parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return parent or path


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("logs", nargs="+", help="train.log files (one run each)")
    ap.add_argument("-o", "--out", default="train.png", help="PNG to write (default train.png)")
    args = ap.parse_args()
    runs = [(label_of(p), read_log(p)) for p in args.logs]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_tok, ax_mfu) = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    for i, (label, run) in enumerate(runs):
        colour = f"C{i}"
        steps = sorted(run["train"])
        loss, tok, mfu = zip(*(run["train"][s] for s in steps))
        ax_loss.plot(steps, loss, color=colour, lw=1.2, label=f"{label} train")
        if run["val"]:
            vs = sorted(run["val"])
            ax_loss.plot(vs, [run["val"][s] for s in vs], "o", color=colour, ms=4, label=f"{label} val")
        ax_tok.plot(steps, tok, color=colour, lw=1.0, label=label)
        ax_mfu.plot(steps, mfu, color=colour, lw=1.0, label=label)
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.legend(fontsize=8)
    ax_tok.set_ylabel("tokens/s")
    ax_mfu.set_ylabel("MFU (%)")
    ax_mfu.set_xlabel("step")
    for ax in (ax_loss, ax_tok, ax_mfu):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        fig.savefig(args.out, dpi=100)
    except OSError as e:
        fail(f"{args.out}: cannot write: {e.strerror or e}")
    print(f"plot_train: wrote {args.out} ({len(runs)} run{'s' if len(runs) > 1 else ''})")


if __name__ == "__main__":
    main()
