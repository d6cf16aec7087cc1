"""Image denoising with NBNet: noise models, PSNR/SSIM, tiled inference, training, CLI.

>>> from spatial_attention.denoise import add_noise, psnr, ssim, denoise_tiled
>>> noisy = add_noise(clean, "gaussian", sigma=25)          # clean: (B, 3, H, W) in [0, 1]
>>> out = denoise_tiled(model, noisy, tile=256, overlap=32)  # any size, bounded memory

Noise models (images in [0, 1], noise not clipped, as in the synthetic benchmarks):

* ``gaussian``: ``y = x + (sigma / 255) n``, ``n ~ N(0, 1)`` (AWGN at sigma 15, 25, 50).
* ``poisson_gaussian``: ``y = a * Poisson(x / a) + b n`` (the heteroscedastic raw-sensor
  model of Foi et al. 2008, shot noise ``a``, read noise ``b``), a stand-in for real
  camera noise when no real noisy/clean pairs are at hand.

Metrics: :func:`psnr` (``10 log10(1 / MSE)``, range 1) and :func:`ssim` (Wang et al. 2004:
11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, population statistics, averaged over
the valid region and the channels, which is what scikit-image's ``structural_similarity``
computes with ``gaussian_weights=True, use_sample_covariance=False``).

Tiled inference (:func:`denoise_tiled`) cuts the image into overlapping tiles, runs them
in small batches and blends them with weights that fall off linearly across the
overlap, so memory depends on the tile size, not on the image. The model pads each tile
to a multiple of 16 itself (:class:`~spatial_attention.models.nbnet.NBNet`).

Training (``spatial-attention train-denoiser``) follows ``train.py``'s conventions: a run
directory with ``config.json``, ``metrics.csv`` (one row per evaluation),
``checkpoint/`` (``model.safetensors`` + weights-only ``state.pt``, saved atomically) and
``--resume``. Patches are random crops with the 8 flips/rotations of the official
training code; crops, flips and noise of step ``s`` come from a generator seeded with
``(seed, s)``, so a resumed run sees exactly the batches it would have seen.
Loss and optimiser are the official ones: L1 between ``x - model_noise`` and the clean
patch, Adam (lr 2e-4, weight decay 1e-8) with a cosine decay to 0.
"""

from __future__ import annotations

import argparse
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

from .errors import UsageError

__all__ = [
    "NOISE_MODELS",
    "TEST_IMAGES",
    "TRAIN_IMAGES",
    "add_arguments",
    "add_noise",
    "add_train_arguments",
    "denoise_tiled",
    "load_clean_images",
    "psnr",
    "run",
    "run_train",
    "sample_batch",
    "ssim",
    "tile_starts",
    "train_denoiser",
]

NOISE_MODELS = ("gaussian", "poisson_gaussian")
#: built-in images used for training; the held-out ones below are never trained on
TRAIN_IMAGES = ("astronaut", "chelsea", "coffee", "motorcycle", "retina", "rocket",
                "brick", "coins", "grass", "hubble", "moon", "page")
#: held out: a grey photograph, a colour portrait, a grey texture and a colour micrograph
TEST_IMAGES = ("camera", "grace_hopper", "gravel", "ihc")


# -- noise ----------------------------------------------------------------------------------


def add_noise(x: Tensor, model: str = "gaussian", sigma: float | Tensor = 25.0,
              shot: float = 0.01, read: float = 0.02,
              generator: torch.Generator | None = None) -> Tensor:
    """``x`` (values in [0, 1]) plus noise of ``model`` (see the module docstring).

    ``sigma`` is on the 0..255 scale and may be a ``(B,)`` tensor (one level per image).
    """
    if model == "gaussian":
        s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device) / 255.0
        if s.dim() == 1:
            s = s.view(-1, *([1] * (x.dim() - 1)))
        n = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        return x + s * n
    if model == "poisson_gaussian":
        if not shot > 0 or read < 0:
            raise UsageError(f"poisson_gaussian: shot must be > 0 and read >= 0, got "
                             f"{shot}, {read}")
        counts = torch.poisson((x.clamp_min(0) / shot).float(), generator=generator)
        n = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        return (counts.to(x.dtype) * shot) + read * n
    raise UsageError(f"unknown noise model {model!r}; expected one of {NOISE_MODELS}")


# -- metrics --------------------------------------------------------------------------------


def psnr(x: Tensor, ref: Tensor, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio per image, ``(B,)``, of ``(B, C, H, W)`` tensors."""
    mse = (x.double() - ref.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse.clamp_min(1e-20))


def _gauss_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(x: Tensor, ref: Tensor, data_range: float = 1.0, win: int = 11,
         sigma: float = 1.5) -> Tensor:
    """Structural similarity (Wang et al. 2004, Eq. 13) per image, ``(B,)``.

    Gaussian-weighted local statistics over the valid region (no padding), averaged
    over positions and channels. Images smaller than the window use a window of their
    smaller side (made odd).
    """
    x, ref = x.double(), ref.double()
    C = x.shape[1]
    win = min(win, *x.shape[-2:])
    win = win if win % 2 else win - 1
    g = _gauss_window(win, sigma).to(x.device)
    gh = g.view(1, 1, 1, -1).expand(C, 1, 1, win)
    gv = g.view(1, 1, -1, 1).expand(C, 1, win, 1)

    def filt(t: Tensor) -> Tensor:
        return F.conv2d(F.conv2d(t, gh, groups=C), gv, groups=C)

    mx, my = filt(x), filt(ref)
    vx = filt(x * x) - mx * mx
    vy = filt(ref * ref) - my * my
    cxy = filt(x * ref) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


# -- tiled inference ------------------------------------------------------------------------


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile`` covering ``[0, length)``, adjacent ones
    overlapping by at least ``overlap``; the last tile ends at ``length``."""
    if length <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, length - tile, step))
    starts.append(length - tile)
    return starts


def _ramp(length: int, overlap: int, device: torch.device) -> Tensor:
    """Blend weights along one axis of a tile: rising over ``overlap`` pixels at each end."""
    if overlap <= 0 or length <= 1:
        return torch.ones(length, device=device)
    i = torch.arange(length, device=device, dtype=torch.float32)
    edge = torch.minimum(i + 1, length - i) / (overlap + 1)
    return edge.clamp(max=1.0)


@torch.no_grad()
def denoise_tiled(
    model: Callable[[Tensor], Tensor],
    image: Tensor,
    tile: int = 256,
    overlap: int = 32,
    batch: int = 4,
    progress: bool = False,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Run ``model`` over ``image`` ``(C, H, W)`` or ``(1, C, H, W)`` tile by tile.

    Tiles of ``tile x tile`` (the whole image when smaller) overlap by ``overlap``
    pixels and are blended with linear ramps; ``batch`` tiles run per call. Peak memory
    is that of one batch of tiles plus two image-sized float32 buffers. ``dtype``
    (e.g. ``torch.bfloat16``) runs the model under autocast on the image's device.
    Returns ``image``'s shape in float32.
    """
    if tile < 16 or overlap < 0 or overlap >= tile or batch < 1:
        raise UsageError(f"denoise: need tile >= 16, 0 <= overlap < tile and batch >= 1; "
                         f"got tile={tile}, overlap={overlap}, batch={batch}")
    squeeze = image.dim() == 3
    img = image[None] if squeeze else image
    if img.dim() != 4 or img.shape[0] != 1:
        raise UsageError(f"denoise: expected one image (C, H, W), got {tuple(image.shape)}")
    img = img.float()
    _, C, H, W = img.shape
    th, tw = min(tile, H), min(tile, W)
    boxes = [(y, x) for y in tile_starts(H, th, overlap) for x in tile_starts(W, tw, overlap)]
    weight = _ramp(th, overlap if H > th else 0, img.device)[:, None] * \
        _ramp(tw, overlap if W > tw else 0, img.device)[None, :]  # (th, tw)
    out = torch.zeros_like(img[0])
    norm = torch.zeros(1, H, W, device=img.device)
    from tqdm import tqdm

    bar = tqdm(total=len(boxes), desc="tiles", unit="tile", disable=not progress,
               dynamic_ncols=True, file=sys.stderr)
    for i in range(0, len(boxes), batch):
        chunk = boxes[i:i + batch]
        tiles = torch.stack([img[0, :, y:y + th, x:x + tw] for y, x in chunk])
        if dtype is not None:
            with torch.autocast(img.device.type, dtype=dtype):
                pred = model(tiles).float()
        else:
            pred = model(tiles).float()
        for (y, x), p in zip(chunk, pred, strict=True):
            out[:, y:y + th, x:x + tw] += p * weight
            norm[:, y:y + th, x:x + tw] += weight
        bar.update(len(chunk))
    bar.close()
    out = out / norm
    return out if squeeze else out[None]


# -- images ---------------------------------------------------------------------------------


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
    from .images import builtin_images, load_image

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
        from .data import TarDataset

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
    from .data import IMAGE_EXTENSIONS

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
    "shot": 0.01,
    "read": 0.02,
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


def _noisy(cfg: dict[str, Any], clean: Tensor, g: torch.Generator) -> Tensor:
    if cfg["noise"] == "gaussian":
        return add_noise(clean, "gaussian", _sigmas(cfg, clean.shape[0], g), generator=g)
    return add_noise(clean, "poisson_gaussian", shot=cfg["shot"], read=cfg["read"],
                     generator=g)


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
               if cfg["noise"] == "gaussian" else cfg)
        noisy.append(_noisy(sub, clean_t, g))
    return torch.cat(noisy), clean_t.repeat(len(noisy), 1, 1, 1)


def _read_rows(path: Path) -> list[dict[str, str]]:
    from .checkpoint import read_csv_rows

    return read_csv_rows(path)


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    from .checkpoint import write_csv_rows

    write_csv_rows(path, rows, _CSV_FIELDS)


def denoiser_names() -> list[str]:
    """The registered restoration models (``nbnet``, ``nbnet_small``, ...)."""
    from .models import list_models, model_info

    return [n for n in list_models() if model_info(n).family == "restoration"]


def _denoiser_name(name: str) -> str:
    """``name`` as registered, after checking that it names a denoiser."""
    from .models import model_info

    info = model_info(name)
    if info.family != "restoration":
        raise UsageError(f"model {name!r} is a {info.family} model, not a denoiser "
                         f"(try {' or '.join(denoiser_names())})")
    return info.name


def build_denoiser(name: str, model_args: dict[str, Any] | None = None) -> nn.Module:
    """A registered restoration model (``nbnet``, ``nbnet_small``) by name."""
    from .models import create_model

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
    if isinstance(cfg, dict) and "settings" in cfg:  # train.py's nested config
        model = cfg.get("model", {})
        name = model.get("name", "?") if isinstance(model, dict) else model
        raise UsageError(f"{what} {run_dir} is a classifier run (spatial-attention train, "
                         f"model {name}), not a train-denoiser run")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model", "nbnet"), str):
        raise UsageError(f"{what} {run_dir}: its config.json is not a train-denoiser "
                         "run's")
    return cfg


def _train(cfg: dict[str, Any], resume: str | os.PathLike | None,
           log: Callable[[str], None]) -> Path:
    from tqdm import tqdm

    from .checkpoint import (
        CHECKPOINT_DIR,
        check_state_dict,
        load_state,
        read_weights,
        save_checkpoint,
    )

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


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``spatial-attention train-denoiser``."""
    d = TRAIN_DEFAULTS
    parser.add_argument("--model", help=f"nbnet or nbnet_small (default {d['model']})")
    parser.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                        help="model constructor argument, e.g. --model-arg ssa=false")
    parser.add_argument("--images", help="builtin (default: the packages' sample images, "
                        "minus the held-out ones), a directory, or a tar such as "
                        "cifar10/train.tar")
    parser.add_argument("--max-images", type=int, help="use at most this many images")
    parser.add_argument("--noise", choices=NOISE_MODELS, help="default gaussian")
    parser.add_argument("--sigma", type=float, nargs="+",
                        help="Gaussian levels (0..255) drawn per image (default 15 25 50); "
                        "with --sigma-range, the levels validated at")
    parser.add_argument("--sigma-range", type=float, nargs=2, metavar=("LO", "HI"),
                        help="blind training: draw each patch's level uniformly in [LO, HI]")
    parser.add_argument("--shot", type=float, help=f"Poisson-Gaussian a ({d['shot']})")
    parser.add_argument("--read", type=float, help=f"Poisson-Gaussian b ({d['read']})")
    parser.add_argument("--patch", type=int, help=f"crop size ({d['patch']}; official 128)")
    parser.add_argument("--batch", type=int, help=f"batch size ({d['batch']}; official 32)")
    parser.add_argument("--steps", type=int, help=f"optimizer steps ({d['steps']})")
    parser.add_argument("--lr", type=float, help=f"Adam learning rate ({d['lr']})")
    parser.add_argument("--wd", type=float, help=f"weight decay ({d['wd']})")
    parser.add_argument("--eval-every", type=int, help=f"steps between evaluations and "
                        f"checkpoints ({d['eval_every']})")
    parser.add_argument("--eval-size", type=int, help="side of the held-out centre crops")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--device", help="cpu (default), cuda, cuda:N")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--out", help="run directory (default runs/denoise-<model>-<noise>)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR")
    parser.add_argument("--stop-at-step", type=int, metavar="N",
                        help="save a checkpoint and stop after step N (resume later)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction,
                        help="progress bar (default: when stderr is a terminal)")


def run_train(args: argparse.Namespace) -> int:
    from .train import _parse_model_args

    cfg = {k: v for k, v in vars(args).items() if k in TRAIN_DEFAULTS and v is not None}
    if args.model_arg:
        cfg["model_args"] = _parse_model_args(args.model_arg)
    train_denoiser(cfg, resume=args.resume)
    return 0


# -- the denoise command --------------------------------------------------------------------


def _fits(name: str, state: dict[str, Tensor]) -> bool:
    """Whether ``state`` has exactly the keys and shapes of ``name`` at its defaults."""
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        expected = build_denoiser(name).state_dict()
    return expected.keys() == state.keys() and all(
        tuple(v.shape) == tuple(state[k].shape) for k, v in expected.items()
    )


def _named_in_file(weights: Path) -> str | None:
    """The model a safetensors file names in its metadata (train-denoiser writes it)."""
    if weights.suffix != ".safetensors" or not weights.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as f:
            name = (f.metadata() or {}).get("model")
    except Exception:  # unreadable: load_pretrained says so in its own words
        return None
    return name if name in denoiser_names() else None


def _load_model(args: argparse.Namespace) -> nn.Module:
    from .checkpoint import CHECKPOINT_DIR
    from .models.nbnet import _read_any, convert_megengine_state_dict

    if not args.weights:
        raise UsageError("no --weights given: pass a `spatial-attention train-denoiser` run "
                         "directory, a weights file, or the official NBNet checkpoint.pkl")
    name, model_args = args.model, {}
    weights = Path(args.weights).expanduser()
    if weights.is_dir():  # a train-denoiser run directory
        cfg = _run_config(weights, "--weights")
        name = args.model or cfg.get("model", "nbnet")
        model_args = cfg.get("model_args", {})
        weights = weights / CHECKPOINT_DIR / "model.safetensors"
    elif weights.parent.name == CHECKPOINT_DIR and \
            (weights.parent.parent / "config.json").is_file():
        # the weights file of a run: the run beside it knows the model and its arguments
        cfg = _run_config(weights.parent.parent, "--weights")
        run_model = cfg.get("model", "nbnet")
        if name is None or _denoiser_name(name) == run_model:
            name, model_args = run_model, cfg.get("model_args", {})
    if name is None:
        name = _named_in_file(weights)
    if name is not None:
        name = _denoiser_name(name)
    state = convert_megengine_state_dict(_read_any(weights))
    if name is None:  # a bare file: whichever model its keys and shapes fit
        fits = [n for n in denoiser_names() if _fits(n, state)]
        if not fits:
            raise UsageError(
                f"--weights {weights}: its keys and shapes fit none of "
                f"{', '.join(denoiser_names())} at their default sizes; pass --model, or "
                "the run directory if it was trained with --model-arg"
            )
        name = fits[0]
    model = build_denoiser(name, model_args)
    from .checkpoint import check_state_dict

    try:
        check_state_dict(model.state_dict(), state, f"checkpoint {weights}")
    except UsageError as exc:
        fits = [n for n in denoiser_names() if n != name and _fits(n, state)]
        if fits:
            raise UsageError(f"--weights {weights} holds {fits[0]} weights, not {name}'s: "
                             f"pass --model {fits[0]}") from None
        raise exc from None
    model.load_state_dict(state)
    return model.eval()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``spatial-attention denoise``."""
    parser.add_argument("input", metavar="IN", help="image file, or builtin:NAME")
    parser.add_argument("--out", required=True, metavar="OUT",
                        help="where to write the denoised image (.png, .jpg, ...)")
    parser.add_argument("--weights",
                        help="(needed) a train-denoiser run directory, a .safetensors/.pt/.npz "
                        "file, or the official MegEngine checkpoint.pkl")
    parser.add_argument("--model", help="nbnet (default) or nbnet_small; a run directory "
                        "names its own")
    parser.add_argument("--sigma", type=float,
                        help="add Gaussian noise of this level (0..255) to IN first, and "
                        "report PSNR/SSIM against the clean IN (a synthetic test)")
    parser.add_argument("--noisy-out", help="also write the noisy input here (with --sigma)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed for --sigma")
    parser.add_argument("--tile", type=int, default=256, help="tile size (default 256)")
    parser.add_argument("--overlap", type=int, default=32, help="tile overlap (default 32)")
    parser.add_argument("--batch", type=int, default=4, help="tiles per forward (default 4)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction,
                        help="progress bar (default: when stderr is a terminal)")


def _write_image(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    if not path.parent.is_dir():
        raise UsageError(f"--out: directory {path.parent} does not exist")
    try:
        Image.fromarray(image).save(path)
    except (ValueError, KeyError) as exc:
        raise UsageError(f"--out {path}: cannot write this format ({exc})") from None
    except OSError as exc:
        raise UsageError(f"--out {path}: {exc.strerror or exc}") from None


def run(args: argparse.Namespace) -> int:
    from .images import load_image

    out = Path(args.out).expanduser()
    if args.sigma is not None and not args.sigma > 0:
        raise UsageError(f"--sigma must be positive, got {args.sigma}")
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    image = load_image(args.input)  # UsageError for missing / unreadable files
    model = _load_model(args).to(torch.device(args.device))
    clean = _to_tensor(image).to(args.device)
    noisy = clean
    if args.sigma is not None:
        g = torch.Generator().manual_seed(args.seed)
        noisy = add_noise(clean.cpu(), "gaussian", args.sigma, generator=g).to(args.device)
        if args.noisy_out:
            _write_image(Path(args.noisy_out).expanduser(), _to_uint8(noisy.cpu()))
    progress = args.progress if args.progress is not None else sys.stderr.isatty()
    t0 = time.perf_counter()
    result = denoise_tiled(model, noisy, args.tile, args.overlap, args.batch, progress,
                           torch.bfloat16 if args.bf16 else None)
    seconds = time.perf_counter() - t0
    _write_image(out, _to_uint8(result.cpu()))
    H, W = image.shape[:2]
    msg = f"wrote {out} ({W}x{H}, {seconds:.2f} s, {H * W / 1e6 / seconds:.3f} MP/s)"
    if args.sigma is not None:
        q = (result.cpu().clamp(0, 1) * 255).round()[None] / 255  # what the file holds
        ref, nz = clean.cpu()[None], noisy.cpu()[None].clamp(0, 1)
        msg += (f"; sigma {args.sigma:g}: PSNR {float(psnr(nz, ref)):.2f} -> "
                f"{float(psnr(q, ref)):.2f} dB, SSIM {float(ssim(nz, ref)):.4f} -> "
                f"{float(ssim(q, ref)):.4f}")
    print(msg)
    return 0
