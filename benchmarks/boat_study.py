"""Study: a tiny BOAT-Swin vs the same Swin with windows only vs global attention, CIFAR-10.

Three variants of one small Swin (patch 2, so a 32x32 image is a 16x16 token map; window
4), trained by `spatial-attention train` with the same schedule, seed and data order:

* ``windows``: ``swin_micro_cifar`` (W-MSA / SW-MSA only);
* ``boat``: ``boat_swin_micro_cifar``, the same network plus FSLA (groups of 16 = the
  window area, overlap 7) in the shifted blocks of every stage but the last;
* ``global``: ``swin_micro_cifar`` with ``window_size=16``: every window covers the whole
  map, i.e. global attention (with Swin's relative position bias over the map).

The script collects test accuracy, parameters, forward GFLOPs per image and training
images/s into ``results.csv`` / ``results.md``; a variant whose run already finished is
not retrained. The small default (``--arch tiny``: C 48, depths 2-2, heads 2-4) and one
epoch fit a shared 2-core CPU; ``--arch micro --epochs 100 --device cuda`` is a full run.

    python benchmarks/boat_study.py --epochs 1 --out benchmarks/boat_study
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from spatial_attention.flops import count_flops
from spatial_attention.models import create_model

ARCHS = {
    "tiny": {"embed_dim": 48, "depths": [2, 2], "num_heads": [2, 4]},
    "micro": {},  # the registered micro CIFAR size (C 64, depths 2-2-6, heads 2-4-8)
}
VARIANTS = {
    "windows": ("swin_micro_cifar", {}),
    "boat": ("boat_swin_micro_cifar", {}),
    "global": ("swin_micro_cifar", {"window_size": 16}),
}


def _last_row(run: Path) -> dict[str, str] | None:
    path = run / "metrics.csv"
    if not path.exists():
        return None
    rows = list(csv.DictReader(path.open()))
    return rows[-1] if rows else None


def _cost(model: str, kwargs: dict) -> tuple[int, float]:
    net = create_model(model, **kwargs).eval()
    params = sum(p.numel() for p in net.parameters())
    with torch.no_grad():
        flops, _ = count_flops(net, torch.randn(1, 3, 32, 32))
    return params, flops / 1e9


def _write(out: Path, rows: list[dict]) -> list[str]:
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = ["| variant | model | test acc | params | GFLOPs / image | train images/s |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['model']} {r['model_args']} | "
                     f"{float(r['test_acc']):.4f} | {r['params']:,} | {r['gflops_per_image']} "
                     f"| {r['train_images_per_s']} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/cifar10/train.tar")
    p.add_argument("--arch", choices=sorted(ARCHS), default="tiny")
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="benchmarks/boat_study")
    p.add_argument("--runs", default="runs/boat_study", help="run directories (not committed)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="further arguments for `spatial-attention train`")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for variant in args.variants:
        model, extra = VARIANTS[variant]
        kwargs = {**ARCHS[args.arch], **extra}
        run = Path(args.runs) / f"{args.arch}-{variant}"
        last = _last_row(run)
        if last is None or int(last["epoch"]) < args.epochs:
            cmd = [sys.executable, "-m", "spatial_attention", "train", "--model", model,
                   "--data", args.data, "--epochs", str(args.epochs), "--batch",
                   str(args.batch), "--seed", str(args.seed), "--device", args.device,
                   "--out", str(run), "--overlays", "0", "--no-progress"]
            for key, value in kwargs.items():
                cmd += ["--model-arg", f"{key}={json.dumps(value)}"]
            cmd += args.extra
            print(" ".join(cmd), flush=True)
            start = time.perf_counter()
            subprocess.run(cmd, check=True)
            print(f"{variant}: {time.perf_counter() - start:.0f} s", flush=True)
            last = _last_row(run)
        params, gflops = _cost(model, kwargs)
        rows.append({
            "variant": variant, "model": model, "model_args": json.dumps(kwargs),
            "epochs": args.epochs, "seed": args.seed, "test_acc": last["val_acc"],
            "params": params, "gflops_per_image": f"{gflops:.4f}",
            "train_images_per_s": last["images_per_s"],
        })
        _write(out, rows)  # after each variant, so a stopped study keeps what it has
    print("\n".join(_write(out, rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
