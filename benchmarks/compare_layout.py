"""NCHW against channels_last for the compare benchmark's network (issue #17).

Training img/s of ``CompareNet`` (width 0.5) for each entry in both layouts, interleaved
round by round, best of the rounds; the ratio is NCHW time over channels_last time.

    python benchmarks/compare_layout.py --threads 1 --entries none se cbam gam cpms
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F

from spatial_attention.apps.compare.net import CompareNet


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", nargs="+", default=["none", "se", "cbam", "gam", "cpms"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    models = {}
    for name in args.entries:
        torch.manual_seed(0)
        cl = CompareNet(name, 0.5, 10)  # channels_last by construction
        nchw = copy.deepcopy(cl).to(memory_format=torch.contiguous_format)
        nchw.forward = _plain_forward(nchw)  # its forward without the layout change
        models[name, "nchw"], models[name, "channels_last"] = nchw, cl

    def step(model: torch.nn.Module) -> None:
        F.cross_entropy(model(x), y, reduction="sum").backward()

    for m in models.values():  # warm-up
        step(m)
    best = dict.fromkeys(models, float("inf"))
    for _ in range(args.rounds):
        for key, m in models.items():
            t0 = time.perf_counter()
            step(m)
            step(m)
            best[key] = min(best[key], time.perf_counter() - t0)
    print(f"| entry | NCHW img/s | channels_last img/s | ratio | ({args.threads} thread(s), "
          f"batch {args.batch}, best of {args.rounds}) |")
    print("|---|--:|--:|--:|")
    for name in args.entries:
        a, b = best[name, "nchw"], best[name, "channels_last"]
        print(f"| {name} | {2 * args.batch / a:.0f} | {2 * args.batch / b:.0f} | {a / b:.2f} |")


def _plain_forward(model: CompareNet):
    def forward(x: torch.Tensor) -> torch.Tensor:
        h = model.stages(model.act(model.whiten(x)))
        return model.head(model.pool(h).flatten(1)) * model.scale
    return forward


if __name__ == "__main__":
    main()
