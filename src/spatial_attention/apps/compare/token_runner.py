"""One token-mixer run (``compare --tokens``): an entry's :class:`~.token_net.TokenNet`
trained under a fixed :class:`TokenProtocol`, resumable.

The recipe is a short-schedule transformer one: AdamW (betas 0.9/0.999) at ``lr`` per
512 images scaled linearly to the batch, weight decay 0.05 on parameters of two or more
dimensions only (weight matrices, kernels, position tables; norms and biases take none),
a linear warm-up over the first ``warmup_fraction`` of the steps then a cosine decay to
0, label smoothing 0.1 on the mean loss, no test-time augmentation by default. The data
side is the CNN protocol's, unchanged: the same uint8 cache, the same per-(seed, epoch)
batch order and translations (:func:`~.data.epoch_batches`), the same alternating flips
and on-device :func:`~.data.augment`, the same seed rules (the seed sets the initial
weights and the data order). Checkpoints (model, optimizer, RNG, counters; no weight
average) are written at every epoch end with the CNN runner's helpers, so a resumed run
continues bit for bit; ``result.json`` is the CNN protocol's :class:`~.runner.RunResult`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...checkpoint import read_weights
from ..training.checkpoints import (
    CHECKPOINT_DIR,
    get_rng_state,
    load_state,
    save_checkpoint,
    set_rng_state,
)
from .data import Cifar, augment, epoch_batches, flip_mask, normalise
from .runner import (
    TTA_MODES,
    RunResult,
    _stats,
    _sync,
    finish_run,
    read_result,
)
from .token_net import TokenNet

__all__ = ["TokenProtocol", "TOKEN_PRESETS", "TOKEN_RECIPE", "train_token_run",
           "build_token_model"]

#: version of what the fields of :class:`TokenProtocol` do not say
TOKEN_RECIPE = 1


@dataclass(frozen=True)
class TokenProtocol:
    """Everything that defines the token benchmark's budget; the same for every entry."""

    epochs: int = 3
    dims: tuple[int, ...] = (64, 128, 256)
    heads: tuple[int, ...] = (2, 4, 8)
    depths: tuple[int, ...] = (2, 2, 2)
    mlp_ratio: float = 2.0
    batch_size: int = 256
    lr: float = 2e-3             # per 512 images, scaled linearly to batch_size
    weight_decay: float = 0.05
    warmup_fraction: float = 0.1
    label_smoothing: float = 0.1
    translate: int = 2
    train_subset: int | None = None
    test_subset: int | None = None
    tta: str = "none"
    recipe: int = TOKEN_RECIPE
    net: str = "tokens"

    def __post_init__(self) -> None:
        if self.tta not in TTA_MODES:
            raise ValueError(f"tta must be one of {', '.join(TTA_MODES)}, got {self.tta!r}")
        for key in ("dims", "heads", "depths"):
            object.__setattr__(self, key, tuple(int(v) for v in getattr(self, key)))
        if not len(self.dims) == len(self.heads) == len(self.depths):
            raise ValueError("token protocol: dims, heads and depths need one value per stage")

    @property
    def tta_label(self) -> str:
        return TTA_MODES[self.tta][0]

    @property
    def widths(self) -> tuple[int, ...]:
        return self.dims

    def describe(self) -> str:
        dims = "/".join(map(str, self.dims))
        return (f"token mixers, {self.epochs} epochs, dims {dims} depths "
                f"{'/'.join(map(str, self.depths))}, AdamW, batch {self.batch_size}, "
                f"{self.tta_label}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TokenProtocol:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


#: CPU: 3 epochs of the default network, chosen so one ``global`` run fits the issue's
#: 20-minute budget on two quiet cores (the measurement: benchmarks/compare/README.md);
#: GPU: the same network, a longer schedule (no other change, as for the CNN presets)
TOKEN_PRESETS = {
    "cpu": TokenProtocol(),
    "gpu": TokenProtocol(epochs=40, batch_size=512),
}


def build_token_model(entry: str, p: TokenProtocol, n_classes: int, seed: int,
                      device: torch.device) -> TokenNet:
    torch.manual_seed(seed)
    return TokenNet(entry, p.dims, p.heads, p.depths, p.mlp_ratio, n_classes).to(device)


def _optimizer(model: nn.Module, p: TokenProtocol) -> torch.optim.AdamW:
    lr = p.lr * p.batch_size / 512
    decay = [q for q in model.parameters() if q.requires_grad and q.ndim >= 2]
    plain = [q for q in model.parameters() if q.requires_grad and q.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": p.weight_decay, "initial_lr": lr},
         {"params": plain, "weight_decay": 0.0, "initial_lr": lr}], lr=lr)


def _lr_factor(step: int, total: int, warmup_fraction: float) -> float:
    warm = max(1, int(total * warmup_fraction))
    if step < warm:
        return (step + 1) / warm
    f = (step - warm) / max(1, total - warm)
    return 0.5 * (1 + math.cos(math.pi * f))


def train_token_run(
    run_dir: str | Path,
    entry: str,
    seed: int,
    protocol: TokenProtocol,
    data: Cifar,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
    stop_after_epochs: int | None = None,
) -> RunResult | None:
    """Train (or finish, or skip) one token run; as :func:`~.runner.train_run`."""
    run_dir = Path(run_dir)
    device = torch.device(device)
    p = protocol
    steps_per_epoch = len(data.train_y) // p.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"compare: {len(data.train_y)} training images is less than one "
                         f"batch of {p.batch_size}")
    total = steps_per_epoch * p.epochs
    done = read_result(run_dir)
    if done is not None:
        if progress:
            progress(total)
        return RunResult(**done)

    mean, std = (t.to(device) for t in _stats(data))
    model = build_token_model(entry, p, len(data.classes), seed, device)
    opt = _optimizer(model, p)
    epoch, step, train_seconds, losses = 0, 0, 0.0, []
    ckpt = run_dir / CHECKPOINT_DIR
    if (ckpt / "state.pt").is_file():
        state = load_state(ckpt / "state.pt")
        model.load_state_dict(read_weights(ckpt / "model.safetensors"))
        opt.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        epoch, step = int(state["epoch"]), int(state["step"])
        train_seconds, losses = float(state["train_seconds"]), list(state["losses"])
        if progress:
            progress(step)

    flips = flip_mask(len(data.train_y), seed, 0).to(device)
    while epoch < p.epochs:
        if stop_after_epochs is not None and epoch >= stop_after_epochs:
            return None
        model.train()
        epoch_flips = flips ^ bool(epoch % 2)
        loss_sum = torch.zeros((), device=device)
        _sync(device)
        t0 = time.perf_counter()
        for idx, dy, dx in epoch_batches(len(data.train_y), p.batch_size, seed, epoch,
                                         p.translate):
            idx = idx.to(device)
            xb = augment(normalise(data.train_x[idx], mean, std), dy, dx, epoch_flips[idx],
                         p.translate)
            yb = data.train_y[idx]
            factor = _lr_factor(step, total, p.warmup_fraction)
            for g in opt.param_groups:
                g["lr"] = g["initial_lr"] * factor
            loss = F.cross_entropy(model(xb), yb, label_smoothing=p.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_sum += loss.detach()
            if progress:
                progress(1)
        _sync(device)
        train_seconds += time.perf_counter() - t0
        losses.append(float(loss_sum) / steps_per_epoch)
        epoch += 1
        state = {"optimizer": opt.state_dict(), "rng": get_rng_state(), "epoch": epoch,
                 "step": step, "train_seconds": train_seconds, "losses": losses}
        save_checkpoint(ckpt, model.state_dict(), state,
                        metadata={"mechanism": entry, "seed": str(seed)})

    return finish_run(run_dir, model, entry, seed, p, data, mean, std, device, step,
                      train_seconds)
