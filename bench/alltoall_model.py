#!/usr/bin/env python3
"""Cost model of the flat and node-aware all-to-all (docs/benchmarks.md).

One exchange, per rank, with N nodes of L ranks and m bytes for every peer:
  flat: (N-1)L (a_n + m b_n) + (L-1)(a_s + m b_s)
  node: (L-1)(a_s + N m b_s) + (N-1)(a_n + L m b_n) + 2 N L m b_s
a_n, b_n: latency and per-byte time of a message between nodes (b_n is the
rank's share of the node's link); a_s, b_s: the same within a node (shared
memory). The two packing copies are taken to cost b_s a byte as well: on 2 x 2
ranks only the flat and the node-aware slopes are measured, which cannot tell
a copy from a shared-memory transfer. Forward and back are two exchanges.
The terms are fitted (least squares) to bench/alltoall_nodes.sh's unshaped-veth
figures on 2 x 2 ranks, then the model is evaluated for clusters.

    python3 bench/alltoall_model.py
"""

N0, L0 = 2, 2
# bench/alltoall_nodes.sh, unshaped veth (docs/benchmarks.md): rows a peer of
# 768 fp32, forward + back, median ms. 256 rows is left out of the fit: there the
# flat time grows 7.9x for 4x the bytes (past the sockets' buffers), which a
# latency + bandwidth model does not describe.
ROWS = [1, 4, 16, 64]
FLAT = [0.234, 0.274, 0.418, 0.889]
NODE = [0.262, 0.333, 0.688, 2.490]


def terms(n, l, m, scheme):
    if scheme == "flat":
        return [(n - 1) * l, (n - 1) * l * m, l - 1, (l - 1) * m]
    return [n - 1, (n - 1) * l * m, l - 1, (l - 1) * n * m + 2 * n * l * m]


def time(p, n, l, m, scheme, exchanges=1):
    return exchanges * sum(a * b for a, b in zip(terms(n, l, m, scheme), p))


def lstsq(a, y):
    """Least squares by the normal equations (scaled columns)."""
    k = len(a[0])
    scale = [max(abs(r[j]) for r in a) or 1.0 for j in range(k)]
    a = [[r[j] / scale[j] for j in range(k)] for r in a]
    m = [[sum(r[i] * r[j] for r in a) for j in range(k)] + [sum(r[i] * v for r, v in zip(a, y))] for i in range(k)]
    for i in range(k):
        piv = max(range(i, k), key=lambda r: abs(m[r][i]))
        m[i], m[piv] = m[piv], m[i]
        for r in range(k):
            if r != i:
                f = m[r][i] / m[i][i]
                m[r] = [x - f * z for x, z in zip(m[r], m[i])]
    return [m[i][k] / m[i][i] / scale[i] for i in range(k)]


def main():
    sizes = [r * 768 * 4.0 for r in ROWS]
    a = [[2 * t for t in terms(N0, L0, m, "flat")] for m in sizes] + \
        [[2 * t for t in terms(N0, L0, m, "node")] for m in sizes]
    p = lstsq(a, [t * 1e-3 for t in FLAT + NODE])
    print("fitted on 2 x 2 ranks, veth: a_n %.1f us, b_n %.3f ns/B, a_s %.1f us, b_s %.3f ns/B"
          % (p[0] * 1e6, p[1] * 1e9, p[2] * 1e6, p[3] * 1e9))
    print("%-22s %10s %10s %10s %10s" % ("rows a peer", "flat ms", "model", "node/flat", "model"))
    for r, m, f, n in zip(ROWS, sizes, FLAT, NODE):
        mf, mn = time(p, N0, L0, m, "flat", 2), time(p, N0, L0, m, "node", 2)
        print("%-22s %10.3f %10.3f %10.2f %10.2f" % ("%d (%.0f KiB)" % (r, m / 1024), f, mf * 1e3, n / f, mn / mf))

    # Clusters, 8 ranks a node. Assumed terms, not measured here: a link of
    # 100 Gbit/s (InfiniBand HDR-class, 2 us a message) or 25 Gbit/s TCP
    # (25 us a message), shared by the node's 8 ranks; shared memory 0.5 us and
    # 0.1 ns/B (and so the packing copies).
    L = 8
    nets = {"100 Gbit/s, 2 us": (2e-6, L / 12.5e9), "25 Gbit/s TCP, 25 us": (25e-6, L / 3.125e9)}
    a_s, b_s = 0.5e-6, 0.1e-9
    # A GPT-2 small MoE layer: B4 T1024 tokens a rank, top-2, 768 bf16 a row.
    out = 4 * 1024 * 2 * 768 * 2.0
    print("\nGPT-2 small MoE layer (%.1f MB a rank each way), %d ranks a node, one exchange:" % (out / 1e6, L))
    print("%-22s %6s %12s %10s %10s %10s %14s" % ("link", "nodes", "m a peer", "flat ms", "node ms", "node/flat", "crossover m"))
    for name, (a_n, b_n) in nets.items():
        q = [a_n, b_n, a_s, b_s]
        for n in (2, 16, 64, 256):
            m = out / (n * L)
            f, d = time(q, n, L, m, "flat"), time(q, n, L, m, "node")
            # node-aware wins below the m where the two are equal (both linear in m)
            f0, d0 = time(q, n, L, 0, "flat"), time(q, n, L, 0, "node")
            f1, d1 = time(q, n, L, 1, "flat") - f0, time(q, n, L, 1, "node") - d0
            cross = (f0 - d0) / (d1 - f1) if d1 > f1 else float("inf")
            print("%-22s %6d %9.1f KiB %10.3f %10.3f %10.2f %10.1f KiB" % (name, n, m / 1024, f * 1e3, d * 1e3, d / f, cross / 1024))


if __name__ == "__main__":
    main()
