"""MaxViT block and grid attention: ours against timm's, same weights, CPU.

    python benchmarks/maxvit.py --threads 1 [--model]

timm (``timm.models.maxxvit``) is the reference: its ``PartitionAttentionCl`` partitions
the map (``window_partition`` / ``grid_partition``), runs ``AttentionCl`` with the
TF-style bias ``RelPosBiasTf`` (maxvit_*_tf) and reverses; the timed timm case is exactly
that method (``_partition_attn``), with weights copied from ours through
:func:`~spatial_attention.layers.maxvit.convert_timm_maxvit_keys`' inverse. timm's fused
(SDPA) and unfused paths are both timed. Every case runs once per round, rounds
interleave all cases (:func:`spatial_attention.apps.bench.interleaved_times`); medians
and minima over ``--repeats`` rounds; peak memory of one call from the tensor-storage
tracker. A parity line (max abs difference to timm, fp32) precedes each table.
``--model`` times the whole MaxViT-T against timm's ``maxvit_tiny_tf_224`` as well.
"""

from __future__ import annotations

import argparse
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


class TimmPartitionAttention(nn.Module):
    """timm's partition + attention + reverse (``PartitionAttentionCl._partition_attn``)
    without the block's norms and MLP."""

    def __init__(self, ours, kind: str, fused: bool) -> None:
        super().__init__()
        import _torchvision_shim  # noqa: F401  (timm imports torchvision)
        from timm.models import maxxvit as tm

        P = ours.size
        cfg = tm.MaxxVitTransformerCfg(rel_pos_type="bias_tf", head_first=False,
                                       window_size=P, grid_size=P, dim_head=ours.head_dim)
        self.block = tm.PartitionAttentionCl(ours.dim, kind, cfg)
        self.block.attn.fused_attn = fused
        sd = {k.replace("relative_position_bias_table", "rel_pos.relative_position_bias_table"):
              v for k, v in ours.state_dict().items()}
        self.block.attn.load_state_dict(sd)

    def forward(self, x):
        return self.block._partition_attn(x)


def modules(kind: str, C: int, P: int):
    name = f"maxvit_{kind}_attention"
    ours = sa.create(name, C, None, P)
    with torch.no_grad():  # trained-like scales, not the N(0, 0.02) start
        for p in ours.parameters():
            p.normal_(0, 0.1)
        ours.relative_position_bias_table.normal_(0, 1)
    mods = {"ours auto": ours,
            "ours explicit": sa.create(name, C, None, P, attn_impl="explicit")}
    mods["ours explicit"].load_state_dict(ours.state_dict())
    try:
        mods["timm fused (SDPA)"] = TimmPartitionAttention(ours, kind, True)
        mods["timm unfused"] = TimmPartitionAttention(ours, kind, False)
    except ImportError as e:
        print(f"timm skipped: {e}")
    return mods




def run(kind, x, P, repeats):
    mods = modules(kind, x.shape[-1], P)
    with torch.no_grad():
        ref = mods["ours auto"](x)
        diffs = {n: (m(x) - ref).abs().max().item() for n, m in mods.items() if n != "ours auto"}
    print(f"\n### maxvit_{kind}_attention on {tuple(x.shape)}, P = {P}\n")
    print("max abs diff to ours auto (fp32): "
          + ", ".join(f"{n} {d:.2g}" for n, d in diffs.items())
          + f" (outputs up to {ref.abs().max().item():.2g})")
    grad = torch.randn_like(x)
    for label, make in (("forward (no_grad)", lambda m: forward_case(m, x)),
                        ("forward + backward", lambda m: train_case(m, x, grad))):
        cases = {n: make(m) for n, m in mods.items()}
        times = interleaved_times(cases, repeats)
        peaks = {n: peak_memory_bytes(c, "cpu", [x, *mods[n].parameters()])
                 for n, c in cases.items()}
        print(f"\n#### {label}\n")
        print(ratio_table(times, peaks, "ours auto"))


def run_model(batch, size, repeats):
    """maxvit_tiny against timm's maxvit_tiny_tf_224 (random weights, ours loaded from
    timm's state dict), eval forward and a training step's forward + backward."""
    import _torchvision_shim  # noqa: F401
    import timm

    from spatial_attention.models import create_model
    from spatial_attention.models.maxvit import load_pretrained

    theirs = timm.create_model("maxvit_tiny_tf_224", pretrained=False, img_size=size)
    ours = load_pretrained(create_model("maxvit_tiny", partition=size // 32, drop_path_rate=0),
                           theirs.state_dict())
    mods = {"ours maxvit_tiny": ours, "timm maxvit_tiny_tf_224": theirs}
    x = torch.randn(batch, 3, size, size)
    for m in mods.values():
        m.eval()
    with torch.no_grad():
        diff = (ours(x) - theirs(x)).abs().max().item()
    print(f"\n### MaxViT-T on {tuple(x.shape)}\n\nmax abs logit diff (fp32, eval): {diff:.2g}")
    grad = torch.randn(batch, 1000)
    for label, train, make in (("forward (eval, no_grad)", False, lambda m: forward_case(m, x)),
                               ("forward + backward (train)", True,
                                lambda m: train_case(m, x, grad))):
        for m in mods.values():
            m.train(train)
        cases = {n: make(m) for n, m in mods.items()}
        times = interleaved_times(cases, repeats, warmup=1)
        peaks = {n: peak_memory_bytes(c, "cpu", [x, *mods[n].parameters()])
                 for n, c in cases.items()}
        print(f"\n#### {label}\n")
        print(ratio_table(times, peaks, "ours maxvit_tiny"))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--shape", default="8,56,56,96", help="B,H,W,C")
    p.add_argument("--size", type=int, default=7, help="window / grid size P = G")
    p.add_argument("--kinds", default="block,grid", help="mixers to time ('' for none)")
    p.add_argument("--model", action="store_true", help="also time MaxViT-T against timm's")
    p.add_argument("--model-batch", type=int, default=4)
    p.add_argument("--model-repeats", type=int, default=5)
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="glibc: no page faults on reallocation (see keep_freed_memory)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    allocator = keep_freed_memory() if args.keep_freed_memory else "default allocator"
    torch.manual_seed(0)
    B, H, W, C = (int(v) for v in args.shape.split(","))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU, "
          f"{allocator}")
    x = torch.randn(B, H, W, C)
    for kind in filter(None, args.kinds.split(",")):
        run(kind, x, args.size, args.repeats)
    if args.model:
        run_model(args.model_batch, 224, args.model_repeats)


if __name__ == "__main__":
    main()
