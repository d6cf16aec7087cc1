"""Reading and checking weights: safetensors, or torch files loaded weights-only.

Loading weights checks them against the model and raises a
:class:`~spatial_attention.errors.UsageError` naming what differs: missing and
unexpected keys by name, shape mismatches by name with both shapes. The models'
``load_pretrained`` and the applications share these readers.

Writing a training run's checkpoint (``save_checkpoint``, ``load_state``, RNG states)
and its metrics CSV moved to :mod:`spatial_attention.apps.training`; those names still
resolve here, with a DeprecationWarning.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._moved import forward_to
from .errors import UsageError

__all__ = [
    "check_state_dict",
    "load_weights",
    "read_state_dict",
    "read_weights",
    "unwrap",
]

# the training-state half of this module, for code that imported it from here
__getattr__ = forward_to(__name__, (
    "spatial_attention.apps.training.checkpoints",
    "spatial_attention.apps.training.reporting",
))[0]


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel and/or ``torch.compile``."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


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


def rename_key_segments(state_dict: Mapping[str, Any],
                        pairs: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    """An official checkpoint's keys renamed segment by segment, wherever the module sits.

    Accepts ``{'state_dict': ...}`` as saved and strips ``DataParallel``'s ``module.``
    prefix. Each key takes the first ``(old, ours)`` pair whose ``old`` starts the key or
    follows a dot in it (``layer1.0.cbam.ChannelGate.mlp.1.weight``); other keys pass
    through unchanged.
    """
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        new = key[len("module."):] if key.startswith("module.") else key
        for old, ours in pairs:
            if new.startswith(old) or f".{old}" in new:
                new = new.replace(old, ours, 1)
                break
        out[new] = value
    return out


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
