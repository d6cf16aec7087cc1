"""Training throughput (images/s) of CIFAR ResNet-18 with and without a map mechanism.

One training step = the trainer's on-device augmentation and normalisation
(``BatchTransform``: random crop with padding, flip), forward, label-smoothed
cross-entropy, backward and an AdamW step, exactly as ``spatial-attention train`` runs
it. JPEG decoding is left out: in training it runs in DataLoader workers beside the
step (it decodes ~15,000 CIFAR images/s on one core, far above what a CPU trains at).

The grid: ``--attn`` (default ``none,se``) x ``--modes`` (eager, compiled with
``torch.compile``) x ``--precisions`` (fp32, bf16 autocast). Each configuration builds
a fresh model (seed 0), runs ``--warmup`` steps (compilation happens there and is
timed apart) and reports the median of ``--steps`` timed steps, so a step slowed by
another process on a shared machine does not move the result much. The 1-minute load
average is recorded with each row for that reason.

    python benchmarks/train_throughput.py                      # this CPU, real CIFAR-10
    python benchmarks/train_throughput.py --device cuda --batch 256 --steps 30

Writes ``benchmarks/train_throughput.csv`` (appends with ``--append``) and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CIFAR = REPO.parent / "shared" / "data" / "cifar10" / "train.tar"

FIELDS = [
    "device", "device_name", "model", "attn", "mode", "precision", "channels_last", "batch",
    "threads", "images_per_s", "step_ms_median", "step_ms_min", "images_per_cpu_s",
    "step_cpu_ms_median", "compile_s", "params",
    "data", "load_avg_1m", "torch",
]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def load_batches(data: str, n: int, batch: int, size: int = 32):
    """``n`` fixed uint8 batches ``(B, 3, 32, 32)`` with labels and keys."""
    g = torch.Generator().manual_seed(0)
    if data == "synthetic":
        x = torch.randint(0, 256, (n * batch, 3, size, size), generator=g, dtype=torch.uint8)
        y = torch.randint(0, 10, (n * batch,), generator=g)
        mean, std = [0.49, 0.48, 0.44], [0.25, 0.24, 0.26]
    else:
        from spatial_attention.apps.training.data import TarDataset, channel_stats

        ds = TarDataset(data, size)
        idx = torch.randperm(len(ds), generator=g)[: n * batch].tolist()
        items = [ds[i] for i in idx]
        x = torch.stack([it[0] for it in items])
        y = torch.tensor([it[1] for it in items])
        mean, std = channel_stats(ds)
    keys = torch.arange(n * batch)
    return [(x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch],
             keys[i * batch:(i + 1) * batch]) for i in range(n)], mean, std


def bench_one(args, attn: str, mode: str, precision: str, batches, mean, std) -> dict:
    from spatial_attention.apps.training.data import BatchTransform
    from spatial_attention.models import create_model

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=10,
                         attn_layer=None if attn == "none" else attn).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    params = sum(p.numel() for p in model.parameters())
    net = torch.compile(model) if mode == "compiled" else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    tf = BatchTransform(mean, std, seed=0, pad=4, flip=True, channels_last=args.channels_last)
    amp = torch.bfloat16 if precision == "bf16" else None

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step(i: int) -> None:
        x, y, k = batches[i % len(batches)]
        x = tf(x.to(device, non_blocking=True), k, epoch=0, train=True)
        y = y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = F.cross_entropy(net(x).float(), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.train()
    t0 = time.perf_counter()
    for i in range(args.warmup):
        step(i)
    sync()
    warm = time.perf_counter() - t0
    times, cpu = [], []
    for i in range(args.steps):
        t, c = time.perf_counter(), time.process_time()
        step(args.warmup + i)
        sync()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    med = statistics.median(times)
    cpu_med = statistics.median(cpu)
    return {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "model": args.model,
        "attn": attn,
        "mode": mode,
        "precision": precision,
        "channels_last": args.channels_last,
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "images_per_s": round(args.batch / med, 1),
        "step_ms_median": round(med * 1000, 1),
        "step_ms_min": round(min(times) * 1000, 1),
        # CPU time of the whole process: with one thread, what an idle core would do
        # however busy the machine is (with several it includes OpenMP spin-waiting)
        "images_per_cpu_s": round(args.batch / cpu_med, 1),
        "step_cpu_ms_median": round(cpu_med * 1000, 1),
        # compiled: the warm-up minus what those steps would take at the timed speed
        "compile_s": round(max(0.0, warm - args.warmup * med), 1) if mode == "compiled" else "",
        "params": params,
        "data": "synthetic" if args.data == "synthetic" else "cifar10 train.tar",
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else "",
        "torch": torch.__version__,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="resnet18_cifar")
    p.add_argument("--attn", default="none,se", help="comma-separated mechanisms ('none')")
    p.add_argument("--modes", default="eager,compiled")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--data", default=str(CIFAR) if CIFAR.is_file() else "synthetic",
                   help="CIFAR-10 train.tar (default ../shared/data/cifar10) or 'synthetic'")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default=str(HERE / "train_throughput.csv"))
    p.add_argument("--append", action="store_true", help="append rows to --out")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batches, mean, std = load_batches(args.data, 4, args.batch)
    rows = []
    for attn in args.attn.split(","):
        for mode in args.modes.split(","):
            for precision in args.precisions.split(","):
                r = bench_one(args, attn, mode, precision, batches, mean, std)
                rows.append(r)
                print(f"{attn:>5} {mode:>8} {precision:>5}: {r['images_per_s']:8.1f} img/s, "
                      f"{r['images_per_cpu_s']:8.1f} img/CPU-s (median step "
                      f"{r['step_ms_median']} ms, compile {r['compile_s'] or '-'} s, load "
                      f"{r['load_avg_1m']})", flush=True)
    out = Path(args.out)
    new = not (args.append and out.is_file())
    with out.open("w" if new else "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerows(rows)
    print(f"\n{rows[0]['device_name']}, {args.model}, batch {args.batch}, "
          f"{rows[0]['threads']} threads, channels_last={args.channels_last}\n")
    print("| attn | mode | precision | images/s | images/CPU-s | median step (ms) | "
          "compile (s) | load |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['attn']} | {r['mode']} | {r['precision']} | {r['images_per_s']} | "
              f"{r['images_per_cpu_s']} | {r['step_ms_median']} | {r['compile_s']} | "
              f"{r['load_avg_1m']} |")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
