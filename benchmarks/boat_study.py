"""Study: a tiny BOAT-Swin vs the same Swin with windows only vs global attention, CIFAR-10.

Three variants of one small Swin (patch 2, so a 32x32 image is a 16x16 token map; window
4), trained by `spatial-attention train` with the same schedule, seed and data order:

* ``windows``: ``swin_micro_cifar`` (W-MSA / SW-MSA only);
* ``boat``: ``boat_swin_micro_cifar``, the same network plus FSLA (groups of 16 = the
  window area, overlap 7) in the shifted blocks of every stage but the last;
* ``global``: ``swin_micro_cifar`` with ``window_size=16``: every window covers the whole
  map, i.e. global attention (with Swin's relative position bias over the map).

The shared runner (``study_runner.py``) trains each variant and collects test accuracy,
parameters, forward GFLOPs per image and training images/s into ``results.csv`` /
``results.md``; a variant whose run already finished is not retrained; ``--subset N``
trains on N images per class. ``--arch tiny`` (C 48, depths 2-2, heads 2-4) fits a
shared 2-core CPU; ``--arch micro --epochs 100 --device cuda`` is a full run.

    python benchmarks/boat_study.py --arch micro --subset 1000 --epochs 10
"""

from __future__ import annotations

import argparse
import json
import sys

from study_runner import Entry, add_arguments, run

ARCHS = {
    "tiny": {"embed_dim": 48, "depths": [2, 2], "num_heads": [2, 4]},
    "micro": {},  # the registered micro CIFAR size (C 64, depths 2-2-6, heads 2-4-8)
}
VARIANTS = {
    "windows": ("swin_micro_cifar", {}),
    "boat": ("boat_swin_micro_cifar", {}),
    "global": ("swin_micro_cifar", {"window_size": 16}),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p, "benchmarks/boat_study", "runs/boat_study")
    p.add_argument("--arch", choices=sorted(ARCHS), default="tiny")
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    args = p.parse_args(argv)
    entries = []
    for variant in args.variants:
        model, extra = VARIANTS[variant]
        kwargs = {**ARCHS[args.arch], **extra}
        entries.append(Entry(f"{args.arch}-{variant}", model, None,
                             tuple(f"{k}={json.dumps(v)}" for k, v in kwargs.items())))
    return run(entries, args)


if __name__ == "__main__":
    sys.exit(main())
