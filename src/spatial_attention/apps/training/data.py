"""Datasets behind ``spatial-attention train``: image folders, tars of them, builtin digits.

Every dataset yields ``(image, label, key)``: ``image`` a ``(3, S, S)`` uint8 tensor,
``label`` an int (``-1`` when the file could not be decoded: such samples are counted,
skipped by the trainer and reported), and ``key`` the sample's index, which seeds its
augmentation. Augmentation and normalisation run on whole batches on the training
device (:class:`BatchTransform`); their randomness is a pure function of
``(seed, epoch, key)``, so results do not depend on the number of loader workers or
of distributed ranks, and a resumed run sees exactly the crops it would have seen.

Sources (:func:`open_datasets`):

* ``builtin:digits``: scikit-learn's bundled 8x8 digits (1,797 images, nothing to
  download), upsampled to ``S x S``, grey replicated to RGB; a fixed seeded 80/20
  split.
* a directory: ImageFolder layout ``root/<class>/<image>``, or ``root/train`` with a
  sibling ``root/val`` or ``root/test``.
* an uncompressed ``.tar`` of such a folder, read in place: the members are indexed
  once and each image is read with a plain ``seek`` + ``read`` through a per-process
  file handle, so loader workers never share a position. ``.../train.tar`` finds its
  validation split in a sibling ``test.tar`` or ``val.tar``.

Nothing here downloads anything.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler, Sampler

from ...errors import UsageError

__all__ = [
    "BUILTIN_DIGITS",
    "IMAGE_EXTENSIONS",
    "BatchTransform",
    "DataInfo",
    "DigitsDataset",
    "FolderDataset",
    "ImageDataset",
    "ResumableDistributedSampler",
    "ShardSampler",
    "SplitDataset",
    "TarDataset",
    "augment_params",
    "channel_stats",
    "open_datasets",
]

BUILTIN_DIGITS = "builtin:digits"
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff"}
)


# -- image datasets ------------------------------------------------------------------


class ImageDataset(Dataset):
    """Files of one class each, decoded lazily with PIL to ``(3, size, size)`` uint8.

    Subclasses provide ``_read(i) -> bytes``, ``describe(i) -> str`` and fill
    ``classes`` and ``targets``.
    """

    #: True for datasets held as tensors, where loader workers would only add IPC
    in_memory = False

    def __init__(self, size: int) -> None:
        if size < 1:
            raise UsageError(f"image size must be positive, got {size}")
        self.size = size
        self.classes: list[str] = []
        self.targets: list[int] = []

    def __len__(self) -> int:
        return len(self.targets)

    def _read(self, index: int) -> bytes:
        raise NotImplementedError

    def describe(self, index: int) -> str:
        """A human name of sample ``index`` (its path), for error reports."""
        return str(index)

    def decode(self, index: int) -> Tensor:
        """The image as ``(3, size, size)`` uint8; raises OSError/ValueError if unreadable."""
        from PIL import Image

        with Image.open(io.BytesIO(self._read(index))) as im:
            im = im.convert("RGB")
            if im.size != (self.size, self.size):
                im = im.resize((self.size, self.size), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        try:
            return self.decode(index), self.targets[index], index
        except (OSError, ValueError, SyntaxError, EOFError, tarfile.TarError):
            # PIL raises UnidentifiedImageError (an OSError), OSError for truncated
            # files and ValueError/SyntaxError for some malformed headers.
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), -1, index


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


class FolderDataset(ImageDataset):
    """ImageFolder layout: ``root/<class>/<image>``; classes and files in sorted order."""

    def __init__(self, root: str | os.PathLike, size: int = 32) -> None:
        super().__init__(size)
        self.root = Path(root)
        classes = sorted(d.name for d in os.scandir(self.root) if d.is_dir())
        self.paths: list[Path] = []
        for c, name in enumerate(classes):
            files = sorted(
                f.name for f in os.scandir(self.root / name) if f.is_file() and _is_image(f.name)
            )
            self.paths += [self.root / name / f for f in files]
            self.targets += [c] * len(files)
        self.classes = classes
        if not self.paths:
            raise UsageError(
                f"{self.root}: no images found in <class>/<image> subfolders (extensions "
                f"{', '.join(sorted(IMAGE_EXTENSIONS))})"
            )

    def _read(self, index: int) -> bytes:
        return self.paths[index].read_bytes()

    def describe(self, index: int) -> str:
        return str(self.paths[index])


class TarDataset(ImageDataset):
    """An ImageFolder inside an uncompressed tar, read without extracting it.

    Members ``[prefix/]<class>/<image>`` are indexed once at construction (offset and
    size of each file's data); ``__getitem__`` seeks and reads through a file handle
    opened lazily in each process (loader workers each get their own).
    """

    def __init__(self, path: str | os.PathLike, size: int = 32) -> None:
        super().__init__(size)
        self.path = Path(path)
        try:
            tf = tarfile.open(self.path, mode="r:")  # uncompressed only: random access
        except tarfile.ReadError as exc:
            raise UsageError(
                f"{self.path}: not an uncompressed tar ({exc}); compressed tars cannot be "
                "read in place, extract it or repack it with `tar cf`"
            ) from None
        entries: list[tuple[str, str, int, int]] = []
        with tf:
            for m in tf:
                if m.isfile() and _is_image(m.name):
                    parts = m.name.split("/")
                    if len(parts) < 2:
                        continue  # an image at the top level has no class
                    entries.append((parts[-2], m.name, m.offset_data, m.size))
        entries.sort(key=lambda e: e[1])
        self.classes = sorted({e[0] for e in entries})
        index = {c: i for i, c in enumerate(self.classes)}
        self.names = [e[1] for e in entries]
        self.offsets = [e[2] for e in entries]
        self.sizes = [e[3] for e in entries]
        self.targets = [index[e[0]] for e in entries]
        if not entries:
            raise UsageError(f"{self.path}: no <class>/<image> members in this tar")
        self._fh: io.BufferedReader | None = None
        self._pid: int | None = None

    def _read(self, index: int) -> bytes:
        if self._fh is None or self._pid != os.getpid():
            self._fh = open(self.path, "rb")  # noqa: SIM115 - kept open for the process
            self._pid = os.getpid()
        self._fh.seek(self.offsets[index])
        data = self._fh.read(self.sizes[index])
        if len(data) != self.sizes[index]:
            raise OSError(f"{self.path}: member {self.names[index]} is truncated")
        return data

    def describe(self, index: int) -> str:
        return f"{self.path}:{self.names[index]}"

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fh"], state["_pid"] = None, None  # each process opens its own handle
        return state

    def __del__(self) -> None:
        fh = getattr(self, "_fh", None)
        if fh is not None and self._pid == os.getpid():
            fh.close()


class DigitsDataset(Dataset):
    """scikit-learn's bundled digits (no download): 8x8 grey, upsampled to ``(3, S, S)``.

    ``split`` is ``"train"`` (1,437 images) or ``"val"`` (360), a fixed split drawn
    with ``seed`` (class-mixed, the same on every machine).
    """

    in_memory = True
    VAL_SIZE = 360

    def __init__(self, split: str = "train", size: int = 32, seed: int = 0) -> None:
        if split not in ("train", "val"):
            raise UsageError(f"digits split must be 'train' or 'val', got {split!r}")
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise UsageError(
                "builtin:digits needs scikit-learn: pip install spatial-attention[data]"
            ) from None
        digits = load_digits()
        order = np.random.default_rng(seed).permutation(len(digits.target))
        idx = order[: self.VAL_SIZE] if split == "val" else order[self.VAL_SIZE :]
        x = torch.from_numpy(digits.images[idx]).float().div(16.0)[:, None]  # (N, 1, 8, 8)
        if size != 8:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        self.images = x.clamp(0, 1).mul(255).round().to(torch.uint8).expand(-1, 3, -1, -1)
        self.images = self.images.contiguous()
        self.targets = digits.target[idx].tolist()
        self.classes = [str(d) for d in range(10)]
        self.size = size

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        return self.images[index], self.targets[index], index

    def describe(self, index: int) -> str:
        return f"{BUILTIN_DIGITS}[{index}]"


class SplitDataset(Dataset):
    """Samples ``indices`` of ``base``; keys are positions in this split."""

    def __init__(self, base: Dataset, indices: Sequence[int]) -> None:
        self.base = base
        self.indices = list(indices)
        self.classes = base.classes
        self.targets = [base.targets[i] for i in self.indices]
        self.size = base.size
        self.in_memory = getattr(base, "in_memory", False)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        image, label, _ = self.base[self.indices[index]]
        return image, label, index

    def describe(self, index: int) -> str:
        return self.base.describe(self.indices[index])


# -- opening a --data argument ------------------------------------------------------------


@dataclass
class DataInfo:
    """What the trainer records about its data in ``config.json``."""

    name: str
    classes: list[str]
    mean: list[float]
    std: list[float]
    train: str
    val: str | None
    train_size: int
    val_size: int
    notes: list[str] = field(default_factory=list)


def _open_one(path: Path, size: int) -> ImageDataset:
    if path.is_dir():
        return FolderDataset(path, size)
    if path.is_file():
        if not tarfile.is_tarfile(path):
            raise UsageError(f"{path}: not a directory or a tar of an image folder")
        return TarDataset(path, size)
    raise UsageError(f"data path {path} does not exist")


def _sibling_val(path: Path) -> Path | None:
    """``.../train.tar`` -> ``.../test.tar`` or ``val.tar``; ``root/train`` -> ``root/val``."""
    if "train" not in path.name:
        return None
    for other in ("val", "test"):
        cand = path.with_name(path.name.replace("train", other))
        if cand.exists():
            return cand
    return None


def open_datasets(
    data: str,
    val: str | None = None,
    size: int = 32,
    val_split: float = 0.1,
    seed: int = 0,
) -> tuple[Dataset, Dataset | None, DataInfo]:
    """``(train, val, info)`` for a ``--data`` argument (see the module docstring).

    Validation comes from ``val`` if given, else a sibling (``test.tar`` beside
    ``train.tar``, ``root/val`` or ``root/test`` beside ``root/train``), else a seeded
    ``val_split`` fraction of the training images (none when ``val_split`` is 0).
    Mean/std are measured on (up to 2,000 of) the training images.
    """
    notes: list[str] = []
    if data.startswith("builtin:"):
        if data != BUILTIN_DIGITS:
            raise UsageError(
                f"unknown builtin dataset {data!r}; the builtin one is {BUILTIN_DIGITS}"
            )
        if val is not None:
            raise UsageError("--val does not apply to builtin:digits (it has a fixed split)")
        train_ds: Dataset = DigitsDataset("train", size)
        val_ds: Dataset | None = DigitsDataset("val", size)
        name, train_desc, val_desc = "digits", BUILTIN_DIGITS, f"{BUILTIN_DIGITS} (val split)"
    else:
        path = Path(data).expanduser()
        if not path.exists():
            raise UsageError(f"data path {data} does not exist")
        if path.is_dir() and val is None and (path / "train").is_dir():
            sib = next((path / s for s in ("val", "test") if (path / s).is_dir()), None)
            path, val = path / "train", (str(sib) if sib is not None else None)
        train_ds = _open_one(path, size)
        val_path = Path(val).expanduser() if val is not None else _sibling_val(path)
        if val is not None and not Path(val).expanduser().exists():
            raise UsageError(f"validation path {val} does not exist")
        name = path.parent.name if path.stem in ("train", "training") else path.stem
        train_desc = str(path.resolve())
        if val_path is not None:
            val_ds = _open_one(val_path, size)
            if val_ds.classes != train_ds.classes:
                only_t = sorted(set(train_ds.classes) - set(val_ds.classes))
                only_v = sorted(set(val_ds.classes) - set(train_ds.classes))
                raise UsageError(
                    f"classes differ between {path} and {val_path}: only in train "
                    f"{only_t[:5]}, only in val {only_v[:5]}"
                )
            val_desc = str(val_path.resolve())
        elif val_split > 0:
            if not 0 < val_split < 1:
                raise UsageError(f"--val-split must be in [0, 1), got {val_split}")
            n = len(train_ds)
            order = np.random.default_rng(seed).permutation(n)
            n_val = max(1, int(round(n * val_split)))
            base = train_ds
            val_ds = SplitDataset(base, sorted(order[:n_val].tolist()))
            train_ds = SplitDataset(base, sorted(order[n_val:].tolist()))
            val_desc = f"{train_desc} ({val_split:g} held out, seed {seed})"
            notes.append(f"no validation set given: held out {n_val} training images")
        else:
            val_ds, val_desc = None, None
    mean, std = channel_stats(train_ds)
    info = DataInfo(
        name=name,
        classes=list(train_ds.classes),
        mean=mean,
        std=std,
        train=train_desc,
        val=val_desc,
        train_size=len(train_ds),
        val_size=len(val_ds) if val_ds is not None else 0,
        notes=notes,
    )
    return train_ds, val_ds, info


def channel_stats(ds: Dataset, max_samples: int = 2000, seed: int = 0) -> tuple[list, list]:
    """Per-channel mean and std in ``[0, 1]`` units over (a seeded subset of) ``ds``."""
    n = len(ds)
    if n == 0:
        raise UsageError("the training set is empty")
    if isinstance(ds, DigitsDataset):
        x = ds.images.double().div_(255)
    else:
        idx = np.random.default_rng(seed).permutation(n)[:max_samples]
        imgs = [img for img, label, _ in (ds[int(i)] for i in sorted(idx)) if label >= 0]
        if not imgs:
            raise UsageError("none of the sampled training images could be decoded")
        x = torch.stack(imgs).double().div_(255)
    mean = x.mean((0, 2, 3))
    std = x.std((0, 2, 3)).clamp_min(1e-3)
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


# -- samplers -----------------------------------------------------------------------------


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` that can start an epoch at a given batch (exact resume).

    With ``num_replicas`` ranks each taking ``batch_size`` samples a step, global batch
    ``k`` is ``perm[k * B : (k + 1) * B]`` of the epoch's permutation (``B = batch_size
    * num_replicas``) whatever the number of ranks, so a single process and N ranks with
    the same global batch see the same samples each step. Use it with
    ``drop_last=True`` (no padding) and a loader with ``drop_last=True``: then every
    world size makes ``len(dataset) // B`` steps an epoch.
    """

    def __init__(self, dataset: Dataset, batch_size: int, **kwargs) -> None:
        super().__init__(dataset, **kwargs)
        self.batch_size = batch_size
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:  # type: ignore[override]
        super().set_epoch(epoch)
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start_batch * self.batch_size :])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start_batch * self.batch_size)

    def batches_per_epoch(self) -> int:
        return self.num_samples // self.batch_size


class ShardSampler(Sampler[int]):
    """Rank ``r`` of ``w`` takes samples ``r, r + w, ...``: evaluation without padding."""

    def __init__(self, n: int, rank: int = 0, world: int = 1) -> None:
        self.indices = list(range(rank, n, world))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


# -- augmentation and normalisation on batches ---------------------------------------------

_M64 = (1 << 64) - 1


def _splitmix(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 arrays: a counter-based, well-mixed hash."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def augment_params(
    keys: Tensor | Sequence[int], epoch: int, seed: int, pad: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dy, dx, flip)`` per sample: crop offsets in ``[0, 2 pad]`` and a coin, each a
    pure function of ``(seed, epoch, key)``."""
    k = np.asarray(keys.cpu() if isinstance(keys, Tensor) else keys, dtype=np.uint64)
    with np.errstate(over="ignore"):
        stream = _splitmix(np.array([seed & _M64], dtype=np.uint64))
        stream = _splitmix(stream ^ np.uint64(epoch & _M64))
        base = _splitmix(stream ^ k)
        draws = [_splitmix(base ^ np.uint64(s)) for s in (1, 2, 3)]
    dy = torch.from_numpy((draws[0] % np.uint64(2 * pad + 1)).astype(np.int64))
    dx = torch.from_numpy((draws[1] % np.uint64(2 * pad + 1)).astype(np.int64))
    flip = torch.from_numpy((draws[2] >> np.uint64(63)).astype(bool))
    return dy, dx, flip


class BatchTransform:
    """Random crop with zero padding + horizontal flip (training), then normalisation.

    ``__call__(images uint8 (B, C, H, W), keys (B,), epoch, train) -> float (B, C, H, W)``
    on ``images``' device. The crop/flip of a sample depends only on ``(seed, epoch,
    key)`` (see :func:`augment_params`).
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        seed: int = 0,
        pad: int = 4,
        flip: bool = True,
        channels_last: bool = False,
    ) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.seed, self.pad, self.flip = seed, pad, flip
        self.channels_last = channels_last
        self._stats: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def _to(self, t: Tensor, device: torch.device) -> Tensor:
        """A small host tensor on ``device`` without a host round-trip: pinned and copied
        asynchronously on CUDA (the step's kernels are queued behind it anyway)."""
        if device.type != "cuda":
            return t.to(device)
        return t.pin_memory().to(device, non_blocking=True)

    def _mean_std(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self._stats:  # once per device, not once per step
            self._stats[device] = (self.mean.to(device), self.std.to(device))
        return self._stats[device]

    def augment(self, x: Tensor, keys: Tensor, epoch: int) -> Tensor:
        B, C, H, W = x.shape
        dy, dx, flip = augment_params(keys, epoch, self.seed, self.pad)
        if self.pad > 0:
            p = self.pad
            xp = F.pad(x, (p, p, p, p))
            rows = self._to(dy[:, None] + torch.arange(H), x.device)  # (B, H)
            cols = self._to(dx[:, None] + torch.arange(W), x.device)  # (B, W)
            b = torch.arange(B, device=x.device)[:, None, None]
            x = xp.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
            x = x.permute(0, 3, 1, 2)
        if self.flip:
            x = torch.where(self._to(flip, x.device)[:, None, None, None], x.flip(-1), x)
        return x

    def __call__(self, x: Tensor, keys: Tensor, epoch: int, train: bool) -> Tensor:
        if train:
            x = self.augment(x, keys, epoch)
        mean, std = self._mean_std(x.device)
        x = (x.float() / 255.0 - mean) / std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x.contiguous() if not self.channels_last else x
