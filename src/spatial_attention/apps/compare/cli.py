"""``spatial-attention compare``: the equal-budget CIFAR-10 benchmark of map attention.

Every selected mechanism (and the ``none`` baseline) is trained under one protocol for
each seed, one run per (mechanism, seed), in ``<out>/runs/<mechanism>/seed<k>/``. A
finished run is skipped and an interrupted one resumes from its last epoch, so the
command can be stopped and restarted freely. After every run ``results.csv``,
``summary.csv``, ``summary.md`` and ``summary.png`` in ``<out>`` are rewritten from all
finished runs there.

All input is checked before anything starts: unknown or non-map names, a family without
map mechanisms, a missing data folder, a mechanism that cannot be built at the
protocol's widths, an output folder made under a different protocol.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ...errors import UsageError
from .data import check_data, load_cifar
from .runner import PRESETS, TTA_MODES, Protocol, RunResult, read_result, steps_of, train_run
from .stats import SUMMARY_FIELDS, markdown, plot, summarise

__all__ = ["add_arguments", "run", "select_mechanisms", "protocol_from_args", "RESULT_FIELDS"]

BASELINE = "none"
DEFAULT_DATA = "../shared/data/cifar10"
RESULT_FIELDS = ("mechanism", "seed", "accuracy", "train_seconds", "epochs", "params",
                 "macs", "train_img_s", "infer_img_s", "peak_mem_mb", "device", "threads")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ... import registry

    parser.add_argument("names", nargs="*", metavar="NAMES",
                        help="map mechanisms to compare (default: all of them); the "
                             "baseline 'none' is always included")
    parser.add_argument("--family", choices=registry.FAMILIES, metavar="F",
                        help="only the map mechanisms of this family: "
                             + ", ".join(registry.FAMILIES))
    parser.add_argument("--seeds", type=int, default=3, metavar="N",
                        help="seeds 0..N-1 (default 3)")
    parser.add_argument("--data", default=DEFAULT_DATA, metavar="PATH",
                        help="folder with CIFAR-10 train.tar and test.tar "
                             f"(default {DEFAULT_DATA})")
    parser.add_argument("--device", default="cpu", metavar="D",
                        help="cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--out", default="runs/compare", metavar="DIR", help="output folder")
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="protocol scale: cpu (half width, 6 epochs) or gpu (full "
                             "width, 16 epochs); default: by --device")
    parser.add_argument("--epochs", type=int, metavar="E", help="override the preset's epochs")
    parser.add_argument("--width", type=float, help="override the preset's width multiplier")
    parser.add_argument("--batch-size", type=int, help="override the preset's batch size")
    parser.add_argument("--subset", type=int, metavar="N",
                        help="train on N class-balanced training images (small protocols)")
    parser.add_argument("--test-subset", type=int, metavar="N",
                        help="evaluate on N class-balanced test images (small protocols)")
    parser.add_argument("--tta", choices=sorted(TTA_MODES),
                        help="test-time augmentation: flip_translate (default, airbench's), "
                             "flip or none")
    parser.add_argument("--threads", type=int, metavar="T",
                        help="torch CPU threads (default: torch's)")
    # tests stop a queue mid-run to check that resuming is exact
    parser.add_argument("--stop-after-epochs", type=int, help=argparse.SUPPRESS)


def select_mechanisms(names: list[str], family: str | None) -> list[str]:
    """The baseline then the requested map mechanisms, validated (UsageError otherwise)."""
    from ... import registry

    maps = registry.list_mechanisms(layout="map")
    chosen: list[str] = []
    for name in names:
        if name == BASELINE:
            continue
        try:
            entry = registry.info(name)
        except ValueError as exc:
            raise UsageError(str(exc).splitlines()[0]) from None
        if entry.layout != "map":
            raise UsageError(
                f"{name} takes {entry.layout} input {registry.LAYOUTS[entry.layout]}, not a "
                "(B, C, H, W) map; compare benchmarks map mechanisms only")
        if family is not None and entry.family != family:
            raise UsageError(f"{name} is in family {entry.family}, not {family}")
        if entry.name not in chosen:
            chosen.append(entry.name)
    if not names:
        chosen = [n for n in maps if family is None or registry.info(n).family == family]
        if not chosen and family is not None:
            raise UsageError(f"family {family} has no map (B, C, H, W) mechanisms")
    return [BASELINE] + chosen


def protocol_from_args(args: argparse.Namespace, device: torch.device) -> Protocol:
    preset = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    p = PRESETS[preset]
    changes: dict[str, Any] = {}
    for key, attr in (("epochs", "epochs"), ("width", "width"), ("batch_size", "batch_size"),
                      ("subset", "train_subset"), ("test_subset", "test_subset")):
        value = getattr(args, key, None)
        if value is not None:
            if value <= 0:
                raise UsageError(f"--{key.replace('_', '-')} must be positive, got {value}")
            changes[attr] = value
    if getattr(args, "tta", None) is not None:
        changes["tta"] = args.tta
    return replace(p, **changes)


def _device(spec: str) -> torch.device:
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise UsageError(f"--device {spec}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {spec}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {spec}: only cpu and cuda are supported")
    return device


def _check_buildable(mechanisms: list[str], protocol: Protocol) -> None:
    from .net import CompareNet

    for name in mechanisms:
        try:
            with torch.device("meta"):
                CompareNet(name, protocol.width)
        except (ValueError, TypeError) as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UsageError(f"{name} cannot be built at widths {protocol.widths}: {msg}") \
                from None


def _check_out(out: Path, protocol: Protocol) -> None:
    saved = out / "protocol.json"
    if saved.is_file():
        old = Protocol.from_json(json.loads(saved.read_text()))
        if old != protocol:
            diff = ", ".join(f"{k} {getattr(old, k)} -> {getattr(protocol, k)}"
                             for k in protocol.to_json() if getattr(old, k) != getattr(protocol, k))
            raise UsageError(f"{out} holds runs of another protocol ({diff}); use another --out")


def collect_rows(out: Path) -> list[dict[str, Any]]:
    rows = []
    for run_dir in sorted((out / "runs").glob("*/seed*")):
        r = read_result(run_dir)
        if r is not None:
            rows.append(r)
    return rows


def write_reports(out: Path, protocol: Protocol, device: str, n_test: int = 10_000
                  ) -> list[dict[str, Any]]:
    from ..training.reporting import write_csv_rows

    rows = collect_rows(out)
    rows.sort(key=lambda r: (r["mechanism"] != BASELINE, r["mechanism"], r["seed"]))
    write_csv_rows(out / "results.csv", rows, RESULT_FIELDS)
    if not rows:
        return []
    summary = summarise(rows, BASELINE)
    write_csv_rows(out / "summary.csv", summary, SUMMARY_FIELDS)
    (out / "summary.md").write_text(markdown(summary, protocol.describe(), device, n_test,
                                             protocol.tta))
    try:
        plot(summary, out / "summary.png", f"CIFAR-10, {protocol.describe()}, {device}",
             protocol.tta)
    except ImportError:
        # the tables are the result; the plot is a view of them and needs the viz extra
        print("compare: matplotlib is not installed, summary.png skipped "
              "(pip install spatial-attention[viz])")
    return summary


def run(args: argparse.Namespace) -> int:
    device = _device(args.device)
    if args.seeds < 1:
        raise UsageError(f"--seeds must be positive, got {args.seeds}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be positive, got {args.threads}")
    mechanisms = select_mechanisms(list(args.names), args.family)
    protocol = protocol_from_args(args, device)
    data_root = check_data(args.data)
    _check_buildable(mechanisms, protocol)
    out = Path(args.out)
    _check_out(out, protocol)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out.mkdir(parents=True, exist_ok=True)
    (out / "protocol.json").write_text(json.dumps(protocol.to_json(), indent=1))
    data = load_cifar(data_root, out / "cache")
    data = data.subset(protocol.train_subset, protocol.test_subset).to(device)

    from tqdm import tqdm

    # seed-major: a partly finished queue already holds every mechanism at seed 0
    queue = [(m, s) for s in range(args.seeds) for m in mechanisms]
    per_run = steps_of(protocol, len(data.train_y))
    print(f"compare: {len(mechanisms)} entries x {args.seeds} seeds; {protocol.describe()}; "
          f"{len(data.train_y)} train / {len(data.test_y)} test images on {device}")
    stopped = False
    with tqdm(total=len(queue) * per_run, unit="step", dynamic_ncols=True) as bar:
        for name, seed in queue:
            bar.set_description(f"{name} seed {seed}")
            result: RunResult | None = train_run(
                out / "runs" / name / f"seed{seed}", name, seed, protocol, data, device,
                progress=bar.update, stop_after_epochs=args.stop_after_epochs)
            if result is None:
                stopped = True
                break
            bar.set_postfix(acc=f"{100 * result.accuracy:.2f}")
            write_reports(out, protocol, str(device), len(data.test_y))
    if stopped:
        print(f"compare: stopped after {args.stop_after_epochs} epoch(s) as asked; run "
              "again to resume")
        return 0
    print(f"compare: wrote {out / 'summary.md'}")
    print((out / "summary.md").read_text())
    return 0
