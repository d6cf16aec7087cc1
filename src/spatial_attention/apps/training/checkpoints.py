"""A training run's checkpoint: weights in safetensors, the rest in a weights-only file.

A checkpoint is a directory::

    checkpoint/
      model.safetensors   the model's state_dict (parameters and buffers)
      ema.safetensors     the EMA weights, when EMA is on
      state.pt            optimizer, scheduler, grad scaler, RNG states of every rank,
                          epoch / step counters, running metric sums; read back with
                          torch.load(weights_only=True), so loading runs no pickle code

and the run's ``config.json`` sits beside it. Saving writes a temporary directory and
renames it into place, so an interrupted save never leaves a half-written checkpoint.
Reading the weights back (with named key and shape errors) is the core's
:mod:`spatial_attention.checkpoint`, which the models' loaders share.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ...errors import UsageError

__all__ = [
    "CHECKPOINT_DIR",
    "get_rng_state",
    "load_state",
    "save_checkpoint",
    "set_rng_state",
]

CHECKPOINT_DIR = "checkpoint"


def _cpu_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    # clone: safetensors refuses tensors that share storage (tied weights)
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def save_checkpoint(
    directory: str | os.PathLike,
    model_state: Mapping[str, Tensor],
    state: dict[str, Any],
    ema_state: Mapping[str, Tensor] | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``model.safetensors`` (+ ``ema.safetensors``) and ``state.pt`` atomically."""
    from safetensors.torch import save_file

    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta = {"format": "pt", **(metadata or {})}
    save_file(_cpu_state(model_state), tmp / "model.safetensors", metadata=meta)
    if ema_state is not None:
        save_file(_cpu_state(ema_state), tmp / "ema.safetensors", metadata=meta)
    torch.save(state, tmp / "state.pt")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    """The training state of ``state.pt`` (weights_only load), or a clear UsageError."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint state {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated/garbled files
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"checkpoint state {path} is corrupt ({msg})") from None


# -- random number generators ------------------------------------------------------------


def get_rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and Python RNG states, in weights-only-loadable types."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {
            "version": py_version,
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss": py_gauss,
        },
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    nps = state["numpy"]
    np.random.set_state(
        (nps["name"], nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"],
         nps["gauss"])
    )
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
