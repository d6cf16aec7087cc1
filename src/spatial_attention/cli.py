"""The ``spatial-attention`` command: list, info, bench, viz, train, evaluate, denoise,
train-denoiser, compare, yolo.

Each subcommand's options live with the code it drives (``viz.py`` in the core; the
applications under ``apps/``: ``bench``, ``training.cli``, ``denoise.cli``), which exposes
``add_arguments(parser)`` and ``run(args) -> int``; this module only assembles them.
Bad arguments or inputs print one line to stderr and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import registry
from .errors import UsageError

PROG = "spatial-attention"


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors in one line (exit 2) instead of usage + message."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _cmd_list(args: argparse.Namespace) -> int:
    from .models import list_models, model_info

    if args.markdown:
        print(registry.markdown_table())
        return 0
    names = registry.list_mechanisms(family=args.family, layout=args.layout)
    rows = [(n, registry.info(n)) for n in names]
    order = {f: i for i, f in enumerate(registry.FAMILIES)}
    rows.sort(key=lambda r: (order[r[1].family], r[0]))
    w = max([len(n) for n, _ in rows] + [9])
    print(f"{'mechanism':<{w}}  {'family':<19} {'layout':<9} paper")
    for name, e in rows:
        year = f" ({e.year})" if e.year else ""
        print(f"{name:<{w}}  {e.family:<19} {e.layout:<9} {e.paper}{year}")
    if args.family is None and args.layout is None:
        models = list_models()
        if models:
            print()
            w = max(len(m) for m in models + ["model"])
            print(f"{'model':<{w}}  {'family':<19} paper")
            for m in models:
                mi = model_info(m)
                print(
                    f"{m:<{w}}  {mi.family:<19} {mi.paper}" + (f" ({mi.year})" if mi.year else "")
                )
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from . import info
    from .models import ModelInfo

    found = info(args.name)
    if isinstance(found, ModelInfo):
        print(f"{found.name}: {found.summary}\n  family: {found.family}\n  paper:  {found.paper}")
        return 0
    print(found.describe())
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("spatial-attention")
    except PackageNotFoundError:  # run from a source tree that was never installed
        from . import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Attention mechanisms for vision models.")
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("list", help="table of mechanisms and models")
    p.add_argument("--family", choices=registry.FAMILIES)
    p.add_argument("--layout", choices=tuple(registry.LAYOUTS))
    p.add_argument("--markdown", action="store_true", help="the README's markdown table")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("info", help="paper, layout, signature and cost of one mechanism or model")
    p.add_argument("name")
    p.set_defaults(func=_cmd_info)

    from .apps import bench
    from .apps.compare import cli as compare
    from .apps.denoise import cli as denoise
    from .apps.explain import cli as viz
    from .apps.training import cli as train

    p = sub.add_parser("bench", help="parameters, FLOPs, time and memory of mechanisms")
    bench.add_arguments(p)
    p.set_defaults(func=bench.run)

    p = sub.add_parser("viz", help="what a mechanism (random weights) or a trained model "
                       "attends to, over images")
    viz.add_arguments(p)
    p.set_defaults(func=viz.run)

    p = sub.add_parser("train", help="train an image classifier with any mechanism")
    train.add_arguments(p)
    p.set_defaults(func=train.run)

    p = sub.add_parser("evaluate", help="accuracy, per-class accuracy and confusion of a run")
    train.add_evaluate_arguments(p)
    p.set_defaults(func=train.run_evaluate)

    p = sub.add_parser("denoise", help="denoise an image with NBNet (tiled, any size)")
    denoise.add_arguments(p)
    p.set_defaults(func=denoise.run)

    p = sub.add_parser("train-denoiser", help="train NBNet on synthetic noise; PSNR/SSIM")
    denoise.add_train_arguments(p)
    p.set_defaults(func=denoise.run_train)

    p = sub.add_parser("compare", help="equal-budget CIFAR-10 accuracy of map mechanisms (or, "
                       "with --tokens, of token mixers in a small transformer) "
                       "(resumable queue; results.csv, summary.md, summary.png)")
    compare.add_arguments(p)
    p.set_defaults(func=compare.run)

    from .integrations import ultralytics_cli as yolo_cli

    p = sub.add_parser("yolo", help="Ultralytics' yolo command (train, val, predict, export) "
                       "with the sa.<name> layers; --list shows the shipped YAMLs")
    yolo_cli.add_arguments(p)
    p.set_defaults(func=yolo_cli.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UsageError, ValueError, FileNotFoundError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"{PROG} {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
