"""``spatial-attention denoise`` and ``spatial-attention train-denoiser``: options and runs.

``denoise`` uses the denoiser shipped for ``--noise`` (:mod:`.default`) unless
``--weights`` names another: a train-denoiser run directory (its config names the model
and its arguments), a safetensors file whose metadata names it, or any weights file,
tried against each denoiser's keys and shapes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ...checkpoint import check_state_dict
from ...errors import UsageError
from ..training.checkpoints import CHECKPOINT_DIR
from .default import SHIPPED, load_default
from .metrics import psnr, ssim
from .noise import NOISE_MODELS, add_noise
from .tiling import denoise_tiled
from .train import (
    TRAIN_DEFAULTS,
    _denoiser_name,
    _run_config,
    _to_tensor,
    _to_uint8,
    build_denoiser,
    denoiser_names,
    train_denoiser,
)

__all__ = ["add_arguments", "add_train_arguments", "run", "run_train"]


# -- train-denoiser -------------------------------------------------------------------------


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
    parser.add_argument("--shot-range", type=float, nargs=2, metavar=("LO", "HI"),
                        help="blind Poisson-Gaussian training: draw each patch's a "
                        "log-uniformly in [LO, HI] (--shot stays the validation level)")
    parser.add_argument("--read-range", type=float, nargs=2, metavar=("LO", "HI"),
                        help="the same for b (--read stays the validation level)")
    parser.add_argument("--init-from", metavar="RUN_OR_FILE",
                        help="start from these weights (a train-denoiser run or a "
                        ".safetensors file of the same model): fine-tuning")
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
    from ..training.config import _parse_model_args

    cfg = {k: v for k, v in vars(args).items() if k in TRAIN_DEFAULTS and v is not None}
    if args.model_arg:
        cfg["model_args"] = _parse_model_args(args.model_arg)
    train_denoiser(cfg, resume=args.resume)
    return 0


# -- denoise ------------------------------------------------------------------------------


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
    from ...models.nbnet import _read_any, convert_megengine_state_dict

    if not args.weights:
        noise = args.noise or "gaussian"
        shipped = SHIPPED.get(noise)
        if args.model is not None and shipped is not None and \
                _denoiser_name(args.model) != shipped:
            raise UsageError(f"the shipped {noise} denoiser is {shipped}; --model "
                             f"{args.model} needs --weights (a train-denoiser run or file)")
        return load_default(noise)
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
    parser.add_argument("--noise", choices=NOISE_MODELS,
                        help="which shipped denoiser to use (default gaussian); ignored "
                        "with --weights")
    parser.add_argument("--weights",
                        help="instead of the shipped denoiser: a train-denoiser run "
                        "directory, a .safetensors/.pt/.npz file, or the official MegEngine "
                        "checkpoint.pkl")
    parser.add_argument("--model", help="with --weights: nbnet, nbnet_small or "
                        "nbnet_medium (a run directory or its file's metadata names its own)")
    parser.add_argument("--sigma", type=float,
                        help="a synthetic test: add Gaussian noise of this level (0..255) to "
                        "IN first, and report PSNR/SSIM before and after against the clean "
                        "IN; it does not tell the (blind) denoiser the level")
    parser.add_argument("--shot", type=float, metavar="A",
                        help="a synthetic Poisson-Gaussian test instead: add "
                        "A * Poisson(IN / A) + B n to IN first (see --read) and report "
                        "PSNR/SSIM before and after")
    parser.add_argument("--read", type=float, metavar="B",
                        help="with --shot: the Gaussian read-noise std B in [0, 1] units "
                        "(default 0.02)")
    parser.add_argument("--noisy-out", help="also write the noisy input here (with --sigma "
                        "or --shot)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed for --sigma/--shot")
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


def _to_image(x: Tensor) -> np.ndarray:
    """``(C, H, W)`` in [0, 1] -> uint8 ``(H, W, 3)``, or ``(H, W)`` for one channel."""
    arr = _to_uint8(x)
    return arr[..., 0] if arr.shape[-1] == 1 else arr


def run(args: argparse.Namespace) -> int:
    from ...images import load_image

    out = Path(args.out).expanduser()
    if args.sigma is not None and not args.sigma > 0:
        raise UsageError(f"--sigma must be positive, got {args.sigma}")
    if args.sigma is not None and args.shot is not None:
        raise UsageError("--sigma (Gaussian) and --shot (Poisson-Gaussian) are two synthetic "
                         "tests: give one")
    if args.read is not None and args.shot is None:
        raise UsageError("--read needs --shot (the Poisson-Gaussian test)")
    read = 0.02 if args.read is None else args.read
    if args.shot is not None and (not args.shot > 0 or not read >= 0):
        raise UsageError(f"--shot must be > 0 and --read >= 0, got {args.shot}, {read}")
    test = ("gaussian" if args.sigma is not None
            else "poisson_gaussian" if args.shot is not None else None)
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    image = load_image(args.input)  # UsageError for missing / unreadable files
    # load_image always gives 3 channels; equal ones mean a grey file, which comes back grey
    grey = bool((image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all())
    model = _load_model(args).to(torch.device(args.device))
    clean = _to_tensor(image[..., :1] if grey else image).to(args.device)
    noisy = clean
    if test is not None:
        g = torch.Generator().manual_seed(args.seed)
        # a grey image's noise is one field, the same in the 3 channels the model sees
        noisy = add_noise(clean.cpu(), test, sigma=args.sigma or 0.0,
                          shot=args.shot or 1.0, read=read, generator=g).to(args.device)
        if args.noisy_out:
            _write_image(Path(args.noisy_out).expanduser(), _to_image(noisy.cpu()))
    progress = args.progress if args.progress is not None else sys.stderr.isatty()
    t0 = time.perf_counter()
    result = denoise_tiled(model, noisy.expand(3, -1, -1) if grey else noisy, args.tile,
                           args.overlap, args.batch, progress,
                           torch.bfloat16 if args.bf16 else None)
    if grey:  # three estimates of one grey value: their mean
        result = result.mean(0, keepdim=True)
    seconds = time.perf_counter() - t0
    _write_image(out, _to_image(result.cpu()))
    H, W = image.shape[:2]
    msg = (f"wrote {out} ({W}x{H}{' grey' if grey else ''}, {seconds:.2f} s, "
           f"{H * W / 1e6 / seconds:.3f} MP/s)")
    if test is not None:
        q = (result.cpu().clamp(0, 1) * 255).round()[None] / 255  # what the file holds
        ref, nz = clean.cpu()[None], noisy.cpu()[None].clamp(0, 1)
        level = (f"sigma {args.sigma:g}" if test == "gaussian"
                 else f"Poisson-Gaussian a={args.shot:g} b={read:g}")
        msg += (f"; {level}: PSNR {float(psnr(nz, ref)):.2f} -> "
                f"{float(psnr(q, ref)):.2f} dB, SSIM {float(ssim(nz, ref)):.4f} -> "
                f"{float(ssim(q, ref)):.4f}")
    print(msg)
    return 0
