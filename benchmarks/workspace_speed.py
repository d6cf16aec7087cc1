"""Shared workspace cost: fused vs explicit path, and against multi-head self-attention.

Times forward and forward+backward of ``shared_workspace`` (both paths) and of
``multi_head`` self-attention on ``(B, N, C)`` for growing ``N``: the workspace is linear
in ``N`` (``S`` slots), self-attention quadratic. Medians of ``--reps`` runs after a
warm-up; prints a Markdown table.

    python benchmarks/workspace_speed.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import spatial_attention as sa
from spatial_attention import explicit_path


def timed(fn, reps: int) -> float:
    fn()
    samples = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1e3


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lengths", type=int, nargs="+", default=[27, 256, 1024, 4096])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ws = sa.create("shared_workspace", args.dim, args.heads)
    mha = sa.create("multi_head", args.dim, args.heads)
    print(f"B={args.batch}, C={args.dim}, heads={args.heads}, slots 8, top-k 5, "
          f"threads={args.threads}, float32, CPU; median of {args.reps} (ms)\n")
    print("| N | workspace fused fwd | explicit fwd | fused fwd+bwd | explicit fwd+bwd "
          "| multi_head fwd | multi_head fwd+bwd |")
    print("|---|---|---|---|---|---|---|")
    for n in args.lengths:
        x = torch.randn(args.batch, n, args.dim, requires_grad=True)

        def fwd(m, x=x):
            def run():
                with torch.no_grad():
                    m(x)
            return run

        def fwd_bwd(m, x=x):
            def run():
                m(x).sum().backward()
            return run

        row = [timed(fwd(ws), args.reps)]
        with explicit_path(ws):
            row.append(timed(fwd(ws), args.reps))
        row.append(timed(fwd_bwd(ws), args.reps))
        with explicit_path(ws):
            row.append(timed(fwd_bwd(ws), args.reps))
        row += [timed(fwd(mha), args.reps), timed(fwd_bwd(mha), args.reps)]
        print(f"| {n} | " + " | ".join(f"{v:.1f}" for v in row) + " |", flush=True)


if __name__ == "__main__":
    main()
