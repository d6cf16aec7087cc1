"""The cost harness behind ``spatial-attention bench``: parameters, FLOPs, time, memory.

Every mechanism builds its own module and a typical input through the registry
(``info(name).cls.example(name, batch, channels, (H, W))``), so a map attention gets
``(B, C, H, W)``, a token mixer ``(B, H, W, C)`` and sequence attention ``(B, H*W, C)``
(see each class's ``example``). A registered model name (``models.list_models()``)
measures the whole network on images ``(B, 3, H, W)`` (``(B, V, 3, H, W)`` for a
``num_views`` model) at its nominal size (its ``img_size``; 32 for CIFAR models, 75 for
Sort-of-CLEVR with a question vector, 256 for restoration, else 224) and batch 1, unless
``size`` / ``batch`` are given (a model with BatchNorm on pooled features, such as
``sknet50``, needs ``batch >= 2`` for its training step). For each one:

* **params**: the module's parameters (each tensor once).
* **FLOPs**: ``torch.utils.flop_counter.FlopCounterMode`` over one forward and over one
  forward + backward, with the CPU fused attention kernel counted (``flops.py``).
  Matrix products and convolutions only; elementwise work (softmax, norms, activations)
  counts nothing.
* **time**: the median over ``repeats`` calls, after ``warmup`` calls, of a forward in
  ``eval()`` mode under ``torch.no_grad()`` (inference), and of a training step in
  ``train()`` mode: forward, the sum of the outputs, backward into the parameters and
  the floating-point inputs.
* **peak memory**: of one training step (of one inference forward with
  ``backward=False``), parameters, buffers and inputs included. CUDA:
  ``torch.cuda.max_memory_allocated``; CPU: live tensor storage bytes tracked by
  ``memory.TensorMemoryTracker`` (not the process's RSS).

``bfloat16`` runs under ``torch.autocast(device, dtype=torch.bfloat16)`` with float32
parameters and inputs (mixed precision training as people run it); ``float64`` converts
module and inputs.

Before measuring, :func:`make_plan` checks every argument and builds every module on
the meta device (no compute), and :func:`estimate` times one forward and one training
step of each (within a few seconds, extrapolating the rest) to say how long the run
will take; the command prints both first.

>>> from spatial_attention.apps.bench import benchmark, write_csv
>>> results = benchmark(["multi_head"], batch=1, channels=8, size=(4, 4))
>>> write_csv(results, "costs.csv")
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import ctypes.util
import gc
import importlib.util
import math
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ... import registry
from ...errors import UsageError
from .flops import count_flops
from .memory import peak_memory_bytes

__all__ = [
    "BenchPlan",
    "BenchResult",
    "CSV_COLUMNS",
    "DEFAULT_BATCH",
    "DEFAULT_CHANNELS",
    "DEFAULT_MODEL_BATCH",
    "DEFAULT_SIZE",
    "DTYPES",
    "Estimate",
    "SLOW_META_S",
    "Target",
    "benchmark",
    "check_output_path",
    "estimate",
    "make_plan",
    "resolve_target",
    "run_plan",
    "format_table",
    "write_csv",
    "plot",
    "add_arguments",
    "run",
    "interleaved_times",
    "ratio_table",
    "keep_freed_memory",
    "profile_table",
]

#: a backbone stage: ResNet-50's stage 2 output is 28 x 28; 128 channels, batch 8
DEFAULT_BATCH = 8
DEFAULT_CHANNELS = 128
DEFAULT_SIZE = (28, 28)
#: whole models are measured per image by default (their FLOPs as papers quote them)
DEFAULT_MODEL_BATCH = 1
DEFAULT_REPEATS = 10
DEFAULT_WARMUP = 3

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}

_MIB = 2**20


@dataclass
class BenchResult:
    """The costs of one mechanism or model; the fields are the CSV columns, in order.

    ``layout`` is the mechanism's layout, or ``model`` for a whole model.

    Numbers that were not measured (backward off, or the mechanism failed before that
    stage) are ``nan``; ``error`` then says why.
    """

    name: str
    family: str
    layout: str
    input_shape: str
    dtype: str
    device: str
    params: int
    fwd_gflops: float = math.nan
    fwd_bwd_gflops: float = math.nan
    fwd_ms: float = math.nan
    fwd_bwd_ms: float = math.nan
    peak_mib: float = math.nan
    threads: int = 0
    torch_version: str = torch.__version__
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


CSV_COLUMNS = tuple(f.name for f in fields(BenchResult))


# -- validation: before any compute ------------------------------------------------------
def _resolve_dtype(dtype: str | torch.dtype) -> tuple[str, torch.dtype]:
    if isinstance(dtype, torch.dtype):
        for label, dt in DTYPES.items():
            if dt == dtype:
                return label, dt
        raise UsageError(f"unsupported dtype {dtype}; expected one of {', '.join(DTYPES)}")
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    return dtype, DTYPES[dtype]


def _resolve_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UsageError(f"unknown device {device!r}; expected cpu or cuda") from exc
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"unsupported device {device!r}; expected cpu or cuda")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {device!r} asked for, but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(
                f"device {device!r} asked for, but only {torch.cuda.device_count()} "
                "CUDA device(s) are visible"
            )
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _check_int(label: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"{label} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_size(size: Any) -> tuple[int, int]:
    try:
        h, w = size
    except (TypeError, ValueError):
        raise UsageError(f"size must be (H, W), got {size!r}") from None
    if any(isinstance(s, bool) or not isinstance(s, int) for s in (h, w)) or h < 1 or w < 1:
        raise UsageError(f"size must be two integers >= 1 (H W), got {h} {w}")
    return h, w


# -- what to measure: mechanisms and models ------------------------------------------------
@dataclass(frozen=True)
class Target:
    """One thing ``bench`` measures: a registered mechanism or a registered model."""

    name: str
    kind: str  # "mechanism" or "model"
    family: str
    layout: str  # the mechanism's layout, or "model"


def resolve_target(name: str) -> Target:
    """The mechanism or model registered as ``name`` (any case); unknown names raise the
    registry's ValueError with the closest mechanism and model names."""
    try:
        e = registry.info(name)
        return Target(e.name, "mechanism", e.family, e.layout)
    except ValueError:
        pass
    from ...models import list_models, model_info

    try:
        m = model_info(name)
    except ValueError:
        known = sorted(set(registry.list_mechanisms()) | set(list_models()))
        raise registry.unknown_name_error("mechanism or model", str(name), known) from None
    return Target(m.name, "model", m.family, "model")


def _model_size(module: nn.Module, target: Target) -> tuple[int, int]:
    """A model's nominal input size: its ``img_size``, else by family and name."""
    s = getattr(module, "img_size", None)
    if isinstance(s, int) and not isinstance(s, bool):
        return (s, s)
    if isinstance(s, (tuple, list)) and len(s) == 2:
        return (int(s[0]), int(s[1]))
    if hasattr(module, "question_dim"):
        return (75, 75)  # Sort-of-CLEVR images
    if target.family == "restoration":
        return (256, 256)
    return (32, 32) if "cifar" in target.name else (224, 224)


def _build(
    target: Target, batch: int | None, channels: int | None, size: tuple[int, int] | None
) -> tuple[nn.Module, tuple[Any, ...]]:
    """The module and a typical input, on the current default device (meta for checks)."""
    if target.kind == "mechanism":
        return registry.info(target.name).cls.example(
            target.name, DEFAULT_BATCH if batch is None else batch,
            DEFAULT_CHANNELS if channels is None else channels,
            DEFAULT_SIZE if size is None else size,
        )
    from ...models import create_model

    module = create_model(target.name)
    h, w = _model_size(module, target) if size is None else size
    b = DEFAULT_MODEL_BATCH if batch is None else batch
    chans = getattr(module, "in_chans", None) or getattr(module, "in_channels", None) or 3
    views = getattr(module, "num_views", 1)
    if isinstance(views, int) and views > 1:  # multi-view models: a stack of views
        inputs: tuple[Any, ...] = (torch.randn(b, views, int(chans), h, w),)
    else:
        inputs = (torch.randn(b, int(chans), h, w),)
    if hasattr(module, "question_dim"):  # Sort-of-CLEVR: image and question
        inputs += (torch.randn(b, int(module.question_dim)),)
    return module, inputs


def _meta_shape(
    target: Target, batch: int | None, channels: int | None, size: tuple[int, int] | None
) -> str:
    """The input shape text of ``target``, built on the meta device (no forward); ``""``
    when even that fails (the check or the run then says why)."""
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            return _shape_text(_build(target, batch, channels, size)[1])
    except Exception:  # noqa: BLE001
        return ""


def _check_buildable(
    target: Target, batch: int | None, channels: int | None, size: tuple[int, int] | None
) -> tuple[float, float | None]:
    """Build ``target`` and run it on the meta device: shape errors without compute.

    Returns the seconds the meta forward took with its FLOP counter (it dispatches every
    op the real forward will, without computing: its time grows with the number of ops,
    and per op it is slower than a small real kernel) and its FLOPs (None where not
    counted). A ValueError (the
    mechanisms' own checks) means these channels or this size cannot work and becomes a
    UsageError. Anything else (an op with no meta kernel, a buffer made on the CPU) says
    nothing about the arguments and is left to the real run.
    """
    seconds, flops = 0.0, None
    try:
        with warnings.catch_warnings(), torch.device("meta"), torch.no_grad():
            warnings.simplefilter("ignore")
            module, inputs = _build(target, batch, channels, size)
            module.eval()
            t0 = time.perf_counter()
            try:
                flops = float(count_flops(module, *inputs)[0])
            except ValueError:
                raise
            except Exception:  # noqa: BLE001 - a FLOP formula, say: run it plainly
                flops = None
                module(*inputs)
            finally:
                seconds = time.perf_counter() - t0
    except UsageError:
        raise
    except ValueError as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if target.kind == "mechanism":
            h, w = DEFAULT_SIZE if size is None else size
            what = (f"channels={DEFAULT_CHANNELS if channels is None else channels}, "
                    f"size {h}x{w}")
        else:
            what = "its nominal size" if size is None else f"size {size[0]}x{size[1]}"
        raise UsageError(f"{target.name} cannot run with {what}: {msg}") from exc
    except Exception:  # noqa: BLE001 - inconclusive on meta, see docstring
        pass
    return seconds, flops


#: a meta forward slower than this marks a target as slow in the plan
SLOW_META_S = 2.0


@dataclass
class BenchPlan:
    """What a ``bench`` run will measure, with its arguments checked.

    ``shapes[i]`` is the input of ``targets[i]`` (``""`` where the meta build failed).
    ``batch``, ``channels`` and ``size`` are None where each target takes its own default
    (mechanisms: 8, 128, 28x28; models: 1 and their nominal size). ``meta_seconds[i]``
    is how long the meta-device forward of :meth:`check` took and ``meta_flops[i]`` its
    forward FLOPs (None before it ran, or where not counted).
    """

    targets: list[Target]
    shapes: list[str]
    batch: int | None
    channels: int | None
    size: tuple[int, int] | None
    dtype_label: str
    dtype: torch.dtype
    backward: bool
    repeats: int
    warmup: int
    device: torch.device
    threads: int | None
    all_mechanisms: bool = False
    meta_seconds: list[float] | None = None
    meta_flops: list[float | None] | None = None

    @property
    def modes(self) -> tuple[str, ...]:
        return ("forward", "forward+backward") if self.backward else ("forward",)

    def calls_per_target(self) -> tuple[int, int]:
        """(forwards, training steps) one target costs: a FLOP count, warm-up, the timed
        calls and a memory pass."""
        timed = self.warmup + self.repeats
        if self.backward:
            return 1 + timed, 1 + timed + 1
        return 1 + timed + 1, 0

    def check(self, progress: bool = False) -> BenchPlan:
        """Build every target and run it on the meta device (:func:`make_plan` does this);
        a UsageError names the first that cannot run with these arguments."""
        from tqdm.auto import tqdm

        bar = tqdm(self.targets, desc="checking on the meta device", unit="target",
                   file=sys.stderr, disable=not progress, delay=2.0, leave=False)
        checked = [_check_buildable(t, self.batch, self.channels, self.size) for t in bar]
        bar.close()
        self.meta_seconds = [c[0] for c in checked]
        self.meta_flops = [c[1] for c in checked]
        return self

    def slow(self) -> list[tuple[str, float]]:
        """Targets whose meta forward (with its FLOP count) took more than
        :data:`SLOW_META_S` seconds. Meta kernels are slower than real ones on small
        inputs, so this flags only targets with very many ops."""
        if self.meta_seconds is None:
            return []
        return [(t.name, s) for t, s in zip(self.targets, self.meta_seconds, strict=True)
                if s > SLOW_META_S]

    def describe(self) -> str:
        """The plan as the command prints it before measuring."""
        n_mech = sum(t.kind == "mechanism" for t in self.targets)
        n_model = len(self.targets) - n_mech
        what = " and ".join(
            f"{n} {kind}{'s' if n != 1 else ''}"
            for n, kind in ((n_mech, "mechanism"), (n_model, "model")) if n
        )
        threads = self.threads if self.threads is not None else torch.get_num_threads()
        fwd, steps = self.calls_per_target()
        lines = [
            f"plan: {what} x 1 input each x {len(self.modes)} mode"
            f"{'s' if len(self.modes) > 1 else ''} ({', '.join(self.modes)}) = "
            f"{len(self.targets) * len(self.modes)} timed cases; {self.dtype_label} on "
            f"{self.device}, {threads} thread(s)",
            f"  each: {self.warmup} warm-up + {self.repeats} timed calls per mode, plus a "
            f"FLOP count and a memory pass ({fwd} forwards"
            + (f", {steps} training steps)" if steps else ")"),
        ]
        groups: dict[tuple[str, str], list[str]] = {}
        for t, shape in zip(self.targets, self.shapes, strict=True):
            groups.setdefault((t.layout, shape or "?"), []).append(t.name)
        for (layout, shape), names in groups.items():
            shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more"
                                            if len(names) > 6 else "")
            lines.append(f"  {layout} input {shape}: {shown}")
        if self.all_mechanisms:
            lines.append("  for a quick look, name a few: spatial-attention bench se cbam "
                         "multi_head (or fewer --repeats)")
        return "\n".join(lines)

    def describe_slow(self) -> str:
        """A warning line naming the slow targets, or ``""``."""
        slow = self.slow()
        if not slow:
            return ""
        names = ", ".join(f"{n} ({s:.0f} s)" for n, s in slow)
        return (f"slow to check: a meta-device forward (no arithmetic) of {names}; many "
                "small ops (a loop over tokens, say), so their real calls are likely slow "
                "too: leave them out for a quick look")


def make_plan(
    names: Sequence[str] | None = None,
    *,
    batch: int | None = None,
    channels: int | None = None,
    size: tuple[int, int] | None = None,
    dtype: str | torch.dtype = "float32",
    backward: bool = True,
    repeats: int = DEFAULT_REPEATS,
    warmup: int = DEFAULT_WARMUP,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    check: bool = True,
) -> BenchPlan:
    """Check every argument and (``check``) build and run every target on the meta
    device; no compute.

    ``names`` are mechanisms and/or models (default: every registered mechanism). A bad
    argument raises :class:`UsageError`, an unknown name the registry's ValueError.
    With ``check=False`` the meta forwards are left to :meth:`BenchPlan.check` (the
    command prints the plan in between).
    """
    all_mechanisms = not names
    names = list(registry.list_mechanisms() if not names else names)
    targets = list({t.name: t for t in map(resolve_target, names)}.values())
    if batch is not None:
        batch = _check_int("batch", batch, 1)
    if channels is not None:
        channels = _check_int("channels", channels, 1)
    if size is not None:
        size = _check_size(size)
    repeats = _check_int("repeats", repeats, 1)
    warmup = _check_int("warmup", warmup, 0)
    if threads is not None:
        threads = _check_int("threads", threads, 1)
    dtype_label, torch_dtype = _resolve_dtype(dtype)
    dev = _resolve_device(device)
    shapes = [_meta_shape(t, batch, channels, size) for t in targets]
    plan = BenchPlan(targets, shapes, batch, channels, size, dtype_label, torch_dtype,
                     backward, repeats, warmup, dev, threads, all_mechanisms)
    return plan.check() if check else plan


# -- running one mechanism ---------------------------------------------------------------
def _prepare_inputs(
    inputs: Sequence[Any], device: torch.device, dtype: torch.dtype | None, grad: bool
) -> tuple[Any, ...]:
    """Inputs on ``device`` as leaves; floating ones cast and requiring grad.

    The same tensor passed twice (self-attention's ``(x, x, x)``) stays one tensor.
    """
    moved: dict[int, Tensor] = {}
    out = []
    for x in inputs:
        if isinstance(x, Tensor):
            if id(x) not in moved:
                y = x.detach().to(device)
                if y.is_floating_point():
                    if dtype is not None:
                        y = y.to(dtype)
                    y.requires_grad_(grad)
                moved[id(x)] = y
            out.append(moved[id(x)])
        else:
            out.append(x)
    return tuple(out)


def _tensors(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _shape_text(inputs: Sequence[Any]) -> str:
    return ", ".join("x".join(str(s) for s in t.shape) for t in inputs if isinstance(t, Tensor))


def _timed_median_ms(
    fn: Callable[[], Any], repeats: int, warmup: int, device: torch.device
) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def keep_freed_memory() -> str:
    """Ask glibc to serve large blocks from the heap and never return freed memory.

    By default glibc maps every block above a (dynamic) threshold fresh from the kernel
    and unmaps it on free, so each new 25 MB tensor costs ~6,000 page faults (~4 ms on
    2 threads here), an allocator artefact that hits implementations by how many
    full-size tensors they allocate, and varies with the heap's history. jemalloc or
    tcmalloc (PyTorch's advice for CPU) behave like this setting.
    """
    name = ctypes.util.find_library("c")
    if not name:
        return "libc not found: allocator left as is"
    mallopt = getattr(ctypes.CDLL(name), "mallopt", None)  # glibc's; absent on macOS
    if mallopt is None:
        return "mallopt refused: allocator as is"
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    ok = (mallopt(m_mmap_threshold, 32 * 2**20)  # glibc's largest allowed value
          and mallopt(m_trim_threshold, 2**31 - 1) and mallopt(m_top_pad, 256 * 2**20))
    return "glibc keeps freed memory (mallopt)" if ok else "mallopt refused: allocator as is"


def profile_table(fn: Callable[[], Any], calls: int = 5, rows: int = 20, warmup: int = 2) -> str:
    """Where ``fn``'s time goes: ``torch.profiler``'s table of ``calls`` calls, by op and
    input shape, sorted by self CPU time (``rows`` rows)."""
    for _ in range(warmup):
        fn()
    with torch.profiler.profile(record_shapes=True) as prof:
        for _ in range(calls):
            fn()
    return prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=rows)


def forward_case(module: nn.Module, x: Tensor) -> Callable[[], object]:
    """A timing case: ``module(x)`` without autograd (for :func:`interleaved_times`)."""
    def run() -> None:
        with torch.no_grad():
            module(x)
    return run


def train_case(module: nn.Module, x: Tensor, grad: Tensor) -> Callable[[], object]:
    """A timing case: forward and backward of ``module(x)`` with output gradient ``grad``,
    the input and parameter gradients cleared before each call."""
    x = x.detach().requires_grad_()

    def run() -> None:
        x.grad = None
        for p in module.parameters():
            p.grad = None
        torch.autograd.backward(module(x), grad)
    return run


def ratio_table(times: dict[str, list[float]], peaks: dict[str, float], ref: str,
                ms_digits: int = 2, mib_digits: int = 0) -> str:
    """Markdown of interleaved timings (seconds per call, as :func:`interleaved_times`
    returns them) and peak bytes: median and minimum ms, each case's ratio to ``ref``'s
    median and minimum, and peak MiB. The benchmarks/ scripts print their tables with it."""
    rmed, rmin = statistics.median(times[ref]), min(times[ref])
    out = [f"| case | median ms | min ms | x {ref} (median / min) | peak MiB |",
           "|---|---:|---:|---:|---:|"]
    for name, t in times.items():
        med, mn = statistics.median(t), min(t)
        out.append(f"| {name} | {med * 1e3:.{ms_digits}f} | {mn * 1e3:.{ms_digits}f} | "
                   f"{med / rmed:.2f} / {mn / rmin:.2f} | "
                   f"{peaks[name] / 2**20:.{mib_digits}f} |")
    return "\n".join(out)


def interleaved_times(
    cases: dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 2,
    device: torch.device | str = "cpu",
) -> dict[str, list[float]]:
    """Seconds per call of every case, measured round-robin with a rotating order.

    For side-by-side comparisons on a shared machine: a noisy neighbour slows every
    case of a round alike, so medians and minima stay comparable.
    """
    device = torch.device(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for fn in cases.values():
        for _ in range(warmup):
            fn()
    sync()
    names = list(cases)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            cases[n]()
            sync()
            times[n].append(time.perf_counter() - start)
    return times


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


class _Case:
    """One target built on the device with its inputs, and the two calls bench times."""

    def __init__(self, target: Target, plan: BenchPlan) -> None:
        device, dtype = plan.device, plan.dtype
        torch.manual_seed(0)
        module, raw_inputs = _build(target, plan.batch, plan.channels, plan.size)
        cast = torch.float64 if dtype == torch.float64 else None  # bf16: autocast instead
        self.module = module.to(device=device, dtype=cast) if cast else module.to(device)
        self.inputs = _prepare_inputs(raw_inputs, device, cast, grad=plan.backward)
        del raw_inputs
        self.device, self.dtype = device, dtype
        self.leaves = [p for p in self.module.parameters() if p.requires_grad]
        self.leaves += [x for x in self.inputs if isinstance(x, Tensor) and x.requires_grad]
        # detached copies for the no-grad forward: PyTorch's module tracker (inside the
        # FLOP counter) fails on views of grad-requiring leaves made under no_grad
        self.plain = [x.detach() if isinstance(x, Tensor) else x for x in self.inputs]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.bfloat16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward(self) -> None:
        with torch.no_grad(), self.autocast():
            self.module(*self.plain)

    def train_step(self) -> None:
        for t in self.leaves:
            t.grad = None
        with self.autocast():
            out = self.module(*self.inputs)
        outs = [o for o in _tensors(out) if o.is_floating_point() and o.requires_grad]
        if not outs:
            raise RuntimeError("no output requires grad: nothing to backpropagate")
        loss = outs[0].float().sum()
        for o in outs[1:]:
            loss = loss + o.float().sum()
        loss.backward()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _measure(result: BenchResult, target: Target, plan: BenchPlan) -> None:
    """Fill ``result`` stage by stage, so a failure keeps what was measured before it."""
    case = _Case(target, plan)
    module, inputs, device = case.module, case.inputs, plan.device
    result.input_shape = _shape_text(inputs)
    result.params = sum(p.numel() for p in module.parameters())
    notes: list[str] = []

    # A formula that breaks on some op must not cost the timings: note it and go on.
    try:
        module.eval()
        result.fwd_gflops = count_flops(case.forward)[0] / 1e9
    except Exception as exc:  # noqa: BLE001
        notes.append(f"FLOPs not counted: {_first_line(exc)}")
    module.eval()
    result.fwd_ms = _timed_median_ms(case.forward, plan.repeats, plan.warmup, device)
    if plan.backward:
        try:
            module.train()
            result.fwd_bwd_gflops = count_flops(case.train_step)[0] / 1e9
        except Exception as exc:  # noqa: BLE001
            if not notes:
                notes.append(f"FLOPs not counted: {_first_line(exc)}")
        module.train()
        result.fwd_bwd_ms = _timed_median_ms(case.train_step, plan.repeats, plan.warmup,
                                             device)

    # Last, once warm: first-call allocations (workspaces) are not the mechanism's.
    for t in case.leaves:
        t.grad = None
    gc.collect()
    existing = [*module.parameters(), *module.buffers(), *_tensors(inputs)]
    if plan.backward:
        module.train()
        peak = peak_memory_bytes(case.train_step, device, existing)
    else:
        module.eval()
        peak = peak_memory_bytes(case.forward, device, existing)
    result.peak_mib = peak / _MIB
    result.error = "; ".join(notes)


def _bench_one(target: Target, plan: BenchPlan) -> BenchResult:
    result = BenchResult(
        name=target.name,
        family=target.family,
        layout=target.layout,
        input_shape="",
        dtype=plan.dtype_label,
        device=str(plan.device),
        params=0,
        threads=torch.get_num_threads(),
    )
    try:
        _measure(result, target, plan)
    except Exception as exc:  # noqa: BLE001 - one failure must not stop the others
        result.error = _first_line(exc)
        if "more than 1 value per channel" in result.error:
            result.error += " (BatchNorm in training mode: use --batch 2 or more)"
    _release(plan.device)
    return result


def _release(device: torch.device) -> None:
    # The module, inputs and any traceback are gone; give their memory back now.
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def _run_context(plan: BenchPlan) -> Iterator[None]:
    """``plan.threads`` intra-op threads, and the caller's random state kept (each target
    seeds its own build)."""
    previous = torch.get_num_threads()
    if plan.threads is not None:
        torch.set_num_threads(plan.threads)
    rng_devices = [plan.device.index] if plan.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=rng_devices):
            yield
    finally:
        torch.set_num_threads(previous)


# -- how long it will take ---------------------------------------------------------------
#: seconds the pilot of :func:`estimate` may spend before extrapolating
ESTIMATE_BUDGET_S = 8.0


@dataclass
class Estimate:
    """How long a plan will take, from a pilot: one forward and one training step of
    ``measured`` of the ``total`` targets (the others at the measured ones' mean)."""

    seconds: float
    measured: int
    total: int
    pilot_seconds: float
    backward: bool = True
    failed: list[str] = field(default_factory=list)

    def describe(self) -> str:
        basis = "one forward" + (" and one training step" if self.backward else "") + " of "
        if self.measured == self.total:
            basis += "each target"
        else:
            basis += (f"{self.measured} of the {self.total} targets, the others scaled by "
                      "their FLOPs")
        return (f"estimate: about {_duration(self.seconds)} on this machine as loaded now "
                f"(a {self.pilot_seconds:.1f} s pilot timed {basis}; load changes it)")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(seconds, 1):.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def estimate(plan: BenchPlan, budget_s: float = ESTIMATE_BUDGET_S) -> Estimate:
    """Time one forward (and one training step) of each target, as the run would build
    it, until ``budget_s`` seconds are spent (at least one target).

    Each piloted target's time is its build plus the forwards and steps
    :meth:`BenchPlan.calls_per_target` counts, at the pilot's (first-call) speed, the FLOP
    count and memory pass weighted as two calls each. A target the pilot skips (budget
    spent, or its meta check says one call would overrun the budget) is estimated from
    its forward FLOPs at the piloted targets' seconds per FLOP (their mean time where
    FLOPs are unknown); for a target slow to check (:meth:`BenchPlan.slow`), at least its
    meta forward time per call. Targets are piloted in a fixed shuffled order, so a
    budget cut does not sample one family only. A rough figure: the machine's load
    moves it either way, and FLOP rates differ between mechanisms.
    """
    n_fwd, n_step = plan.calls_per_target()
    # the FLOP count and the memory pass run under dispatch modes whose Python overhead
    # per op makes them cost about two plain calls (measured: 1x for a few large kernels,
    # up to 5x for a small model of many ops)
    if plan.backward:
        n_step += 2
    n_fwd += 1
    meta = plan.meta_seconds or [0.0] * len(plan.targets)

    def from_meta(i: int) -> float:
        # only for targets slow to check: a small meta forward costs more than the real
        # one (meta kernels run in Python), a long one (a loop over tokens) about as much
        return meta[i] * (n_fwd + n_step) if meta[i] > SLOW_META_S else 0.0

    order = list(range(len(plan.targets)))
    random.Random(0).shuffle(order)
    measured: dict[int, float] = {}
    failed: list[str] = []
    start = time.perf_counter()
    with _run_context(plan):
        for i in order:
            left = budget_s - (time.perf_counter() - start)
            if measured and (left <= 0 or meta[i] * (1 + plan.backward) > left):
                continue
            target = plan.targets[i]
            t0 = time.perf_counter()
            try:
                case = _Case(target, plan)
                case.sync()
                built = time.perf_counter() - t0
                case.module.eval()
                t1 = time.perf_counter()
                case.forward()
                case.sync()
                fwd = time.perf_counter() - t1
                step = 0.0
                if plan.backward:
                    case.module.train()
                    t2 = time.perf_counter()
                    case.train_step()
                    case.sync()
                    step = time.perf_counter() - t2
                del case
                measured[i] = built + n_fwd * fwd + n_step * step
            except Exception:  # noqa: BLE001 - the run reports it; it costs little there
                failed.append(target.name)
                measured[i] = time.perf_counter() - t0
            _release(plan.device)
    pilot = time.perf_counter() - start
    mean = sum(measured.values()) / len(measured) if measured else 0.0
    flops = plan.meta_flops or [None] * len(plan.targets)
    counted = [i for i in measured if flops[i]]
    per_flop = (sum(measured[i] for i in counted) / sum(flops[i] for i in counted)
                if counted else None)

    def guess(i: int) -> float:
        f = flops[i]
        base = f * per_flop if (per_flop is not None and f is not None) else mean
        return max(base, from_meta(i))

    total = sum(measured[i] if i in measured else guess(i) for i in range(len(plan.targets)))
    return Estimate(total, len(measured), len(plan.targets), pilot, plan.backward, failed)


def run_plan(plan: BenchPlan, progress: bool = False) -> list[BenchResult]:
    """Measure every target of ``plan``, in order; see :func:`benchmark`."""
    from tqdm.auto import tqdm

    results = []
    with _run_context(plan):
        bar = tqdm(plan.targets, desc="bench", unit="target", file=sys.stderr,
                   disable=not progress)
        for t in bar:
            bar.set_postfix_str(t.name)
            results.append(_bench_one(t, plan))
        bar.close()
    return results


def benchmark(
    names: Sequence[str] | None = None,
    *,
    batch: int | None = None,
    channels: int | None = None,
    size: tuple[int, int] | None = None,
    dtype: str | torch.dtype = "float32",
    backward: bool = True,
    repeats: int = DEFAULT_REPEATS,
    warmup: int = DEFAULT_WARMUP,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    progress: bool = False,
) -> list[BenchResult]:
    """Measure each mechanism or model in ``names`` (default: every registered mechanism).

    ``batch``, ``channels``, ``size`` left None take each target's default: mechanisms
    :data:`DEFAULT_BATCH`, :data:`DEFAULT_CHANNELS`, :data:`DEFAULT_SIZE`; models batch 1
    at their nominal size (``channels`` does not apply to them). Arguments are checked,
    and every target is built and run on the meta device, before anything is computed
    (:func:`make_plan`): a bad argument raises :class:`UsageError`, an unknown name the
    registry's ValueError. A target that fails at run time (out of memory, say) gets a
    row with ``error`` set; the others still run. ``threads`` sets
    ``torch.set_num_threads`` for the run (restored after); ``progress`` shows a tqdm
    bar on stderr.
    """
    plan = make_plan(names, batch=batch, channels=channels, size=size, dtype=dtype,
                     backward=backward, repeats=repeats, warmup=warmup, device=device,
                     threads=threads)
    return run_plan(plan, progress=progress)


# -- output ----------------------------------------------------------------------------
def _fmt(value: float, digits: int, general: bool = False) -> str:
    """Fixed decimals, or ``general`` significant digits (FLOPs span 1e-5 to 1e2 G)."""
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.{digits}g}" if general else f"{value:.{digits}f}"


def format_table(results: Sequence[BenchResult]) -> str:
    """The results as an aligned text table, with the common settings on top."""
    if not results:
        return "(no results)"
    r0 = results[0]
    head = (
        f"dtype {r0.dtype}, device {r0.device}, {r0.threads} thread(s), "
        f"torch {r0.torch_version}; times are medians after warm-up"
    )
    first = "name" if any(r.layout == "model" for r in results) else "mechanism"
    cols = (first, "family", "input", "params", "fwd GFLOPs", "f+b GFLOPs",
            "fwd ms", "f+b ms", "peak MiB")
    rows = [
        (
            r.name,
            r.family,
            r.input_shape or "-",
            f"{r.params:,}",
            _fmt(r.fwd_gflops, 4, general=True),
            _fmt(r.fwd_bwd_gflops, 4, general=True),
            _fmt(r.fwd_ms, 2),
            _fmt(r.fwd_bwd_ms, 2),
            _fmt(r.peak_mib, 1),
        )
        for r in results
    ]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    left = {0, 1, 2}

    def line(cells: Sequence[str]) -> str:
        padded = (
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )
        return "  ".join(padded).rstrip()

    out = [head, line(cols), line(["-" * w for w in widths]), *map(line, rows)]
    errors = [f"  {r.name}: {r.error}" for r in results if r.error]
    if errors:
        out += ["errors:", *errors]
    return "\n".join(out)


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value


def write_csv(results: Sequence[BenchResult], path: str | Path) -> Path:
    """One row per mechanism, columns :data:`CSV_COLUMNS`; empty cells for ``nan``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for r in results:
            writer.writerow({k: _csv_value(v) for k, v in asdict(r).items()})
    return path


def _require_matplotlib() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError(
            "--plot needs matplotlib, which is not installed "
            "(pip install 'spatial-attention[viz]')"
        )


def plot(results: Sequence[BenchResult], path: str | Path, title: str | None = None) -> Path:
    """A bar chart of time, FLOPs, peak memory and parameters per mechanism (PNG).

    Uses matplotlib's Agg canvas directly, so it touches no global backend state.
    ``title`` goes on top (default: dtype, device, threads and torch version).
    """
    _require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    results = list(results)
    names = [r.name + (" (failed)" if r.error else "") for r in results]
    ys = list(range(len(results)))
    fig = Figure(figsize=(13, max(3.5, 0.45 * len(results) + 2.2)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 4, sharey=True)

    def nz(values: list[float]) -> list[float]:
        return [0.0 if math.isnan(v) else v for v in values]

    def paired(ax, fwd: list[float], both: list[float], title: str) -> None:
        w = 0.4
        ax.barh([y - w / 2 for y in ys], nz(fwd), height=w, label="forward", color="tab:blue")
        ax.barh([y + w / 2 for y in ys], nz(both), height=w, label="forward + backward",
                color="tab:orange")
        ax.set_title(title)

    paired(axes[0], [r.fwd_ms for r in results], [r.fwd_bwd_ms for r in results],
           "median time (ms)")
    paired(axes[1], [r.fwd_gflops for r in results], [r.fwd_bwd_gflops for r in results],
           "GFLOPs (matmul + conv)")
    axes[2].barh(ys, nz([r.peak_mib for r in results]), color="tab:green")
    axes[2].set_title("peak memory (MiB)")
    axes[3].barh(ys, [r.params / 1e3 for r in results], color="tab:gray")
    axes[3].set_title("parameters (thousands)")
    axes[0].set_yticks(ys, names)
    axes[0].invert_yaxis()
    for ax in axes:
        ax.grid(axis="x", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=2, frameon=False)
    if title is None and results:
        r0 = results[0]
        title = (f"{r0.dtype} on {r0.device}, {r0.threads} thread(s), "
                 f"torch {r0.torch_version}")
    if title:
        fig.suptitle(f"spatial-attention bench: {title}")
    fig.savefig(path, dpi=110)
    return path


# -- command line ------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Parameters, FLOPs, median forward and forward+backward time, and peak memory of "
        "attention mechanisms, each on an input typical for its layout, or of whole "
        "registered models. Before measuring it checks --out/--plot, prints the plan (what "
        "it will time) and a time estimate; with no NAME it measures every registered "
        "mechanism, a long run: name a few for a quick look (bench se cbam multi_head)."
    )
    parser.add_argument(
        "names", nargs="*", metavar="NAME",
        help="mechanisms or models to measure (default: every registered mechanism; "
        "`spatial-attention list` names them)",
    )
    parser.add_argument(
        "--size", nargs=2, type=int, metavar=("H", "W"), default=None,
        help=f"spatial size of the input (default: {DEFAULT_SIZE[0]} {DEFAULT_SIZE[1]} for "
        "mechanisms, a model's nominal size for models); sequence mechanisms get H*W tokens",
    )
    parser.add_argument("--channels", type=int, default=None,
                        help=f"channels C of mechanisms (default: {DEFAULT_CHANNELS})")
    parser.add_argument("--batch", type=int, default=None,
                        help=f"batch size B (default: {DEFAULT_BATCH} for mechanisms, "
                        f"{DEFAULT_MODEL_BATCH} for models)")
    parser.add_argument(
        "--dtype", choices=tuple(DTYPES), default="float32",
        help="float32 (default), float64, or bfloat16: mixed precision under "
        "torch.autocast with float32 parameters and inputs",
    )
    parser.add_argument(
        "--backward", action=argparse.BooleanOptionalAction, default=True,
        help="also time and count a forward+backward training step (default: on)",
    )
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS,
                        help=f"timed calls, the median is reported (default: {DEFAULT_REPEATS})")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP,
                        help=f"untimed calls before timing (default: {DEFAULT_WARMUP})")
    parser.add_argument("--device", default="cpu",
                        help="cpu (default) or cuda / cuda:N")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for the run (default: torch's own setting)")
    parser.add_argument("--out", metavar="CSV", help="write one CSV row per target here")
    parser.add_argument("--plot", metavar="PNG", help="write a bar chart here (needs matplotlib; "
                        ".png, .svg, .pdf)")
    parser.add_argument("--plan", action="store_true",
                        help="print the plan and the time estimate, measure nothing")
    parser.add_argument("--estimate", action=argparse.BooleanOptionalAction, default=True,
                        help=f"time a pilot (a budget of ~{ESTIMATE_BUDGET_S:.0f} s that one "
                        "slow call may overrun) to estimate the run's duration before it "
                        "starts (default: on)")


def check_output_path(label: str, path: str | os.PathLike | None) -> None:
    """Refuse an output path that cannot be written, before anything runs.

    The path must not be a directory, its nearest existing ancestor must be a directory
    in which a file can be created (tried with a temporary file, removed at once), and an
    existing file must be writable. Missing parent directories are fine: they are made
    when the file is written.
    """
    if path is None:
        return
    p = Path(path).expanduser()
    if p.is_dir():
        raise UsageError(f"{label} {path}: is a directory, expected a file name")
    if p.exists() and not os.access(p, os.W_OK):
        raise UsageError(f"{label} {path}: the file exists and is not writable")
    ancestor = p.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"{label} {path}: {ancestor} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as exc:
        raise UsageError(
            f"{label} {path}: cannot write in {ancestor} ({exc.strerror or exc})"
        ) from None


def _check_plot_format(path: str) -> None:
    _require_matplotlib()
    from matplotlib.backend_bases import FigureCanvasBase

    suffix = Path(path).suffix.lower().lstrip(".")
    known = FigureCanvasBase.get_supported_filetypes()
    if suffix and suffix not in known:
        raise UsageError(f"--plot {path}: unknown image format .{suffix}; use .png, .svg or "
                         ".pdf")


def run(args: argparse.Namespace) -> int:
    """``spatial-attention bench``: exit 0 unless every target failed (then 1).

    Before measuring, all on stderr: the output paths and the arguments are checked, the
    plan is printed, every target runs on the meta device (shape errors; slow targets
    named), and a pilot estimates the duration. Any refusal is a UsageError (exit 2).
    """
    check_output_path("--out", args.out)
    check_output_path("--plot", args.plot)
    if args.plot:
        _check_plot_format(args.plot)
    if args.out and args.plot and Path(args.out).resolve() == Path(args.plot).resolve():
        raise UsageError(f"--out and --plot name the same file {args.out}")
    plan = make_plan(
        args.names,
        batch=args.batch,
        channels=args.channels,
        size=tuple(args.size) if args.size is not None else None,
        dtype=args.dtype,
        backward=args.backward,
        repeats=args.repeats,
        warmup=args.warmup,
        device=args.device,
        threads=args.threads,
        check=False,
    )
    print(plan.describe(), file=sys.stderr, flush=True)
    if plan.channels is not None and all(t.kind == "model" for t in plan.targets):
        print("note: --channels applies to mechanisms only", file=sys.stderr)
    plan.check(progress=True)
    if plan.slow():
        print(plan.describe_slow(), file=sys.stderr, flush=True)
    if args.estimate:
        print(estimate(plan).describe(), file=sys.stderr, flush=True)
    if args.plan:
        return 0
    results = run_plan(plan, progress=True)
    print(format_table(results))
    if args.out:
        print(f"wrote {write_csv(results, args.out)}")
    if args.plot:
        if plan.size is not None:
            shape = f"{plan.size[0]}x{plan.size[1]}"
        else:
            shape = "default sizes"
        batch = f"batch {plan.batch}" if plan.batch is not None else "default batches"
        chans = f", {plan.channels} channels" if plan.channels is not None else ""
        title = (
            f"{batch}{chans}, {shape}, {args.dtype} on "
            f"{results[0].device if results else args.device}, "
            f"{results[0].threads if results else '?'} thread(s), torch {torch.__version__}"
        )
        print(f"wrote {plot(results, args.plot, title=title)}")
    return 0 if any(r.ok for r in results) else 1
