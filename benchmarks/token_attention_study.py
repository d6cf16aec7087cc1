"""Study: tiny Swin-like, Twins-SVT-like and global-attention models on CIFAR-10.

All three have about 5.4M parameters, patch 2 on 32x32 images, and the same schedule,
seed and data order (`spatial-attention train` defaults: AdamW, cosine, label smoothing
0.1, random crops and flips):

* ``swin``: ``swin_micro_cifar`` (C 64, depths 2-2-6, window 4, shifted every other block);
* ``twins_svt``: ``twins_svt_micro_cifar`` (dims 64-128-256, LSA window 4 / GSA sr 4-2-1,
  PEG after the first block of each stage);
* ``global``: ``vit_tiny_p2_cifar`` with ``global_attention`` (dim 192, 12 blocks, all
  256 tokens attend to each other);
* ``global_windows``: ``swin_micro_cifar`` with ``window_size=16``: the Swin hierarchy
  with one window per map at every stage, i.e. global attention inside Swin's
  hierarchy (5x Swin's FLOPs, 0.4x the ViT's), so the attention's reach is the only
  difference from ``swin``.

    python benchmarks/token_attention_study.py --subset 1000 --epochs 2 --batch 64   # CPU pilot
    python benchmarks/token_attention_study.py --epochs 30 --device cuda   # the real study
"""

from __future__ import annotations

import argparse
import sys

from study_runner import Entry, add_arguments, run

ENTRIES = [
    Entry("swin", "swin_micro_cifar"),
    Entry("twins_svt", "twins_svt_micro_cifar"),
    Entry("global", "vit_tiny_p2_cifar", "global_attention"),
    Entry("global_windows", "swin_micro_cifar", None, ("window_size=16",)),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p, "benchmarks/token_attention_study", "runs/token_attention_study")
    p.add_argument("--entries", nargs="+", default=[e.label for e in ENTRIES])
    args = p.parse_args(argv)
    return run([e for e in ENTRIES if e.label in args.entries], args)


if __name__ == "__main__":
    sys.exit(main())
