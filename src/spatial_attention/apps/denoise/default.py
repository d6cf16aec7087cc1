"""The denoisers shipped inside the package: no download, no run directory.

>>> from spatial_attention.apps.denoise import load_default, available_defaults
>>> available_defaults()
['gaussian']
>>> model = load_default("gaussian")          # eval-mode NBNet, float32, on the CPU

Each shipped file is ``weights/<model>-<noise>.safetensors``, stored in float16 to keep
the wheel small and loaded into float32; its metadata names the model and the noise.
See ``docs/denoiser.md`` for how each one was trained and where it falls short.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from torch import nn

from ...errors import UsageError
from .noise import NOISE_MODELS

__all__ = ["SHIPPED", "available_defaults", "default_weights_path", "export_weights",
           "load_default"]

#: noise type -> the model its shipped weights belong to. A noise type is added here only
#: together with its file, so that a missing file always means a broken installation.
SHIPPED: dict[str, str] = {"gaussian": "nbnet_medium", "poisson_gaussian": "nbnet_medium"}


def _weights_dir() -> Path:
    # importlib.resources rather than __file__, so an installed wheel and an editable
    # checkout resolve the same way
    return Path(str(resources.files(__package__) / "weights"))


def default_weights_path(noise: str = "gaussian") -> Path:
    """Where the shipped weights for ``noise`` live (whether or not the file is there)."""
    _check_noise(noise)
    return _weights_dir() / f"{SHIPPED[noise]}-{noise}.safetensors"


def available_defaults() -> list[str]:
    """The noise types whose weights ship with this installation."""
    return [n for n in SHIPPED if (_weights_dir() / f"{SHIPPED[n]}-{n}.safetensors").is_file()]


def _check_noise(noise: str) -> None:
    if noise not in NOISE_MODELS:
        raise UsageError(f"unknown noise model {noise!r}; expected one of {NOISE_MODELS}")
    if noise not in SHIPPED:
        shipped = ", ".join(SHIPPED) or "none"
        raise UsageError(
            f"no shipped weights for {noise} noise yet (shipped: {shipped}); train one with "
            f"`spatial-attention train-denoiser --model nbnet_medium --noise {noise} "
            f"--out runs/denoise-{noise}` and pass that run directory as --weights"
        )


def load_default(noise: str = "gaussian",
                 device: str | torch.device | None = None) -> nn.Module:
    """The shipped denoiser for ``noise``, in eval mode, float32, on ``device`` (CPU).

    Raises:
        UsageError: an unknown noise type, one with no shipped weights yet (the message
            says how to train one), a missing weights file (a broken installation) or a
            file that does not fit the model (its missing / unexpected keys named).
    """
    from ...checkpoint import check_state_dict
    from .train import build_denoiser

    path = default_weights_path(noise)
    if not path.is_file():
        raise UsageError(f"the shipped {noise} weights are missing from this installation "
                         f"(expected {path}); reinstall spatial-attention, or pass --weights")
    model_name = SHIPPED[noise]
    state, meta = _read(path)
    for key, want in (("model", model_name), ("noise", noise)):
        if meta.get(key, want) != want:
            raise UsageError(f"shipped weights {path} are for {key} {meta[key]!r}, "
                             f"expected {want!r}")
    model = build_denoiser(model_name)
    check_state_dict(model.state_dict(), state, f"shipped weights {path}")
    # float16 on disk only: the arithmetic stays float32, as it was trained
    model.load_state_dict({k: v.float() if v.is_floating_point() else v
                           for k, v in state.items()})
    # channels_last weights, as denoise_tiled's tiles: the CPU convolutions' fast layout
    model = model.eval().to(memory_format=torch.channels_last)
    return model.to(device) if device is not None else model


def export_weights(run_dir: str | Path, noise: str, out: str | Path, note: str = "") -> Path:
    """Write a train-denoiser run's final weights as a file to ship: float16 safetensors
    whose metadata names the model, the noise, the step and ``note`` (how the shipped
    files in ``weights/`` are made; ``load_default`` reads them back)."""
    import json

    from safetensors.torch import save_file

    from ...checkpoint import read_weights
    from ..training.checkpoints import CHECKPOINT_DIR, load_state

    run = Path(run_dir)
    cfg = json.loads((run / "config.json").read_text())
    if cfg.get("noise") != noise:
        raise UsageError(f"{run} was trained on {cfg.get('noise')!r} noise, not {noise!r}")
    state = read_weights(run / CHECKPOINT_DIR / "model.safetensors")
    step = int(load_state(run / CHECKPOINT_DIR / "state.pt")["step"])
    half = {k: (v.half() if v.is_floating_point() else v).contiguous()
            for k, v in state.items()}
    out = Path(out)
    save_file(half, str(out), metadata={"model": cfg["model"], "noise": noise,
                                        "step": str(step), "note": note})
    return out


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"shipped weights {path} are corrupt or not a safetensors file "
                         f"({msg}); reinstall spatial-attention") from None
