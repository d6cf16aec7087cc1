"""Study: CIFAR-style ResNet-18 on CIFAR-10 with each convolutional attention mechanism.

Every mechanism is trained by `spatial-attention train` with the same schedule, seed and
data order; the script collects test accuracy, parameters, forward GFLOPs per 32x32
image and training images/s into one CSV and a markdown table.

    python benchmarks/conv_attention_study.py --epochs 1 \
        --data ../shared/data/cifar10/train.tar --out benchmarks/conv_attention_study

Longer schedules (e.g. --epochs 30 on a CUDA GPU with --device cuda) use the same
command; rerunning skips mechanisms whose run directory already finished.
"""

from __future__ import annotations

import argparse
import sys

from study_runner import Entry, add_arguments, run

MECHANISMS = ["none", "se", "eca", "cbam", "gam", "cpca", "cpms", "sk"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p, "benchmarks/conv_attention_study", "runs/conv_attention_study")
    p.add_argument("--model", default="resnet18_cifar")
    p.add_argument("--mechanisms", nargs="+", default=MECHANISMS)
    args = p.parse_args(argv)
    entries = [Entry(a, args.model, None if a == "none" else a) for a in args.mechanisms]
    return run(entries, args)


if __name__ == "__main__":
    sys.exit(main())
