"""The cost harness behind ``spatial-attention bench``: parameters, FLOPs, time, memory.

Every mechanism builds its own module and a typical input through the registry
(``info(name).cls.example(name, batch, channels, (H, W))``), so a map attention gets
``(B, C, H, W)``, a token mixer ``(B, H, W, C)`` and sequence attention ``(B, H*W, C)``
(see each class's ``example``). For each one:

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
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ... import registry
from ...errors import UsageError
from .flops import count_flops
from .memory import peak_memory_bytes

__all__ = [
    "BenchResult",
    "CSV_COLUMNS",
    "DEFAULT_BATCH",
    "DEFAULT_CHANNELS",
    "DEFAULT_SIZE",
    "DTYPES",
    "benchmark",
    "format_table",
    "write_csv",
    "plot",
    "add_arguments",
    "run",
    "interleaved_times",
    "keep_freed_memory",
    "profile_table",
]

#: a backbone stage: ResNet-50's stage 2 output is 28 x 28; 128 channels, batch 8
DEFAULT_BATCH = 8
DEFAULT_CHANNELS = 128
DEFAULT_SIZE = (28, 28)
DEFAULT_REPEATS = 10
DEFAULT_WARMUP = 3

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}

_MIB = 2**20


@dataclass
class BenchResult:
    """The costs of one mechanism; the fields are the CSV columns, in order.

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


def _check_buildable(name: str, batch: int, channels: int, size: tuple[int, int]) -> None:
    """Build ``name`` and run it on the meta device: shape errors without compute.

    A ValueError (the mechanisms' own checks) means these channels or this size cannot
    work and becomes a UsageError. Anything else (an op with no meta kernel, a buffer
    made on the CPU) says nothing about the arguments and is left to the real run.
    """
    cls = registry.info(name).cls
    try:
        with warnings.catch_warnings(), torch.device("meta"), torch.no_grad():
            warnings.simplefilter("ignore")
            module, inputs = cls.example(name, batch, channels, size)
            module.eval()
            module(*inputs)
    except UsageError:
        raise
    except ValueError as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(
            f"{name} cannot run with channels={channels}, size {size[0]}x{size[1]}: "
            f"{msg}"
        ) from exc
    except Exception:  # noqa: BLE001 - inconclusive on meta, see docstring
        pass


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


def _measure(
    result: BenchResult,
    name: str,
    *,
    batch: int,
    channels: int,
    size: tuple[int, int],
    dtype: torch.dtype,
    backward: bool,
    repeats: int,
    warmup: int,
    device: torch.device,
) -> None:
    """Fill ``result`` stage by stage, so a failure keeps what was measured before it."""
    torch.manual_seed(0)
    module, raw_inputs = registry.info(name).cls.example(name, batch, channels, size)
    cast = torch.float64 if dtype == torch.float64 else None  # bf16: autocast instead
    module = module.to(device=device, dtype=cast) if cast else module.to(device)
    inputs = _prepare_inputs(raw_inputs, device, cast, grad=backward)
    del raw_inputs
    result.input_shape = _shape_text(inputs)
    result.params = sum(p.numel() for p in module.parameters())

    def autocast() -> contextlib.AbstractContextManager:
        if dtype == torch.bfloat16:
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    leaves = [p for p in module.parameters() if p.requires_grad]
    leaves += [x for x in inputs if isinstance(x, Tensor) and x.requires_grad]
    notes: list[str] = []

    # detached copies for the no-grad forward: PyTorch's module tracker (inside the FLOP
    # counter) fails on views of grad-requiring leaves made under no_grad
    plain = [x.detach() if isinstance(x, Tensor) else x for x in inputs]

    def forward() -> None:
        with torch.no_grad(), autocast():
            module(*plain)

    def train_step() -> None:
        for t in leaves:
            t.grad = None
        with autocast():
            out = module(*inputs)
        outs = [o for o in _tensors(out) if o.is_floating_point() and o.requires_grad]
        if not outs:
            raise RuntimeError("no output requires grad: nothing to backpropagate")
        loss = outs[0].float().sum()
        for o in outs[1:]:
            loss = loss + o.float().sum()
        loss.backward()

    # A formula that breaks on some op must not cost the timings: note it and go on.
    try:
        module.eval()
        result.fwd_gflops = count_flops(forward)[0] / 1e9
        if backward:
            module.train()
            result.fwd_bwd_gflops = count_flops(train_step)[0] / 1e9
    except Exception as exc:  # noqa: BLE001
        result.fwd_gflops = result.fwd_bwd_gflops = math.nan
        notes.append(f"FLOPs not counted: {_first_line(exc)}")

    module.eval()
    result.fwd_ms = _timed_median_ms(forward, repeats, warmup, device)
    if backward:
        module.train()
        result.fwd_bwd_ms = _timed_median_ms(train_step, repeats, warmup, device)

    # Last, once warm: first-call allocations (workspaces) are not the mechanism's.
    for t in leaves:
        t.grad = None
    gc.collect()
    existing = [*module.parameters(), *module.buffers(), *_tensors(inputs)]
    if backward:
        module.train()
        peak = peak_memory_bytes(train_step, device, existing)
    else:
        module.eval()
        peak = peak_memory_bytes(forward, device, existing)
    result.peak_mib = peak / _MIB
    result.error = "; ".join(notes)


def _bench_one(
    name: str, *, dtype_label: str, device: torch.device, **settings: Any
) -> BenchResult:
    entry = registry.info(name)
    result = BenchResult(
        name=name,
        family=entry.family,
        layout=entry.layout,
        input_shape="",
        dtype=dtype_label,
        device=str(device),
        params=0,
        threads=torch.get_num_threads(),
    )
    try:
        _measure(result, name, device=device, **settings)
    except Exception as exc:  # noqa: BLE001 - one failure must not stop the others
        result.error = _first_line(exc)
    # The module, inputs and any traceback are gone; give their memory back now.
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def benchmark(
    names: Sequence[str] | None = None,
    *,
    batch: int = DEFAULT_BATCH,
    channels: int = DEFAULT_CHANNELS,
    size: tuple[int, int] = DEFAULT_SIZE,
    dtype: str | torch.dtype = "float32",
    backward: bool = True,
    repeats: int = DEFAULT_REPEATS,
    warmup: int = DEFAULT_WARMUP,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    progress: bool = False,
) -> list[BenchResult]:
    """Measure each mechanism in ``names`` (default: every registered one).

    Arguments are checked, and every mechanism is built and run on the meta device,
    before anything is computed: a bad argument raises :class:`UsageError`, an unknown
    name the registry's ValueError. A mechanism that fails at run time (out of memory,
    say) gets a row with ``error`` set; the others still run. ``threads`` sets
    ``torch.set_num_threads`` for the run (restored after); ``progress`` shows a tqdm
    bar on stderr.
    """
    names = list(registry.list_mechanisms() if not names else names)
    for n in names:
        registry.info(n)  # unknown names: the registry's error, with the closest names
    batch = _check_int("batch", batch, 1)
    channels = _check_int("channels", channels, 1)
    size = _check_size(size)
    repeats = _check_int("repeats", repeats, 1)
    warmup = _check_int("warmup", warmup, 0)
    if threads is not None:
        threads = _check_int("threads", threads, 1)
    dtype_label, torch_dtype = _resolve_dtype(dtype)
    dev = _resolve_device(device)
    for n in dict.fromkeys(names):
        _check_buildable(n, batch, channels, size)

    from tqdm.auto import tqdm

    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    results = []
    # Each mechanism seeds its own example; the caller's random state is left as it was.
    rng_devices = [dev.index] if dev.type == "cuda" else []
    settings = dict(
        batch=batch,
        channels=channels,
        size=size,
        dtype_label=dtype_label,
        dtype=torch_dtype,
        backward=backward,
        repeats=repeats,
        warmup=warmup,
        device=dev,
    )
    try:
        with torch.random.fork_rng(devices=rng_devices):
            bar = tqdm(names, desc="bench", unit="mech", file=sys.stderr, disable=not progress)
            for n in bar:
                bar.set_postfix_str(n)
                results.append(_bench_one(n, **settings))
            bar.close()
    finally:
        torch.set_num_threads(previous_threads)
    return results


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
    cols = ("mechanism", "family", "input", "params", "fwd GFLOPs", "f+b GFLOPs",
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
        "attention mechanisms, each on an input typical for its layout."
    )
    parser.add_argument(
        "names", nargs="*", metavar="NAME",
        help="mechanisms to measure (default: every registered one)",
    )
    parser.add_argument(
        "--size", nargs=2, type=int, metavar=("H", "W"), default=list(DEFAULT_SIZE),
        help=f"spatial size of the input (default: {DEFAULT_SIZE[0]} {DEFAULT_SIZE[1]}); "
        "sequence mechanisms get H*W tokens",
    )
    parser.add_argument("--channels", type=int, default=DEFAULT_CHANNELS,
                        help=f"channels C (default: {DEFAULT_CHANNELS})")
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH,
                        help=f"batch size B (default: {DEFAULT_BATCH})")
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
    parser.add_argument("--out", metavar="CSV", help="write one CSV row per mechanism here")
    parser.add_argument("--plot", metavar="PNG", help="write a bar chart here (needs matplotlib)")


def _check_output_path(label: str, path: str | None) -> None:
    if path is not None and Path(path).is_dir():
        raise UsageError(f"{label} {path!r} is a directory, expected a file name")


def run(args: argparse.Namespace) -> int:
    """``spatial-attention bench``: exit 0 unless every mechanism failed (then 1)."""
    _check_output_path("--out", args.out)
    _check_output_path("--plot", args.plot)
    if args.plot:
        _require_matplotlib()
    results = benchmark(
        args.names,
        batch=args.batch,
        channels=args.channels,
        size=tuple(args.size),
        dtype=args.dtype,
        backward=args.backward,
        repeats=args.repeats,
        warmup=args.warmup,
        device=args.device,
        threads=args.threads,
        progress=True,
    )
    print(format_table(results))
    if args.out:
        print(f"wrote {write_csv(results, args.out)}")
    if args.plot:
        title = (
            f"batch {args.batch}, {args.channels} channels, {args.size[0]}x{args.size[1]}, "
            f"{args.dtype} on {results[0].device if results else args.device}, "
            f"{results[0].threads if results else '?'} thread(s), torch {torch.__version__}"
        )
        print(f"wrote {plot(results, args.plot, title=title)}")
    return 0 if any(r.ok for r in results) else 1
