"""Training a denoiser (``spatial-attention train-denoiser``): clean images, random
patches, synthetic noise, and the loop.

A run follows the classifier's conventions (:mod:`spatial_attention.apps.training`): a
run directory with ``config.json``, ``metrics.csv`` (one row per evaluation),
``checkpoint/`` (``model.safetensors`` + weights-only ``state.pt``, saved atomically) and
``--resume``. Patches are random crops with the 8 flips/rotations of the official
training code; crops, flips and noise of step ``s`` come from a generator seeded with
``(seed, s)``, so a resumed run sees exactly the batches it would have seen.
Loss and optimiser are the official ones: L1 between ``x - model_noise`` and the clean
patch, Adam (lr 2e-4, weight decay 1e-8) with a cosine decay to 0.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import UsageError
from .metrics import psnr, ssim
from .noise import NOISE_MODELS, add_noise

__all__ = [
    "TEST_IMAGES",
    "TRAIN_DEFAULTS",
    "TRAIN_IMAGES",
    "build_denoiser",
    "denoiser_names",
    "load_clean_images",
    "sample_batch",
    "train_denoiser",
]

#: built-in images used for training; the held-out ones below are never trained on
TRAIN_IMAGES = ("astronaut", "chelsea", "coffee", "motorcycle", "retina", "rocket",
                "brick", "coins", "grass", "hubble", "moon", "page")
#: held out: a grey photograph, a colour portrait, a grey texture and a colour micrograph
TEST_IMAGES = ("camera", "grace_hopper", "gravel", "ihc")


def _to_tensor(image: np.ndarray) -> Tensor:
    """``(H, W, 3)`` uint8 -> ``(3, H, W)`` float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0


def _to_uint8(x: Tensor) -> np.ndarray:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def load_clean_images(source: str = "builtin", split: str = "train",
                      max_images: int | None = None, size: int | None = None,
                      unreadable: list[str] | None = None) -> list[Tensor]:
    """Clean training / test images as ``(3, H, W)`` float tensors in [0, 1].

    ``source``: ``"builtin"`` (the packages' sample images: :data:`TRAIN_IMAGES` for
    ``split="train"``, :data:`TEST_IMAGES` for ``"test"``), a directory of images, or an
    uncompressed tar such as ``cifar10/train.tar`` (read in place by ``data.TarDataset``).
    Unreadable images are skipped, as ``train`` skips them, and their names appended to
    ``unreadable`` when it is given; none readable at all is a UsageError.
    """
    skipped = unreadable if unreadable is not None else []
    from ...images import builtin_images, load_image

    if source == "builtin":
        have = set(builtin_images())
        names = [n for n in (TRAIN_IMAGES if split == "train" else TEST_IMAGES) if n in have]
        if not names:
            raise UsageError("no built-in images available (install scikit-image)")
        names = names[:max_images] if max_images else names
        return [_to_tensor(load_image(f"builtin:{n}", size=size)) for n in names]
    path = Path(source).expanduser()
    if not path.exists():
        raise UsageError(f"training images not found: {source}")
    if path.is_file() and path.suffix == ".tar":
        from ..training.data import TarDataset

        ds = TarDataset(path, size=size or 32)
        n = len(ds) if not max_images else min(max_images, len(ds))
        # a strided subset, so a small max_images still spans the classes
        idx = np.linspace(0, len(ds) - 1, n).round().astype(int)
        images = []
        for i in idx:
            img, label, _ = ds[int(i)]  # label -1: unreadable, as in the training data
            if label < 0:
                skipped.append(ds.describe(int(i)))
            else:
                images.append(img.float() / 255.0)
        if not images:
            raise UsageError(f"none of the images read from {source} is readable")
        return images
    from ..training.data import IMAGE_EXTENSIONS

    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise UsageError(f"no images found under {source}")
    images = []
    for p in files:
        if max_images and len(images) >= max_images:
            break
        try:
            images.append(_to_tensor(load_image(p, size=size)))
        except UsageError:  # load_image's verdict on a file that is not a readable image
            skipped.append(str(p))
    if not images:
        raise UsageError(f"none of the {len(files)} images under {source} is readable")
    return images


def _dihedral(x: Tensor, mode: int) -> Tensor:
    """One of the 8 flips/rotations of the official augmentation (mode 0: identity)."""
    if mode >= 4:
        x = x.flip(-2)
    return torch.rot90(x, mode % 4, dims=(-2, -1))


def sample_batch(images: Sequence[Tensor], batch: int, patch: int,
                 generator: torch.Generator) -> Tensor:
    """``(batch, 3, patch, patch)`` random crops with random flips/rotations."""
    out = []
    for _ in range(batch):
        i = int(torch.randint(len(images), (1,), generator=generator))
        img = images[i]
        H, W = img.shape[-2:]
        y = int(torch.randint(H - patch + 1, (1,), generator=generator))
        x = int(torch.randint(W - patch + 1, (1,), generator=generator))
        mode = int(torch.randint(8, (1,), generator=generator))
        out.append(_dihedral(img[:, y:y + patch, x:x + patch], mode))
    return torch.stack(out)


# -- training -------------------------------------------------------------------------------

TRAIN_DEFAULTS: dict[str, Any] = {
    "model": "nbnet_small",
    "model_args": {},
    "images": "builtin",
    "max_images": None,
    "noise": "gaussian",
    "sigma": [15.0, 25.0, 50.0],
    "sigma_range": None,
    "grey_shared_noise": True,
    "shot": 0.01,
    "read": 0.02,
    "shot_range": None,
    "read_range": None,
    "init_from": None,
    "patch": 64,
    "batch": 8,
    "steps": 2000,
    "lr": 2e-4,
    "wd": 1e-8,
    "eval_every": 200,
    "eval_size": 128,
    "seed": 0,
    "device": "cpu",
    "threads": None,
    "progress": None,
    "out": None,
    "stop_at_step": None,
}
_TRAIN_FREE = {"progress", "out", "device", "threads", "eval_every", "stop_at_step"}
_CSV_FIELDS = ["step", "lr", "train_loss", "val_psnr", "val_ssim", "noisy_psnr",
               "steps_per_s", "elapsed_s"]


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def _sigmas(cfg: dict[str, Any], batch: int, g: torch.Generator) -> Tensor:
    if cfg.get("sigma_range"):  # blind training: a level drawn uniformly per patch
        lo, hi = cfg["sigma_range"]
        return lo + (hi - lo) * torch.rand(batch, generator=g)
    levels = torch.tensor(cfg["sigma"], dtype=torch.float32)
    return levels[torch.randint(len(levels), (batch,), generator=g)]


def _log_uniform(rng: Sequence[float] | None, fixed: float, batch: int,
                 g: torch.Generator) -> Tensor | float:
    """One level per patch, log-uniform in ``rng`` (blind training), else ``fixed``."""
    if not rng:
        return fixed
    lo, hi = math.log(rng[0]), math.log(rng[1])
    return torch.exp(lo + (hi - lo) * torch.rand(batch, generator=g))


def _noisy(cfg: dict[str, Any], clean: Tensor, g: torch.Generator) -> Tensor:
    if cfg["noise"] == "gaussian":
        noisy = add_noise(clean, "gaussian", _sigmas(cfg, clean.shape[0], g), generator=g)
    else:  # blind over the ranges when given: shot and read drawn per patch
        B = clean.shape[0]
        shot = _log_uniform(cfg.get("shot_range"), cfg["shot"], B, g)
        read = _log_uniform(cfg.get("read_range"), cfg["read"], B, g)
        noisy = add_noise(clean, "poisson_gaussian", shot=shot, read=read, generator=g)
    if cfg.get("grey_shared_noise", True):
        noisy = share_grey_noise(clean, noisy)
    return noisy


def share_grey_noise(clean: Tensor, noisy: Tensor) -> Tensor:
    """A grey photograph has one noise field, not three: patches whose channels are equal
    get channel 0's noisy values in every channel (else the model learns to treat a grey
    image's noise as colour detail, and denoises real grey images far less)."""
    grey = (clean == clean[:, :1]).flatten(1).all(1)  # (B,)
    if not bool(grey.any()):
        return noisy
    return torch.where(grey[:, None, None, None], noisy[:, :1].expand_as(noisy), noisy)


def _val_set(cfg: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """Fixed noisy/clean centre crops of the held-out built-in images."""
    size = cfg["eval_size"]
    clean = []
    for img in load_clean_images("builtin", "test"):
        H, W = img.shape[-2:]
        s = min(size, H, W)
        y, x = (H - s) // 2, (W - s) // 2
        clean.append(img[:, y:y + s, x:x + s])
    s = min(c.shape[-1] for c in clean)
    clean_t = torch.stack([c[:, :s, :s] for c in clean])
    g = torch.Generator().manual_seed(12345)
    noisy = []
    for i in range(len(cfg["sigma"]) if cfg["noise"] == "gaussian" else 1):
        sub = ({**cfg, "sigma": [cfg["sigma"][i]], "sigma_range": None}
               if cfg["noise"] == "gaussian"
               else {**cfg, "shot_range": None, "read_range": None})
        noisy.append(_noisy(sub, clean_t, g))
    return torch.cat(noisy), clean_t.repeat(len(noisy), 1, 1, 1)


def _read_rows(path: Path) -> list[dict[str, str]]:
    from ..training.reporting import read_csv_rows

    return read_csv_rows(path)


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    from ..training.reporting import write_csv_rows

    write_csv_rows(path, rows, _CSV_FIELDS)


def denoiser_names() -> list[str]:
    """The registered restoration models (``nbnet``, ``nbnet_small``, ...)."""
    from ...models import list_models, model_info

    return [n for n in list_models() if model_info(n).family == "restoration"]


def _denoiser_name(name: str) -> str:
    """``name`` as registered, after checking that it names a denoiser."""
    from ...models import model_info

    info = model_info(name)
    if info.family != "restoration":
        raise UsageError(f"model {name!r} is a {info.family} model, not a denoiser "
                         f"(try {' or '.join(denoiser_names())})")
    return info.name


def build_denoiser(name: str, model_args: dict[str, Any] | None = None) -> nn.Module:
    """A registered restoration model (``nbnet``, ``nbnet_small``) by name."""
    from ...models import create_model

    name = _denoiser_name(name)
    try:
        return create_model(name, **(model_args or {}))
    except TypeError as exc:
        raise UsageError(f"model {name!r}: {exc}") from None


def _check_cfg(cfg: dict[str, Any]) -> None:
    if cfg["noise"] not in NOISE_MODELS:
        raise UsageError(f"unknown noise model {cfg['noise']!r}; expected {NOISE_MODELS}")
    for key in ("patch", "batch", "steps", "eval_every", "eval_size"):
        if not int(cfg[key]) >= 1:
            raise UsageError(f"--{key.replace('_', '-')} must be >= 1, got {cfg[key]}")
    if any(not s > 0 for s in cfg["sigma"]):
        raise UsageError(f"--sigma levels must be positive, got {cfg['sigma']}")
    rng = cfg.get("sigma_range")
    if rng is not None and (len(rng) != 2 or not 0 <= rng[0] < rng[1]):
        raise UsageError(f"--sigma-range must be two levels 0 <= LO < HI, got {rng}")
    if not cfg["shot"] > 0 or not cfg["read"] >= 0:
        raise UsageError(f"--shot must be > 0 and --read >= 0, got {cfg['shot']}, "
                         f"{cfg['read']}")
    for key in ("shot_range", "read_range"):
        rng = cfg.get(key)
        if rng is not None and (len(rng) != 2 or not 0 < rng[0] <= rng[1]):
            raise UsageError(f"--{key.replace('_', '-')} must be two values 0 < LO <= HI "
                             f"(drawn log-uniformly), got {rng}")
    init = cfg.get("init_from")
    if init is not None and not Path(init).exists():
        raise UsageError(f"--init-from {init}: no such file or run directory")


def train_denoiser(cfg: dict[str, Any], resume: str | os.PathLike | None = None,
                   log: Callable[[str], None] = print) -> Path:
    """Train a denoiser by ``cfg`` (see ``TRAIN_DEFAULTS``); returns the run directory."""
    if resume is not None:
        run_dir = Path(resume)
        saved = _run_config(run_dir, "--resume")
        changed = sorted(k for k in cfg if k not in _TRAIN_FREE and k in saved
                         and cfg[k] != saved[k] and cfg[k] != TRAIN_DEFAULTS.get(k))
        if changed:
            raise UsageError(f"--resume: {', '.join(changed)} differ from the saved run; "
                             "resume with the same settings")
        # settings that do not change the result come from this call, not the saved run
        cfg = {**saved, **{k: cfg.get(k, TRAIN_DEFAULTS[k]) for k in _TRAIN_FREE}}
    cfg = {**TRAIN_DEFAULTS, **cfg}
    _check_cfg(cfg)
    if resume is None:
        if cfg["out"] is None:
            cfg["out"] = _default_out(cfg)
        elif (Path(cfg["out"]) / "config.json").exists():
            raise UsageError(f"{cfg['out']} already holds a run; continue it with --resume, "
                             "or choose another --out")
    threads = torch.get_num_threads()
    if cfg["threads"]:
        torch.set_num_threads(int(cfg["threads"]))
    try:
        return _train(cfg, resume, log)
    finally:
        torch.set_num_threads(threads)


def _default_out(cfg: dict[str, Any]) -> str:
    """``runs/denoise-<model>-<noise>``, numbered past the runs already there."""
    stem = Path("runs") / f"denoise-{cfg['model']}-{cfg['noise']}"
    out, i = stem, 1
    while out.exists() and any(out.iterdir()):
        out, i = stem.with_name(f"{stem.name}-{i}"), i + 1
    return str(out)


def _run_config(run_dir: Path, what: str) -> dict[str, Any]:
    """A train-denoiser run's config.json; a UsageError naming any other kind of run."""
    path = run_dir / "config.json"
    if not path.is_file():
        raise UsageError(f"{what} {run_dir}: a directory without config.json "
                         "(expected a train-denoiser run)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is corrupt ({exc})") from None
    if isinstance(cfg, dict) and "settings" in cfg:  # the classifier's nested config
        model = cfg.get("model", {})
        name = model.get("name", "?") if isinstance(model, dict) else model
        raise UsageError(f"{what} {run_dir} is a classifier run (spatial-attention train, "
                         f"model {name}), not a train-denoiser run")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model", "nbnet"), str):
        raise UsageError(f"{what} {run_dir}: its config.json is not a train-denoiser "
                         "run's")
    return cfg


def _init_weights(source: str | os.PathLike, model: nn.Module) -> dict[str, Tensor]:
    """The state dict for ``--init-from``: a weights file, or a train-denoiser run (its
    checkpoint); a key set that does not fit ``model`` is reported by name."""
    from ...checkpoint import check_state_dict, read_weights
    from ..training.checkpoints import CHECKPOINT_DIR

    path = Path(source)
    if path.is_dir():
        path = path / CHECKPOINT_DIR / "model.safetensors"
        if not path.is_file():
            raise UsageError(f"--init-from {source}: no checkpoint in this directory "
                             "(expected a train-denoiser run)")
    state = {k: v.float() for k, v in read_weights(path).items()}
    check_state_dict(model.state_dict(), state, f"--init-from {source}")
    return state


def _train(cfg: dict[str, Any], resume: str | os.PathLike | None,
           log: Callable[[str], None]) -> Path:
    from tqdm import tqdm

    from ...checkpoint import check_state_dict, read_weights
    from ..training.checkpoints import CHECKPOINT_DIR, load_state, save_checkpoint

    device = torch.device(cfg["device"])
    run_dir = Path(cfg["out"] or resume)

    # everything that can fail on bad settings or data comes before the run directory,
    # so a mistake leaves nothing behind
    torch.manual_seed(cfg["seed"])
    model = build_denoiser(cfg["model"], cfg["model_args"]).to(device)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"], weight_decay=cfg["wd"])
    total = int(cfg["steps"])

    def lr_at(step: int) -> float:  # the official cosine decay, per step
        return cfg["lr"] * (math.cos(min(step, total) / total * math.pi) + 1) / 2

    unreadable: list[str] = []
    images = load_clean_images(cfg["images"], "train", cfg["max_images"],
                               unreadable=unreadable)
    if unreadable:
        log(f"{len(unreadable)} unreadable training image"
            f"{'s' if len(unreadable) != 1 else ''} skipped, e.g.: {', '.join(unreadable[:3])}")
    images = [im for im in images if min(im.shape[-2:]) >= cfg["patch"]]
    if not images:
        raise UsageError(f"no training image is at least {cfg['patch']} pixels on a side; "
                         "use a smaller --patch")
    val_noisy, val_clean = _val_set(cfg)
    noisy_psnr = float(psnr(val_noisy.clamp(0, 1), val_clean).mean())
    run_dir.mkdir(parents=True, exist_ok=True)

    step, rows = 0, []
    ckpt = run_dir / CHECKPOINT_DIR
    metrics_path = run_dir / "metrics.csv"
    if resume is not None and ckpt.is_dir():
        state = read_weights(ckpt / "model.safetensors")
        check_state_dict(model.state_dict(), state, f"checkpoint {ckpt}")
        model.load_state_dict(state)
        st = load_state(ckpt / "state.pt")
        opt.load_state_dict(st["optimizer"])
        step = int(st["step"])
        rows = [r for r in _read_rows(metrics_path) if int(r["step"]) <= step]
        log(f"resumed {run_dir} at step {step}")
    elif cfg.get("init_from"):  # fine-tuning: start from another run's (or file's) weights
        model.load_state_dict(_init_weights(cfg["init_from"], model))
        log(f"initialised from {cfg['init_from']}")
    (run_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))

    progress = cfg["progress"] if cfg["progress"] is not None else sys.stderr.isatty()
    bar = tqdm(total=total, initial=step, desc="train", disable=not progress,
               dynamic_ncols=True)
    loss_sum, loss_n, t0, t_eval = 0.0, 0, time.perf_counter(), time.perf_counter()
    elapsed0 = float(rows[-1]["elapsed_s"]) if rows else 0.0
    steps_at_eval = step

    def evaluate() -> tuple[float, float]:
        model.eval()
        with torch.no_grad():
            outs = torch.cat([model(val_noisy[i:i + 4].to(device)).float().cpu()
                              for i in range(0, len(val_noisy), 4)])
        model.train()
        return float(psnr(outs.clamp(0, 1), val_clean).mean()), \
            float(ssim(outs.clamp(0, 1), val_clean).mean())

    model.train()
    while step < total:
        g = _step_generator(cfg["seed"], step)
        clean = sample_batch(images, cfg["batch"], cfg["patch"], g)
        noisy = _noisy(cfg, clean, g)
        clean = clean.to(device, memory_format=torch.channels_last)
        noisy = noisy.to(device, memory_format=torch.channels_last)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = F.l1_loss(model(noisy), clean)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        loss_sum, loss_n = loss_sum + float(loss.detach()), loss_n + 1
        bar.update(1)
        if progress:
            bar.set_postfix(loss=f"{float(loss):.4f}")
        stopping = cfg["stop_at_step"] is not None and step >= cfg["stop_at_step"]
        if step % cfg["eval_every"] == 0 or step == total or stopping:
            vp, vs = evaluate()
            now = time.perf_counter()
            row = {
                "step": step, "lr": f"{lr_at(step - 1):.3g}",
                "train_loss": f"{loss_sum / max(loss_n, 1):.5f}",
                "val_psnr": f"{vp:.3f}", "val_ssim": f"{vs:.4f}",
                "noisy_psnr": f"{noisy_psnr:.3f}",
                "steps_per_s": f"{(step - steps_at_eval) / (now - t_eval):.3f}",
                "elapsed_s": f"{elapsed0 + now - t0:.1f}",
            }
            rows.append(row)
            _write_rows(metrics_path, rows)
            save_checkpoint(ckpt, model.state_dict(),
                            {"optimizer": opt.state_dict(), "step": step},
                            metadata={"model": cfg["model"]})
            msg = (f"step {step}/{total} loss {row['train_loss']} val PSNR {vp:.2f} dB "
                   f"(noisy {noisy_psnr:.2f}) SSIM {vs:.4f}")
            if progress:
                tqdm.write(msg, file=sys.stdout)
            else:
                log(msg)
            loss_sum, loss_n, t_eval, steps_at_eval = 0.0, 0, now, step
        if stopping:
            log(f"stopped at step {step}; continue with --resume {run_dir}")
            break
    bar.close()
    return run_dir
