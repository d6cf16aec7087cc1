"""Two-view CIFAR-10: single-view Swin against MV-Swin-T at the same budget.

Every CIFAR-10 image gives two *views*: two different crops of it (side 16-24 of 32 at a
random place, resized back to 32, each flipped at random) while training; at test time
the fixed top-left and bottom-right 22x22 crops. No view shows the whole image, so a
model that reads both has more of it.

Entries (same data order, seed, optimizer, schedule and epochs):

* ``swin_view1``: ``swin_micro_cifar`` on view 1 only; evaluated on view 1, and also
  with its logits averaged over both test views (``late_fusion_acc``: the same weights,
  no extra training),
* ``mvswin_mix``: ``mvswin_micro_cifar`` on both views (W-MDA, per-view stages 0-1,
  token fusion, shared stage 2),
* ``mvswin_concat`` (``--models`` to add it): the keys-concatenation variant.

Results go to ``--out``/results.csv and results.md after every entry and every epoch
(a stopped run keeps what it has). Small budgets are a pilot; the full study is e.g.
``--epochs 100 --train-limit 0 --test-limit 0 --device cuda``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from spatial_attention.apps.training.data import TarDataset
from spatial_attention.models import create_model

MODELS = {
    "swin_view1": ("swin_micro_cifar", {}),
    "mvswin_mix": ("mvswin_micro_cifar", {}),
    "mvswin_concat": ("mvswin_micro_cifar", {"cross_mode": "concat"}),
}
MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)


def load(path: str, limit: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded ``(N, 3, 32, 32)`` uint8 images and labels (a seeded subset if limit)."""
    ds = TarDataset(path, size=32)
    idx = list(range(len(ds)))
    if limit:
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(ds), generator=g)[:limit].tolist()
    images = torch.stack([ds.decode(i) for i in idx])
    labels = torch.tensor([ds.targets[i] for i in idx])
    return images, labels


def crops(x: torch.Tensor, side: torch.Tensor, top: torch.Tensor, left: torch.Tensor,
          flip: torch.Tensor) -> torch.Tensor:
    """Batched crop-and-resize to 32x32 with one affine grid per image (bilinear)."""
    B, _, H, W = x.shape
    s = side / H
    cy = (top + side / 2) / H * 2 - 1
    cx = (left + side / 2) / W * 2 - 1
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0] = s * torch.where(flip, -1.0, 1.0)
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = s
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, (B, 3, 32, 32), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def two_views(images: torch.Tensor, train: bool, g: torch.Generator) -> torch.Tensor:
    """``(B, 2, 3, 32, 32)`` normalised views of uint8 images."""
    x = (images.float() / 255 - MEAN) / STD
    B = x.shape[0]
    views = []
    for v in range(2):
        if train:
            side = torch.randint(16, 25, (B,), generator=g).float()
            top = (torch.rand(B, generator=g) * (32 - side)).floor()
            left = (torch.rand(B, generator=g) * (32 - side)).floor()
            flip = torch.rand(B, generator=g) < 0.5
        else:
            side = torch.full((B,), 22.0)
            top = left = torch.full((B,), 0.0 if v == 0 else 10.0)
            flip = torch.zeros(B, dtype=torch.bool)
        views.append(crops(x, side, top, left, flip))
    return torch.stack(views, dim=1)


def forward(label: str, model: torch.nn.Module, views: torch.Tensor) -> torch.Tensor:
    return model(views[:, 0]) if label == "swin_view1" else model(views)


@torch.no_grad()
def evaluate(label: str, model, images, labels, device, batch) -> dict[str, float]:
    model.eval()
    g = torch.Generator().manual_seed(0)
    correct = late = 0
    for i in range(0, len(images), batch):
        views = two_views(images[i:i + batch], False, g).to(device)
        y = labels[i:i + batch].to(device)
        out = forward(label, model, views)
        correct += (out.argmax(-1) == y).sum().item()
        if label == "swin_view1":
            both = out.softmax(-1) + model(views[:, 1]).softmax(-1)
            late += (both.argmax(-1) == y).sum().item()
    result = {"test_acc": correct / len(images)}
    if label == "swin_view1":
        result["late_fusion_acc"] = late / len(images)
    return result


def train_one(label: str, args, data, out: Path, rows: list[dict]) -> None:
    torch.manual_seed(args.seed)
    name, kwargs = MODELS[label]
    model = create_model(name, num_classes=10, **kwargs).to(args.device)
    params = sum(p.numel() for p in model.parameters())
    (tr_x, tr_y), (te_x, te_y) = data
    steps_per_epoch = math.ceil(len(tr_x) / args.batch)
    total = steps_per_epoch * args.epochs
    warmup = min(steps_per_epoch, total // 10 + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup
        else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
    g = torch.Generator().manual_seed(args.seed)
    seen, train_time = 0, 0.0
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(tr_x), generator=g)
        loss_sum = 0.0
        for i in range(0, len(order), args.batch):
            idx = order[i:i + args.batch]
            views = two_views(tr_x[idx], True, g).to(args.device)
            y = tr_y[idx].to(args.device)
            start = time.perf_counter()
            loss = F.cross_entropy(forward(label, model, views), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            train_time += time.perf_counter() - start
            seen += len(idx)
            loss_sum += loss.item() * len(idx)
        result = evaluate(label, model, te_x, te_y, args.device, 256)
        row = {"entry": label, "model": name, "epoch": epoch, "train_images": len(tr_x),
               "test_images": len(te_x), "train_loss": round(loss_sum / len(tr_x), 4),
               **{k: round(v, 4) for k, v in result.items()},
               "params": params, "train_images_per_s": round(seen / train_time, 1)}
        print(json.dumps(row), flush=True)
        rows[:] = [r for r in rows if not (r["entry"] == label and r["epoch"] == epoch)]
        rows.append(row)
        write(out, rows)


def write(out: Path, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    fields = ["entry", "model", "epoch", "train_images", "test_images", "train_loss",
              "test_acc", "late_fusion_acc", "params", "train_images_per_s"]
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    lines = ["| entry | model | epoch | train / test images | train loss | test acc "
             "| late-fusion acc | params | train images/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['entry']} | {r['model']} | {r['epoch']} | {r['train_images']} / "
            f"{r['test_images']} | {r['train_loss']} | {r['test_acc']:.4f} | "
            f"{r.get('late_fusion_acc', '-')} | {r['params']:,} | {r['train_images_per_s']} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", default="../shared/data/cifar10/train.tar")
    p.add_argument("--test", default="../shared/data/cifar10/test.tar")
    p.add_argument("--train-limit", type=int, default=0, help="0: all 50,000")
    p.add_argument("--test-limit", type=int, default=0, help="0: all 10,000")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--models", nargs="+", default=["swin_view1", "mvswin_mix"],
                   choices=sorted(MODELS))
    p.add_argument("--out", default="benchmarks/mvswin_study")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    data = (load(args.train, args.train_limit, args.seed),
            load(args.test, args.test_limit, args.seed + 1))
    print(f"decoded {len(data[0][0])} + {len(data[1][0])} images in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    rows: list[dict] = []
    for label in args.models:
        train_one(label, args, data, Path(args.out), rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
