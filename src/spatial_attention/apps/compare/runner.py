"""One benchmark run: a (mechanism, seed) trained under the fixed protocol, resumable.

The optimisation follows airbench94 (Keller Jordan): Nesterov SGD on the summed,
label-smoothed (0.2) loss with airbench's learning-rate and weight-decay scaling,
BatchNorm shifts at 64x the learning rate, a triangular schedule (0.2 -> 1 over the
first 23% of steps, then down to 0.07), the whitening bias trained for the first 3
epochs only, and lookahead: every 5 steps the weights are pulled towards (and replaced
by) a slow average whose pull grows as ``0.95^5 (t/T)^3``; the final weights are the
average. Evaluation is on the whole test set with airbench's test-time augmentation
by default: the image and its mirror (weight 1/2 together), and both of them shifted
by one pixel up-left and down-right with reflect padding (1/4 for each shift); see
:data:`TTA_MODES`.

A run writes ``checkpoint/`` (model, lookahead average, optimizer, RNG, epoch and
time counters) atomically at every epoch end, and ``result.json`` when done. Since the
data order and augmentation are functions of ``(seed, epoch)`` and every other state
is in the checkpoint, a resumed run continues bit for bit.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...checkpoint import read_weights
from ..training.checkpoints import (
    CHECKPOINT_DIR,
    get_rng_state,
    load_state,
    save_checkpoint,
    set_rng_state,
)
from .data import Cifar, augment, epoch_batches, flip_mask, normalise
from .net import CompareNet, whitening_sample, whitening_weights

__all__ = ["Protocol", "PRESETS", "RunResult", "train_run", "evaluate", "count_macs",
           "TTA_MODES", "RECIPE"]

RESULT_NAME = "result.json"

#: test-time augmentation: name -> (label for tables, number of forward passes per image)
TTA_MODES = {
    "none": ("no TTA", 1),
    "flip": ("flip TTA", 2),
    "flip_translate": ("flip + 1-px translate TTA", 6),
}

#: version of what the fields below do not say (initialisation, data sample): 1 fitted
#: the whitening to the first 5,000 cached images (one class) with a random whitening
#: bias; 2 fits it to a fixed random 5,000 and zeroes the bias, as airbench does. An
#: output folder holding runs of one recipe refuses another.
RECIPE = 2


@dataclass(frozen=True)
class Protocol:
    """Everything that defines the budget; identical for every entry of a comparison."""

    epochs: int = 6
    width: float = 0.5
    batch_size: int = 1024
    lr: float = 11.5             # per 1024 images of summed loss (airbench's unit)
    momentum: float = 0.85
    weight_decay: float = 0.0153
    bias_scaler: float = 64.0
    label_smoothing: float = 0.2
    whiten_bias_epochs: int = 3
    warmup_fraction: float = 0.23
    translate: int = 2
    lookahead_every: int = 5
    train_subset: int | None = None
    test_subset: int | None = None
    tta: str = "flip_translate"
    recipe: int = RECIPE

    def __post_init__(self) -> None:
        if self.tta not in TTA_MODES:
            raise ValueError(f"tta must be one of {', '.join(TTA_MODES)}, got {self.tta!r}")

    @property
    def tta_label(self) -> str:
        return TTA_MODES[self.tta][0]

    def describe(self) -> str:
        return (f"{self.epochs} epochs, width x{self.width:g} {self.widths}, batch "
                f"{self.batch_size}, {self.tta_label}")

    @property
    def widths(self) -> tuple[int, ...]:
        return CompareNet("none", self.width).widths

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Protocol:
        names = {f.name for f in fields(cls)}
        kept = {k: v for k, v in d.items() if k in names}
        kept.setdefault("recipe", 1)  # written before the field existed
        return cls(**kept)


#: CPU: half width, chosen to fit the time budget; GPU: airbench94's full width and a
#: longer schedule (no other change, so the two presets differ only in scale)
PRESETS = {
    "cpu": Protocol(),
    "gpu": Protocol(epochs=16, width=1.0),
}


@dataclass
class RunResult:
    mechanism: str
    seed: int
    accuracy: float
    train_seconds: float
    epochs: int
    params: int
    macs: int
    train_img_s: float
    infer_img_s: float
    peak_mem_mb: float
    device: str
    threads: int

    def to_row(self) -> dict[str, Any]:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _lr_factor(step: int, total: int, warmup_fraction: float) -> float:
    warm = max(1, int(total * warmup_fraction))
    if step < warm:
        f = step / warm
        return 0.2 * (1 - f) + 1.0 * f
    f = (step - warm) / max(1, total - warm)
    return 1.0 * (1 - f) + 0.07 * f


class Lookahead:
    """A slow copy of every float tensor of the state (BN statistics included)."""

    def __init__(self, model: nn.Module) -> None:
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                slow = self.state[k]
                slow.lerp_(v, 1 - decay)
                v.copy_(slow)


def _optimizer(model: CompareNet, p: Protocol) -> torch.optim.SGD:
    # airbench's units: lr and wd are per 1024 images of a summed loss, made independent
    # of the momentum's effective step multiplier 1/(1 - momentum)
    scale = 1024 * (1 + 1 / (1 - p.momentum))
    lr = p.lr / scale
    wd = p.weight_decay * p.batch_size / scale
    lr_bias = lr * p.bias_scaler
    biases = model.norm_biases()
    ids = {id(b) for b in biases}
    others = [q for q in model.parameters() if q.requires_grad and id(q) not in ids]
    groups = [
        {"params": biases, "lr": lr_bias, "weight_decay": wd / lr_bias, "initial_lr": lr_bias},
        {"params": others, "lr": lr, "weight_decay": wd / lr, "initial_lr": lr},
    ]
    return torch.optim.SGD(groups, momentum=p.momentum, nesterov=True)


def build_model(mechanism: str, p: Protocol, data: Cifar, mean: Tensor, std: Tensor,
                seed: int, device: torch.device) -> CompareNet:
    torch.manual_seed(seed)
    model = CompareNet(mechanism, p.width, len(data.classes))
    # the whitening comes from a fixed sample of 5,000 training images, so it is the
    # same for every mechanism and seed (see whitening_sample: not the first 5,000)
    pick = whitening_sample(len(data.train_y)).to(data.train_x.device)
    sample = normalise(data.train_x[pick], mean, std).cpu()
    model.whiten.weight.data.copy_(whitening_weights(sample))
    return model.to(device)


def tta_logits(model: nn.Module, xb: Tensor, tta: str) -> Tensor:
    """The logits of a normalised batch under one of :data:`TTA_MODES`."""
    if tta == "none":
        return model(xb)

    def mirrored(v: Tensor) -> Tensor:
        return 0.5 * (model(v) + model(v.flip(-1)))

    logits = mirrored(xb)
    if tta == "flip":
        return logits
    # airbench's level 2: the unshifted pair counts 1/2, each one-pixel shift 1/4
    h, w = xb.shape[-2:]
    padded = F.pad(xb, (1, 1, 1, 1), mode="reflect")
    # the two diagonal one-pixel shifts (content moved down-right, then up-left)
    shifted = mirrored(padded[..., 0:h, 0:w]) + mirrored(padded[..., 2:h + 2, 2:w + 2])
    return 0.5 * logits + 0.25 * shifted


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, mean: Tensor, std: Tensor,
             batch: int = 1000, tta: str = "flip_translate") -> tuple[float, float]:
    """``(accuracy, images per second)`` under ``tta`` (every view counted as an image)."""
    model.eval()
    correct = 0
    device = next(model.parameters()).device
    _sync(device)
    t0 = time.perf_counter()
    for i in range(0, len(y), batch):
        logits = tta_logits(model, normalise(x[i:i + batch], mean, std), tta)
        correct += int((logits.argmax(1) == y[i:i + batch]).sum())
    _sync(device)
    seconds = time.perf_counter() - t0
    return correct / len(y), TTA_MODES[tta][1] * len(y) / max(seconds, 1e-9)


def count_macs(model: nn.Module, device: torch.device) -> int:
    """Multiply-adds of one image's forward pass (eval mode)."""
    from ..bench.flops import count_flops

    model.eval()
    x = torch.zeros(2, 3, 32, 32, device=device)
    with torch.no_grad():
        flops, _ = count_flops(model, x)
    return int(flops) // 4  # 2 FLOPs per multiply-add, 2 images


def _peak_memory_mb(model: nn.Module, xb: Tensor, yb: Tensor, smoothing: float) -> float:
    """Tensor bytes at the peak of one training step (weights, input, activations,
    gradients) on a copy, so the run's own state is untouched."""
    from ..bench.memory import peak_memory_bytes

    twin = copy.deepcopy(model).train()

    def step() -> None:
        loss = F.cross_entropy(twin(xb), yb, label_smoothing=smoothing, reduction="sum")
        loss.backward()

    tensors = list(twin.parameters()) + list(twin.buffers()) + [xb]
    return peak_memory_bytes(step, xb.device, tensors) / 2**20


def _stats(data: Cifar) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std of the training images in [0, 1] units, accumulated in
    float64 over chunks (a float copy of all 50,000 images would be 600 MB)."""
    s = torch.zeros(3, dtype=torch.float64, device=data.train_x.device)
    s2 = torch.zeros_like(s)
    for i in range(0, len(data.train_x), 5000):
        x = data.train_x[i:i + 5000].double().div_(255)
        s += x.sum(dim=(0, 2, 3))
        s2 += x.square().sum(dim=(0, 2, 3))
    n = data.train_x.numel() // 3
    mean = s / n
    std = ((s2 / n - mean.square()) * n / (n - 1)).sqrt()
    return mean.float(), std.float()


def read_result(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / RESULT_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def train_run(
    run_dir: str | Path,
    mechanism: str,
    seed: int,
    protocol: Protocol,
    data: Cifar,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
    stop_after_epochs: int | None = None,
) -> RunResult | None:
    """Train (or finish, or skip) one run; ``None`` if stopped by ``stop_after_epochs``.

    ``data`` should already be on ``device``. ``progress(n)`` is told of every n steps
    done, including those a resumed run skips.
    """
    run_dir = Path(run_dir)
    device = torch.device(device)
    p = protocol
    done = read_result(run_dir)
    steps_per_epoch = len(data.train_y) // p.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"compare: {len(data.train_y)} training images is less than one "
                         f"batch of {p.batch_size}")
    total = steps_per_epoch * p.epochs
    if done is not None:
        if progress:
            progress(total)
        return RunResult(**done)

    mean, std = (t.to(device) for t in _stats(data))
    model = build_model(mechanism, p, data, mean, std, seed, device)
    opt = _optimizer(model, p)
    slow = Lookahead(model)
    epoch, step, train_seconds, losses = 0, 0, 0.0, []
    ckpt = run_dir / CHECKPOINT_DIR
    if (ckpt / "state.pt").is_file():
        state = load_state(ckpt / "state.pt")
        model.load_state_dict(read_weights(ckpt / "model.safetensors"))
        slow.state = {k: v.to(device) for k, v in read_weights(ckpt / "ema.safetensors").items()}
        opt.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        epoch, step = int(state["epoch"]), int(state["step"])
        train_seconds, losses = float(state["train_seconds"]), list(state["losses"])
        if progress:
            progress(step)

    flips = flip_mask(len(data.train_y), seed, 0).to(device)
    whiten_bias_steps = p.whiten_bias_epochs * steps_per_epoch
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
            # the whitening bias stops training after a few epochs: its set_to_none grad
            # makes SGD skip it (momentum included), as airbench's freeze does
            model.whiten.bias.requires_grad_(step < whiten_bias_steps)
            factor = _lr_factor(step, total, p.warmup_fraction)
            for g in opt.param_groups:
                g["lr"] = g["initial_lr"] * factor
            loss = F.cross_entropy(model(xb), yb, label_smoothing=p.label_smoothing,
                                   reduction="sum")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % p.lookahead_every == 0:
                slow.update(model, 0.95 ** 5 * (step / total) ** 3)
            loss_sum += loss.detach()
            if progress:
                progress(1)
        _sync(device)
        train_seconds += time.perf_counter() - t0
        losses.append(float(loss_sum) / (steps_per_epoch * p.batch_size))
        epoch += 1
        state = {"optimizer": opt.state_dict(), "rng": get_rng_state(), "epoch": epoch,
                 "step": step, "train_seconds": train_seconds, "losses": losses}
        save_checkpoint(ckpt, model.state_dict(), state, ema_state=slow.state,
                        metadata={"mechanism": mechanism, "seed": str(seed)})

    slow.update(model, 1.0)
    return finish_run(run_dir, model, mechanism, seed, p, data, mean, std, device, step,
                      train_seconds)


def finish_run(run_dir: Path, model: nn.Module, mechanism: str, seed: int, p: Any,
               data: Cifar, mean: Tensor, std: Tensor, device: torch.device, step: int,
               train_seconds: float) -> RunResult:
    """Evaluate the final weights, measure cost, write ``result.json`` atomically (shared
    by the CNN and the token protocols; ``p`` has ``tta``, ``batch_size``, ``epochs`` and
    ``label_smoothing``)."""
    accuracy, infer_img_s = evaluate(model, data.test_x, data.test_y, mean, std, tta=p.tta)
    idx = torch.arange(min(p.batch_size, len(data.train_y)), device=device)
    peak = _peak_memory_mb(model, normalise(data.train_x[idx], mean, std),
                           data.train_y[idx], p.label_smoothing)
    result = RunResult(
        mechanism=mechanism, seed=seed, accuracy=accuracy,
        train_seconds=train_seconds, epochs=p.epochs,
        params=sum(q.numel() for q in model.parameters()),
        macs=count_macs(model, device),
        train_img_s=step * p.batch_size / max(train_seconds, 1e-9),
        infer_img_s=infer_img_s, peak_mem_mb=peak, device=str(device),
        threads=torch.get_num_threads(),
    )
    tmp = run_dir / (RESULT_NAME + ".tmp")
    tmp.write_text(json.dumps(result.to_row(), indent=1))
    tmp.replace(run_dir / RESULT_NAME)
    return result


def steps_of(protocol: Protocol, n_train: int) -> int:
    return (n_train // protocol.batch_size) * protocol.epochs
