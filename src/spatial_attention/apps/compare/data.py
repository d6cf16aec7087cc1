"""CIFAR-10 for the equal-budget benchmark: decoded once, kept as uint8, augmented per batch.

Decoding 60,000 JPEGs costs far more than an epoch's data handling, so the two tars are
decoded a single time into ``<out>/cache/cifar10_uint8.pt`` (plain tensors and a list
of class names, read back with ``weights_only=True``). After that an epoch is index
arithmetic on one tensor that lives on the training device.

The augmentation is a pure function of ``(seed, epoch)``: the batch order, the
translations and the flips of an epoch come from one generator seeded by both, so a
resumed run sees exactly the batches the uninterrupted run saw.
"""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ...errors import UsageError

__all__ = ["Cifar", "load_cifar", "epoch_batches", "normalise", "CACHE_NAME"]

CACHE_NAME = "cifar10_uint8.pt"
#: bumped when the cache's contents change meaning, so an old cache is rebuilt
CACHE_VERSION = 1


@dataclass
class Cifar:
    """Images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` int64 for both splits."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    classes: list[str]

    def to(self, device: torch.device) -> Cifar:
        return Cifar(self.train_x.to(device), self.train_y.to(device),
                     self.test_x.to(device), self.test_y.to(device), self.classes)

    def subset(self, n_train: int | None, n_test: int | None) -> Cifar:
        """The first ``n`` images of a class-balanced interleaving (small protocols stay
        balanced and every class appears)."""
        def take(x: Tensor, y: Tensor, n: int | None) -> tuple[Tensor, Tensor]:
            if n is None or n >= len(y):
                return x, y
            # rank each image within its class, then order by (rank, class): round robin
            order = torch.argsort(y, stable=True)
            sorted_y = y[order]
            starts = torch.searchsorted(sorted_y, sorted_y, right=False)
            rank = torch.arange(len(y)) - starts
            key = rank * (int(y.max()) + 1) + sorted_y
            pick = order[torch.argsort(key, stable=True)[:n]].sort().values
            return x[pick], y[pick]

        tx, ty = take(self.train_x, self.train_y, n_train)
        vx, vy = take(self.test_x, self.test_y, n_test)
        return Cifar(tx, ty, vx, vy, self.classes)


def _check_tar(path: Path) -> None:
    if not path.is_file():
        raise UsageError(f"CIFAR-10 split {path} does not exist")
    if not tarfile.is_tarfile(path):
        raise UsageError(f"{path}: not a tar of <split>/<class>/<image> files")


def check_data(root: str | os.PathLike) -> Path:
    """The data folder, after checking both tars are there (before anything starts)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UsageError(f"data path {root} does not exist or is not a folder")
    for split in ("train", "test"):
        _check_tar(root / f"{split}.tar")
    return root


def _decode_tar(path: Path) -> tuple[Tensor, list[str], list[str]]:
    """All images of one tar as uint8, with their class names, in sorted member order."""
    try:
        from PIL import Image
    except ImportError:
        raise UsageError("decoding CIFAR-10 needs Pillow: pip install spatial-attention[data]") \
            from None

    members: list[tuple[str, str, bytes]] = []
    with tarfile.open(path, mode="r:") as tf:
        for m in tf:
            parts = m.name.split("/")
            if not m.isfile() or len(parts) < 2:
                continue
            fh = tf.extractfile(m)
            if fh is None:
                continue
            members.append((m.name, parts[-2], fh.read()))
    if not members:
        raise UsageError(f"{path}: no <class>/<image> members")
    members.sort(key=lambda e: e[0])  # tar order is whatever the archiver chose
    out = np.empty((len(members), 32, 32, 3), dtype=np.uint8)
    for i, (name, _, data) in enumerate(members):
        try:
            with Image.open(io.BytesIO(data)) as im:
                im = im.convert("RGB")
                if im.size != (32, 32):
                    raise UsageError(f"{path}:{name} is {im.size[0]}x{im.size[1]}, not 32x32")
                out[i] = np.asarray(im)
        except (OSError, SyntaxError) as exc:
            raise UsageError(f"{path}:{name} could not be decoded ({exc})") from None
    images = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
    return images, [m[1] for m in members], [m[0] for m in members]


def load_cifar(root: str | os.PathLike, cache_dir: str | os.PathLike) -> Cifar:
    """Both splits from ``root/{train,test}.tar``, through the uint8 cache in ``cache_dir``.

    The cache records the tars' sizes and modification times; a different tar rebuilds it.
    """
    root = check_data(root)
    cache = Path(cache_dir) / CACHE_NAME
    stamp = torch.tensor([
        v for split in ("train", "test")
        for v in (os.stat(root / f"{split}.tar").st_size,
                  int(os.stat(root / f"{split}.tar").st_mtime))
    ], dtype=torch.int64)
    if cache.is_file():
        try:
            saved = torch.load(cache, map_location="cpu", weights_only=True)
            if saved.get("version") == CACHE_VERSION and torch.equal(saved["stamp"], stamp):
                return Cifar(saved["train_x"], saved["train_y"], saved["test_x"],
                             saved["test_y"], list(saved["classes"]))
        except Exception:  # a truncated or foreign cache is simply rebuilt
            pass
    train_x, train_c, _ = _decode_tar(root / "train.tar")
    test_x, test_c, _ = _decode_tar(root / "test.tar")
    classes = sorted(set(train_c))
    if sorted(set(test_c)) != classes:
        raise UsageError(f"{root}: train and test tars have different classes")
    index = {c: i for i, c in enumerate(classes)}
    data = Cifar(train_x, torch.tensor([index[c] for c in train_c]),
                 test_x, torch.tensor([index[c] for c in test_c]), classes)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + ".tmp")
    torch.save({"version": CACHE_VERSION, "stamp": stamp, "train_x": data.train_x,
                "train_y": data.train_y, "test_x": data.test_x, "test_y": data.test_y,
                "classes": classes}, tmp)
    tmp.replace(cache)
    return data


def normalise(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 ``(B, 3, H, W)`` -> float32, standardised per channel."""
    return (x.float().div_(255) - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def _generator(seed: int, epoch: int) -> torch.Generator:
    # distinct, reproducible streams per (seed, epoch) without drawing from a shared one
    g = torch.Generator(device="cpu")
    g.manual_seed(1_000_003 * (seed + 1) + 7919 * epoch)
    return g


def epoch_batches(
    n: int, batch_size: int, seed: int, epoch: int, translate: int
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """``[(indices, dy, dx), ...]`` for one epoch; the last, short batch is dropped.

    ``dy``/``dx`` are each image's crop offsets into the ``translate``-padded image.
    Flips are not drawn here: see :func:`flip_mask` (alternating flips).
    """
    g = _generator(seed, epoch)
    order = torch.randperm(n, generator=g)
    shifts = torch.randint(0, 2 * translate + 1, (2, n), generator=g)
    batches = []
    for start in range(0, n - batch_size + 1, batch_size):
        idx = order[start:start + batch_size]
        batches.append((idx, shifts[0, start:start + batch_size],
                        shifts[1, start:start + batch_size]))
    return batches


def flip_mask(n: int, seed: int, epoch: int) -> Tensor:
    """Which training images are mirrored in ``epoch``: a random half in epoch 0, then
    the complement every other epoch (airbench's alternating flip: over two epochs each
    image is seen once each way, which random flips only give on average)."""
    g = _generator(seed, -1)
    base = torch.rand(n, generator=g) < 0.5
    return base ^ bool(epoch % 2)


def augment(images: Tensor, dy: Tensor, dx: Tensor, flip: Tensor, translate: int) -> Tensor:
    """Reflect-pad, crop each image at its own offset and mirror the flagged ones; the
    whole batch in a few indexing ops on its device."""
    b, _, h, w = images.shape
    device = images.device
    if translate > 0:
        padded = torch.nn.functional.pad(images, (translate,) * 4, mode="reflect")
        rows = (dy.to(device)[:, None] + torch.arange(h, device=device))[:, None, :, None]
        cols = (dx.to(device)[:, None] + torch.arange(w, device=device))[:, None, None, :]
        bidx = torch.arange(b, device=device)[:, None, None, None]
        cidx = torch.arange(images.shape[1], device=device)[None, :, None, None]
        images = padded[bidx, cidx, rows, cols]
    flip = flip.to(device)
    return torch.where(flip[:, None, None, None], images.flip(-1), images)
