"""Ultralytics YOLO: every map mechanism by name in a model YAML, without editing Ultralytics.

>>> from spatial_attention.integrations.ultralytics import build_yolo, register
>>> register()                         # once per process; build_yolo calls it for you
>>> model = build_yolo("yolo11-cbam", scale="s")   # an ultralytics.YOLO
>>> model.train(data="data.yaml", epochs=100)

Shipped YAMLs (:func:`list_configs`, :func:`config_path`) cover detection
(``yolo11-cbam``), segmentation (``yolo11-seg-cbam``) and pose (``yolo11-pose-cbam``);
``spatial-attention yolo train model=yolo11s-cbam.yaml data=...`` is Ultralytics' own
command line with these layers (:func:`yolo_command`).

In a model YAML a mechanism is written ``sa.<name>`` and takes no channel argument::

    - [-1, 1, C3k2, [512, False]]
    - [-1, 1, sa.cbam, []]            # channels: whatever the previous layer gives
    - [-1, 1, sa.se, [8]]             # mechanism arguments after channels, positionally
    - [-1, 1, sa.gam, [{rate: 4}]]    # or as a mapping of keyword arguments, last

How it fits Ultralytics (``ultralytics/nn/tasks.py``): ``parse_model`` resolves a module
name with ``globals()[name]`` in the tasks module, computes input channels only for the
modules it knows, and calls every other module as ``m(*args)``; string arguments are
first looked up among its local variables (that is how ``[nc]`` becomes the class count).
:func:`register` therefore

1. puts one small ``nn.Module`` class per map mechanism into the tasks namespace under the
   key ``"sa.<name>"`` (a dotted key cannot clash with any name Ultralytics defines), and
2. wraps ``tasks.parse_model`` so that, in a copy of each ``sa.<name>`` row, the arguments
   start with ``"c2"`` (a local of ``parse_model`` that holds the previous layer's output
   channels when the row reads from ``-1``) or with ``"ch"`` and the row's ``from`` index
   (the list of every layer's output channels). The layer picks its input channels from
   those. Channels therefore scale with the model's width multiple and ``max_channels``
   exactly as the layer before it does, and one YAML serves every scale n/s/m/l/x; the
   output channel count Ultralytics records for the row is its input's (``c2 = ch[f]``),
   which is right for attention that keeps ``(B, C, H, W)``.

Checkpoints pickle the layers by reference to this module (``SA_<name>`` classes, made on
demand), so ``YOLO("best.pt")`` reloads them with nothing registered; unpickling one also
calls :func:`register` when Ultralytics is imported, so a reloaded model can be trained
again (Ultralytics rebuilds it from its YAML). Everything is undone by :func:`unregister`.
"""

from __future__ import annotations

import difflib
import re
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..registry import create, info
from .timm import compatible_mechanisms, frame_map_problem

__all__ = [
    "PREFIX",
    "SCALES",
    "SHIPPED_MECHANISMS",
    "SHIPPED_TASK_MECHANISMS",
    "TASKS",
    "TorchvisionError",
    "YOLOAttention",
    "build_yolo",
    "config_name",
    "config_path",
    "config_task",
    "layer_class",
    "list_configs",
    "model_argument",
    "register",
    "registered",
    "torchvision_problem",
    "unregister",
    "yolo_command",
    "yolo_config",
    "yolo_yaml",
]

#: module names in a YOLO YAML are ``PREFIX + mechanism name``
PREFIX = "sa."
SCALES = ("n", "s", "m", "l", "x")
CONFIG_DIR = Path(__file__).with_name("yolo_cfg")


class _From:
    """The ``from`` index of a row, carried through ``parse_model`` next to its ``ch`` list."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __repr__(self) -> str:
        return f"from={self.index}"


class YOLOAttention(nn.Module):
    """A registered map mechanism as a YOLO layer; subclasses bind the mechanism name.

    ``SA_cbam(c1, *args, {kw: v})`` builds ``create("cbam", c1, *args, kw=v)``. Inside a
    model YAML, ``c1`` is filled in by the wrapped ``parse_model`` (see the module doc).
    Shapes: ``(B, C, H, W) -> (B, C, H, W)``; the mechanism is the child ``attn``, so
    ``capture_attention`` records it as ``model.<i>.attn``.
    """

    mechanism: ClassVar[str] = ""

    def __init__(self, c1: Any, *args: Any) -> None:
        super().__init__()
        name = self.mechanism
        if not name:
            raise TypeError("YOLOAttention is abstract: use layer_class(name) or 'sa.<name>'")
        if isinstance(c1, list):  # parse_model's channel list, then the row's from index
            if not (args and isinstance(args[0], _From)):
                raise TypeError(f"{PREFIX}{name}: got a channel list without a from index")
            c1, args = c1[args[0].index], args[1:]
        if isinstance(c1, bool) or not isinstance(c1, int):
            raise TypeError(
                f"{PREFIX}{name}: expected the input channel count (an int) first, got {c1!r}. "
                "In a YAML the channels come from the previous layer: call "
                "spatial_attention.integrations.ultralytics.register() before building, and "
                "if it was called, this Ultralytics version builds layers in a way it does "
                "not know"
            )
        kwargs: dict[str, Any] = {}
        if args and isinstance(args[-1], Mapping):
            kwargs, args = dict(args[-1]), args[:-1]
        self.c1 = c1
        self.attn = create(name, c1, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        return self.attn(x)

    def extra_repr(self) -> str:
        return f"{PREFIX}{self.mechanism}"

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # a reloaded checkpoint may be trained again, which rebuilds it from its YAML
        if "ultralytics.nn.tasks" in sys.modules and not registered():
            register()


_CLASSES: dict[str, type[YOLOAttention]] = {}


def layer_class(name: str) -> type[YOLOAttention]:
    """The YOLO layer class of map mechanism ``name`` (``SA_<name>`` in this module)."""
    if name not in _CLASSES:
        problem = frame_map_problem(name)  # unknown names: ValueError naming the closest
        if problem:
            raise ValueError(
                f"{PREFIX}{name}: {problem}; a YOLO layer takes and returns (B, C, H, W), so "
                f"it needs one of {[PREFIX + n for n in compatible_mechanisms()]}"
            )
        summary = info(name).summary
        cls_name = f"SA_{name}"
        cls = type(
            cls_name,
            (YOLOAttention,),
            {
                "mechanism": name,
                "__module__": __name__,
                "__qualname__": cls_name,
                "__doc__": f"YOLO layer ``{PREFIX}{name}``: {summary}",
            },
        )
        _CLASSES[name] = cls
        globals()[cls_name] = cls  # pickling finds classes by module attribute
    return _CLASSES[name]


def __getattr__(attr: str) -> Any:  # PEP 562: unpickling SA_<name> in a fresh process
    if attr.startswith("SA_"):
        try:
            return layer_class(attr[3:])
        except ValueError:
            pass
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


# -- hooking into Ultralytics -------------------------------------------------------------


def _tasks():
    try:
        from ultralytics.nn import tasks
    except ImportError as e:  # pragma: no cover - exercised only without ultralytics
        raise ImportError(
            "spatial_attention.integrations.ultralytics needs Ultralytics: "
            "pip install 'spatial-attention[yolo]' (ultralytics-opencv-headless)"
        ) from e
    return tasks


def _layer_error(module: str, index: int, problem: str) -> ValueError:
    """A bad ``sa.<name>`` row: the layer as written, where it is, why, and what exists."""
    return ValueError(
        f"YOLO layer {module!r} (row {index} of the model YAML): {problem}; the {PREFIX}<name> "
        f"layers available: {', '.join(PREFIX + n for n in compatible_mechanisms())}"
    )


def _rewrite_row(row: list, index: int = -1) -> list:
    f, n, m, args = row[:4]
    name = m[len(PREFIX):]
    # unknown or non-map names: a clear ValueError before Ultralytics runs
    known = compatible_mechanisms()
    if name not in known:
        try:
            problem = frame_map_problem(name)
        except ValueError:  # not registered at all
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
            hint = f" (did you mean {', '.join(PREFIX + c for c in close)}?)" if close else ""
            problem = f"unknown mechanism {name!r}{hint}"
        if problem:
            raise _layer_error(m, index, problem)
    layer_class(name)
    args = list(args or [])
    if f == -1:
        lead = ["c2"]  # parse_model's local: output channels of the previous layer
    elif isinstance(f, int) and not isinstance(f, bool):
        lead = ["ch", _From(f)]  # parse_model's local: output channels of every layer
    else:
        raise ValueError(
            f"{m}: an attention layer reads one input, got from={f!r}; "
            "concatenate first (Concat) and put the attention after it"
        )
    return [f, n, m, lead + args, *row[4:]]


def _inject(tasks) -> None:
    for name in compatible_mechanisms():
        vars(tasks)[PREFIX + name] = layer_class(name)


def _wrap(parse_model):
    def parse_model_with_attention(d, ch, verbose=True):
        rows = [*d.get("backbone", []), *d.get("head", [])]
        if any(isinstance(r[2], str) and r[2].startswith(PREFIX) for r in rows):
            d = dict(d)
            start = {"backbone": 0, "head": len(d.get("backbone", []))}
            for part in ("backbone", "head"):
                d[part] = [
                    _rewrite_row(r, i) if isinstance(r[2], str) and r[2].startswith(PREFIX) else r
                    for i, r in enumerate(d.get(part, []), start=start[part])
                ]
            _inject(_tasks())  # mechanisms registered after register() work too
        return parse_model(d, ch, verbose)

    parse_model_with_attention.__wrapped__ = parse_model
    parse_model_with_attention.__doc__ = parse_model.__doc__
    parse_model_with_attention._spatial_attention = True
    return parse_model_with_attention


def _library_modules() -> list[type]:
    """Every nn.Module class of ``spatial_attention.layers`` and the YOLO layer classes."""
    found = set(_CLASSES.values())
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or not mod_name.startswith("spatial_attention.layers"):
            continue
        for value in vars(mod).values():
            if (
                isinstance(value, type)
                and issubclass(value, nn.Module)
                and value.__module__.startswith("spatial_attention.")
            ):
                found.add(value)
    return sorted(found, key=lambda c: (c.__module__, c.__qualname__))


def _allow_weights_only_load() -> None:
    # Ultralytics' opt-in restricted loading (ULTRALYTICS_SAFE_LOAD, torch_safe_load(...,
    # safe_only=True)) unpickles with torch.load(weights_only=True) and an allow-list of
    # its own and torch's classes; ours join torch's process-wide list of safe globals.
    add = getattr(torch.serialization, "add_safe_globals", None)
    if add is not None:
        add(_library_modules())


def registered() -> bool:
    """Whether :func:`register` is in effect (and Ultralytics is imported)."""
    tasks = sys.modules.get("ultralytics.nn.tasks")
    return bool(tasks and getattr(tasks.parse_model, "_spatial_attention", False))


def register() -> list[str]:
    """Make every map mechanism usable as ``sa.<name>`` in YOLO YAMLs; idempotent.

    Returns the module names now available. Touches only the running process: the
    ``ultralytics.nn.tasks`` namespace and its ``parse_model`` (undo with :func:`unregister`),
    and torch's list of safe globals, so that Ultralytics' opt-in restricted loading
    (``ULTRALYTICS_SAFE_LOAD=1``) accepts checkpoints with these layers.
    """
    tasks = _tasks()
    if not getattr(tasks.parse_model, "_spatial_attention", False):
        tasks.parse_model = _wrap(tasks.parse_model)
        import ultralytics.nn as unn

        if getattr(unn, "parse_model", None) is tasks.parse_model.__wrapped__:
            unn.parse_model = tasks.parse_model
    _inject(tasks)
    _allow_weights_only_load()
    return [PREFIX + n for n in compatible_mechanisms()]


def unregister() -> None:
    """Undo :func:`register`: restore ``parse_model`` and drop the ``sa.*`` names."""
    tasks = sys.modules.get("ultralytics.nn.tasks")
    if tasks is None:
        return
    wrapped = getattr(tasks.parse_model, "__wrapped__", None)
    if getattr(tasks.parse_model, "_spatial_attention", False) and wrapped is not None:
        import ultralytics.nn as unn

        if getattr(unn, "parse_model", None) is tasks.parse_model:
            unn.parse_model = wrapped
        tasks.parse_model = wrapped
    for key in [k for k in vars(tasks) if k.startswith(PREFIX)]:
        del vars(tasks)[key]


# -- configs --------------------------------------------------------------------------------

# Ultralytics' YOLO11 and YOLOv8 detection layouts (ultralytics/cfg/models), with one
# attention layer before SPPF and one after every C3k2 / C2f of the neck. Rows are
# (from, repeats, module, args[, note]); "ATTN" marks the attention rows, and "from"
# indices count those rows.
_LAYOUTS: dict[str, dict[str, Any]] = {
    "yolo11": {
        "scales": {
            "n": [0.50, 0.25, 1024],
            "s": [0.50, 0.50, 1024],
            "m": [0.50, 1.00, 512],
            "l": [1.00, 1.00, 512],
            "x": [1.00, 1.50, 512],
        },
        "backbone": [
            [-1, 1, "Conv", [64, 3, 2], "P1/2"],
            [-1, 1, "Conv", [128, 3, 2], "P2/4"],
            [-1, 2, "C3k2", [256, False, 0.25]],
            [-1, 1, "Conv", [256, 3, 2], "P3/8"],
            [-1, 2, "C3k2", [512, False, 0.25]],
            [-1, 1, "Conv", [512, 3, 2], "P4/16"],
            [-1, 2, "C3k2", [512, True]],
            [-1, 1, "Conv", [1024, 3, 2], "P5/32"],
            [-1, 2, "C3k2", [1024, True]],
            [-1, 1, "ATTN", []],
            [-1, 1, "SPPF", [1024, 5]],
            [-1, 2, "C2PSA", [1024]],
        ],
        "head": [
            [-1, 1, "nn.Upsample", [None, 2, "nearest"]],
            [[-1, 6], 1, "Concat", [1], "cat backbone P4"],
            [-1, 2, "C3k2", [512, False]],
            [-1, 1, "ATTN", []],
            [-1, 1, "nn.Upsample", [None, 2, "nearest"]],
            [[-1, 4], 1, "Concat", [1], "cat backbone P3"],
            [-1, 2, "C3k2", [256, False]],
            [-1, 1, "ATTN", [], "P3/8-small"],
            [-1, 1, "Conv", [256, 3, 2]],
            [[-1, 15], 1, "Concat", [1], "cat head P4"],
            [-1, 2, "C3k2", [512, False]],
            [-1, 1, "ATTN", [], "P4/16-medium"],
            [-1, 1, "Conv", [512, 3, 2]],
            [[-1, 11], 1, "Concat", [1], "cat head P5"],
            [-1, 2, "C3k2", [1024, True]],
            [-1, 1, "ATTN", [], "P5/32-large"],
            [[19, 23, 27], 1, "Detect", ["nc"]],
        ],
    },
    "yolov8": {
        "scales": {
            "n": [0.33, 0.25, 1024],
            "s": [0.33, 0.50, 1024],
            "m": [0.67, 0.75, 768],
            "l": [1.00, 1.00, 512],
            "x": [1.00, 1.25, 512],
        },
        "backbone": [
            [-1, 1, "Conv", [64, 3, 2], "P1/2"],
            [-1, 1, "Conv", [128, 3, 2], "P2/4"],
            [-1, 3, "C2f", [128, True]],
            [-1, 1, "Conv", [256, 3, 2], "P3/8"],
            [-1, 6, "C2f", [256, True]],
            [-1, 1, "Conv", [512, 3, 2], "P4/16"],
            [-1, 6, "C2f", [512, True]],
            [-1, 1, "Conv", [1024, 3, 2], "P5/32"],
            [-1, 3, "C2f", [1024, True]],
            [-1, 1, "ATTN", []],
            [-1, 1, "SPPF", [1024, 5]],
        ],
        "head": [
            [-1, 1, "nn.Upsample", [None, 2, "nearest"]],
            [[-1, 6], 1, "Concat", [1], "cat backbone P4"],
            [-1, 3, "C2f", [512]],
            [-1, 1, "ATTN", []],
            [-1, 1, "nn.Upsample", [None, 2, "nearest"]],
            [[-1, 4], 1, "Concat", [1], "cat backbone P3"],
            [-1, 3, "C2f", [256]],
            [-1, 1, "ATTN", [], "P3/8-small"],
            [-1, 1, "Conv", [256, 3, 2]],
            [[-1, 14], 1, "Concat", [1], "cat head P4"],
            [-1, 3, "C2f", [512]],
            [-1, 1, "ATTN", [], "P4/16-medium"],
            [-1, 1, "Conv", [512, 3, 2]],
            [[-1, 10], 1, "Concat", [1], "cat head P5"],
            [-1, 3, "C2f", [1024]],
            [-1, 1, "ATTN", [], "P5/32-large"],
            [[18, 22, 26], 1, "Detect", ["nc"]],
        ],
    },
}

# The same layouts with Ultralytics' segmentation and pose heads (its yolo11-seg / -pose and
# yolov8-seg / -pose YAMLs): only the last row and, for pose, ``kpt_shape`` differ. ``nc``
# is Ultralytics' default for that file (training takes the class count from the data).
TASKS = ("detect", "segment", "pose")
_HEADS: dict[str, dict[str, Any]] = {
    "detect": {"module": "Detect", "args": ["nc"], "suffix": "", "title": "object detection"},
    "segment": {
        "module": "Segment", "args": ["nc", 32, 256], "suffix": "seg",
        "title": "instance segmentation",
    },
    "pose": {
        "module": "Pose", "args": ["nc", "kpt_shape"], "suffix": "pose", "title": "pose estimation",
        "kpt_shape": [17, 3],
    },
}
_DEFAULT_NC = {("yolov8", "pose"): 1}

#: the mechanisms of the shipped detection YAMLs (``yolo11-cbam``, ...)
SHIPPED_MECHANISMS = ("cbam", "gam", "cpms", "coord", "simam", "ema", "triplet")
#: the mechanisms of the shipped segmentation and pose YAMLs (``yolo11-seg-cbam``, ...)
SHIPPED_TASK_MECHANISMS = {"segment": ("cbam", "coord"), "pose": ("cbam", "coord")}


def config_name(base: str, mechanism: str, task: str = "detect") -> str:
    """The shipped name of a config: ``yolo11-cbam``, ``yolo11-seg-cbam``, ``yolov8-pose-coord``."""
    suffix = _HEADS[task]["suffix"] if task in _HEADS else None
    if suffix is None:
        raise ValueError(f"YOLO config: unknown task {task!r}; expected one of {TASKS}")
    return f"{base}-{suffix}-{mechanism}" if suffix else f"{base}-{mechanism}"


def yolo_config(
    base: str, mechanism: str, *args: Any, nc: int | None = None, task: str = "detect",
    **kwargs: Any,
) -> dict:
    """A YOLO11 / YOLOv8 config with ``mechanism`` before SPPF and after each C3k2 / C2f of
    the neck, as a dict Ultralytics builds (the shipped YAMLs are these).

    ``task`` picks the head: ``"detect"``, ``"segment"`` or ``"pose"`` (Ultralytics'
    ``Detect`` / ``Segment`` / ``Pose``, as in its ``-seg`` and ``-pose`` YAMLs). ``nc``
    defaults to Ultralytics' value for that file. ``args`` / ``kwargs`` are the mechanism's
    arguments after ``channels``.
    """
    if base not in _LAYOUTS:
        raise ValueError(f"yolo_config: unknown base {base!r}; expected one of {sorted(_LAYOUTS)}")
    config_name(base, mechanism, task)  # an unknown task: a clear ValueError
    layer_class(mechanism)  # a map mechanism, or a clear ValueError
    attn_args = [*args, dict(kwargs)] if kwargs else list(args)
    layout, head = _LAYOUTS[base], _HEADS[task]

    def rows(part: str) -> list[list]:
        out = [
            [f, n, PREFIX + mechanism, list(attn_args)] if m == "ATTN" else [f, n, m, list(a)]
            for f, n, m, a, *_ in layout[part]
        ]
        if part == "head":  # the output module reads the three attended neck outputs
            out[-1][2:] = [head["module"], list(head["args"])]
        return out

    cfg: dict[str, Any] = {"nc": _DEFAULT_NC.get((base, task), 80) if nc is None else nc}
    if "kpt_shape" in head:
        cfg["kpt_shape"] = list(head["kpt_shape"])
    cfg["scales"] = {k: list(v) for k, v in layout["scales"].items()}
    cfg["backbone"] = rows("backbone")
    cfg["head"] = rows("head")
    return cfg


def _flow(value: Any) -> str:
    """One YAML flow value the way Ultralytics writes its configs (``[64, 3, 2]``, ``None``)."""
    if isinstance(value, list):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        plain = re.fullmatch(r"[A-Za-z_][\w.]*", value) and value.lower() not in {
            "null", "none", "true", "false", "yes", "no", "on", "off"
        }
        return value if plain else f'"{value}"'
    return repr(value)


def yolo_yaml(
    base: str, mechanism: str, *args: Any, nc: int | None = None, task: str = "detect",
    **kwargs: Any,
) -> str:
    """:func:`yolo_config` as YAML text in Ultralytics' layout; the shipped files are these."""
    cfg = yolo_config(base, mechanism, *args, nc=nc, task=task, **kwargs)
    title = {"yolo11": "YOLO11", "yolov8": "YOLOv8"}[base]
    call = f"{base!r}, {mechanism!r}" + ("" if task == "detect" else f", task={task!r}")
    lines = [
        f"# {title} {_HEADS[task]['title']} (P3/8 - P5/32) with {PREFIX}{mechanism} attention "
        "before SPPF",
        "# and after every block of the neck. Input channels come from the previous layer.",
        f"# Written by spatial_attention.integrations.ultralytics.yolo_yaml({call});",
        f"# build with build_yolo({config_name(base, mechanism, task)!r}, scale='n') "
        "(any of n/s/m/l/x).",
        "",
        f"nc: {cfg['nc']} # number of classes",
    ]
    if "kpt_shape" in cfg:
        lines.append(f"kpt_shape: {_flow(cfg['kpt_shape'])} # keypoints, dims (x, y, visible)")
    lines.append(
        "scales: # [depth, width, max_channels]; the scale letter comes from the file name"
    )
    lines += [f"  {k}: {_flow(v)}" for k, v in cfg["scales"].items()]
    for part in ("backbone", "head"):
        lines += ["", f"{part}:", "  # [from, repeats, module, args]"]
        start = 0 if part == "backbone" else len(cfg["backbone"])
        specs = _LAYOUTS[base][part]
        for i, (row, spec) in enumerate(zip(cfg[part], specs, strict=True), start=start):
            note = f" {spec[4]}" if len(spec) > 4 else ""
            lines.append(f"  - {_flow(row)} # {i}{note}")
    return "\n".join(lines) + "\n"


def list_configs(task: str | None = None) -> list[str]:
    """Names of the shipped YAMLs (``yolo11-cbam``, ``yolo11-seg-cbam``, ...), for
    :func:`build_yolo` and ``model=`` of ``spatial-attention yolo``; ``task`` keeps those
    of one task (``"detect"``, ``"segment"``, ``"pose"``)."""
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    if task is None:
        return names
    config_name("yolo11", "se", task)  # an unknown task: a clear ValueError
    return [n for n in names if config_task(n) == task]


def config_task(name: str) -> str:
    """The task of a shipped config from its name: ``yolo11-seg-cbam`` -> ``"segment"``."""
    parts = _unscaled(Path(name).stem).split("-")
    for task, head in _HEADS.items():
        if head["suffix"] and head["suffix"] in parts[1:-1]:
            return task
    return "detect"


def config_path(name: str) -> Path:
    """The path of shipped YAML ``name``: ``yolo11-cbam``, ``yolo11-cbam.yaml`` or, with a
    scale letter as Ultralytics writes it, ``yolo11s-cbam``."""
    stem = name[:-5] if name.endswith(".yaml") else name
    match = _SCALE_IN_STEM.match(stem)
    for candidate in (stem, f"{match.group(1)}{match.group(3)}" if match else stem):
        path = CONFIG_DIR / f"{candidate}.yaml"
        if path.is_file():
            return path
    raise _unknown_config(stem)


def _unknown_config(stem: str) -> ValueError:
    close = difflib.get_close_matches(_unscaled(stem), list_configs(), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ValueError(
        f"unknown YOLO config {stem!r}{hint} (`spatial-attention yolo --list` shows the "
        f"{len(list_configs())} shipped ones)"
    )


# Ultralytics reads the scale from the file name (yolo11n-cbam.yaml -> "n") and, when no
# file has that name, loads the one without the scale letter (yolo11-cbam.yaml). Its
# rewrite runs over the whole path string, so we check that it lands on our file.
_SCALE_IN_STEM = re.compile(r"^(yolo(?:e-)?v?\d+)([nslmx])?(.*)$")
_ULTRALYTICS_UNIFY = re.compile(r"(\d+)([nslmx])(.+)?$")


def _scale_of(stem: str) -> str | None:
    match = _SCALE_IN_STEM.match(stem)
    return match.group(2) if match else None


def _scaled_path(path: Path, scale: str, text: str | None) -> Path:
    """A path Ultralytics reads ``scale`` from and that loads this config."""
    match = _SCALE_IN_STEM.match(path.stem)
    if text is None and match:
        if match.group(2) == scale and path.is_file():
            return path
        base = path.with_name(f"{match.group(1)}{match.group(3)}{path.suffix}")
        scaled = path.with_name(f"{match.group(1)}{scale}{match.group(3)}{path.suffix}")
        if (
            base == path
            and not scaled.exists()
            and _ULTRALYTICS_UNIFY.sub(r"\1\3", str(scaled)) == str(path)
        ):
            return scaled
    # a dict, a file name Ultralytics cannot read a scale from, or a directory name that
    # derails its rewrite: write the config once more under a name that carries the scale
    if text is None:
        text = path.read_text()
    stem = f"{match.group(1)}{scale}{match.group(3)}" if match else f"yolo0{scale}-{path.stem}"
    out = Path(tempfile.mkdtemp(prefix="spatial_attention_yolo_")) / f"{stem}.yaml"
    out.write_text(text)
    return out


def build_yolo(
    cfg: str | Path | Mapping[str, Any],
    scale: str | None = None,
    *,
    nc: int | None = None,
    verbose: bool = False,
):
    """An ``ultralytics.YOLO`` built from a YAML with ``sa.<name>`` layers, at ``scale``.

    ``cfg`` is a shipped config name (``"yolo11-cbam"``, see :func:`list_configs`), a
    YAML path, or a config dict (:func:`yolo_config`). ``scale`` is one of n/s/m/l/x; by
    default the one in the file name (``yolo11s-cbam``), else ``"n"``. ``nc`` overrides
    the class count (training takes it from the data anyway). Nothing is downloaded: the
    model is built from the YAML, never from ``.pt`` weights. Calls :func:`register`.

    Ultralytics reads the scale from the file name only, so a dict, or a file whose name
    or directory it cannot read a scale from, is written once more to a fresh temporary
    directory under a name that carries the scale (training rebuilds the model from it).
    """
    text = None
    if isinstance(cfg, Mapping):
        import yaml

        path = Path("custom.yaml")
        text = yaml.safe_dump(dict(cfg), sort_keys=False)
    else:
        path = Path(cfg)
        if not path.is_file():
            if path.parent != Path("."):
                raise FileNotFoundError(f"build_yolo: no YOLO config at {path}")
            path = config_path(path.name)  # shipped; a scale letter in the name is allowed
            scale = scale or _scale_of(Path(str(cfg)).stem)
        path = path.resolve()
    named = _scale_of(path.stem) if text is None else None
    scale = scale or named or "n"
    if scale not in SCALES:
        raise ValueError(f"build_yolo: scale must be one of {SCALES}, got {scale!r}")
    if named and named != scale:
        raise ValueError(f"build_yolo: {path.name} names scale {named!r} but scale={scale!r}")
    register()
    from ultralytics import YOLO

    # the task (detect / segment / pose) is Ultralytics' guess from the head's last module
    model = YOLO(str(_scaled_path(path, scale, text)), verbose=verbose)
    if nc is not None and nc != model.model.yaml.get("nc"):
        rebuilt = model.task_map[model.task]["model"](model.model.yaml, nc=nc, verbose=verbose)
        rebuilt.args, rebuilt.task = model.model.args, model.model.task
        model.model = rebuilt
    return model


# -- Ultralytics' command line ----------------------------------------------------------------


def model_argument(value: str) -> str:
    """``model=VALUE`` for Ultralytics: a shipped config name (``yolo11s-cbam.yaml``,
    ``yolov8-seg-coord``; a scale letter allowed) becomes a path Ultralytics reads the
    scale from (n when the name has none); anything else is returned unchanged."""
    path = Path(value)
    if path.exists() or path.parent != Path(".") or path.suffix not in ("", ".yaml"):
        return value
    try:
        shipped = config_path(path.name)
    except ValueError:
        close = difflib.get_close_matches(_unscaled(path.stem), list_configs(), n=3, cutoff=0.8)
        if close and path.suffix == ".yaml" and not _ultralytics_has(value):
            raise _unknown_config(path.stem) from None
        return value
    return str(_scaled_path(shipped, _scale_of(path.stem) or "n", None))


def _unscaled(stem: str) -> str:
    match = _SCALE_IN_STEM.match(stem)
    return f"{match.group(1)}{match.group(3)}" if match else stem


def _ultralytics_has(name: str) -> bool:
    """Whether Ultralytics finds model YAML ``name`` itself (its own configs, scale rule)."""
    from ultralytics.utils.checks import check_yaml

    unified = re.sub(r"(\d+)([nslmx])(.+)?$", r"\1\3", name)
    return any(check_yaml(n, hard=False) for n in dict.fromkeys((name, unified)))


def torchvision_problem() -> str | None:
    """Why ``import torchvision`` fails here (a build whose compiled operators do not load
    with this torch), or None when it works. Ultralytics needs it to validate and predict."""
    try:
        import torchvision  # noqa: F401
    except ImportError as e:
        return f"torchvision is not importable ({e})"
    except (RuntimeError, OSError) as e:  # "operator torchvision::nms does not exist"
        from importlib.metadata import PackageNotFoundError, version

        try:
            tv = version("torchvision")
        except PackageNotFoundError:  # pragma: no cover - a broken install
            tv = "?"
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        return (
            f"torchvision {tv} cannot load its compiled operators with torch "
            f"{torch.__version__} ({first}): install torch and torchvision from one build "
            "(both CPU or both the same CUDA), see docs/integrations.md, 'Installing'"
        )
    return None


class TorchvisionError(RuntimeError):
    """``import torchvision`` fails (see :func:`torchvision_problem`)."""


# Ultralytics' modes that build a validator or predictor, and so import torchvision (its
# ONNX export of a YAML-built model does not)
_MODES_NEEDING_TORCHVISION = {"train", "val", "predict", "track", "benchmark"}


def yolo_command(argv: Sequence[str]) -> None:
    """Ultralytics' ``yolo`` command line with the ``sa.<name>`` layers registered.

    ``argv`` is what follows ``yolo`` (``["train", "model=yolo11s-cbam.yaml",
    "data=data.yaml", "epochs=1"]``): ``model=`` may name a shipped config
    (:func:`model_argument`); everything else is Ultralytics' (``ultralytics.cfg.entrypoint``).
    A bad ``sa.<name>`` layer or config name is a ``ValueError``; a torchvision that cannot
    load its operators is a :class:`TorchvisionError` saying so, before any work.
    """
    args = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if eq and key.lstrip("-") == "model":
            arg = f"{key}={model_argument(value)}"
        args.append(arg)
    words = {a.lstrip("-") for a in args} | {a.partition("=")[2] for a in args
                                             if a.lstrip("-").startswith("mode=")}
    if _MODES_NEEDING_TORCHVISION & words:
        problem = torchvision_problem()
        if problem:
            raise TorchvisionError(problem)
    # Ultralytics reads sys.argv when first imported (its help text quotes it): let it see
    # the command it runs, not ours
    saved_argv, sys.argv = sys.argv, ["yolo", *args]
    try:
        register()
        from ultralytics import cfg
    finally:
        sys.argv = saved_argv

    if hasattr(cfg, "ARGV"):  # what entrypoint() reads when given no string: keeps spaces
        saved = cfg.ARGV
        cfg.ARGV = ["yolo", *args]
        try:
            cfg.entrypoint()
        finally:
            cfg.ARGV = saved
    else:  # pragma: no cover - another Ultralytics version: one space-separated string
        if any(not a or any(c.isspace() for c in a) for a in args):
            raise ValueError(f"this Ultralytics version takes no spaces in arguments: {args}")
        cfg.entrypoint(debug=" ".join(["yolo", *args]))
