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
import csv
import subprocess
import sys
import time
from pathlib import Path

import torch

from spatial_attention.flops import count_flops
from spatial_attention.models import create_model

MECHANISMS = ["none", "se", "eca", "cbam", "gam", "cpca", "cpms", "sk"]


def _last_row(run: Path) -> dict[str, str] | None:
    path = run / "metrics.csv"
    if not path.exists():
        return None
    rows = list(csv.DictReader(path.open()))
    return rows[-1] if rows else None


def _cost(model_name: str, attn: str) -> tuple[int, float]:
    model = create_model(model_name, num_classes=10, attn_layer=None if attn == "none" else attn)
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        flops, _ = count_flops(model, torch.randn(1, 3, 32, 32))
    return params, flops / 1e9


def _write(out: Path, rows: list[dict]) -> list[str]:
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [
        "| attn | test acc | params | GFLOPs / image | train images/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['attn']} | {float(r['test_acc']):.4f} | {r['params']:,} | "
            f"{r['gflops_per_image']} | {r['train_images_per_s']} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/cifar10/train.tar")
    p.add_argument("--model", default="resnet18_cifar")
    p.add_argument("--mechanisms", nargs="+", default=MECHANISMS)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--out",
        default="benchmarks/conv_attention_study",
        help="where results.csv and results.md go",
    )
    p.add_argument(
        "--runs",
        default="runs/conv_attention_study",
        help="run directories (checkpoints; not for the repository)",
    )
    p.add_argument(
        "--extra",
        nargs=argparse.REMAINDER,
        default=[],
        help="further arguments passed to `spatial-attention train`",
    )
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for attn in args.mechanisms:
        run = Path(args.runs) / attn
        last = _last_row(run)
        if last is None or int(last["epoch"]) < args.epochs:
            cmd = [
                sys.executable,
                "-m",
                "spatial_attention",
                "train",
                "--model",
                args.model,
                "--attn",
                attn,
                "--data",
                args.data,
                "--epochs",
                str(args.epochs),
                "--batch",
                str(args.batch),
                "--seed",
                str(args.seed),
                "--device",
                args.device,
                "--out",
                str(run),
                "--overlays",
                "0",
                "--no-progress",
                *args.extra,
            ]
            print(" ".join(cmd), flush=True)
            start = time.perf_counter()
            subprocess.run(cmd, check=True)
            print(f"{attn}: {time.perf_counter() - start:.0f} s", flush=True)
            last = _last_row(run)
        params, gflops = _cost(args.model, attn)
        rows.append(
            {
                "attn": attn,
                "model": args.model,
                "epochs": args.epochs,
                "seed": args.seed,
                "test_acc": last["val_acc"],
                "params": params,
                "gflops_per_image": f"{gflops:.4f}",
                "train_images_per_s": last["images_per_s"],
            }
        )
        _write(out, rows)  # after each mechanism, so a stopped study keeps what it has
    lines = _write(out, rows)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
