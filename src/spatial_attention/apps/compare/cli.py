"""``spatial-attention compare``: the equal-budget CIFAR-10 benchmark of map attention.

Every selected mechanism (and the ``none`` baseline) is trained under one protocol for
each seed, one run per (mechanism, seed), in ``<out>/runs/<mechanism>/seed<k>/``. A
finished run is skipped and an interrupted one resumes from its last epoch, so the
command can be stopped and restarted freely. After every run ``results.csv``,
``summary.csv``, ``summary.md``, ``summary.png`` and ``claims.md`` (the papers' claims
this protocol tests, :mod:`.claims`) in ``<out>`` are rewritten from all finished runs
there.

All input is checked before anything starts: unknown or non-map names, a family without
map mechanisms, a missing data folder, a mechanism that cannot be built at the
protocol's widths, an output folder made under a different protocol.

``--tokens [NAMES...]`` runs the token-mixer protocol instead (:mod:`.token_net`,
:mod:`.token_runner`): a compact hierarchical transformer whose token mixer is swapped,
baseline ``global``, output in ``runs/compare-tokens`` by default with the same layout,
and two more columns, each mixer's FLOPs at the 16x16 token grid of a 32x32 input and
at the 56x56 grid of a 224x224 one (the mixer alone at the first stage's width). Names
are checked the same way (a map mechanism with ``--tokens``, or a token mixer without
it, is refused); an entry whose network cannot be built or run is skipped with a note
in the summary instead of stopping the queue.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ...errors import UsageError
from .claims import CLAIMS, accuracies_by_entry, claims_table
from .data import check_data, load_cifar
from .plan import format_plan, plan_queue
from .runner import PRESETS, TTA_MODES, Protocol, RunResult, read_result, steps_of, train_run
from .stats import SUMMARY_FIELDS, markdown, plot, summarise
from .timing import TIMING_FIELDS, TIMING_NAME, read_timing, timing_note, timing_pass
from .token_runner import TOKEN_PRESETS, TokenProtocol, train_token_run

#: written beside summary.md after every run
CLAIMS_NAME = "claims.md"

__all__ = ["add_arguments", "run", "select_mechanisms", "protocol_from_args", "RESULT_FIELDS"]

BASELINE = "none"
TOKEN_BASELINE = "global"
DEFAULT_OUT = "runs/compare"
TOKEN_OUT = "runs/compare-tokens"
#: the token protocol's extra summary columns: (csv field, token grid side, label)
FLOP_FIELDS = (("attn_flops_32px", 16, "mixer FLOPs 32px"),
               ("attn_flops_224px", 56, "mixer FLOPs 224px"))
FLOPS_NAME = "attention_flops.json"
SKIPPED_NAME = "skipped.json"
DEFAULT_DATA = "../shared/data/cifar10"
RESULT_FIELDS = ("mechanism", "seed", "accuracy", "train_seconds", "epochs", "params",
                 "macs", "train_img_s", "infer_img_s", "peak_mem_mb", "device", "threads")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ... import registry

    parser.add_argument("names", nargs="*", metavar="NAMES",
                        help="map mechanisms to compare (default: all of them); the "
                             "baseline 'none' is always included")
    parser.add_argument("--tokens", nargs="*", metavar="NAMES",
                        help="token-mixer protocol: compare these token mixers (swin, twins, "
                             "boat, cswin, or any registered token mixer; default all) in a "
                             "small hierarchical transformer; baseline 'global'")
    parser.add_argument("--family", choices=registry.FAMILIES, metavar="F",
                        help="only the map mechanisms (with --tokens: token mixers) of this "
                             "family: "
                             + ", ".join(registry.FAMILIES))
    parser.add_argument("--seeds", type=int, default=3, metavar="N",
                        help="seeds 0..N-1 (default 3)")
    parser.add_argument("--baseline-seeds", type=int, metavar="N",
                        help="seeds of the baseline ('none', or 'global' with --tokens), "
                        "when it needs more than the others (default: --seeds; the "
                        "issue's protocol asks 5)")
    parser.add_argument("--data", default=DEFAULT_DATA, metavar="PATH",
                        help="folder with CIFAR-10 train.tar and test.tar "
                             f"(default {DEFAULT_DATA})")
    parser.add_argument("--device", default="cpu", metavar="D",
                        help="cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--out", metavar="DIR",
                        help=f"output folder (default {DEFAULT_OUT}; with --tokens "
                             f"{TOKEN_OUT})")
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="protocol scale: cpu (half width, 6 epochs) or gpu (full "
                             "width, 16 epochs); with --tokens cpu (3 epochs, batch 256) or "
                             "gpu (40 epochs, batch 512); default: by --device")
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
    parser.add_argument("--timing", action="store_true",
                        help="instead of training: a short timing pass of the same entries "
                        "(built at once, timed interleaved round by round) into "
                        "<out>/timing.csv; the summary's img/s then come from it")
    parser.add_argument("--timing-rounds", type=int, default=3, metavar="R",
                        help="rounds of the timing pass (default 3; the best one is kept)")
    parser.add_argument("--plan", action="store_true",
                        help="only print the queue: per entry the runs finished, resuming "
                        "and to start, and the time their steps should take (rates from "
                        "the folder's timing pass, else its finished runs); trains nothing")
    # tests stop a queue mid-run to check that resuming is exact
    parser.add_argument("--stop-after-epochs", type=int, help=argparse.SUPPRESS)


def select_mechanisms(names: list[str], family: str | None) -> list[str]:
    """The baseline then the requested map mechanisms, validated (UsageError otherwise).

    Entries of :data:`.net.VARIANTS` (a mechanism with other constructor arguments) are
    accepted by name, checked as their mechanism is, and follow it in the default list.
    """
    from ... import registry
    from .net import VARIANTS, resolve_entry

    maps = registry.list_mechanisms(layout="map")
    chosen: list[str] = []
    for name in names:
        if name == BASELINE:
            continue
        try:
            entry = registry.info(resolve_entry(name)[0])
        except ValueError as exc:
            raise UsageError(str(exc).splitlines()[0]) from None
        if entry.layout != "map":
            hint = " (token mixers: compare --tokens)" if entry.layout == "tokens" else ""
            raise UsageError(
                f"{name} takes {entry.layout} input {registry.LAYOUTS[entry.layout]}, not a "
                f"(B, C, H, W) map; compare benchmarks map mechanisms only{hint}")
        if family is not None and entry.family != family:
            raise UsageError(f"{name} is in family {entry.family}, not {family}")
        label = name if name in VARIANTS else entry.name
        if label not in chosen:
            chosen.append(label)
    if not names:
        chosen = []
        for n in maps:
            if family is None or registry.info(n).family == family:
                chosen += [n] + [v for v, (base, _) in VARIANTS.items() if base == n]
        if not chosen and family is not None:
            raise UsageError(f"family {family} has no map (B, C, H, W) mechanisms")
    return [BASELINE] + chosen


def select_token_entries(names: list[str], family: str | None) -> list[str]:
    """The baseline ``global`` then the requested token-mixer entries, validated."""
    from ... import registry
    from .token_net import ENTRIES, TOKEN_FAMILIES, entry_pattern, list_entries

    def families(entry: str) -> set[str]:
        return {registry.info(m).family for m in entry_pattern(entry)}

    if family is not None and family not in TOKEN_FAMILIES:
        raise UsageError(f"family {family} has no token mixers; with --tokens use one of "
                         + ", ".join(TOKEN_FAMILIES))
    # a registered mixer that is a composite's only member is that composite
    alias = {pattern[0]: e for e, pattern in ENTRIES.items() if len(pattern) == 1}
    chosen: list[str] = []
    for name in names:
        if name in ENTRIES:
            entry = name
        else:
            if name == BASELINE:
                raise UsageError("'none' is the CNN protocol's baseline; the token "
                                 f"protocol's is '{TOKEN_BASELINE}' (always included)")
            try:
                info = registry.info(name)
            except ValueError as exc:
                raise UsageError(str(exc).splitlines()[0]) from None
            if info.layout != "tokens" or info.family not in TOKEN_FAMILIES:
                hint = (" (map mechanisms: compare without --tokens)"
                        if info.layout == "map" else "")
                raise UsageError(
                    f"{name} takes {info.layout} input {registry.LAYOUTS[info.layout]}; "
                    f"compare --tokens benchmarks token mixers only{hint}")
            entry = alias.get(info.name, info.name)
        if family is not None and family not in families(entry):
            raise UsageError(f"{name} is in family {'/'.join(sorted(families(entry)))}, "
                             f"not {family}")
        if entry != TOKEN_BASELINE and entry not in chosen:
            chosen.append(entry)
    if not names:
        chosen = [e for e in list_entries()
                  if e != TOKEN_BASELINE and (family is None or family in families(e))]
    return [TOKEN_BASELINE] + chosen


def protocol_from_args(args: argparse.Namespace, device: torch.device
                       ) -> Protocol | TokenProtocol:
    preset = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    tokens = getattr(args, "tokens", None) is not None
    p: Protocol | TokenProtocol = TOKEN_PRESETS[preset] if tokens else PRESETS[preset]
    if tokens and getattr(args, "width", None) is not None:
        raise UsageError("--width sets the CNN protocol's width; the token protocol has "
                         "fixed dims")
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


def _token_buildable(entries: list[str], protocol: TokenProtocol) -> dict[str, str]:
    """``{entry: reason}`` for the entries whose network cannot be built or run at the
    protocol's dims (told on stdout; the queue goes on without them). The baseline must
    work."""
    from .token_net import TokenNet

    skipped: dict[str, str] = {}
    for name in entries:
        try:
            with torch.random.fork_rng(devices=[]):
                net = TokenNet(name, protocol.dims, protocol.heads, protocol.depths,
                               protocol.mlp_ratio).eval()
                with torch.no_grad():
                    net(torch.zeros(1, 3, 32, 32))
        except Exception as exc:  # any failure of a third-party mixer: skip, not crash
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            why = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
            if name == TOKEN_BASELINE:
                raise UsageError(f"the baseline {name} cannot be built at dims "
                                 f"{protocol.dims}: {why}") from None
            print(f"compare: skipping {name}: cannot be built or run at dims "
                  f"{protocol.dims} ({why})")
            skipped[name] = why
    return skipped


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_json(path: Path, d: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(d, indent=1, sort_keys=True))
    tmp.replace(path)


def _token_flops(out: Path, entries: list[str], protocol: TokenProtocol) -> None:
    """Each entry's mixer FLOPs (see FLOP_FIELDS) into ``<out>/attention_flops.json``,
    counted once per entry (at the first stage's dim and heads)."""
    from .token_net import attention_flops

    path = out / FLOPS_NAME
    flops = _read_json(path)
    for name in entries:
        if name in flops:
            continue
        flops[name] = {}
        for key, grid, _ in FLOP_FIELDS:
            try:
                with torch.random.fork_rng(devices=[]):
                    flops[name][key] = attention_flops(name, protocol.dims[0],
                                                       protocol.heads[0], grid)
            except Exception as exc:  # the table shows "-"; training is unaffected
                print(f"compare: {name}: mixer FLOPs at a {grid}x{grid} grid not counted "
                      f"({type(exc).__name__})")
                flops[name][key] = None
        _write_json(path, flops)


def _check_out(out: Path, protocol: Protocol | TokenProtocol) -> None:
    saved = out / "protocol.json"
    if saved.is_file():
        d = json.loads(saved.read_text())
        was, want = d.get("net", "cnn"), getattr(protocol, "net", "cnn")
        if was != want:
            raise UsageError(f"{out} holds runs of the {was} protocol, not the {want} one; "
                             "use another --out")
        old = type(protocol).from_json(d)
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


def _flops_text(v: Any) -> str:
    return "-" if v in (None, "") else f"{float(v) / 1e6:.1f}M"


def write_reports(out: Path, protocol: Protocol | TokenProtocol, device: str,
                  n_test: int = 10_000) -> list[dict[str, Any]]:
    from ..training.reporting import write_csv_rows

    tokens = isinstance(protocol, TokenProtocol)
    baseline = TOKEN_BASELINE if tokens else BASELINE
    rows = collect_rows(out)
    rows.sort(key=lambda r: (r["mechanism"] != baseline, r["mechanism"], r["seed"]))
    write_csv_rows(out / "results.csv", rows, RESULT_FIELDS)
    if not rows:
        return []
    summary = summarise(rows, baseline)
    fields, extra, notes = SUMMARY_FIELDS, [], []
    if tokens:
        flops = _read_json(out / FLOPS_NAME)
        for r in summary:
            for key, _, _ in FLOP_FIELDS:
                r[key] = flops.get(r["mechanism"], {}).get(key, "")
                r[key + "_text"] = _flops_text(r[key])
        fields = SUMMARY_FIELDS + tuple(k for k, _, _ in FLOP_FIELDS)
        extra = [(label, key + "_text") for key, _, label in FLOP_FIELDS]
        notes = [f"Mixer FLOPs: one image through the entry's token mixer alone (projections "
                 f"included; mean per block of its pattern) at width {protocol.dims[0]}, on the "
                 "16x16 token grid of a 32x32 input and the 56x56 grid of a 224x224 one."]
        notes += [f"- skipped: {name}: {why}"
                  for name, why in sorted(_read_json(out / SKIPPED_NAME).items())]
    timing = read_timing(out)
    if timing:  # throughput from the interleaved timing pass, not from the loaded runs
        for r in summary:
            t = timing.get(r["mechanism"])
            if t is not None:
                r["train_img_s"], r["infer_img_s"] = (float(t["train_img_s"]),
                                                      float(t["infer_img_s"]))
        notes = [*notes, timing_note(timing)]
    write_csv_rows(out / "summary.csv", summary, fields)
    (out / "summary.md").write_text(markdown(summary, protocol.describe(), device, n_test,
                                             protocol.tta, baseline, extra, notes))
    # the papers' claims this protocol can test, from this folder's runs
    kind = "tokens" if tokens else "map"
    accuracies = accuracies_by_entry(rows)
    (out / CLAIMS_NAME).write_text(
        f"The papers' claims this protocol tests ({protocol.describe()}): the first entry "
        "minus the second in points with a 95% Welch interval (apps/compare/claims.py).\n\n"
        + claims_table({kind: accuracies}, [c for c in CLAIMS if c.protocol == kind]))
    try:
        plot(summary, out / "summary.png", f"CIFAR-10, {protocol.describe()}, {device}",
             protocol.tta, baseline)
    except ImportError:
        # the tables are the result; the plot is a view of them and needs the viz extra
        print("compare: matplotlib is not installed, summary.png skipped "
              "(pip install spatial-attention[viz])")
    return summary


def _run_timing(out: Path, entries: list[str], protocol: Protocol | TokenProtocol,
                data: Any, device: torch.device, rounds: int) -> int:
    from ..training.reporting import write_csv_rows

    baseline = TOKEN_BASELINE if isinstance(protocol, TokenProtocol) else BASELINE
    print(f"compare --timing: {len(entries)} entries, {rounds} interleaved rounds, "
          f"{torch.get_num_threads()} thread(s) on {device}")
    rows = timing_pass(entries, protocol, data, device, baseline, rounds=rounds)
    old = {k: v for k, v in read_timing(out).items() if k not in entries}
    if old and baseline not in entries:
        print(f"compare --timing: {TIMING_NAME} keeps earlier rows of "
              f"{', '.join(sorted(old))}; their ratios come from another pass")
    write_csv_rows(out / TIMING_NAME, [*old.values(), *rows], TIMING_FIELDS)
    for r in rows:
        ratio = (f" ({float(r['train_vs_baseline']):.2f}x / "
                 f"{float(r['infer_vs_baseline']):.2f}x {baseline})"
                 if r["train_vs_baseline"] != "" else "")
        print(f"  {r['mechanism']}: train {r['train_img_s']:.0f} img/s, infer "
              f"{r['infer_img_s']:.0f} img/s{ratio}")
    if collect_rows(out):
        write_reports(out, protocol, str(device), len(data.test_y))
    print(f"compare --timing: wrote {out / TIMING_NAME}")
    return 0


def _queue(entries: list[str], baseline: str, seeds: int,
           base_seeds: int) -> list[tuple[str, int]]:
    """The ``(entry, seed)`` runs in order: seed-major, so a partly finished queue
    already holds every entry at seed 0; the baseline may have more seeds."""
    return [(m, s) for s in range(max(seeds, base_seeds)) for m in entries
            if s < (base_seeds if m == baseline else seeds)]


def _print_plan(out: Path, queue: list[tuple[str, int]], protocol: Protocol | TokenProtocol,
                n_train: int) -> int:
    """Print what ``queue`` has left (``--plan``); the steps of one run."""
    per_run = steps_of(protocol, n_train)
    for line in format_plan(plan_queue(out, queue, per_run, protocol.batch_size), per_run):
        print(line)
    return per_run


def run(args: argparse.Namespace) -> int:
    device = _device(args.device)
    if args.seeds < 1:
        raise UsageError(f"--seeds must be positive, got {args.seeds}")
    if args.baseline_seeds is not None and args.baseline_seeds < 1:
        raise UsageError(f"--baseline-seeds must be positive, got {args.baseline_seeds}")
    if args.timing_rounds < 1:
        raise UsageError(f"--timing-rounds must be positive, got {args.timing_rounds}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be positive, got {args.threads}")
    tokens = getattr(args, "tokens", None) is not None
    skipped: dict[str, str] = {}
    if tokens:
        mechanisms = select_token_entries(list(args.tokens) + list(args.names), args.family)
    else:
        mechanisms = select_mechanisms(list(args.names), args.family)
    protocol = protocol_from_args(args, device)
    data_root = check_data(args.data)
    if isinstance(protocol, TokenProtocol):
        skipped = _token_buildable(mechanisms, protocol)
        mechanisms = [m for m in mechanisms if m not in skipped]
    else:
        _check_buildable(mechanisms, protocol)
    out = Path(args.out or (TOKEN_OUT if tokens else DEFAULT_OUT))
    _check_out(out, protocol)
    baseline = TOKEN_BASELINE if tokens else BASELINE
    base_seeds = args.seeds if args.baseline_seeds is None else args.baseline_seeds
    queue = _queue(mechanisms, baseline, args.seeds, base_seeds)
    if args.plan:  # read-only: no protocol.json, no run folders (the data cache aside)
        data = load_cifar(data_root, out / "cache")
        _print_plan(out, queue, protocol,
                    len(data.subset(protocol.train_subset, protocol.test_subset).train_y))
        return 0

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out.mkdir(parents=True, exist_ok=True)
    (out / "protocol.json").write_text(json.dumps(protocol.to_json(), indent=1))
    train: Any = train_run
    if isinstance(protocol, TokenProtocol):
        train = train_token_run
        old = _read_json(out / SKIPPED_NAME)
        old = {k: v for k, v in old.items() if k not in mechanisms}
        _write_json(out / SKIPPED_NAME, {**old, **skipped})
        _token_flops(out, mechanisms, protocol)
    data = load_cifar(data_root, out / "cache")
    data = data.subset(protocol.train_subset, protocol.test_subset).to(device)
    if args.timing:
        return _run_timing(out, mechanisms, protocol, data, device, args.timing_rounds)

    from tqdm import tqdm

    per_run = _print_plan(out, queue, protocol, len(data.train_y))
    seeds_text = (f"{args.seeds} seeds" if base_seeds == args.seeds
                  else f"{args.seeds} seeds ({baseline}: {base_seeds})")
    print(f"compare: {len(mechanisms)} entries x {seeds_text}; {protocol.describe()}; "
          f"{len(data.train_y)} train / {len(data.test_y)} test images on {device}")
    stopped = False
    with tqdm(total=len(queue) * per_run, unit="step", dynamic_ncols=True) as bar:
        for name, seed in queue:
            bar.set_description(f"{name} seed {seed}")
            result: RunResult | None = train(
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
