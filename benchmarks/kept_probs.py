"""Attention cores on CPU: SDPA against kept probabilities, tiled and untiled.

    python benchmarks/kept_probs.py --threads 2 --repeats 15 [--keep-freed-memory]

Times forward + backward (and forward alone) of the attention core only, no projections,
for the three shapes the kept-probabilities path (``functional.scoring._ShortKeyAttention``)
was written for, every case of a shape interleaved round by round:

* ``fsla``: BOAT's leaves on (8, 56, 56, 96), 3 heads: 1536 blocks of 49 queries x 69 keys;
* ``lsa``: Twins LSA's 7 x 7 windows on (8, 56, 56, 64), 2 heads: 1024 blocks of 49 x 49;
* ``ga``: generalized attention ``'1111'`` on (2, 256, 32, 32), 8 heads, kv_stride 2: 16
  blocks of 1024 x 256, queries and keys 64 wide (32 content + 32 one-hot position
  columns, constant in the key), values 32 wide.

Cases: ``sdpa`` (``F.scaled_dot_product_attention``, the CPU flash kernel; not for ``ga``,
whose widths differ), ``plain`` (matmul, softmax, matmul under autograd), ``kept,
untiled`` and ``kept, tiled`` (``TILE_BYTES`` as shipped).
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from spatial_attention.apps.bench import interleaved_times, keep_freed_memory
from spatial_attention.functional import materialized_attention, scoring

SHAPES = {  # name: (blocks lead, queries, keys, qk width, v width, scale, constant columns)
    "fsla": ((8, 192), 49, 69, 32, 32, 32**-0.5, 0),
    "lsa": ((512, 2), 49, 49, 32, 32, 32**-0.5, 0),
    "ga": ((2, 8), 1024, 256, 64, 32, 1.0, 32),
}


def cases(name: str, train: bool):
    lead, nq, nk, d, dv, scale, fixed = SHAPES[name]
    torch.manual_seed(0)
    q = torch.randn(*lead, nq, d, requires_grad=train)
    k = torch.randn(*lead, nk, d, requires_grad=train)
    v = torch.randn(*lead, nk, dv, requires_grad=train)
    g = torch.randn(*lead, nq, dv)
    tiled = scoring.TILE_BYTES

    def run(fn, tile=tiled):
        def call():
            scoring.TILE_BYTES = tile
            if not train:
                with torch.no_grad():
                    fn()
                return
            for t in (q, k, v):
                t.grad = None
            torch.autograd.backward(fn(), g)
        return call

    out = {}
    if d == dv:
        out["sdpa"] = run(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale))
    out["plain"] = run(lambda: torch.softmax(q @ k.transpose(-2, -1) * scale, -1) @ v)
    kept = lambda: materialized_attention(q, k, v, None, scale, constant_key_columns=fixed)  # noqa: E731
    out["kept, untiled"] = run(kept, 2**62)
    out["kept, tiled"] = run(kept)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--keep-freed-memory", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        print(keep_freed_memory())
    print("| shape | case | forward ms | forward + backward ms | f+b / plain (per round) |")
    print("|---|---|---:|---:|---:|")
    for name in args.shapes:
        fwd = interleaved_times(cases(name, False), args.repeats)
        train = interleaved_times(cases(name, True), args.repeats)
        for case in train:
            pairs = zip(train[case], train["plain"], strict=True)
            ratio = statistics.median(a / b for a, b in pairs)
            print(f"| {name} | {case} | {statistics.median(fwd[case]) * 1e3:.1f} | "
                  f"{statistics.median(train[case]) * 1e3:.1f} | {ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()
