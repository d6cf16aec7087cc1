"""Bi-level routing attention: ours against the official BiFormer module, same weights.

    python benchmarks/biformer.py --official /tmp/biformer --threads 1

``--official`` is a folder holding ``bra_legacy.py``, the official
``BiLevelRoutingAttention`` (rayleizhu/BiFormer ``ops/bra_legacy.py``), importable with
``einops`` (looked up in the folder's ``pylib/`` too, so it need not be installed
where the library is). It gets our module's weights (the key mapping of
:meth:`BiLevelRoutingAttention.load_official_state_dict`, reversed). Every case runs once
per round, rounds interleave all cases (:func:`spatial_attention.apps.bench.
interleaved_times`); medians and minima over ``--repeats`` rounds, peak memory of one
call from the tensor-storage tracker (parameters and input included).
"""

from __future__ import annotations

import argparse
import importlib
import sys
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

# the official setting per stage of BiFormer-T at 224: (map side, dim, heads, topk)
STAGES = {1: (56, 64, 2, 1), 2: (28, 128, 4, 4), 3: (14, 256, 8, 16)}


def official_class(folder: str | None):
    if not folder or not (Path(folder) / "bra_legacy.py").exists():
        return None
    for path in (Path(folder) / "pylib", Path(folder)):
        sys.path.insert(0, str(path))
    return importlib.import_module("bra_legacy").BiLevelRoutingAttention


def modules(args, dim, heads, topk):
    mods, notes = {}, []
    torch.manual_seed(0)
    ours = sa.create("bi_level_routing_attention", dim, heads, n_win=args.n_win, topk=topk)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.2)
    for impl in ("auto", "kept_probs", "sdpa", "explicit"):
        if impl not in args.impls:
            continue
        m = sa.create("bi_level_routing_attention", dim, heads, n_win=args.n_win, topk=topk,
                      attn_impl=impl)
        m.load_state_dict(ours.state_dict())
        mods[f"ours {impl}"] = m
    cls = official_class(args.official)
    if cls is not None:
        off = cls(dim, num_heads=heads, n_win=args.n_win, topk=topk, side_dwconv=5,
                  kv_downsample_mode="identity")
        state = {("qkv.qkv." + k[4:] if k.startswith("qkv.") else k): v
                 for k, v in ours.state_dict().items()}
        off.load_state_dict(state)
        mods["official BiLevelRoutingAttention (bra_legacy)"] = off
    else:
        notes.append("official module skipped: no --official folder with bra_legacy.py")
    return mods, notes




def run(title, mods, notes, x, repeats):
    grad = torch.randn_like(x)
    ref = next(iter(mods))
    with torch.no_grad():
        want = mods[ref](x)
        for n, m in mods.items():
            diff = (m(x) - want).abs().max().item()
            notes.append(f"{n}: max abs difference to {ref} {diff:.1e}")
    for label, make in (("forward (no_grad)", lambda m: forward_case(m, x)),
                        ("forward + backward", lambda m: train_case(m, x, grad))):
        cases = {n: make(m) for n, m in mods.items()}
        times = interleaved_times(cases, repeats)
        peaks = {n: peak_memory_bytes(c, "cpu", [x, *mods[n].parameters()])
                 for n, c in cases.items()}
        print(f"\n#### {title}, {label}\n")
        print(ratio_table(times, peaks, ref))
    print()
    for note in notes:
        print(f"- {note}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--official", default=None, help="folder holding bra_legacy.py")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--n-win", type=int, default=7)
    p.add_argument("--stages", default="1,2,3", help="BiFormer-T stages to run (1-3)")
    p.add_argument("--extra", action="store_true",
                   help="also (B, 56, 56, 64) with topk 4 (the issue's setting)")
    p.add_argument("--impls", default="auto,kept_probs,explicit")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="glibc: no page faults on reallocation (see keep_freed_memory)")
    args = p.parse_args()
    args.impls = args.impls.split(",")
    torch.set_num_threads(args.threads)
    allocator = keep_freed_memory() if args.keep_freed_memory else "default allocator"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU, "
          f"{allocator}")
    settings = []
    if args.extra:
        settings.append(("(B, 56, 56, 64), 2 heads, topk 4", 56, 64, 2, 4))
    for s in (int(v) for v in args.stages.split(",") if v):
        side, dim, heads, topk = STAGES[s]
        settings.append((f"BiFormer-T stage {s}: ({args.batch}, {side}, {side}, {dim}), "
                         f"{heads} heads, topk {topk}", side, dim, heads, topk))
    for title, side, dim, heads, topk in settings:
        torch.manual_seed(1)
        x = torch.randn(args.batch, side, side, dim)
        run(title, *modules(args, dim, heads, topk), x, args.repeats)


if __name__ == "__main__":
    main()
