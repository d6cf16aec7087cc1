"""Global context, non-local and external attention: ours against the official modules.

    python benchmarks/zoo_gc_nl_external.py --official /tmp/parity --threads 1

``--official`` is a folder holding local transcriptions of the official modules, which
cannot be imported from their repositories without their frameworks (mmengine, mmcv's
registry and ``ConvModule``, EANet's synchronized BatchNorm and settings):

* ``context_block.py``: mmcv ``mmcv/cnn/bricks/context_block.py`` (``ContextBlock``, the
  code of ``xvjiarui/GCNet``), with stand-ins for mmengine's init helpers and registry;
* ``mmcv_nonlocal.py``: mmcv ``mmcv/cnn/bricks/non_local.py`` (``NonLocal2d``), with
  ``ConvModule`` reduced to conv / BatchNorm / ReLU;
* ``eanet_official.py``: ``MenghaoGuo/EANet`` ``model_torch.py`` (``External_attention``),
  ``SynchronizedBatchNorm2d`` replaced by ``nn.BatchNorm2d`` (one process: same math).

Each official module gets the same weights as ours. timm's ``GlobalContext`` and
``NonLocalAttn`` are timed too, configured to the same cost where timm allows it. Every
case runs once per round, rounds interleave all cases (see
:func:`spatial_attention.apps.bench.interleaved_times`); medians and minima over
``--repeats`` rounds, peak memory of one call from the tensor-storage tracker.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conv_attention_cbam_gam import import_timm_layers  # noqa: E402  (the shim lives there)


def official(folder: str | None, module: str):
    if not folder or not (Path(folder) / f"{module}.py").exists():
        return None
    sys.path.insert(0, folder)
    return importlib.import_module(module)


def gc_modules(args, C):
    mods, notes = {}, []
    ours = sa.create("global_context", C)
    with torch.no_grad():  # trained-like weights, not the zero-initialised last conv
        for p in ours.parameters():
            p.normal_(0, 0.1)
    mods["ours auto"] = ours
    mods["ours explicit"] = sa.create("global_context", C, attn_impl="explicit")
    mods["ours explicit"].load_state_dict(ours.state_dict())
    off = official(args.official, "context_block")
    if off is not None:
        mods["official ContextBlock (mmcv)"] = off.ContextBlock(C, 1 / 16)
        mods["official ContextBlock (mmcv)"].load_state_dict(ours.state_dict())
    else:
        notes.append("official ContextBlock skipped: no --official folder")
    layers, why = import_timm_layers()
    if layers is not None:
        t = layers.GlobalContext(C, fuse_add=True, fuse_scale=False, rd_channels=ours.planes)
        mods["timm GlobalContext (add, same width)"] = t
    else:
        notes.append(f"timm skipped: {why}")
    return mods, notes


def nl_modules(args, C, mode="embedded_gaussian"):
    mods, notes = {}, []
    ours = sa.create("non_local", C, mode=mode)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.1)
    fast = {"embedded_gaussian": "SDPA", "dot_product": "reassociated",
            "concatenation": "broadcast sum"}[mode]
    mods[f"ours auto ({fast})"] = ours
    mods["ours explicit"] = sa.create("non_local", C, mode=mode, attn_impl="explicit")
    mods["ours explicit"].load_state_dict(ours.state_dict())
    off = official(args.official, "mmcv_nonlocal")
    if off is not None:
        m = off.NonLocal2d(C, mode=mode)
        m.load_state_dict({k: ours.state_dict()[k.replace(".conv.", ".")]
                           for k in m.state_dict()})
        mods["official NonLocal2d (mmcv)"] = m
    else:
        notes.append("official NonLocal2d skipped: no --official folder")
    if mode != "embedded_gaussian":  # timm has the embedded Gaussian only
        return mods, notes
    layers, why = import_timm_layers()
    if layers is not None:
        mods["timm NonLocalAttn (Ci = C/2, BN)"] = layers.NonLocalAttn(C, rd_channels=C // 2)
    else:
        notes.append(f"timm skipped: {why}")
    return mods, notes


def ea_modules(args, C):
    mods, notes = {}, []
    ours = sa.create("external", C)
    mods["ours auto (folded)"] = ours
    mods["ours explicit"] = sa.create("external", C, attn_impl="explicit")
    mods["ours explicit"].load_state_dict(ours.state_dict())
    off = official(args.official, "eanet_official")
    if off is not None:
        mods["official External_attention"] = off.External_attention(C)
        mods["official External_attention"].load_state_dict(ours.state_dict())
    else:
        notes.append("official External_attention skipped: no --official folder")
    return mods, notes




def run(title, mods, notes, x, repeats):
    for m in mods.values():
        m.train()  # BatchNorm in training mode, as in a training step
    grad = torch.randn_like(x)
    ref = next(iter(mods))
    for label, make in (("forward (no_grad)", lambda m: forward_case(m, x)),
                        ("forward + backward", lambda m: train_case(m, x, grad))):
        cases = {n: make(m) for n, m in mods.items()}
        for n in list(cases):
            try:
                cases[n]()
            except RuntimeError as e:  # mmcv's concatenation divides its ReLU's output in place
                notes.append(f"{n}, {label}: fails, {str(e).splitlines()[0][:160]}")
                del cases[n]
        times = interleaved_times(cases, repeats)
        peaks = {n: peak_memory_bytes(c, "cpu", [x, *mods[n].parameters()])
                 for n, c in cases.items()}
        print(f"\n#### {title}, {label}\n")
        print(ratio_table(times, peaks, ref))
    for note in notes:
        print(f"\n{note}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--official", default=None, help="folder with the transcribed modules")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--nl-repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--size", type=int, default=56)
    p.add_argument("--nl-size", type=int, default=56)
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="glibc: no page faults on reallocation (see keep_freed_memory)")
    p.add_argument("--mechanisms", default="global_context,non_local,external",
                   help="comma-separated subset to run")
    args = p.parse_args()
    only = set(args.mechanisms.split(","))
    torch.set_num_threads(args.threads)
    allocator = keep_freed_memory() if args.keep_freed_memory else "default allocator"
    torch.manual_seed(0)
    B, C, S = args.batch, args.channels, args.size
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU, "
          f"{allocator}")
    x = torch.randn(B, C, S, S)
    if "global_context" in only:
        run(f"global_context on ({B}, {C}, {S}, {S})", *gc_modules(args, C), x, args.repeats)
    if "non_local" in only:
        xn = torch.randn(B, C, args.nl_size, args.nl_size)
        run(f"non_local on {tuple(xn.shape)}", *nl_modules(args, C), xn, args.nl_repeats)
        run(f"non_local dot_product on {tuple(xn.shape)}",
            *nl_modules(args, C, "dot_product"), xn, args.nl_repeats)
        xc = torch.randn(2, C, 28, 28)  # mmcv's concatenation forms (B, 2 Ci, N, N)
        run(f"non_local concatenation on {tuple(xc.shape)}",
            *nl_modules(args, C, "concatenation"), xc, args.nl_repeats)
    if "external" in only:
        run(f"external on ({B}, {C}, {S}, {S})", *ea_modules(args, C), x, args.repeats)
        xe = torch.randn(2, 512, 64, 64)  # the EANet head: 512 channels at stride 8
        run("external on (2, 512, 64, 64)", *ea_modules(args, 512), xe, args.repeats)


if __name__ == "__main__":
    main()
