"""The training and evaluation loops of ``spatial-attention train`` / ``evaluate``.

::

    spatial-attention train                                   # ResNet-10 on builtin:digits
    spatial-attention train --model resnet18_cifar --attn se \\
        --data ../shared/data/cifar10/train.tar --epochs 30 --batch 128 --out runs/se18
    spatial-attention train --out runs/se18 --resume          # continue exactly
    spatial-attention train --resume runs/se18 --epochs 60    # extend: 30 more epochs
    spatial-attention train --init-from runs/se18 --data ...  # a new run from its weights
    torchrun --nproc-per-node 4 -m spatial_attention.train --data ... --batch 512
    spatial-attention evaluate runs/se18

A run directory holds ``config.json`` (every setting, the classes and the
normalisation), ``checkpoint/`` (safetensors weights + a weights-only state file, see
:mod:`.checkpoints`), ``metrics.csv``, ``curves.png`` and, for models
that contain mechanisms, ``attention/`` overlays of a few validation images.

Exact resume: the checkpoint holds the model, optimizer, scheduler, grad scaler, EMA,
the RNG states of every rank and the position in the epoch (epoch, batch). The sample
order of an epoch is a pure function of ``(seed, epoch)`` (DistributedSampler) and the
crop/flip of a sample of ``(seed, epoch, sample)``, so a run stopped at any step (Ctrl-C,
SIGTERM, ``--stop-at-step``) and resumed reaches the same weights as one that never
stopped. ``--resume RUN --epochs N`` with N above the epochs done extends the run: the
warm-up + cosine schedule is recomputed for N epochs and continues from the run's step
(so the learning rate jumps from the old curve to the new one), the metrics rows are
kept, and config.json records the change under ``extensions``. Distributed runs go
through ``torchrun``, which sets ``WORLD_SIZE``/``RANK``:
DistributedDataParallel, a DistributedSampler over the same global batch, logging and
checkpoints on rank 0.

The pieces around the loop live beside it: settings in :mod:`.config`, processes and
devices in :mod:`.distributed`, the network in :mod:`.model`, the run's CSV, figures and
overlays in :mod:`.reporting`, and the command line in :mod:`.cli`.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import UsageError
from .config import (
    _RESUME_FREE,
    DEFAULTS,
    _absolute_paths,
    _default_out,
    _explicit,
    _extension_check,
    _parse_model_args,
    _read_config,
    _resolve,
    _resume_checks,
    _write_json,
)
from .distributed import Context, _agree, _all_reduce, _init_context, _resolve_device
from .model import build_model
from .reporting import _plot_confusion, _plot_curves, _read_metrics, _write_metrics, write_overlays

__all__ = ["WarmupCosine", "evaluate_run", "train"]


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


# -- training -----------------------------------------------------------------------------

_STOP_AT_STEP = 1000  # a stop code no signal number reaches
#: steps between the loop's reads of device values (progress bar, agreeing on a signal
#: across ranks): each read waits for the device to drain its queue, so a GPU would
#: otherwise idle while the host prepares the next step
_SYNC_EVERY = 16

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


def _gather_rng(ctx: Context) -> list[dict[str, Any]]:
    from .checkpoints import get_rng_state

    mine = get_rng_state()
    if not ctx.distributed:
        return [mine]
    import torch.distributed as dist

    states: list[Any] = [None] * ctx.world
    dist.all_gather_object(states, mine)
    return states


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
        if "epochs" in explicit:
            _extension_check(explicit["epochs"], saved_run["settings"]["epochs"], run_dir)
        free = {k: v for k, v in explicit.items() if k in _RESUME_FREE or k == "epochs"}
        cfg = _resolve(free, saved_run["settings"])
        cfg["out"] = str(run_dir)
        cfg["stop_at_step"] = explicit.get("stop_at_step")  # never inherited
    else:
        cfg = _resolve(explicit)
        # weights to start from: refused before anything is built or written
        if cfg["init_from"]:
            from .model import resolve_init_source

            resolve_init_source(cfg["init_from"])
        if cfg["pretrained"]:
            if not str(cfg["model"]).startswith("timm:"):
                raise UsageError(f"--pretrained is for timm: models; start {cfg['model']} "
                                 "from weights with --init-from RUN_OR_FILE")
            if not Path(cfg["pretrained"]).expanduser().is_file():
                raise UsageError(f"--pretrained {cfg['pretrained']} does not exist (a local "
                                 "weights file; nothing is ever downloaded)")

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

        # model: identical initialisation on every rank, then per-rank RNG streams
        torch.manual_seed(cfg["seed"])
        model_args = _parse_model_args(cfg["model_arg"])
        # weights to start from: a new run only (a resumed one has its checkpoint)
        fresh = not self.resuming
        model = build_model(cfg["model"], self.num_classes, cfg["attn"], cfg["img_size"],
                            model_args, pretrained=cfg["pretrained"] if fresh else None,
                            log=self.log)
        if fresh and cfg["init_from"]:
            from .model import init_weights_from

            for line in init_weights_from(model, cfg["init_from"]):
                self.log(line)
        if ctx.main:  # once the model is built: a refused one leaves no empty run
            self.run_dir.mkdir(parents=True, exist_ok=True)
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
        self.extensions: list[dict[str, Any]] = list((self.saved or {}).get("extensions", []))
        self.extended: dict[str, Any] | None = None
        if self.resuming:
            self._load()
        self._write_config()

    def _write_config(self) -> None:
        if not self.ctx.main:
            return
        from ... import __version__

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
        if self.extensions:
            cfg["extensions"] = self.extensions
        _write_json(self.run_dir / "config.json", cfg)

    # -- checkpoints -------------------------------------------------------------------------
    def _save(self, finished: bool = False) -> None:
        from .checkpoints import CHECKPOINT_DIR, save_checkpoint

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
        from ...checkpoint import check_state_dict, load_weights, read_weights
        from .checkpoints import CHECKPOINT_DIR, load_state, set_rng_state

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
        self.finished = state["finished"] and self.epoch >= self.cfg["epochs"]
        self._reschedule()
        if self.ctx.main:
            self.sums = state["sums"].to(self.ctx.device)
            self.epoch_time = state["epoch_time"]
        self.rows = [r for r in _read_metrics(self.metrics_path)
                     if int(r["epoch"]) <= self.epoch]

    def _reschedule(self) -> None:
        """After loading: a run resumed with another ``--epochs`` gets the warm-up + cosine
        schedule of the new total, continued from its step (the loaded scheduler state
        carries the old total)."""
        fn = self.sched.lr_lambdas[0]
        total = self.cfg["epochs"] * self.steps_per_epoch
        warmup = min(round(self.cfg["warmup_epochs"] * self.steps_per_epoch), total)
        if (fn.total, fn.warmup) == (total, warmup):
            return
        old_epochs = fn.total // self.steps_per_epoch
        before = self.sched.get_last_lr()[0]
        fn.total, fn.warmup = total, warmup
        step = self.sched.last_epoch  # == global_step: one scheduler step per optimizer step
        for group, base in zip(self.opt.param_groups, self.sched.base_lrs, strict=True):
            group["lr"] = base * fn(step)
        self.sched._last_lr = [g["lr"] for g in self.opt.param_groups]
        self.extended = {"at_step": self.global_step, "at_epoch": self.epoch,
                         "epochs_before": old_epochs, "epochs_after": self.cfg["epochs"],
                         "lr_before": before, "lr_after": self.sched.get_last_lr()[0]}
        self.extensions.append(self.extended)

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
        if self.extended is not None:
            e = self.extended
            self.log(f"extending from {e['epochs_before']} to {e['epochs_after']} epochs at "
                     f"step {e['at_step']}: the warm-up + cosine schedule is recomputed for "
                     f"{e['epochs_after']} epochs from this step (lr {e['lr_before']:.3g} -> "
                     f"{e['lr_after']:.3g})")
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
            from ...capture import attention_modules

            if attention_modules(model):
                self.log("no attention overlays: the model's mechanisms record no spatial map "
                         "(channel attention)")


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
    from ...checkpoint import load_weights
    from .checkpoints import CHECKPOINT_DIR
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
