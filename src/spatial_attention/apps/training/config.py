"""A classifier run's settings: defaults, the command line, a resumed run's config.json.

Every setting lives in :data:`DEFAULTS` under the key it has in ``config.json``; the
command line overrides only what it names, so a resumed run keeps its own values and
:func:`_resume_checks` refuses changes that would not continue it exactly. The one
exception is ``--epochs``: a larger count extends the run (see :func:`_extension_check`
and docs/training.md, "Extending a run").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ...errors import UsageError

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
    "init_from": None,  # a run or weights file a new run starts from
    "pretrained": None,  # a local weights file for a timm: model
    "stop_at_step": None,
    "progress": None,  # on when stderr is a terminal
    "overlays": 4,
}
_OPT_DEFAULTS = {"adamw": {"lr": 2e-3, "wd": 0.05}, "sgd": {"lr": 0.1, "wd": 5e-4}}
#: settings a resumed run may change without changing its result (or knowingly: device)
_RESUME_FREE = {"workers", "progress", "stop_at_step", "overlays", "out", "device", "compile"}


def _explicit(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line (argparse leaves the others None)."""
    return {k: v for k, v in vars(args).items() if k in DEFAULTS and v is not None}


def _absolute_paths(explicit: dict[str, Any]) -> dict[str, Any]:
    """``--data``/``--val`` (and the weights a run starts from) as absolute paths, so a
    run can be evaluated from anywhere and says where its weights came from."""
    out = dict(explicit)
    for key in ("data", "val", "init_from", "pretrained"):
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


def _resume_checks(explicit: dict[str, Any], saved: dict[str, Any], run_dir: Path) -> None:
    """Refuse settings that would make the resumed run another run (``--epochs`` aside:
    :func:`_extension_check`), and weights to start from (the checkpoint has them)."""
    for key in ("init_from", "pretrained"):
        if key in explicit:
            flag = "--" + key.replace("_", "-")
            raise UsageError(
                f"{flag} starts a new run from weights; --resume {run_dir} continues from "
                "its own checkpoint (drop one of them)"
            )
    differ = []
    for k, v in explicit.items():
        if k in _RESUME_FREE or k == "epochs":
            continue
        if saved.get(k) != v:
            differ.append(f"--{k.replace('_', '-')} {v!r} (the run has {saved.get(k)!r})")
    if differ:
        raise UsageError(
            f"--resume {run_dir}: the run was made with other settings, and changing them "
            "would not continue it exactly: " + "; ".join(differ)
        )


def _extension_check(epochs: int, saved_epochs: int, run_dir: Path) -> tuple[int, bool]:
    """``--resume RUN --epochs N``: N must exceed the epochs the run has completed.

    Returns ``(completed epochs, finished)`` read from the checkpoint (``(0, False)``
    when there is none yet: the resume itself then says so). Any N above the completed
    count is accepted, larger or smaller than the configured total: the schedule is
    recomputed for N epochs and continues from the run's step (docs/training.md,
    "Extending a run").
    """
    from .checkpoints import CHECKPOINT_DIR, load_state

    state_path = run_dir / CHECKPOINT_DIR / "state.pt"
    if not state_path.is_file():
        return 0, False
    state = load_state(state_path)
    done, finished = int(state["epoch"]), bool(state["finished"])
    if epochs <= done:
        status = "finished" if finished else "stopped"
        raise UsageError(
            f"--epochs {epochs}: {run_dir} has already trained {done} epoch(s) ({status}, "
            f"configured for {saved_epochs}); to train longer, give more than {done}, e.g. "
            f"--epochs {max(done, saved_epochs) * 2}"
        )
    return done, finished
