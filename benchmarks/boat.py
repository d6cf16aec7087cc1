"""BOAT cost benchmarks: scaling with the number of tokens, and FSLA vs the reference.

``scaling``: forward time (median), FLOPs (forward, multiply-add = 2) and peak tensor
memory of global attention (``multi_head``: qkv, one SDPA over all tokens, proj),
Swin window attention (``window_attention``, window 7), FSLA (``fsla``, groups of 49,
overlap 20) and the bilateral block (``bilateral_local_attention``: window + FSLA, with
their LayerNorms and residuals) on ``(B, S, S, C)`` maps, ``S`` in 28, 56, 112, 224.
Writes ``boat_scaling.csv`` and a log-log plot ``boat_scaling.png``. Global attention at
224^2 tokens costs ~1 TFLOP per image; it is timed only with ``--time-global-224``.

``reference``: FSLA and the reference implementation's ``ContentAttention`` (mahaoyuHKU/
pytorch-boat, BOAT-Swin) side by side on the same weights, forward and forward +
backward, interleaved, medians. The reference class is read at run time from a fetched
snapshot given by ``--reference-git`` (a git directory; only this harness rewrites its
``.cuda()`` calls away, and nothing of it is stored here). Also global SDPA attention
(``multi_head``) on the same input, for scale.

    python benchmarks/boat.py scaling --threads 2
    python benchmarks/boat.py reference --reference-git /path/to/pytorch-boat/.git \
        --threads 2
    python benchmarks/boat.py profile --threads 2    # where FSLA's time goes, by op
"""

from __future__ import annotations

import argparse
import ast
import csv
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

import spatial_attention as sa
from spatial_attention.apps.bench.flops import count_flops
from spatial_attention.apps.bench.memory import TensorMemoryTracker

MECHS = {
    "global (multi_head)": ("multi_head", {}),
    "window_attention (M=7)": ("window_attention", {"window_size": 7}),
    "fsla (g=49, o=20)": ("fsla", {}),
    "bilateral_local_attention": ("bilateral_local_attention", {}),
}


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _runner(name: str, module: nn.Module, x: torch.Tensor):
    if sa.info(name).layout == "sequence":
        seq = x.flatten(1, 2)
        return lambda: module(seq)
    return lambda: module(x)


def scaling(args: argparse.Namespace) -> None:
    out = Path(args.out)
    rows = []
    for side in args.sizes:
        x = torch.randn(args.batch, side, side, args.dim)
        for label, (name, kwargs) in MECHS.items():
            module = sa.create(name, args.dim, args.heads, **kwargs).eval()
            run = _runner(name, module, x)
            with torch.no_grad():
                flops, _ = count_flops(run)
                tracker = TensorMemoryTracker()
                with tracker:
                    run()
                timed = not (name == "multi_head" and side >= 224 and not args.time_global_224)
                ms = _median_ms(run, args.repeats if side < 112 else 3) if timed else float("nan")
            rows.append({"mechanism": label, "side": side, "tokens": side * side,
                         "forward_ms": round(ms, 2), "gflops": round(flops / 1e9, 3),
                         "peak_mib": round(tracker.peak_bytes / 2**20, 1)})
            print(rows[-1], flush=True)
    with (out / "boat_scaling.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for key, ax, title in zip(("forward_ms", "gflops", "peak_mib"), axes,
                              ("forward time (ms)", "forward GFLOPs", "peak tensor MiB"),
                              strict=True):
        for label in MECHS:
            pts = [(r["tokens"], r[key]) for r in rows if r["mechanism"] == label
                   and not math.isnan(r[key])]
            ax.loglog(*zip(*pts, strict=True), marker="o", label=label)
        ax.set_xlabel("tokens N = S^2")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"batch {args.batch}, C {args.dim}, {args.heads} heads, float32, "
                 f"{torch.get_num_threads()} CPU threads")
    fig.tight_layout()
    fig.savefig(out / "boat_scaling.png", dpi=110)


def load_reference(git_dir: str) -> type:
    """The reference's ContentAttention class, from a snapshot, ``.cuda()`` removed."""
    path = "BOAT-Swin/models/boat_swin_transformer.py"
    src = subprocess.run(["git", "--git-dir", git_dir, "show", f"HEAD:{path}"],
                         capture_output=True, text=True, check=True).stdout
    node = next(n for n in ast.parse(src).body
                if isinstance(n, ast.ClassDef) and n.name == "ContentAttention")
    code = ast.get_source_segment(src, node).replace(".cuda()", "")
    from einops import rearrange

    namespace = {"torch": torch, "nn": nn, "math": math, "rearrange": rearrange}
    exec(compile(code, f"{git_dir}:{path}", "exec"), namespace)  # noqa: S102
    return namespace["ContentAttention"]


def reference(args: argparse.Namespace) -> None:
    allocator = "default allocator"
    if args.keep_freed_memory:
        from spatial_attention.apps.bench import keep_freed_memory

        allocator = keep_freed_memory()
    Ref = load_reference(args.reference_git)
    torch.manual_seed(0)
    ref = Ref(args.dim, (7, 7), args.heads)
    ours = sa.create("fsla", args.dim, args.heads)
    ours.load_state_dict(ref.state_dict())
    glob = sa.create("multi_head", args.dim, args.heads)
    B, S, C = args.batch, args.side, args.dim
    x = torch.randn(B, S, S, C, requires_grad=True)
    with torch.no_grad():
        diff = (ref(x.view(B, -1, C)).view(B, S, S, C) - ours(x)).abs().max().item()
    cases = {
        "reference ContentAttention": lambda: ref(x.view(B, -1, C)),
        "fsla (ours)": lambda: ours(x),
    }
    if args.baseline_pkg:
        # an earlier version of this library, copied as a package of another name (e.g.
        # `git archive b1106fa src/spatial_attention`, renamed old_sa), timed in the same
        # rounds: before/after comparisons free of the host's run-to-run drift
        import importlib

        path = Path(args.baseline_pkg).resolve()
        sys.path.insert(0, str(path.parent))
        old = importlib.import_module(path.name).create("fsla", args.dim, args.heads)
        old.load_state_dict(ref.state_dict())
        cases[f"fsla ({path.name})"] = lambda: old(x)
    if not args.no_global:
        cases["global (multi_head, SDPA)"] = lambda: glob(x.view(B, -1, C))
    res = {k: {"fwd": [], "fwdbwd": []} for k in cases}
    for f in cases.values():  # warm-up
        f().sum().backward()
    for _ in range(args.repeats):  # interleaved, so load changes hit every case alike
        for k, f in cases.items():
            with torch.no_grad():
                t = time.perf_counter()
                f()
                res[k]["fwd"].append(time.perf_counter() - t)
            t = time.perf_counter()
            f().sum().backward()
            res[k]["fwdbwd"].append(time.perf_counter() - t)
    print(f"input ({B}, {S}, {S}, {C}), {args.heads} heads, float32, "
          f"{torch.get_num_threads()} threads, {args.repeats} interleaved repeats; "
          f"max |ref - ours| on the same weights: {diff:.2e}; {allocator}")
    print("| implementation | forward ms (median / min) | forward+backward ms (median / min) |")
    print("|---|---:|---:|")
    for k, r in res.items():
        f, fb = r["fwd"], r["fwdbwd"]
        print(f"| {k} | {statistics.median(f) * 1e3:.1f} / {min(f) * 1e3:.1f} | "
              f"{statistics.median(fb) * 1e3:.1f} / {min(fb) * 1e3:.1f} |")
    # the reference's own time drifts by a third between runs (allocator state), so the
    # ratio is also taken round by round, each round's two calls side by side
    ref_r = res["reference ContentAttention"]
    for label in [k for k in res if k.startswith("fsla")]:
        for part in ("fwd", "fwdbwd"):
            ratios = [a / b for a, b in zip(res[label][part], ref_r[part], strict=True)]
            print(f"{label} / reference, {part}: median of per-round ratios "
                  f"{statistics.median(ratios):.3f} "
                  f"(range {min(ratios):.3f}-{max(ratios):.3f})")


def profile(args: argparse.Namespace) -> None:
    """Where FSLA's forward + backward goes: torch.profiler's table by op and shape."""
    from spatial_attention.apps.bench import profile_table

    torch.manual_seed(0)
    ours = sa.create("fsla", args.dim, args.heads)
    x = torch.randn(args.batch, args.side, args.side, args.dim, requires_grad=True)
    print(f"fsla, input ({args.batch}, {args.side}, {args.side}, {args.dim}), {args.heads} "
          f"heads, {torch.get_num_threads()} threads; totals over {args.repeats} calls")
    print(profile_table(lambda: ours(x).sum().backward(), args.repeats, args.rows))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("scaling")
    s.add_argument("--sizes", type=int, nargs="+", default=[28, 56, 112, 224])
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--dim", type=int, default=96)
    s.add_argument("--heads", type=int, default=3)
    s.add_argument("--repeats", type=int, default=5)
    s.add_argument("--time-global-224", action="store_true")
    s.add_argument("--out", default="benchmarks")
    r = sub.add_parser("reference")
    r.add_argument("--reference-git", required=True)
    r.add_argument("--batch", type=int, default=8)
    r.add_argument("--side", type=int, default=56)
    r.add_argument("--dim", type=int, default=96)
    r.add_argument("--heads", type=int, default=3)
    r.add_argument("--repeats", type=int, default=7)
    r.add_argument("--no-global", action="store_true", help="skip global attention")
    r.add_argument("--baseline-pkg", default=None,
                   help="directory of an earlier spatial_attention copied under another "
                        "package name, timed in the same rounds")
    r.add_argument("--keep-freed-memory", action="store_true",
                   help="glibc keeps freed blocks: no page faults on reallocation "
                        "(spatial_attention.apps.bench.keep_freed_memory)")
    f = sub.add_parser("profile", help="torch.profiler table of FSLA's forward + backward")
    f.add_argument("--batch", type=int, default=8)
    f.add_argument("--side", type=int, default=56)
    f.add_argument("--dim", type=int, default=96)
    f.add_argument("--heads", type=int, default=3)
    f.add_argument("--repeats", type=int, default=5)
    f.add_argument("--rows", type=int, default=40)
    for q in (s, r, f):
        q.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    {"scaling": scaling, "reference": reference, "profile": profile}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
