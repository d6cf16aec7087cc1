"""Training checkpoints: weights in safetensors, the rest in a weights-only torch file.

A checkpoint is a directory::

    checkpoint/
      model.safetensors   the model's state_dict (parameters and buffers)
      ema.safetensors     the EMA weights, when EMA is on
      state.pt            optimizer, scheduler, grad scaler, RNG states of every rank,
                          epoch / step counters, running metric sums; read back with
                          torch.load(weights_only=True), so loading runs no pickle code

and the run's ``config.json`` sits beside it. Saving writes a temporary directory and
renames it into place, so an interrupted save never leaves a half-written checkpoint.

Loading weights checks them against the model and raises a
:class:`~spatial_attention.errors.UsageError` naming what differs: missing and
unexpected keys by name, shape mismatches by name with both shapes.
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
from torch import Tensor, nn

from .errors import UsageError

__all__ = [
    "CHECKPOINT_DIR",
    "check_state_dict",
    "get_rng_state",
    "load_state",
    "load_weights",
    "read_weights",
    "save_checkpoint",
    "set_rng_state",
    "unwrap",
]

CHECKPOINT_DIR = "checkpoint"


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel and/or ``torch.compile``."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


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


def read_weights(path: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of a safetensors file; a clear UsageError if absent or corrupt."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(
            f"checkpoint {path} is corrupt or not a safetensors file ({msg})"
        ) from None


def read_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's contents from safetensors, or torch with ``weights_only=True``.

    Foreign checkpoints (official releases, timm) come as either; torch files are never
    unpickled beyond tensors and plain containers. Clear UsageErrors for absent or
    unreadable files.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        return read_weights(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for garbled or non-torch files
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"checkpoint {path} could not be read ({msg})") from None
    if not isinstance(state, dict):
        raise UsageError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict")
    return state


def read_csv_rows(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a run's metrics CSV (none when the file does not exist yet)."""
    import csv

    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def write_csv_rows(
    path: str | os.PathLike, rows: list[dict[str, Any]], fields: list[str] | tuple[str, ...]
) -> None:
    """Rewrite a metrics CSV atomically (temporary file, then rename): a run stopped
    mid-write never leaves a truncated log for ``--resume`` to read."""
    import csv

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields))
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in fields})
    tmp.replace(path)


def _names(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def check_state_dict(
    expected: Mapping[str, Tensor], got: Mapping[str, Tensor], source: str = "checkpoint"
) -> None:
    """Raise a UsageError naming missing / unexpected keys and shape mismatches."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = sorted(
        k for k in set(expected) & set(got) if tuple(expected[k].shape) != tuple(got[k].shape)
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    if shapes:
        shown = [
            f"{k} (checkpoint {tuple(got[k].shape)}, model {tuple(expected[k].shape)})"
            for k in shapes
        ]
        problems.append(f"shape mismatches: {_names(shown, 4)}")
    if problems:
        raise UsageError(f"{source} does not match the model: " + "; ".join(problems))


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a safetensors state_dict into ``model`` after checking keys and shapes."""
    state = read_weights(path)
    model = unwrap(model)
    check_state_dict(model.state_dict(), state, f"checkpoint {path}")
    model.load_state_dict(state)


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
