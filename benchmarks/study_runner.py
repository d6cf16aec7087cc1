"""Shared runner of the CIFAR-10 studies: train each entry with `spatial-attention train`.

Every entry (label, model, optional --attn, optional --model-arg list) is trained with
the same schedule, seed and data order; the runner collects test accuracy, parameters,
forward GFLOPs per image and training images/s into ``results.csv`` and ``results.md``
after each entry (a stopped study keeps what it has), and rerunning skips entries whose
run directory already reached the requested epochs. Rows of entries not run this time
are kept from the existing ``results.csv``, so a study can be completed entry by entry.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from spatial_attention.apps.bench.flops import count_flops
from spatial_attention.apps.training import build_model


@dataclass(frozen=True)
class Entry:
    label: str
    model: str
    attn: str | None = None
    model_args: tuple[str, ...] = field(default_factory=tuple)  # "KEY=VALUE"


def add_arguments(p: argparse.ArgumentParser, out: str, runs: str) -> None:
    p.add_argument("--data", default="../shared/data/cifar10/train.tar")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=out, help="where results.csv and results.md go")
    p.add_argument("--runs", default=runs, help="run directories (not for the repository)")
    p.add_argument("--subset", type=int, default=0, metavar="N",
                   help="pilot runs: N training and N/5 test images per class, drawn once "
                   "(seed 0) into the runs directory (0: the full sets)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="further arguments passed to `spatial-attention train`")


def make_subset(train_tar: Path, per_class: int, out_dir: Path) -> Path:
    """``train.tar`` / ``test.tar`` with ``per_class`` (and ``per_class // 5``) images of
    every class, sampled with seed 0 from the tars beside ``train_tar``; returns the new
    ``train.tar`` (the pipeline finds ``test.tar`` beside it)."""
    import random
    import tarfile

    out_dir.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.tar", per_class), ("test.tar", max(1, per_class // 5))):
        dst = out_dir / name
        if dst.exists():
            continue
        with tarfile.open(train_tar.parent / name) as src:
            by_class: dict[str, list] = {}
            for m in src.getmembers():
                if m.isfile() and m.name.lower().endswith((".jpg", ".jpeg", ".png")):
                    by_class.setdefault(m.name.split("/")[-2], []).append(m)
            rng = random.Random(0)
            tmp = dst.with_suffix(".part")
            with tarfile.open(tmp, "w") as out:
                for c in sorted(by_class):
                    members = sorted(by_class[c], key=lambda m: m.name)
                    for m in rng.sample(members, min(n, len(members))):
                        out.addfile(m, src.extractfile(m))
            tmp.rename(dst)
    return out_dir / "train.tar"


def last_row(run: Path) -> dict[str, str] | None:
    path = run / "metrics.csv"
    if not path.exists():
        return None
    rows = list(csv.DictReader(path.open()))
    return rows[-1] if rows else None


def _model_args(items: tuple[str, ...]) -> dict:
    import json

    out = {}
    for item in items:
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def cost(entry: Entry, img_size: int = 32) -> tuple[int, float]:
    """Parameters and forward GFLOPs (2 per multiply-add) of one 32x32 image."""
    model = build_model(entry.model, 10, entry.attn, img_size, _model_args(entry.model_args))
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        flops, _ = count_flops(model, torch.randn(1, 3, img_size, img_size))
    return params, flops / 1e9


def read_rows(out: Path) -> list[dict]:
    """The rows of an earlier ``results.csv`` in ``out`` (none if there is no file)."""
    path = out / "results.csv"
    if not path.exists():
        return []
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["params"] = int(r["params"])
    return rows


def write(out: Path, rows: list[dict]) -> list[str]:
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [
        "| entry | model | attn | epochs | train images | test acc | params | GFLOPs / image "
        "| train images/s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['entry']} | {r['model']} | {r['attn']} | {r['epochs']} | "
            f"{r.get('train_images', 'all')} | {float(r['test_acc']):.4f} | {r['params']:,} | "
            f"{r['gflops_per_image']} | "
            f"{r['train_images_per_s']} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    return lines


def run(entries: list[Entry], args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.subset:
        args.data = str(make_subset(Path(args.data), args.subset, Path(args.runs) / "data"))
    rows = read_rows(out)  # entries measured before and not rerun now keep their rows
    for entry in entries:
        run_dir = Path(args.runs) / entry.label
        last = last_row(run_dir)
        if last is None or int(last["epoch"]) < args.epochs:
            cmd = [sys.executable, "-m", "spatial_attention", "train", "--model", entry.model,
                   "--data", args.data, "--epochs", str(args.epochs), "--batch",
                   str(args.batch), "--seed", str(args.seed), "--device", args.device,
                   "--out", str(run_dir), "--overlays", "0", "--no-progress"]
            if entry.attn is not None:
                cmd += ["--attn", entry.attn]
            for item in entry.model_args:
                cmd += ["--model-arg", item]
            cmd += list(args.extra)
            print(" ".join(cmd), flush=True)
            start = time.perf_counter()
            subprocess.run(cmd, check=True)
            print(f"{entry.label}: {time.perf_counter() - start:.0f} s", flush=True)
            last = last_row(run_dir)
        params, gflops = cost(entry)
        row = {
            "entry": entry.label, "model": entry.model, "attn": entry.attn or "-",
            "epochs": last["epoch"], "seed": args.seed,
            "train_images": 10 * args.subset if args.subset else "all",
            "test_acc": last["val_acc"],
            "params": params, "gflops_per_image": f"{gflops:.4f}",
            "train_images_per_s": last["images_per_s"],
        }
        rows = [r for r in rows if r["entry"] != entry.label]
        at = next((i for i, r in enumerate(read_rows(out)) if r["entry"] == entry.label),
                  len(rows))
        rows.insert(at, row)
        write(out, rows)
    print("\n".join(write(out, rows)))
    return 0
