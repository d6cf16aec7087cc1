"""``spatial-attention yolo``: Ultralytics' own command line, with the ``sa.<name>`` layers.

    spatial-attention yolo --list                      # the shipped YAMLs: name, task, path
    spatial-attention yolo --path yolo11-seg-cbam      # one shipped YAML's path
    spatial-attention yolo train model=yolo11s-cbam.yaml data=data.yaml epochs=100
    spatial-attention yolo val model=runs/detect/train/weights/best.pt data=data.yaml

Everything after ``yolo`` goes to Ultralytics' ``entrypoint`` (its ``yolo`` command: modes
train / val / predict / export, ``key=value`` arguments) after ``register()``; ``model=``
may name a shipped YAML, with a scale letter or not. The work is
``spatial_attention.integrations.ultralytics.yolo_command``; this module is its argparse.
"""

from __future__ import annotations

import argparse

from ..errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--list", action="store_true", help="the shipped YAMLs: name, task, path")
    parser.add_argument("--path", metavar="NAME",
                        help="print the path of shipped YAML NAME (e.g. yolo11-cbam)")
    parser.add_argument(
        "args", nargs=argparse.REMAINDER, metavar="ARGS",
        help="Ultralytics' arguments: MODE key=value ... (model= may name a shipped YAML)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        from . import ultralytics as sa_yolo
    except ImportError as e:  # pragma: no cover - only without torch pieces
        raise UsageError(str(e)) from e
    if args.list:
        names = sa_yolo.list_configs()
        w = max(len(n) for n in names)
        print(f"{'name':<{w}}  {'task':<7}  path")
        for name in names:
            print(f"{name:<{w}}  {sa_yolo.config_task(name):<7}  {sa_yolo.config_path(name)}")
        return 0
    if args.path:
        print(sa_yolo.config_path(args.path))
        return 0
    try:
        sa_yolo.yolo_command(args.args)
    except ImportError as e:  # Ultralytics missing
        raise UsageError(str(e)) from e
    except (sa_yolo.TorchvisionError, SyntaxError) as e:
        # a torchvision without operators; Ultralytics' argument checks (SyntaxError)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(msg) from e
    return 0
