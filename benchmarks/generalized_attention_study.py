"""Study: Zhu et al.'s attention-term ablation in small, a CIFAR ResNet on CIFAR-10.

Generalized attention after the first 3x3 conv of every block of the last two stages
(``resnet18_cifar_ga``, attention_type 1111 / 0100 / 0010 / 0001 / 0011 / 1000), the
same network with deformable convolution there instead (``resnet18_cifar_dcn``), and the
plain network, all trained with one schedule, seed and data order. One row per variant:
test accuracy, parameters, forward GFLOPs per 32x32 image, training images/s, eval ms
per batch. Rows are appended to ``--out``'s CSV as each variant finishes; rerunning skips
variants already there.

Small-budget default (a CPU pilot, labelled as such in the results):

    python benchmarks/generalized_attention_study.py --train-images 8000 \
        --test-images 2000 --epochs 2 --width 16 --layers 1 1 1 1 --threads 1 \
        --out benchmarks/generalized_attention_study/results.csv

The full run is the same script with ``--train-images 0 --test-images 0 --epochs 30
--width 64 --layers 2 2 2 2 --device cuda``.
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from spatial_attention.apps.bench.flops import count_flops
from spatial_attention.apps.training.data import TarDataset
from spatial_attention.models import create_model

VARIANTS = {
    "baseline": ("resnet18_cifar_ga", dict(stages=[False, False, False, False])),
    "ga_1111": ("resnet18_cifar_ga", dict(attention_type="1111")),
    "ga_0100": ("resnet18_cifar_ga", dict(attention_type="0100")),
    "ga_0010": ("resnet18_cifar_ga", dict(attention_type="0010")),
    "ga_0001": ("resnet18_cifar_ga", dict(attention_type="0001")),
    "ga_0011": ("resnet18_cifar_ga", dict(attention_type="0011")),
    "ga_1000": ("resnet18_cifar_ga", dict(attention_type="1000")),
    "deformable": ("resnet18_cifar_dcn", dict()),
}


def load_subset(path: str, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` seeded random images (0: all) of a tar ImageFolder, decoded once."""
    ds = TarDataset(path, size=32)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(ds), generator=g)
    idx = order[:count] if count > 0 else order
    images = torch.stack([ds.decode(int(i)) for i in idx])
    labels = torch.tensor([ds.targets[int(i)] for i in idx])
    return images, labels


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random 4-pixel-padded crops and horizontal flips, per image, on a batch."""
    B, _, H, W = x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (B,), generator=g)
    dx = torch.randint(0, 9, (B,), generator=g)
    rows = (dy[:, None] + torch.arange(H))[:, None, :, None].expand(B, x.shape[1], H, W + 8)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(W))[:, None, None, :].expand(B, x.shape[1], H, W)
    out = out.gather(3, cols)
    flip = torch.rand(B, generator=g) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def run_variant(name: str, args, data) -> dict:
    model_name, kwargs = VARIANTS[name]
    if model_name == "resnet18_cifar_ga":
        kwargs = dict(kwargs, kv_stride=args.kv_stride, num_heads=args.heads)
    torch.manual_seed(args.seed)
    model = create_model(model_name, num_classes=10, width=args.width, layers=args.layers,
                         **kwargs)
    params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        flops, _ = count_flops(model.eval(), torch.randn(1, 3, 32, 32))
    device = torch.device(args.device)
    model.to(device)
    (xtr, ytr), (xte, yte), (mean, std) = data
    steps_per_epoch = len(xtr) // args.batch
    total = steps_per_epoch * args.epochs
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": args.wd},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=args.lr, momentum=0.9, nesterov=True)
    g = torch.Generator().manual_seed(args.seed)  # same data order for every variant
    step, seen, train_time = 0, 0, 0.0
    for _epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(xtr), generator=g)
        for b in range(steps_per_epoch):
            idx = order[b * args.batch:(b + 1) * args.batch]
            x = augment(xtr[idx].float() / 255, g)
            x = ((x - mean) / std).to(device)
            y = ytr[idx].to(device)
            lr = args.lr * 0.5 * (1 + math.cos(math.pi * step / total))
            for group in opt.param_groups:
                group["lr"] = lr
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            train_time += time.perf_counter() - t0
            seen += len(idx)
            step += 1
        print(f"{name}: epoch {_epoch + 1} loss {loss.item():.3f}", flush=True)
    model.eval()
    correct, eval_time, batches = 0, 0.0, 0
    with torch.no_grad():
        for b in range(0, len(xte), args.batch):
            x = ((xte[b:b + args.batch].float() / 255 - mean) / std).to(device)
            t0 = time.perf_counter()
            pred = model(x).argmax(1).cpu()
            eval_time += time.perf_counter() - t0
            batches += 1
            correct += (pred == yte[b:b + args.batch]).sum().item()
    return {
        "variant": name,
        "model": model_name,
        "attention_type": kwargs.get("attention_type", ""),
        "epochs": args.epochs,
        "train_images": len(xtr),
        "test_images": len(xte),
        "test_acc": f"{correct / len(xte):.4f}",
        "params": params,
        "gflops_per_image": f"{flops / 1e9:.4f}",
        "train_images_per_s": f"{seen / train_time:.1f}",
        "eval_ms_per_batch": f"{eval_time / batches * 1e3:.1f}",
    }


def write_markdown(csv_path: Path) -> None:
    rows = list(csv.DictReader(csv_path.open()))
    lines = ["| variant | attention_type | test acc | params | GFLOPs / image | "
             "train images/s | eval ms / batch |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['attention_type']} | {r['test_acc']} | "
                     f"{int(r['params']):,} | {r['gflops_per_image']} | "
                     f"{r['train_images_per_s']} | {r['eval_ms_per_batch']} |")
    csv_path.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/cifar10")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--train-images", type=int, default=8000, help="0: all 50000")
    p.add_argument("--test-images", type=int, default=2000, help="0: all 10000")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--wd", type=float, default=5e-4)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--layers", type=int, nargs=4, default=[1, 1, 1, 1])
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-stride", type=int, default=1,
                   help="GA key/value stride (1: CIFAR's last maps are only 8x8 and 4x4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path,
                   default=Path("benchmarks/generalized_attention_study/results.csv"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if args.out.exists():
        done = {r["variant"] for r in csv.DictReader(args.out.open())}
    root = Path(args.data)
    xtr, ytr = load_subset(str(root / "train.tar"), args.train_images, args.seed)
    xte, yte = load_subset(str(root / "test.tar"), args.test_images, args.seed + 1)
    mean = (xtr.float() / 255).mean((0, 2, 3)).reshape(1, 3, 1, 1)
    std = (xtr.float() / 255).std((0, 2, 3)).reshape(1, 3, 1, 1)
    data = ((xtr, ytr), (xte, yte), (mean, std))
    for name in args.variants:
        if name in done:
            continue
        start = time.perf_counter()
        row = run_variant(name, args, data)
        row["wall_s"] = f"{time.perf_counter() - start:.0f}"
        new = not args.out.exists()
        with args.out.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)
        write_markdown(args.out)
        print(row, flush=True)


if __name__ == "__main__":
    main()
