"""Forward+backward time of MV-Swin-T's multi-view window attention, paths and variants.

Cases (each a training step: forward, sum, backward into inputs and parameters), on two
views ``(B, 2, H, W, C)``:

* ``mix fused`` / ``mix explicit``: W-MDA on its batched path and on the explicit path,
* ``concat fused``, ``self fused``: the keys-concatenation variant and per-view Swin-V2
  window attention (no cross term), both through ``F.scaled_dot_product_attention``,
* ``self, loop over views``: the same per-view attention as two single-view modules called
  one after the other (what batching the views saves),
* ``window_attention, views as batch``: Swin-V1 W-MSA (``window_attention``) with the
  views in the batch, for scale.

Times are interleaved round-robin (``bench.interleaved_times``) and the median is
reported. Usage: ``python benchmarks/mvswin_speed.py [--batch 4 --size 24 --dim 96]``.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from spatial_attention.apps.bench import interleaved_times
from spatial_attention.layers.multiview import MultiViewWindowAttention
from spatial_attention.layers.window import WindowAttention


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=24)
    p.add_argument("--dim", type=int, default=96)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--window", type=int, default=12)
    p.add_argument("--shift", type=int, default=6)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    B, S, C, h, M = args.batch, args.size, args.dim, args.heads, args.window
    x = torch.randn(B, 2, S, S, C, requires_grad=True)

    def mv(mode: str, fused: bool = True) -> MultiViewWindowAttention:
        m = MultiViewWindowAttention(C, h, window_size=M, shift=args.shift, mode=mode)
        m.attn_impl = None if fused else "explicit"
        return m

    mods = {"mix fused": mv("mix"), "mix explicit": mv("mix", False),
            "concat fused": mv("concat"), "self fused": mv("self")}
    singles = [MultiViewWindowAttention(C, h, window_size=M, shift=args.shift, mode="self",
                                        num_views=1) for _ in range(2)]
    swin = WindowAttention(C, h, window_size=M, shift_size=args.shift)

    def step(fn):
        def run():
            x.grad = None
            fn().sum().backward()
        return run

    cases = {name: step(lambda m=m: m(x)) for name, m in mods.items()}
    cases["self, loop over views"] = step(
        lambda: torch.stack([singles[v](x[:, v:v + 1]) for v in range(2)]))
    cases["window_attention, views as batch"] = step(lambda: swin(x.flatten(0, 1)))
    times = interleaved_times(cases, args.repeats, warmup=2)
    print(f"B={B}, 2 views, {S}x{S}, C={C}, heads={h}, window={M}, shift={args.shift}, "
          f"threads={torch.get_num_threads()}, repeats={args.repeats}, torch {torch.__version__}")
    print("| case | median ms (fwd+bwd) | min ms |")
    print("|---|---:|---:|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts) * 1e3:.1f} | {min(ts) * 1e3:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
