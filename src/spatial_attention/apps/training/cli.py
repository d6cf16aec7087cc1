"""``spatial-attention train`` and ``spatial-attention evaluate``: their options, and the
torchrun entry ``python -m spatial_attention.train`` (also ``-m spatial_attention.apps.training``).

Parsing only; the work is :func:`~spatial_attention.apps.training.loop.train` and
:func:`~spatial_attention.apps.training.loop.evaluate_run`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from ...errors import UsageError
from .config import _OPT_DEFAULTS, DEFAULTS, PROG
from .loop import evaluate_run, train

__all__ = ["add_arguments", "add_evaluate_arguments", "main", "run", "run_evaluate"]


# -- train --------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``spatial-attention train`` (and ``python -m spatial_attention.train``)."""
    d = DEFAULTS
    g = parser.add_argument_group("model")
    g.add_argument("--model", help=f"registered model or timm:NAME (default {d['model']})")
    g.add_argument("--attn", help="mechanism for the model's attn_layer / token mixer "
                   "(e.g. se, cbam; multi_head for ViTs; 'none')")
    g.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                   help="extra model constructor argument, VALUE parsed as JSON when it can "
                   "be (repeatable), e.g. --model-arg width=16")
    g.add_argument("--init-from", metavar="RUN_OR_FILE",
                   help="start a new run from these weights: a run directory (its EMA "
                   "weights if kept, else its model weights) or a .safetensors / torch "
                   "file; shapes must match, keys the file lacks keep their initialisation "
                   "(both reported by name)")
    g.add_argument("--pretrained", metavar="FILE",
                   help="timm: models only: a local weights file loaded by timm's "
                   "pretrained loader (a classifier of another class count is dropped); "
                   "nothing is downloaded")
    g = parser.add_argument_group("data")
    g.add_argument("--data", help="image folder, tar of one, or builtin:digits (default)")
    g.add_argument("--val", help="validation folder/tar (default: test.tar/val.tar beside a "
                   "train.tar, root/val or root/test beside root/train, else --val-split)")
    g.add_argument("--val-split", type=float,
                   help=f"fraction held out when there is no validation set ({d['val_split']})")
    g.add_argument("--img-size", type=int, help=f"images are resized to this ({d['img_size']})")
    g.add_argument("--pad", type=int, help="random-crop padding (default img-size // 8)")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction,
                   help="random horizontal flips (default: on, off for digits)")
    g.add_argument("--workers", type=int, help=f"DataLoader workers per process ({d['workers']})")
    g.add_argument("--threads", type=int, metavar="N",
                   help="torch CPU threads for this process (default: torch's choice); "
                   "does not change the results' settings")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, help=f"default {d['epochs']}; with --resume, more "
                   "than the run has done extends it (the schedule is recomputed for the "
                   "new total from the run's step)")
    g.add_argument("--batch", type=int, help=f"global batch size, all ranks ({d['batch']})")
    g.add_argument("--opt", choices=tuple(_OPT_DEFAULTS), help="adamw (default) or sgd")
    g.add_argument("--lr", type=float, help="peak learning rate (adamw 2e-3, sgd 0.1)")
    g.add_argument("--wd", type=float, help="weight decay (adamw 0.05, sgd 5e-4)")
    g.add_argument("--momentum", type=float, help=f"SGD momentum, Nesterov ({d['momentum']})")
    g.add_argument("--warmup-epochs", type=float,
                   help=f"linear warm-up before the cosine decay ({d['warmup_epochs']})")
    g.add_argument("--min-lr", type=float, help="learning rate at the end of the cosine (0)")
    g.add_argument("--label-smoothing", type=float, help=f"({d['label_smoothing']})")
    g.add_argument("--clip-grad", type=float, help="clip the gradient norm (0: off)")
    g.add_argument("--ema", type=float, metavar="DECAY",
                   help="keep an EMA of the weights with this decay, e.g. 0.999 (0: off)")
    g.add_argument("--seed", type=int, help=f"({d['seed']})")
    g = parser.add_argument_group("execution")
    g.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    g.add_argument("--amp", choices=("auto", "off", "bf16", "fp16"),
                   help="mixed precision; auto = bf16 where the device supports it")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                   help="channels_last memory format (default: on)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile the model")
    g.add_argument("--sync-bn", action=argparse.BooleanOptionalAction,
                   help="SyncBatchNorm across ranks (CUDA only)")
    g.add_argument("--deterministic", action=argparse.BooleanOptionalAction,
                   help="torch.use_deterministic_algorithms (CPU runs already are)")
    g = parser.add_argument_group("run")
    g.add_argument("--out", help="run directory (default runs/<model>[-<attn>]-<data>)")
    g.add_argument("--resume", nargs="?", const=True, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR (or --out) exactly where it stopped")
    g.add_argument("--stop-at-step", type=int, metavar="N",
                   help="save a checkpoint and stop after N optimizer steps in all")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction,
                   help="progress bars (default: when stderr is a terminal)")
    g.add_argument("--overlays", type=int,
                   help=f"attention overlays of this many validation images ({d['overlays']})")


def run(args: argparse.Namespace) -> int:
    """``spatial-attention train``."""
    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be >= 1, got {threads}")
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return train(args)
    finally:
        torch.set_num_threads(previous)


# -- evaluate -----------------------------------------------------------------------------


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``spatial-attention evaluate``."""
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a directory made by train")
    parser.add_argument("--data", help="evaluate on this folder/tar instead of the run's "
                        "validation set")
    parser.add_argument("--weights", choices=("auto", "model", "ema"), default="auto",
                        help="auto: the EMA weights when the run kept them")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--overlays", type=int, default=8,
                        help="attention overlays of this many images (0: none)")


def run_evaluate(args: argparse.Namespace) -> int:
    """``spatial-attention evaluate RUN_DIR``."""
    r = evaluate_run(args.run_dir, args.data, args.weights, args.batch, args.workers,
                     args.device, args.overlays)
    print(f"{r['run']}: accuracy {r['accuracy']:.4f} on {r['images']} images "
          f"({r['weights']} weights, {r['data']})")
    if r["unreadable"]:
        print(f"  {r['unreadable']} unreadable images skipped")
    w = max(len(c) for c in r["classes"])
    for c, acc in r["per_class_accuracy"].items():
        print(f"  {c:<{w}}  {acc:.4f}")
    print(f"wrote {Path(r['run']) / 'eval.json'}"
          + (f", {r['confusion_png']}" if "confusion_png" in r else "")
          + (f", {len(r['overlays'])} attention overlays" if r["overlays"] else ""))
    return 0


# -- python -m spatial_attention.train (torchrun) -----------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m spatial_attention.train`` (what torchrun launches)."""
    parser = argparse.ArgumentParser(
        prog="python -m spatial_attention.train",
        description="Train an image classifier (the options of `spatial-attention train`).",
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)  # --threads applies here too
    except (UsageError, ValueError, FileNotFoundError) as exc:
        if int(os.environ.get("RANK", "0")) == 0:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 2

