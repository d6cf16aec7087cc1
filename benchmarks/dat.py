"""DAT deformable attention: ours against the official ``DAttentionBaseline``, same weights.

    python benchmarks/dat.py --official /tmp/dat_helper/official --threads 1

``--official`` is a folder holding the official ``models/dat_blocks.py`` of
``LeapLabTHU/DAT`` as ``dat_blocks_v1.py`` (the CVPR 2022 release, 797f187) and, if
present, ``dat_blocks_v2.py`` (the DAT++ code at 32173fc), with timm's ``to_2tuple`` /
``trunc_normal_`` import replaced by PyTorch's equivalents, and ``einops`` importable
(the official code needs it; the library does not). Each official module gets our
weights through the inverse of :func:`convert_official_dat_keys`. Shapes: DAT-T's
stage 3 (``(8, 14, 14, 384)``, 12 heads, 3 groups, 5x5 offset kernel) and stage 4
(``(8, 7, 7, 768)``, 24 heads, 6 groups, 3x3). Every case runs once per round, rounds
interleave all cases (:func:`spatial_attention.apps.bench.interleaved_times`); medians
and minima over ``--repeats`` rounds, peak memory of one call from the tensor tracker.
Ours takes ``(B, H, W, C)``, the official ``(B, C, H, W)``: each gets its own layout.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch
from torch import nn

import spatial_attention as sa
from spatial_attention.apps.bench import (
    forward_case,
    interleaved_times,
    keep_freed_memory,
    ratio_table,
    train_case,
)
from spatial_attention.apps.bench.memory import peak_memory_bytes


class FirstOutput(nn.Module):
    """The official module returns ``(y, positions, references)``: keep ``y``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)[0]


def official_state(ours: nn.Module) -> dict[str, torch.Tensor]:
    """Our weights under the official names and shapes (the converter's inverse)."""
    s = ours.state_dict()
    conv = {k: v[:, :, None, None] for k, v in (
        ("proj_q.weight", s["q.weight"]), ("proj_out.weight", s["proj.weight"]),
        ("proj_k.weight", s["k.weight"]), ("proj_v.weight", s["v.weight"]),
        ("conv_offset.3.weight", s["offset_proj.weight"]))}
    return {**conv, "proj_q.bias": s["q.bias"], "proj_out.bias": s["proj.bias"],
            "proj_k.bias": s["k.bias"], "proj_v.bias": s["v.bias"],
            "conv_offset.0.weight": s["offset_dw.weight"],
            "conv_offset.0.bias": s["offset_dw.bias"],
            "conv_offset.1.norm.weight": s["offset_norm.weight"],
            "conv_offset.1.norm.bias": s["offset_norm.bias"], "rpe_table": s["rpe_table"]}


def load_official(folder: str | None, name: str):
    if not folder or not (Path(folder) / f"{name}.py").exists():
        return None
    sys.path.insert(0, folder)
    return importlib.import_module(name)


def modules(args, C, heads, groups, size, ksize):
    mods, notes = {}, []
    ours = sa.create("deformable_attention", C, num_heads=heads, groups=groups, q_size=size,
                     ksize=ksize)
    mods["ours auto"] = ours
    mods["ours explicit"] = sa.create("deformable_attention", C, num_heads=heads,
                                      groups=groups, q_size=size, ksize=ksize,
                                      attn_impl="explicit")
    mods["ours explicit"].load_state_dict(ours.state_dict())
    v1 = load_official(args.official, "dat_blocks_v1")
    if v1 is None:
        notes.append("official modules skipped: no --official folder with dat_blocks_v1.py")
        return mods, notes
    stage = {9: 0, 7: 1, 5: 2, 3: 3}[ksize]  # the CVPR code picks its kernel by stage
    off = v1.DAttentionBaseline(size, size, heads, C // heads, groups, 0.0, 0.0, 1, 2.0,
                                True, False, False, False, stage)
    off.load_state_dict(official_state(ours))
    mods["official (CVPR 2022 code)"] = FirstOutput(off)
    v2 = load_official(args.official, "dat_blocks_v2")
    if v2 is not None:
        ours2 = sa.create("deformable_attention", C, num_heads=heads, groups=groups,
                          q_size=size, ksize=ksize, version="dat++")
        ours2.load_state_dict(ours.state_dict())
        mods["ours auto, version dat++"] = ours2
        off2 = v2.DAttentionBaseline(size, size, heads, C // heads, groups, 0.0, 0.0, 1,
                                     2.0, True, False, False, False, ksize, False)
        off2.load_state_dict(official_state(ours))
        mods["official (DAT++ code)"] = FirstOutput(off2)
    return mods, notes


def parity(mods, x_tokens) -> list[str]:
    """Max abs difference of each module's output from ours auto (same version)."""
    x_map = x_tokens.permute(0, 3, 1, 2).contiguous()
    out = {}
    with torch.no_grad():
        for name, m in mods.items():
            y = m(x_map) if name.startswith("official") else m(x_tokens).permute(0, 3, 1, 2)
            out[name] = y
    lines = []
    for name, y in out.items():
        ref = out["ours auto, version dat++"] if "DAT++" in name else out["ours auto"]
        lines.append(f"| {name} | {(y - ref).abs().max().item():.2e} |")
    return lines




def run(title, mods, notes, x_tokens, repeats):
    x_map = x_tokens.permute(0, 3, 1, 2).contiguous()
    inputs = {n: (x_map if n.startswith("official") else x_tokens) for n in mods}
    for m in mods.values():
        m.train()
    print(f"\n#### {title}: max abs difference from ours auto (fp32, same weights)\n")
    print("| case | max abs diff |\n|---|---:|")
    print("\n".join(parity(mods, x_tokens)))
    for label, make in (
        ("forward (no_grad)", lambda n, m: forward_case(m, inputs[n])),
        ("forward + backward",
         lambda n, m: train_case(m, inputs[n], torch.randn_like(inputs[n]))),
    ):
        cases = {n: make(n, m) for n, m in mods.items()}
        times = interleaved_times(cases, repeats)
        peaks = {n: peak_memory_bytes(c, "cpu", [inputs[n], *mods[n].parameters()])
                 for n, c in cases.items()}
        print(f"\n#### {title}, {label}\n")
        print(ratio_table(times, peaks, "ours auto"))
    for note in notes:
        print(f"\n{note}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--official", default=None, help="folder with dat_blocks_v1.py (and v2)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--stages", default="3,4", help="DAT-T stages to run (3 and/or 4)")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="glibc: no page faults on reallocation (see keep_freed_memory)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    allocator = keep_freed_memory() if args.keep_freed_memory else "default allocator"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU, "
          f"{allocator}")
    shapes = {"3": (384, 12, 3, 14, 5), "4": (768, 24, 6, 7, 3)}  # C, heads, groups, S, k
    for stage in args.stages.split(","):
        C, heads, groups, S, k = shapes[stage]
        torch.manual_seed(0)
        mods, notes = modules(args, C, heads, groups, (S, S), k)
        x = torch.randn(args.batch, S, S, C)
        run(f"DAT-T stage {stage}: ({args.batch}, {S}, {S}, {C}), {heads} heads, {groups} "
            f"groups, {k}x{k} offsets", mods, notes, x, args.repeats)


if __name__ == "__main__":
    main()
