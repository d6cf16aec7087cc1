"""``spatial-attention train`` and ``spatial-attention evaluate``: image classification.

::

    spatial-attention train                                   # ResNet-10 on builtin:digits
    spatial-attention train --model resnet18_cifar --attn se \\
        --data ../shared/data/cifar10/train.tar --epochs 30 --batch 128 --out runs/se18
    spatial-attention train --out runs/se18 --resume          # continue exactly
    torchrun --nproc-per-node 4 -m spatial_attention.train --data ... --batch 512
    spatial-attention evaluate runs/se18

A run directory holds ``config.json`` (every setting, the classes and the
normalisation), ``checkpoint/`` (safetensors weights + a weights-only state file, see
:mod:`spatial_attention.checkpoint`), ``metrics.csv``, ``curves.png`` and, for models
that contain mechanisms, ``attention/`` overlays of a few validation images.

Exact resume: the checkpoint holds the model, optimizer, scheduler, grad scaler, EMA,
the RNG states of every rank and the position in the epoch (epoch, batch). The sample
order of an epoch is a pure function of ``(seed, epoch)`` (DistributedSampler) and the
crop/flip of a sample of ``(seed, epoch, sample)``, so a run stopped at any step (Ctrl-C,
SIGTERM, ``--stop-at-step``) and resumed reaches the same weights as one that never
stopped. Distributed runs go through ``torchrun``, which sets ``WORLD_SIZE``/``RANK``:
DistributedDataParallel, a DistributedSampler over the same global batch, logging and
checkpoints on rank 0.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import UsageError

__all__ = [
    "DEFAULTS",
    "add_arguments",
    "add_evaluate_arguments",
    "build_model",
    "evaluate_run",
    "main",
    "run",
    "run_evaluate",
    "train",
]

PROG = "spatial-attention train"

#: every setting of a run, as stored in config.json; None means "depends" (see _resolve)
DEFAULTS: dict[str, Any] = {
    "model": "resnet10_cifar",
    "attn": None,
    "model_arg": [],
    "data": "builtin:digits",
    "val": None,
    "val_split": 0.1,
    "img_size": 32,
    "epochs": 5,
    "batch": 64,
    "opt": "adamw",
    "lr": None,  # adamw 2e-3, sgd 0.1
    "wd": None,  # adamw 0.05, sgd 5e-4
    "momentum": 0.9,
    "warmup_epochs": 0.5,
    "min_lr": 0.0,
    "label_smoothing": 0.1,
    "clip_grad": 0.0,
    "pad": None,  # img_size // 8
    "flip": None,  # on for images, off for digits
    "amp": "auto",
    "channels_last": True,
    "compile": False,
    "ema": 0.0,
    "seed": 0,
    "workers": 2,
    "device": "auto",
    "sync_bn": False,
    "deterministic": False,
    "out": None,
    "stop_at_step": None,
    "progress": None,  # on when stderr is a terminal
    "overlays": 4,
}
_OPT_DEFAULTS = {"adamw": {"lr": 2e-3, "wd": 0.05}, "sgd": {"lr": 0.1, "wd": 5e-4}}
#: settings a resumed run may change without changing its result (or knowingly: device)
_RESUME_FREE = {"workers", "progress", "stop_at_step", "overlays", "out", "device", "compile"}


# -- arguments ----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``spatial-attention train`` (and ``python -m spatial_attention.train``)."""
    d = DEFAULTS
    g = parser.add_argument_group("model")
    g.add_argument("--model", help=f"registered model or timm:NAME (default {d['model']})")
    g.add_argument("--attn", help="mechanism for the model's attn_layer / token mixer "
                   "(e.g. se, cbam; multi_head for ViTs; 'none')")
    g.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                   help="extra model constructor argument, VALUE parsed as JSON when it can "
                   "be (repeatable), e.g. --model-arg width=16")
    g = parser.add_argument_group("data")
    g.add_argument("--data", help="image folder, tar of one, or builtin:digits (default)")
    g.add_argument("--val", help="validation folder/tar (default: test.tar/val.tar beside a "
                   "train.tar, root/val or root/test beside root/train, else --val-split)")
    g.add_argument("--val-split", type=float,
                   help=f"fraction held out when there is no validation set ({d['val_split']})")
    g.add_argument("--img-size", type=int, help=f"images are resized to this ({d['img_size']})")
    g.add_argument("--pad", type=int, help="random-crop padding (default img-size // 8)")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction,
                   help="random horizontal flips (default: on, off for digits)")
    g.add_argument("--workers", type=int, help=f"DataLoader workers per process ({d['workers']})")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, help=f"default {d['epochs']}")
    g.add_argument("--batch", type=int, help=f"global batch size, all ranks ({d['batch']})")
    g.add_argument("--opt", choices=tuple(_OPT_DEFAULTS), help="adamw (default) or sgd")
    g.add_argument("--lr", type=float, help="peak learning rate (adamw 2e-3, sgd 0.1)")
    g.add_argument("--wd", type=float, help="weight decay (adamw 0.05, sgd 5e-4)")
    g.add_argument("--momentum", type=float, help=f"SGD momentum, Nesterov ({d['momentum']})")
    g.add_argument("--warmup-epochs", type=float,
                   help=f"linear warm-up before the cosine decay ({d['warmup_epochs']})")
    g.add_argument("--min-lr", type=float, help="learning rate at the end of the cosine (0)")
    g.add_argument("--label-smoothing", type=float, help=f"({d['label_smoothing']})")
    g.add_argument("--clip-grad", type=float, help="clip the gradient norm (0: off)")
    g.add_argument("--ema", type=float, metavar="DECAY",
                   help="keep an EMA of the weights with this decay, e.g. 0.999 (0: off)")
    g.add_argument("--seed", type=int, help=f"({d['seed']})")
    g = parser.add_argument_group("execution")
    g.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    g.add_argument("--amp", choices=("auto", "off", "bf16", "fp16"),
                   help="mixed precision; auto = bf16 where the device supports it")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                   help="channels_last memory format (default: on)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile the model")
    g.add_argument("--sync-bn", action=argparse.BooleanOptionalAction,
                   help="SyncBatchNorm across ranks (CUDA only)")
    g.add_argument("--deterministic", action=argparse.BooleanOptionalAction,
                   help="torch.use_deterministic_algorithms (CPU runs already are)")
    g = parser.add_argument_group("run")
    g.add_argument("--out", help="run directory (default runs/<model>[-<attn>]-<data>)")
    g.add_argument("--resume", nargs="?", const=True, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR (or --out) exactly where it stopped")
    g.add_argument("--stop-at-step", type=int, metavar="N",
                   help="save a checkpoint and stop after N optimizer steps in all")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction,
                   help="progress bars (default: when stderr is a terminal)")
    g.add_argument("--overlays", type=int,
                   help=f"attention overlays of this many validation images ({d['overlays']})")


def _explicit(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line (argparse leaves the others None)."""
    return {k: v for k, v in vars(args).items() if k in DEFAULTS and v is not None}


def _absolute_paths(explicit: dict[str, Any]) -> dict[str, Any]:
    """``--data``/``--val`` as absolute paths, so a run can be evaluated from anywhere."""
    out = dict(explicit)
    for key in ("data", "val"):
        v = out.get(key)
        if isinstance(v, str) and not v.startswith("builtin:") and Path(v).expanduser().exists():
            out[key] = str(Path(v).expanduser().resolve())
    return out


def _parse_model_args(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise UsageError(f"--model-arg expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _resolve(explicit: dict[str, Any], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Defaults, then ``base`` (a resumed run's config), then the command line."""
    cfg = {**DEFAULTS, **(base or {}), **explicit}
    opt = cfg["opt"]
    if cfg["lr"] is None:
        cfg["lr"] = _OPT_DEFAULTS[opt]["lr"]
    if cfg["wd"] is None:
        cfg["wd"] = _OPT_DEFAULTS[opt]["wd"]
    if cfg["pad"] is None:
        cfg["pad"] = cfg["img_size"] // 8
    if cfg["flip"] is None:
        cfg["flip"] = not str(cfg["data"]).startswith("builtin:")
    if cfg["attn"] in ("none", ""):
        cfg["attn"] = None
    for key in ("epochs", "batch", "img_size"):
        if cfg[key] < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be positive, got {cfg[key]}")
    for key in ("workers", "pad", "warmup_epochs", "wd", "min_lr", "clip_grad"):
        if not cfg[key] >= 0:  # `not >=`: NaN is wrong too
            raise UsageError(f"--{key.replace('_', '-')} must be >= 0, got {cfg[key]}")
    if not cfg["lr"] > 0:
        raise UsageError(f"--lr must be > 0, got {cfg['lr']}")
    if not 0.0 <= cfg["val_split"] < 1.0:
        raise UsageError(f"--val-split must be in [0, 1), got {cfg['val_split']}")
    if not 0.0 <= cfg["ema"] < 1.0:
        raise UsageError(f"--ema must be a decay in [0, 1), got {cfg['ema']}")
    if not 0.0 <= cfg["label_smoothing"] < 1.0:
        raise UsageError(f"--label-smoothing must be in [0, 1), got {cfg['label_smoothing']}")
    _parse_model_args(cfg["model_arg"])  # fail early on a malformed one
    return cfg


# -- distributed context ------------------------------------------------------------------


@dataclass
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def _resolve_device(spec: str, local_rank: int) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UsageError(f"--device {spec!r} is not a device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def _init_context(device_spec: str) -> Context:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _resolve_device(device_spec, local_rank)
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group(backend=backend)
    elif device.type == "cuda":
        torch.cuda.set_device(device)
    return Context(rank, world, local_rank, device)


def _agree(ctx: Context, fn):
    """Run ``fn`` on rank 0 and hand its result (or its UsageError) to every rank."""
    if not ctx.distributed:
        return fn()
    import torch.distributed as dist

    box: list[Any] = [None]
    if ctx.main:
        try:
            box[0] = ("ok", fn())
        except UsageError as exc:
            box[0] = ("error", str(exc))
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise UsageError(value)
    return value


def _all_reduce(ctx: Context, t: Tensor) -> Tensor:
    if ctx.distributed:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t


# -- model --------------------------------------------------------------------------------


def build_model(
    name: str,
    num_classes: int,
    attn: str | None = None,
    img_size: int = 32,
    model_args: dict[str, Any] | None = None,
) -> nn.Module:
    """A registered model (or ``timm:NAME``) for ``num_classes`` classes, ``attn`` inside."""
    kwargs = dict(model_args or {})
    if name.startswith("timm:"):
        try:
            import timm
        except ImportError:
            raise UsageError(
                f"--model {name}: timm is not installed; pip install spatial-attention[timm]"
            ) from None
        except Exception as exc:  # a broken install (e.g. a mismatched torchvision)
            raise UsageError(
                f"--model {name}: timm failed to import ({type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); "
                "reinstall it with pip install spatial-attention[timm]"
            ) from None
        if attn is not None:
            # timm's ResNet family takes attn_layer through block_args (see
            # integrations/timm.py); other timm models refuse it with a TypeError.
            from .integrations.timm import attn_layer

            block_args = dict(kwargs.pop("block_args", {}) or {})
            block_args["attn_layer"] = attn_layer(attn)
            kwargs["block_args"] = block_args
        try:
            # pretrained=False: nothing is downloaded
            return timm.create_model(
                name[5:], pretrained=False, num_classes=num_classes, **kwargs
            )
        except TypeError as exc:
            raise UsageError(
                f"--model {name}: timm could not build it with {sorted(kwargs)} ({exc}); "
                "--attn works with timm's ResNet family (block_args=dict(attn_layer=...))"
            ) from None
    from .models import model_info

    try:
        builder = model_info(name).builder
    except ValueError as exc:
        raise UsageError(f"--model: {exc}") from None
    params = inspect.signature(builder).parameters
    if "img_size" in params:
        kwargs.setdefault("img_size", img_size)
    kwargs["num_classes"] = num_classes
    if attn is not None:
        kwargs["attn_layer"] = attn
    try:
        return builder(**kwargs)
    except TypeError as exc:
        raise UsageError(f"--model {name}: {exc} (check --attn / --model-arg)") from None
    except ValueError as exc:
        raise UsageError(f"--model {name}: {exc}") from None


def _param_groups(model: nn.Module, wd: float) -> list[dict[str, Any]]:
    """No weight decay on biases, norms and position embeddings (1-D or named pos)."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or "pos_embed" in n else decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


class WarmupCosine:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine to ``floor``."""

    def __init__(self, warmup: int, total: int, floor: float = 0.0) -> None:
        self.warmup, self.total, self.floor = warmup, total, floor

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        t = (step - self.warmup) / max(1, self.total - self.warmup)
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "off":
        return None
    if amp == "fp16":
        if device.type != "cuda":
            raise UsageError("--amp fp16 needs a CUDA device; use bf16 on CPU")
        return torch.float16
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
    elif device.type == "cpu":
        try:  # oneDNN runs bf16 natively (AVX-512 / ARM BF16); else autocast is emulated
            bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            bf16 = False
    else:
        bf16 = False
    if amp == "bf16":
        if device.type not in ("cuda", "cpu"):
            raise UsageError(f"--amp bf16 is not supported on {device.type}")
        return torch.bfloat16
    return torch.bfloat16 if bf16 else None  # auto


# -- small helpers ------------------------------------------------------------------------


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _worker_init(_: int) -> None:
    # Ctrl-C reaches the whole process group; the main process saves a checkpoint and
    # shuts the workers down itself, so they must not die first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _loader(ds, sampler, batch: int, cfg: dict, ctx: Context, drop_last: bool, seed: int):
    from torch.utils.data import DataLoader

    workers = 0 if getattr(ds, "in_memory", False) else cfg["workers"]
    g = torch.Generator()
    g.manual_seed(seed)  # the loader's own generator: it never touches the global RNG
    return DataLoader(
        ds,
        batch_size=batch,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=ctx.device.type == "cuda",
        drop_last=drop_last,
        worker_init_fn=_worker_init if workers > 0 else None,
        generator=g,
    )


def _default_out(cfg: dict, data_name: str) -> str:
    stem = "-".join(
        s.replace(":", "_").replace("/", "_")
        for s in (cfg["model"], cfg["attn"], data_name)
        if s
    )
    out = Path("runs") / stem
    i = 1
    while out.exists() and any(out.iterdir()):
        out = Path("runs") / f"{stem}-{i}"
        i += 1
    return str(out)


def _read_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.json"
    if not path.is_file():
        raise UsageError(f"{run_dir} is not a training run (no config.json)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is corrupt ({exc})") from None
    if not isinstance(cfg, dict) or "settings" not in cfg:
        model = cfg.get("model") if isinstance(cfg, dict) else None
        if isinstance(model, str) and "noise" in cfg:  # train-denoiser's flat config
            raise UsageError(
                f"{run_dir} is a denoiser run (train-denoiser, model {model}), not a "
                f"classifier run: use `spatial-attention denoise IN --out OUT --weights "
                f"{run_dir}`, or `train-denoiser --resume {run_dir}`"
            )
        raise UsageError(f"{run_dir} is not a classifier run (its config.json has no "
                         "settings)")
    return cfg


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint and stops after the step.

    A second signal falls back to the default behaviour (stop now, no checkpoint).
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        if self.signum is not None:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.signum = signum

    def __enter__(self) -> _StopFlag:
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)


# -- evaluation ---------------------------------------------------------------------------


@torch.no_grad()
def _evaluate(
    model: nn.Module, loader, transform, ctx: Context, num_classes: int, amp: torch.dtype | None
) -> dict[str, Any]:
    """Loss, accuracy and confusion matrix over ``loader`` (summed over ranks)."""
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=ctx.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    unreadable = torch.zeros((), dtype=torch.int64, device=ctx.device)
    for x, y, keys in loader:
        x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
        ok = y >= 0
        unreadable += (~ok).sum()
        if not ok.any():
            continue
        x, y = transform(x[ok], keys[ok.cpu()], 0, train=False), y[ok]
        with _autocast(ctx.device, amp):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
        pred = logits.argmax(1)
        confusion += torch.bincount(y * num_classes + pred, minlength=num_classes**2).view(
            num_classes, num_classes
        )
    for t in (confusion, loss_sum, unreadable):
        _all_reduce(ctx, t)
    n = int(confusion.sum())
    correct = int(confusion.diag().sum())
    return {
        "loss": float(loss_sum) / max(n, 1),
        "acc": correct / max(n, 1),
        "count": n,
        "unreadable": int(unreadable),
        "confusion": confusion.cpu(),
    }


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# -- drawing ------------------------------------------------------------------------------


def _figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _plot_curves(rows: list[dict[str, str]], path: Path) -> None:
    try:
        fig = _figure((11, 3.4))
    except ImportError:
        return
    ep = [int(r["epoch"]) for r in rows]

    def col(key):
        return [float(r[key]) if r.get(key) not in (None, "") else float("nan") for r in rows]

    ax1, ax2, ax3 = fig.subplots(1, 3)
    ax1.plot(ep, col("train_loss"), "o-", label="train")
    ax1.plot(ep, col("val_loss"), "o-", label="val")
    ax1.set(xlabel="epoch", ylabel="loss", title="loss")
    ax2.plot(ep, col("train_acc"), "o-", label="train")
    ax2.plot(ep, col("val_acc"), "o-", label="val")
    if any(r.get("val_acc_ema") not in (None, "") for r in rows):
        ax2.plot(ep, col("val_acc_ema"), "o--", label="val (EMA)")
    ax2.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    ax3.plot(ep, col("images_per_s"), "o-")
    ax3.set(xlabel="epoch", ylabel="images/s", title="throughput")
    for ax in (ax1, ax2):
        ax.legend()
    from matplotlib.ticker import MaxNLocator

    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _plot_confusion(confusion: Tensor, classes: list[str], path: Path, title: str) -> None:
    n = len(classes)
    fig = _figure((1.2 + 0.45 * n, 1.0 + 0.4 * n) if n > 10 else (6.5, 5.5))
    ax = fig.subplots()
    cm = confusion.double()
    rates = cm / cm.sum(1, keepdim=True).clamp_min(1)
    im = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                v = int(confusion[i, j])
                if v:
                    ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), classes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _module_grid(model: nn.Module, module: nn.Module, shape: tuple[int, ...],
                 image_hw: tuple[int, int]) -> tuple[int, int] | None:
    layout = getattr(module, "layout", "map")
    if layout == "map" and len(shape) == 4:
        return shape[-2], shape[-1]
    if layout == "tokens" and len(shape) == 4:
        return shape[1], shape[2]
    if len(shape) == 3:
        n = shape[1]
        if hasattr(model, "grid_size"):
            gh, gw = model.grid_size(*image_hw)
            if gh * gw == n:
                return gh, gw
        r = math.isqrt(n)
        if r * r == n:
            return r, r
    return None


@torch.no_grad()
def write_overlays(
    model: nn.Module,
    dataset,
    transform,
    classes: list[str],
    out_dir: Path,
    count: int,
    device: torch.device,
) -> list[Path]:
    """PNG per validation image: the image and where each mechanism attends.

    Uses :func:`~spatial_attention.capture_attention` and each mechanism's
    ``spatial_map``; mechanisms without a spatial map (channel attention such as SE)
    are skipped. Returns the written paths (none when the model has no mechanism with a
    spatial map, or matplotlib is missing).
    """
    from .capture import attention_modules, capture_attention

    mods = attention_modules(model)
    if not mods or count <= 0 or dataset is None:
        return []
    try:
        _figure((1, 1))
    except ImportError:
        return []
    samples = []
    for i in range(len(dataset)):
        img, label, key = dataset[i]
        if label >= 0:
            samples.append((img, label, key))
        if len(samples) == count:
            break
    if not samples:
        return []
    x8 = torch.stack([s[0] for s in samples])
    keys = torch.tensor([s[2] for s in samples])
    x = transform(x8.to(device), keys, 0, train=False)
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = []
    for name, m in mods:
        def hook(mod, inputs, name=name):
            if inputs and isinstance(inputs[0], Tensor):
                shapes.setdefault(name, tuple(inputs[0].shape))
        hooks.append(m.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with capture_attention(model) as maps:
            logits = model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    H, W = x.shape[-2:]
    panels: list[tuple[str, Tensor]] = []
    for name, m in mods:
        if name not in maps or name not in shapes:
            continue
        grid = _module_grid(model, m, shapes[name], (H, W))
        if grid is None:
            continue
        try:
            smap = type(m).spatial_map(maps[name], grid)  # (B, h, w)
        except ValueError:
            continue  # e.g. channel weights: no spatial map
        if smap.dim() == 3 and smap.shape[0] == len(samples):
            panels.append((name, smap.float().cpu()))
    if not panels:
        return []
    if len(panels) > 6:  # keep the figure readable: evenly spaced, always the last
        pick = np.linspace(0, len(panels) - 1, 6).round().astype(int)
        panels = [panels[i] for i in sorted(set(pick.tolist()))]
    try:
        from .viz import overlay as _overlay
    except ImportError:  # pragma: no cover - viz ships with the package
        _overlay = None
    out_dir.mkdir(parents=True, exist_ok=True)
    pred = logits.argmax(1).cpu()
    written = []
    for b, (img, label, key) in enumerate(samples):
        image = img.permute(1, 2, 0).numpy()  # (H, W, 3) uint8
        fig = _figure((2.2 * (len(panels) + 1), 2.6))
        axes = fig.subplots(1, len(panels) + 1)
        axes[0].imshow(image)
        axes[0].set_title(f"true {classes[label]}\npred {classes[int(pred[b])]}", fontsize=8)
        for ax, (name, smap) in zip(axes[1:], panels, strict=False):
            m = smap[b]
            if _overlay is not None:
                blend = _overlay(image, m.numpy())
            else:
                up = F.interpolate(m[None, None], size=image.shape[:2], mode="bilinear",
                                   align_corners=False)[0, 0]
                up = (up - up.min()) / (up.max() - up.min()).clamp_min(1e-12)
                blend = 0.5 * image / 255.0 + 0.5 * _jet(up.numpy())
            ax.imshow(blend)
            ax.set_title(name, fontsize=7)
        for ax in axes:
            ax.axis("off")
        fig.tight_layout()
        path = out_dir / f"val_{key:05d}.png"
        fig.savefig(path, dpi=100)
        written.append(path)
    return written


def _jet(v: np.ndarray) -> np.ndarray:
    from matplotlib import colormaps

    return colormaps["jet"](v)[..., :3]


# -- training -----------------------------------------------------------------------------

_STOP_AT_STEP = 1000  # a stop code no signal number reaches
#: steps between the loop's reads of device values (progress bar, agreeing on a signal
#: across ranks): each read waits for the device to drain its queue, so a GPU would
#: otherwise idle while the host prepares the next step
_SYNC_EVERY = 16

_CSV_FIELDS = [
    "epoch", "step", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_acc_ema",
    "images_per_s", "epoch_time_s", "unreadable_train", "unreadable_val",
]


def _drop_unreadable(
    x: Tensor, y: Tensor, keys: Tensor
) -> tuple[Tensor, Tensor, Tensor, list[int]]:
    """The readable samples of a loader batch, and the keys of the unreadable ones.

    Runs on the loader's CPU tensors, before the copy to the device, where counting and
    dropping would each wait for the device. A batch with no readable sample comes back
    whole (its images are zeros): every rank still runs forward and backward, so the
    collective calls of DDP stay in step.
    """
    ok = y >= 0
    if bool(ok.all()):
        return x, y, keys, []
    bad = keys[~ok].tolist()
    if not bool(ok.any()):
        return x, y, keys, bad
    return x[ok], y[ok], keys[ok], bad


def _read_metrics(path: Path) -> list[dict[str, str]]:
    from .checkpoint import read_csv_rows

    return read_csv_rows(path)


def _write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    from .checkpoint import write_csv_rows

    write_csv_rows(path, rows, _CSV_FIELDS)


def _gather_rng(ctx: Context) -> list[dict[str, Any]]:
    from .checkpoint import get_rng_state

    mine = get_rng_state()
    if not ctx.distributed:
        return [mine]
    import torch.distributed as dist

    states: list[Any] = [None] * ctx.world
    dist.all_gather_object(states, mine)
    return states


def _resume_checks(explicit: dict[str, Any], saved: dict[str, Any], run_dir: Path) -> None:
    differ = []
    for k, v in explicit.items():
        if k in _RESUME_FREE:
            continue
        if saved.get(k) != v:
            differ.append(f"--{k.replace('_', '-')} {v!r} (the run has {saved.get(k)!r})")
    if differ:
        raise UsageError(
            f"--resume {run_dir}: the run was made with other settings, and changing them "
            "would not continue it exactly: " + "; ".join(differ)
        )


def train(args: argparse.Namespace) -> int:
    """Train (or resume) one run from parsed arguments; returns the exit status."""
    explicit = _absolute_paths(_explicit(args))
    resume = getattr(args, "resume", None)
    saved_run: dict[str, Any] | None = None
    run_dir: Path | None = None
    if resume:
        if resume is True:
            if "out" not in explicit:
                raise UsageError("--resume needs the run directory: --resume RUN_DIR or --out")
            run_dir = Path(explicit["out"])
        else:
            run_dir = Path(resume)
        saved_run = _read_config(run_dir)
        _resume_checks(explicit, saved_run["settings"], run_dir)
        cfg = _resolve({k: v for k, v in explicit.items() if k in _RESUME_FREE},
                       saved_run["settings"])
        cfg["out"] = str(run_dir)
        cfg["stop_at_step"] = explicit.get("stop_at_step")  # never inherited
    else:
        cfg = _resolve(explicit)

    ctx = _init_context(cfg["device"])
    try:
        return _Trainer(cfg, ctx, run_dir, saved_run).fit()
    finally:
        if ctx.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


class _Trainer:
    def __init__(self, cfg: dict, ctx: Context, run_dir: Path | None, saved: dict | None):
        self.cfg, self.ctx, self.saved = cfg, ctx, saved
        self.resuming = saved is not None
        if cfg["batch"] % ctx.world:
            raise UsageError(
                f"--batch {cfg['batch']} (the global batch) is not divisible by the "
                f"{ctx.world} processes"
            )
        if cfg["sync_bn"] and ctx.device.type != "cuda":
            raise UsageError("--sync-bn needs CUDA (torch's SyncBatchNorm has no CPU kernel)")
        if cfg["deterministic"]:
            torch.use_deterministic_algorithms(True, warn_only=True)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        self.progress = cfg["progress"] if cfg["progress"] is not None else sys.stderr.isatty()
        self.progress = self.progress and ctx.main
        self.run_dir = run_dir

    def log(self, msg: str) -> None:
        if self.ctx.main:
            from tqdm import tqdm

            tqdm.write(msg, file=sys.stdout)
            sys.stdout.flush()

    # -- setup ----------------------------------------------------------------------------
    def _setup(self) -> None:
        from .data import BatchTransform, ResumableDistributedSampler, ShardSampler, open_datasets
        from .ema import ModelEma

        cfg, ctx = self.cfg, self.ctx
        _seed_all(cfg["seed"])
        self.train_ds, self.val_ds, info = open_datasets(
            cfg["data"], cfg["val"], cfg["img_size"], cfg["val_split"], seed=cfg["seed"]
        )
        if self.resuming:
            saved = self.saved["data"]
            if saved["classes"] != info.classes or saved["train_size"] != info.train_size:
                raise UsageError(
                    f"--resume: the data changed since the run started (classes "
                    f"{len(saved['classes'])} -> {len(info.classes)}, training images "
                    f"{saved['train_size']} -> {info.train_size})"
                )
            info.mean, info.std = saved["mean"], saved["std"]
        self.info = info
        self.num_classes = len(info.classes)
        if self.run_dir is None:
            out = cfg["out"]
            if out is None:
                out = _agree(ctx, lambda: _default_out(cfg, info.name))
            else:
                def check():
                    p = Path(out)
                    if (p / "config.json").exists():
                        raise UsageError(
                            f"{out} already holds a run; continue it with --resume, or "
                            "choose another --out"
                        )
                    return out
                out = _agree(ctx, check)
            self.run_dir = Path(out)
            cfg["out"] = out
        if ctx.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)

        # model: identical initialisation on every rank, then per-rank RNG streams
        torch.manual_seed(cfg["seed"])
        model_args = _parse_model_args(cfg["model_arg"])
        model = build_model(cfg["model"], self.num_classes, cfg["attn"], cfg["img_size"],
                            model_args)
        self.channels_last = bool(cfg["channels_last"])
        model = model.to(ctx.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if cfg["sync_bn"] and ctx.distributed:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model  # the plain module: state_dict, EMA, overlays
        self.ema = ModelEma(model, cfg["ema"]) if cfg["ema"] > 0 else None
        torch.manual_seed(cfg["seed"] + ctx.rank)
        net: nn.Module = model
        if ctx.distributed:
            net = nn.parallel.DistributedDataParallel(
                model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None
            )
        if cfg["compile"]:
            net = torch.compile(net)
        self.net = net
        self.amp = _amp_dtype(cfg["amp"], ctx.device)

        local_batch = cfg["batch"] // ctx.world
        self.sampler = ResumableDistributedSampler(
            self.train_ds, local_batch, num_replicas=ctx.world, rank=ctx.rank, shuffle=True,
            seed=cfg["seed"], drop_last=True,
        )
        self.steps_per_epoch = self.sampler.batches_per_epoch()
        if self.steps_per_epoch == 0:
            raise UsageError(
                f"--batch {cfg['batch']} is larger than the {len(self.train_ds)} training "
                "images"
            )
        self.train_loader = _loader(self.train_ds, self.sampler, local_batch, cfg, ctx, True,
                                    cfg["seed"])
        self.val_loader = None
        if self.val_ds is not None:
            vs = ShardSampler(len(self.val_ds), ctx.rank, ctx.world)
            self.val_loader = _loader(self.val_ds, vs, max(local_batch, 64), cfg, ctx, False,
                                      cfg["seed"])
        self.transform = BatchTransform(
            info.mean, info.std, seed=cfg["seed"], pad=cfg["pad"], flip=cfg["flip"],
            channels_last=self.channels_last,
        )

        if cfg["opt"] == "sgd":
            self.opt = torch.optim.SGD(_param_groups(model, cfg["wd"]), lr=cfg["lr"],
                                       momentum=cfg["momentum"], nesterov=cfg["momentum"] > 0)
        else:
            self.opt = torch.optim.AdamW(_param_groups(model, cfg["wd"]), lr=cfg["lr"])
        total = cfg["epochs"] * self.steps_per_epoch
        warmup = round(cfg["warmup_epochs"] * self.steps_per_epoch)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, WarmupCosine(min(warmup, total), total, cfg["min_lr"] / cfg["lr"])
        )
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=self.amp == torch.float16)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg["label_smoothing"])

        self.epoch, self.batch_in_epoch, self.global_step = 0, 0, 0
        self.sums = torch.zeros(4, dtype=torch.float64, device=ctx.device)  # loss, ok, n, bad
        self.epoch_time = 0.0
        self.metrics_path = self.run_dir / "metrics.csv"
        self.rows: list[dict[str, Any]] = []
        self.bad_keys: list[int] = []
        if self.resuming:
            self._load()
        self._write_config()

    def _write_config(self) -> None:
        if not self.ctx.main:
            return
        from . import __version__

        n_params = sum(p.numel() for p in self.model.parameters())
        settings = {k: self.cfg[k] for k in DEFAULTS}
        cfg = {
            "settings": settings,
            "data": asdict(self.info),
            "model": {
                "name": self.cfg["model"],
                "attn": self.cfg["attn"],
                "kwargs": _parse_model_args(self.cfg["model_arg"]),
                "num_classes": self.num_classes,
                "params": n_params,
            },
            "world_size": self.ctx.world,
            "local_batch": self.cfg["batch"] // self.ctx.world,
            "steps_per_epoch": self.steps_per_epoch,
            "device": str(self.ctx.device),
            "amp": str(self.amp).replace("torch.", "") if self.amp else "off",
            "channels_last": self.channels_last,
            "versions": {"spatial_attention": __version__, "torch": torch.__version__},
        }
        _write_json(self.run_dir / "config.json", cfg)

    # -- checkpoints -------------------------------------------------------------------------
    def _save(self, finished: bool = False) -> None:
        from .checkpoint import CHECKPOINT_DIR, save_checkpoint

        rng = _gather_rng(self.ctx)
        sums = _all_reduce(self.ctx, self.sums.clone())
        if not self.ctx.main:
            return
        state = {
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "global_step": self.global_step,
            "steps_per_epoch": self.steps_per_epoch,
            "world_size": self.ctx.world,
            "finished": finished,
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng,
            "sums": sums.cpu(),
            "epoch_time": self.epoch_time,
            "ema_updates": self.ema.updates if self.ema is not None else 0,
        }
        meta = {
            "model": self.cfg["model"],
            "attn": str(self.cfg["attn"]),
            "epoch": str(self.epoch),
            "global_step": str(self.global_step),
        }
        save_checkpoint(
            self.run_dir / CHECKPOINT_DIR,
            self.model.state_dict(),
            state,
            self.ema.state_dict() if self.ema is not None else None,
            metadata=meta,
        )

    def _load(self) -> None:
        from .checkpoint import (
            CHECKPOINT_DIR,
            check_state_dict,
            load_state,
            load_weights,
            read_weights,
            set_rng_state,
        )

        ckpt = self.run_dir / CHECKPOINT_DIR
        if not ckpt.is_dir():
            raise UsageError(f"--resume: {self.run_dir} has no checkpoint/ to resume from")
        state = load_state(ckpt / "state.pt")
        load_weights(self.model, ckpt / "model.safetensors")
        if self.ema is not None:
            ema_state = read_weights(ckpt / "ema.safetensors")
            check_state_dict(self.ema.state_dict(), ema_state, f"checkpoint {ckpt}/ema")
            self.ema.load_state_dict(ema_state, state["ema_updates"])
        if state["steps_per_epoch"] != self.steps_per_epoch:
            raise UsageError(
                f"--resume: {state['steps_per_epoch']} steps per epoch in the checkpoint, "
                f"{self.steps_per_epoch} now (did the data or --batch change?)"
            )
        try:
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise UsageError(f"--resume: optimizer state does not fit the model ({exc})") from None
        rng = state["rng"]
        if len(rng) != self.ctx.world:
            self.log(f"note: resuming {len(rng)}-process RNG state with {self.ctx.world} "
                     "processes; the result will not match an uninterrupted run bit for bit")
        set_rng_state(rng[self.ctx.rank % len(rng)])
        self.epoch = state["epoch"]
        self.batch_in_epoch = state["batch_in_epoch"]
        self.global_step = state["global_step"]
        self.finished = state["finished"]
        if self.ctx.main:
            self.sums = state["sums"].to(self.ctx.device)
            self.epoch_time = state["epoch_time"]
        self.rows = [r for r in _read_metrics(self.metrics_path)
                     if int(r["epoch"]) <= self.epoch]

    # -- the loop ---------------------------------------------------------------------------
    def fit(self) -> int:
        self.finished = False
        self._setup()
        cfg, ctx = self.cfg, self.ctx
        if self.resuming and (self.finished or self.epoch >= cfg["epochs"]):
            self.log(f"{self.run_dir}: already finished ({cfg['epochs']} epochs)")
            return 0
        n_params = sum(p.numel() for p in self.model.parameters())
        verb = "resuming" if self.resuming else "training"
        where = (f"epoch {self.epoch + 1} step {self.batch_in_epoch}"
                 if self.resuming else f"{cfg['epochs']} epochs")
        self.log(
            f"{verb} {cfg['model']}" + (f" + {cfg['attn']}" if cfg["attn"] else "")
            + f" ({n_params / 1e6:.2f}M params) on {self.info.name} "
            f"({self.info.train_size} train / {self.info.val_size} val, "
            f"{self.num_classes} classes), {where}, batch {cfg['batch']}"
            + (f" over {ctx.world} processes" if ctx.distributed else "")
            + f", {ctx.device}" + (f", {str(self.amp)[6:]}" if self.amp else "")
            + f" -> {self.run_dir}"
        )
        for note in self.info.notes:
            self.log(f"note: {note}")
        if ctx.main and not self.resuming:
            _write_metrics(self.metrics_path, [])
        with _StopFlag() as stop:
            status = self._loop(stop)
        if status is not None:
            return status
        self._finish()
        return 0

    def _loop(self, stop: _StopFlag) -> int | None:
        from tqdm import tqdm

        epochs = self.cfg["epochs"]
        ebar = tqdm(total=epochs, initial=self.epoch, desc="epochs", position=0,
                    disable=not self.progress, dynamic_ncols=True)
        try:
            while self.epoch < epochs:
                status = self._train_epoch(stop)
                if status is not None:
                    return status
                self._end_epoch()
                ebar.update(1)
        finally:
            ebar.close()
        return None

    def _should_stop(self, stop: _StopFlag) -> int:
        """0: go on; else a signal number or _STOP_AT_STEP, the same on every rank."""
        at_step = (self.cfg["stop_at_step"] is not None
                   and self.global_step >= self.cfg["stop_at_step"])
        if not self.ctx.distributed:
            return stop.signum or (_STOP_AT_STEP if at_step else 0)
        # A signal may reach the ranks a step apart, so they agree on it, but only every
        # _SYNC_EVERY steps and at the end of an epoch: the agreement is a collective and
        # a read-back. --stop-at-step needs none, every rank counts the same steps.
        if self.global_step % _SYNC_EVERY and self.batch_in_epoch != self.steps_per_epoch:
            return _STOP_AT_STEP if at_step else 0
        import torch.distributed as dist

        t = torch.tensor([stop.signum or 0], dtype=torch.int64, device=self.ctx.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t) or (_STOP_AT_STEP if at_step else 0)

    def _train_epoch(self, stop: _StopFlag) -> int | None:
        from tqdm import tqdm

        cfg, ctx = self.cfg, self.ctx
        self.net.train()
        self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
        bar = tqdm(total=self.steps_per_epoch, initial=self.batch_in_epoch,
                   desc=f"epoch {self.epoch + 1}/{cfg['epochs']}", position=1, leave=False,
                   disable=not self.progress, dynamic_ncols=True)
        t0 = time.perf_counter()
        seen = 0
        try:
            for x, y, keys in self.train_loader:
                self._step(x, y, keys)
                self.batch_in_epoch += 1
                self.global_step += 1
                seen += len(y) * ctx.world
                if self.progress:
                    if (self.batch_in_epoch % _SYNC_EVERY == 0
                            or self.batch_in_epoch == self.steps_per_epoch):
                        dt = time.perf_counter() - t0
                        s = self.sums.tolist()
                        bar.set_postfix(loss=f"{s[0] / max(s[2], 1):.3f}",
                                        acc=f"{s[1] / max(s[2], 1):.3f}",
                                        img_s=f"{seen / max(dt, 1e-9):.0f}", refresh=False)
                    bar.update(1)
                code = self._should_stop(stop)
                if code:
                    self.epoch_time += time.perf_counter() - t0
                    return self._interrupt(code)
        finally:
            bar.close()
        self.epoch_time += time.perf_counter() - t0
        return None

    def _step(self, x: Tensor, y: Tensor, keys: Tensor) -> None:
        ctx = self.ctx
        x, y, keys, bad = _drop_unreadable(x, y, keys)
        n_bad = len(bad)
        all_bad = n_bad == len(y)
        if n_bad and len(self.bad_keys) < 10:
            self.bad_keys += bad
        x = x.to(ctx.device, non_blocking=True)
        y = y.to(ctx.device, non_blocking=True)
        x = self.transform(x, keys, self.epoch, train=True)
        with _autocast(ctx.device, self.amp):
            logits = self.net(x)
            if all_bad:
                loss = logits.sum() * 0.0  # keep the collective calls of DDP in step
            else:
                loss = self.criterion(logits.float(), y)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg["clip_grad"] > 0:
            self.scaler.unscale_(self.opt)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg["clip_grad"])
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        if self.ema is not None:
            self.ema.update(self.model)
        # Sums stay on the device, read back only by the progress bar, _end_epoch and
        # _save. Python numbers go in as kernel arguments: torch.tensor(n, device=...)
        # would be a blocking copy. The adds are the float64 adds of one stacked update.
        with torch.no_grad():
            if not all_bad:
                nb = len(y)
                self.sums[:2] += torch.stack([loss.detach().double() * nb,
                                              (logits.argmax(1) == y).sum().double()])
                self.sums[2] += nb
            self.sums[3] += n_bad

    def _interrupt(self, code: int) -> int:
        self._save()
        if code == _STOP_AT_STEP:
            self.log(f"stopped at step {self.global_step} (--stop-at-step); checkpoint in "
                     f"{self.run_dir}/checkpoint; continue with --resume {self.run_dir}")
            return 0
        name = signal.Signals(code).name
        self.log(f"{name}: saved a checkpoint at epoch {self.epoch + 1} step "
                 f"{self.batch_in_epoch}; continue with --resume {self.run_dir}")
        return 128 + code

    def _end_epoch(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        sums = _all_reduce(ctx, self.sums.clone()).tolist()
        row: dict[str, Any] = {
            "epoch": self.epoch + 1,
            "step": self.global_step,
            "lr": f"{self.sched.get_last_lr()[0]:.6g}",
            "train_loss": f"{sums[0] / max(sums[2], 1):.6f}",
            "train_acc": f"{sums[1] / max(sums[2], 1):.6f}",
            "unreadable_train": int(sums[3]),
            "images_per_s": f"{sums[2] / max(self.epoch_time, 1e-9):.1f}",
            "epoch_time_s": f"{self.epoch_time:.2f}",
        }
        msg = (f"epoch {self.epoch + 1}/{cfg['epochs']}  loss {row['train_loss'][:6]}  "
               f"acc {float(row['train_acc']):.4f}")
        if ctx.distributed:  # BatchNorm statistics: rank 0's, as in the checkpoint
            import torch.distributed as dist

            for b in self.model.buffers():
                dist.broadcast(b, 0)
        if self.val_loader is not None:
            # the plain module: DDP's forward would make collective calls, and the
            # ranks' shards may differ in length by one batch
            ev = _evaluate(self.model, self.val_loader, self.transform, ctx,
                           self.num_classes, self.amp)
            row.update(val_loss=f"{ev['loss']:.6f}", val_acc=f"{ev['acc']:.6f}",
                       unreadable_val=ev["unreadable"])
            msg += f"  val_loss {ev['loss']:.4f}  val_acc {ev['acc']:.4f}"
            if self.ema is not None:
                ev_ema = _evaluate(self.ema.module, self.val_loader, self.transform, ctx,
                                   self.num_classes, self.amp)
                row["val_acc_ema"] = f"{ev_ema['acc']:.6f}"
                msg += f"  val_acc_ema {ev_ema['acc']:.4f}"
            if ev["unreadable"]:
                msg += f"  ({ev['unreadable']} unreadable val images skipped)"
        msg += f"  {row['images_per_s']} img/s  {self.epoch_time:.1f}s"
        if sums[3]:
            msg += f"  ({int(sums[3])} unreadable training images skipped)"
        self.log(msg)
        if sums[3] and ctx.main and self.bad_keys:
            names = [self.train_ds.describe(k) for k in self.bad_keys[:3]]
            self.log("  unreadable, e.g.: " + ", ".join(names))
        self.bad_keys = []
        self.epoch += 1
        self.batch_in_epoch = 0
        self.sums.zero_()
        self.epoch_time = 0.0
        if ctx.main:
            self.rows.append(row)
            _write_metrics(self.metrics_path, self.rows)
            _plot_curves(self.rows, self.run_dir / "curves.png")
        self._save(finished=self.epoch >= cfg["epochs"])

    def _finish(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        if not ctx.main:
            return
        last = self.rows[-1] if self.rows else {}
        msg = f"done: {self.run_dir}"
        if last.get("val_acc"):
            msg += f"  val_acc {float(last['val_acc']):.4f}"
        self.log(msg)
        model = self.ema.module if self.ema is not None else self.model
        paths = write_overlays(model, self.val_ds, self.transform, self.info.classes,
                               self.run_dir / "attention", cfg["overlays"], ctx.device)
        if paths:
            self.log(f"attention overlays: {self.run_dir / 'attention'} ({len(paths)} images)")
        elif cfg["overlays"] > 0 and self.val_ds is not None:
            from .capture import attention_modules

            if attention_modules(model):
                self.log("no attention overlays: the model's mechanisms record no spatial map "
                         "(channel attention)")


def run(args: argparse.Namespace) -> int:
    """``spatial-attention train``."""
    return train(args)


# -- evaluate -----------------------------------------------------------------------------


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``spatial-attention evaluate``."""
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a directory made by train")
    parser.add_argument("--data", help="evaluate on this folder/tar instead of the run's "
                        "validation set")
    parser.add_argument("--weights", choices=("auto", "model", "ema"), default="auto",
                        help="auto: the EMA weights when the run kept them")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--overlays", type=int, default=8,
                        help="attention overlays of this many images (0: none)")


def evaluate_run(
    run_dir: str | os.PathLike,
    data: str | None = None,
    weights: str = "auto",
    batch: int = 256,
    workers: int = 2,
    device: str = "auto",
    overlays: int = 8,
) -> dict[str, Any]:
    """Accuracy, per-class accuracy and confusion matrix of a trained run.

    Writes ``eval.json``, ``confusion.png`` and ``attention/`` into ``run_dir`` and
    returns the contents of ``eval.json``.
    """
    from .checkpoint import CHECKPOINT_DIR, load_weights
    from .data import BatchTransform, ShardSampler, _open_one, open_datasets

    run_dir = Path(run_dir)
    cfg = _read_config(run_dir)
    s = _resolve({}, cfg["settings"])
    ctx = Context(device=_resolve_device(device, 0))
    classes = cfg["data"]["classes"]
    if data is None:
        _, val_ds, _ = open_datasets(s["data"], s["val"], s["img_size"], s["val_split"],
                                     seed=s["seed"])
        if val_ds is None:
            raise UsageError(f"{run_dir} was trained without a validation set; pass --data")
        source = cfg["data"]["val"]
    else:
        p = Path(data).expanduser()
        if not p.exists():
            raise UsageError(f"data path {data} does not exist")
        val_ds = _open_one(p, s["img_size"])
        if val_ds.classes != classes:
            raise UsageError(f"{data}: its classes {val_ds.classes[:5]}... differ from the run's")
        source = str(p.resolve())
    mcfg = cfg["model"]
    model = build_model(mcfg["name"], mcfg["num_classes"], mcfg["attn"], s["img_size"],
                        mcfg["kwargs"])
    ckpt = run_dir / CHECKPOINT_DIR
    which = weights
    if which == "auto":
        which = "ema" if (ckpt / "ema.safetensors").is_file() else "model"
    load_weights(model, ckpt / f"{which}.safetensors")
    model.to(ctx.device).eval()
    transform = BatchTransform(cfg["data"]["mean"], cfg["data"]["std"])
    loader = _loader(val_ds, ShardSampler(len(val_ds)), batch, {"workers": workers}, ctx,
                     False, 0)
    ev = _evaluate(model, loader, transform, ctx, len(classes), None)
    cm = ev["confusion"]
    per_class = (cm.diag().double() / cm.sum(1).double().clamp_min(1)).tolist()
    result = {
        "run": str(run_dir),
        "weights": which,
        "data": source,
        "images": ev["count"],
        "unreadable": ev["unreadable"],
        "accuracy": ev["acc"],
        "loss": ev["loss"],
        "per_class_accuracy": dict(zip(classes, per_class, strict=True)),
        "confusion": cm.tolist(),
        "classes": classes,
    }
    _write_json(run_dir / "eval.json", result)
    try:
        _plot_confusion(cm, classes, run_dir / "confusion.png",
                        f"{mcfg['name']}: accuracy {ev['acc']:.4f}")
        result["confusion_png"] = str(run_dir / "confusion.png")
    except ImportError:
        pass
    paths = write_overlays(model, val_ds, transform, classes, run_dir / "attention", overlays,
                           ctx.device)
    result["overlays"] = [str(p) for p in paths]
    return result


def run_evaluate(args: argparse.Namespace) -> int:
    """``spatial-attention evaluate RUN_DIR``."""
    r = evaluate_run(args.run_dir, args.data, args.weights, args.batch, args.workers,
                     args.device, args.overlays)
    print(f"{r['run']}: accuracy {r['accuracy']:.4f} on {r['images']} images "
          f"({r['weights']} weights, {r['data']})")
    if r["unreadable"]:
        print(f"  {r['unreadable']} unreadable images skipped")
    w = max(len(c) for c in r["classes"])
    for c, acc in r["per_class_accuracy"].items():
        print(f"  {c:<{w}}  {acc:.4f}")
    print(f"wrote {Path(r['run']) / 'eval.json'}"
          + (f", {r['confusion_png']}" if "confusion_png" in r else "")
          + (f", {len(r['overlays'])} attention overlays" if r["overlays"] else ""))
    return 0


# -- python -m spatial_attention.train (torchrun) -----------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m spatial_attention.train`` (what torchrun launches)."""
    parser = argparse.ArgumentParser(
        prog="python -m spatial_attention.train",
        description="Train an image classifier (the options of `spatial-attention train`).",
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return train(args)
    except (UsageError, ValueError, FileNotFoundError) as exc:
        if int(os.environ.get("RANK", "0")) == 0:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
