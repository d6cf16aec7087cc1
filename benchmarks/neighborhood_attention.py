"""Neighbourhood attention (NAT / DiNAT): ours against plain implementations and Swin windows.

    python benchmarks/neighborhood_attention.py --threads 1 --official /tmp/na/parity

One map, ``(8, 56, 56, 96)``, 3 heads, kernel 7 (NAT-Tiny's first stage), timed for:

* ``neighborhood_attention`` ``auto`` (query tiles against their halo keys) and
  ``explicit`` (each query's 49 keys gathered: the plain form of the equation);
* with ``--official``, the NAT repository's pure-torch module (``nattentorch.py``,
  ``LegacyNeighborhoodAttention``: unfold, replicate padding), a local copy kept outside
  this project (``nattentorch_legacy.py``), loaded with our weights and checked equal
  before timing (NATTEN itself needs its compiled extension);
* ``window_attention`` with window 7 (Swin's W-MSA), the cost the issue sets as the
  yardstick (target: neighbourhood attention within 1.5x of its time);
* ``neighborhood_attention`` with dilation 8 (DiNAT-Mini's first stage), ``auto``.

Two groups of cases, each interleaved round by round (a noisy neighbour slows a round's
cases alike): the fast ones (ours ``auto``, windows, dilation) over ``--repeats`` rounds,
the plain ones (ours ``explicit``, the legacy module, with ours ``auto`` again for the
ratio) over ``--plain-repeats``; medians and minima, and the peak memory of one call from
the tensor-storage tracker (input and parameters included).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import warnings
from pathlib import Path

import torch

import spatial_attention as sa
from spatial_attention.apps.bench import (
    forward_case,
    interleaved_times,
    keep_freed_memory,
    ratio_table,
    train_case,
)
from spatial_attention.apps.bench.memory import peak_memory_bytes


def legacy_module(folder: str | None, dim: int, heads: int, kernel: int):
    file = Path(folder or "") / "nattentorch_legacy.py"
    if not folder or not file.exists():
        return None
    spec = importlib.util.spec_from_file_location("nattentorch_legacy", file)
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(file.parent))
    spec.loader.exec_module(mod)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the legacy version ... is highly inefficient"
        return mod.LegacyNeighborhoodAttention(dim, kernel, heads)


def modules(args):
    C, h, k = args.channels, args.heads, args.kernel
    torch.manual_seed(0)
    ours = sa.create("neighborhood_attention", C, h, kernel_size=k)
    mods = {"ours auto (tiles)": ours}
    mods["ours explicit (per-query gather)"] = sa.create(
        "neighborhood_attention", C, h, kernel_size=k, attn_impl="explicit")
    mods["ours explicit (per-query gather)"].load_state_dict(ours.state_dict())
    legacy = legacy_module(args.official, C, h, k)
    notes = []
    if legacy is not None:
        legacy.load_state_dict(ours.state_dict())
        mods["NAT legacy nattentorch (official, pure torch)"] = legacy
    else:
        notes.append("official legacy module skipped: no --official folder")
    mods[f"window_attention (window {k})"] = sa.create("window_attention", C, h,
                                                       window_size=k)
    dil = sa.create("neighborhood_attention", C, h, kernel_size=k, dilation=args.dilation)
    mods[f"ours auto, dilation {args.dilation}"] = dil
    return mods, notes




def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--official", default=None, help="folder with nattentorch_legacy.py")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--plain-repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=56)
    p.add_argument("--channels", type=int, default=96)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--kernel", type=int, default=7)
    p.add_argument("--dilation", type=int, default=8)
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="glibc: no page faults on reallocation (see keep_freed_memory)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    allocator = keep_freed_memory() if args.keep_freed_memory else "default allocator"
    B, S, C = args.batch, args.size, args.channels
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU, "
          f"{allocator}")
    mods, notes = modules(args)
    torch.manual_seed(1)
    x = torch.randn(B, S, S, C)
    ours = mods["ours auto (tiles)"]
    with torch.no_grad():
        want = ours(x)
        for name, m in mods.items():
            if name.startswith(("ours explicit", "NAT legacy")):
                diff = (m(x) - want).abs().max().item()
                notes.append(f"{name}: max abs diff to ours auto {diff:.1e}")
    grad = torch.randn_like(x)
    fast = [n for n in mods if not n.startswith(("ours explicit", "NAT legacy"))]
    plain = ["ours auto (tiles)"] + [n for n in mods if n not in fast]
    ref = f"window_attention (window {args.kernel})"
    for label, make in (("forward (no_grad)", lambda m: forward_case(m, x)),
                        ("forward + backward", lambda m: train_case(m, x, grad))):
        for names, repeats, warmup, against in ((fast, args.repeats, 2, ref),
                                                (plain, args.plain_repeats, 1, plain[0])):
            if len(names) < 2:
                continue
            cases = {n: make(mods[n]) for n in names}
            times = interleaved_times(cases, repeats, warmup=warmup)
            peaks = {n: peak_memory_bytes(c, "cpu", [x, *mods[n].parameters()])
                     for n, c in cases.items()}
            print(f"\n#### ({B}, {S}, {S}, {C}), {args.heads} heads, kernel {args.kernel}, "
                  f"{label}, {repeats} rounds\n")
            print(ratio_table(times, peaks, against, ms_digits=1))
    for note in notes:
        print(f"\n{note}")


if __name__ == "__main__":
    main()
