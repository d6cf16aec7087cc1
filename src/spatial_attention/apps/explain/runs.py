"""A trained model and the way it reads images, from whatever the user trained.

:func:`load_trained` accepts a classifier run of ``spatial-attention train``
(``config.json`` + ``checkpoint/``), a run of the equal-budget benchmark
(``<out>/runs/<mechanism>/seed<k>/``), or a weights file with a model name. It returns
a :class:`Trained`: the model in eval mode, its class names, and ``prepare`` turning an
``(H, W, 3)`` uint8 image into the normalised ``(1, 3, h, w)`` batch the model was
trained on (resized to its training size: a classifier reads its own resolution; the
maps are drawn back over the image at the user's size).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...checkpoint import load_weights
from ...errors import UsageError

__all__ = ["Trained", "load_trained", "load_run", "load_weights_file", "IMAGENET_STATS",
           "CIFAR10_STATS", "CIFAR10_CLASSES"]

IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
#: used for a benchmark run when its data cache is gone (the cached data's own statistics
#: are used when present; the two differ in the third decimal)
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]


@dataclass
class Trained:
    model: nn.Module
    classes: list[str]
    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    label: str  # what the figures call it, e.g. "cbam seed 0 (compare run)"

    def prepare(self, image: np.ndarray) -> Tensor:
        """``(H, W, 3)`` uint8 -> ``(1, 3, h, w)`` float, resized and normalised."""
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255
        x = F.interpolate(x, size=self.size, mode="bilinear", antialias=True,
                          align_corners=False)
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (x - mean) / std


def _compare_run(run_dir: Path) -> Trained:
    from ..compare.net import CompareNet
    from ..compare.runner import Protocol

    meta = json.loads((run_dir / "result.json").read_text()) if (
        run_dir / "result.json").is_file() else {}
    mechanism = meta.get("mechanism") or run_dir.parent.name
    protocol_file = run_dir.parent.parent.parent / "protocol.json"
    if not protocol_file.is_file():
        raise UsageError(f"{run_dir}: a benchmark run needs {protocol_file} (its protocol)")
    protocol = Protocol.from_json(json.loads(protocol_file.read_text()))
    model = CompareNet(mechanism, protocol.width)
    ckpt = run_dir / "checkpoint"
    # the final weights are the lookahead average (the runner's last step copies it in)
    which = "ema" if (ckpt / "ema.safetensors").is_file() else "model"
    load_weights(model, ckpt / f"{which}.safetensors")
    mean, std = CIFAR10_STATS
    cache = run_dir.parent.parent.parent / "cache"
    if (cache / "cifar10_uint8.pt").is_file():
        from ..compare.runner import _stats

        data = torch.load(cache / "cifar10_uint8.pt", weights_only=True)
        if isinstance(data, dict) and "train_x" in data:
            from ..compare.data import Cifar

            m, s = _stats(Cifar(data["train_x"], data["train_y"], data["test_x"],
                                data["test_y"], list(data.get("classes", CIFAR10_CLASSES))))
            mean, std = tuple(m.tolist()), tuple(s.tolist())
    finished = "" if meta else ", unfinished"
    return Trained(model.eval(), CIFAR10_CLASSES, (32, 32), mean, std,
                   f"{mechanism} seed {run_dir.name.removeprefix('seed')} (benchmark run"
                   f"{finished})")


def _training_run(run_dir: Path, weights: str) -> Trained:
    from ..training.checkpoints import CHECKPOINT_DIR
    from ..training.config import _read_config, _resolve
    from ..training.model import build_model

    cfg = _read_config(run_dir)
    s = _resolve({}, cfg["settings"])
    m = cfg["model"]
    model = build_model(m["name"], m["num_classes"], m["attn"], s["img_size"], m["kwargs"])
    ckpt = run_dir / CHECKPOINT_DIR
    which = weights
    if which == "auto":
        which = "ema" if (ckpt / "ema.safetensors").is_file() else "model"
    load_weights(model, ckpt / f"{which}.safetensors")
    size = int(s["img_size"])
    attn = f" + {m['attn']}" if m["attn"] else ""
    return Trained(model.eval(), list(cfg["data"]["classes"]), (size, size),
                   tuple(cfg["data"]["mean"]), tuple(cfg["data"]["std"]),
                   f"{m['name']}{attn} ({run_dir.name})")


def load_run(run_dir: str | Path, weights: str = "auto") -> Trained:
    """A training run (``config.json``) or an equal-budget benchmark run."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise UsageError(f"--run {run_dir}: no such folder")
    if (run_dir / "config.json").is_file():
        return _training_run(run_dir, weights)
    if (run_dir / "checkpoint").is_dir() and run_dir.name.startswith("seed"):
        return _compare_run(run_dir)
    raise UsageError(f"--run {run_dir}: neither a training run (config.json) nor a benchmark "
                     "run (runs/<mechanism>/seed<k>/checkpoint)")


def load_weights_file(path: str | Path, model_name: str, *, num_classes: int = 1000,
                      size: int = 224, classes: list[str] | None = None,
                      attn: str | None = None) -> Trained:
    """A registered model (or ``timm:NAME``) with weights from a local file."""
    from ..training.model import build_model

    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(f"--weights {path}: no such file")
    model = build_model(model_name, num_classes, attn, size, {})
    load_weights(model, path)
    names = classes or [str(i) for i in range(num_classes)]
    mean, std = IMAGENET_STATS
    return Trained(model.eval(), names, (size, size), mean, std, f"{model_name} ({path.name})")


def load_trained(run: str | None = None, weights: str | None = None,
                 model: str | None = None, **kwargs) -> Trained:
    if run is not None:
        if weights is not None or model is not None:
            raise UsageError("give either --run RUN_DIR or --weights FILE --model NAME")
        return load_run(run)
    if weights is None or model is None:
        raise UsageError("--weights FILE needs --model NAME (and the reverse)")
    return load_weights_file(weights, model, **kwargs)

