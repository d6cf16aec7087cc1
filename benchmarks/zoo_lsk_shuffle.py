"""LSK and shuffle attention: ours against the official modules, same weights.

    python benchmarks/zoo_lsk_shuffle.py --official /tmp/lsk_shuffle --threads 1

``--official`` is a folder holding local transcriptions of the official modules (nothing
of them is kept in this repository):

* ``lsk_official.py``: ``LSKblock`` of ``zcablii/LSKNet``
  (``mmrotate/models/backbones/lsknet.py``, the class alone: it needs only torch);
* ``sa_official.py``: ``sa_layer`` of ``wofmanaf/SA-Net`` (``models/sa_resnet.py``).

Each official module gets ours' weights (random, so no gate is the trivial one), the
outputs are compared (max |diff| printed), then every case is timed round-robin (see
:func:`spatial_attention.apps.bench.interleaved_times`): forward without autograd, and
forward + backward (gradients to the input and the parameters). Peak MiB: tensor
storages alive during one call (``apps.bench.memory.peak_memory_bytes``), input and
parameters included.
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


def official(folder: str | None, module: str):
    if not folder or not (Path(folder) / f"{module}.py").exists():
        return None
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(module)


def ours_pair(name: str, C: int, **kwargs) -> dict[str, torch.nn.Module]:
    auto = sa.create(name, C, **kwargs)
    with torch.no_grad():
        for p in auto.parameters():
            p.normal_(0, 0.3)
    explicit = sa.create(name, C, attn_impl="explicit", **kwargs)
    explicit.load_state_dict(auto.state_dict())
    return {"ours auto": auto, "ours explicit": explicit}


def lsk_modules(args, C):
    mods, notes = ours_pair("lsk", C), []
    off = official(args.official, "lsk_official")
    if off is not None:
        m = off.LSKblock(C)
        m.load_state_dict(mods["ours auto"].state_dict())
        mods["official LSKblock"] = m
    else:
        notes.append("official LSKblock skipped: no --official folder")
    return mods, notes


def sa_modules(args, C, G):
    mods, notes = ours_pair("shuffle_attention", C, groups=G), []
    off = official(args.official, "sa_official")
    if off is not None:
        m = off.sa_layer(C, G)
        m.load_state_dict(mods["ours auto"].state_dict())
        mods["official sa_layer"] = m
    else:
        notes.append("official sa_layer skipped: no --official folder")
    return mods, notes




def run(title, mods, notes, x, repeats):
    ref = next(iter(mods))
    with torch.no_grad():
        want = mods[ref](x)
        scale = want.abs().max().item()
        for n, m in mods.items():
            print(f"{title}: {n} vs {ref}, max |diff| {(m(x) - want).abs().max().item():.2e} "
                  f"(max |output| {scale:.2e})")
    grad = torch.randn_like(x)
    for label, make in (("forward (no_grad)", lambda m: forward_case(m, x)),
                        ("forward + backward", lambda m: train_case(m, x, grad))):
        cases = {n: make(m) for n, m in mods.items()}
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
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lsk-channels", type=int, default=64)
    p.add_argument("--sa-channels", type=int, default=256)
    p.add_argument("--sa-groups", type=int, default=64)
    p.add_argument("--size", type=int, default=56)
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="glibc: no page faults on reallocation (see keep_freed_memory)")
    p.add_argument("--mechanisms", default="lsk,shuffle_attention",
                   help="comma-separated subset to run")
    args = p.parse_args()
    only = set(args.mechanisms.split(","))
    torch.set_num_threads(args.threads)
    allocator = keep_freed_memory() if args.keep_freed_memory else "default allocator"
    torch.manual_seed(0)
    B, S = args.batch, args.size
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU "
          f"({torch.backends.cpu.get_cpu_capability()}), {allocator}")
    if "lsk" in only:
        C = args.lsk_channels
        run(f"lsk on ({B}, {C}, {S}, {S})", *lsk_modules(args, C), torch.randn(B, C, S, S),
            args.repeats)
    if "shuffle_attention" in only:
        C, G = args.sa_channels, args.sa_groups
        run(f"shuffle_attention (G = {G}) on ({B}, {C}, {S}, {S})", *sa_modules(args, C, G),
            torch.randn(B, C, S, S), args.repeats)


if __name__ == "__main__":
    main()
