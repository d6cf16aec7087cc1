"""Criss-cross and polarized self-attention: ours against the official modules.

    python benchmarks/zoo_cc_psa.py --official /tmp/parity --threads 1

``--official`` is a folder holding local transcriptions of the official modules (never
committed; the repositories cannot be imported as packages):

* ``ccnet_official.py``: ``speedinghzl/CCNet`` ``cc_attention/functions.py`` (the
  pure-PyTorch ``CrissCrossAttention``) with its ``-inf`` diagonal built on the input's
  device instead of ``.cuda()``, and ``RCCA(in_dim, recurrence)``, which applies it
  ``recurrence`` times as ``RCCAModule.forward`` does;
* ``psa_official.py``: ``DeLightCMU/PSA`` ``semantic-segmentation/network/PSA.py``
  (``PSA_p``, ``PSA_s``), unchanged.

Each official module gets the same weights as ours (criss-cross: the same names;
polarized: ``variant="official"`` through ``load_official_state_dict``); our paper-form
polarized modules (``variant="paper"``) are timed beside them. Every case runs once per
round, rounds interleave all cases (:func:`spatial_attention.apps.bench.interleaved_times`);
medians and minima over ``--repeats`` rounds, peak memory of one call from the
tensor-storage tracker.
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


def cc_modules(args, C):
    mods, notes = {}, []
    ours = sa.create("criss_cross", C)
    with torch.no_grad():  # a trained-like gamma: 0 at init makes the block the identity
        ours.gamma.fill_(0.5)
    mods["ours auto ((H, B, W, C) bmms)"] = ours
    mods["ours explicit (einsums)"] = sa.create("criss_cross", C, attn_impl="explicit")
    mods["ours explicit (einsums)"].load_state_dict(ours.state_dict())
    off = official(args.official, "ccnet_official")
    if off is not None:
        m = off.RCCA(C, recurrence=2)
        m.cca.load_state_dict(ours.state_dict())
        mods["official CrissCrossAttention x 2"] = m
    else:
        notes.append("official CrissCrossAttention skipped: no --official folder")
    return mods, notes


def psa_modules(args, C, mode):
    mods, notes = {}, []
    off = official(args.official, "psa_official")
    ours = sa.create("polarized", C, mode=mode, variant="official")
    with torch.no_grad():  # the bottleneck / W_z away from their initial values
        for p in ours.ch_wz.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    mods["ours official auto"] = ours
    mods["ours official explicit"] = sa.create("polarized", C, mode=mode, variant="official",
                                               attn_impl="explicit")
    mods["ours official explicit"].load_state_dict(ours.state_dict())
    if off is not None:
        m = (off.PSA_p if mode == "parallel" else off.PSA_s)(C, C)
        renamed = {"ch_wq.": "conv_q_right.", "ch_wv.": "conv_v_right.", "ch_wz.": "conv_up.",
                   "sp_wq.": "conv_q_left.", "sp_wv.": "conv_v_left."}
        state = {}
        for k, v in ours.state_dict().items():
            for a, b in renamed.items():
                k = k.replace(a, b)
            state[k] = v
        m.load_state_dict(state)
        mods[f"official PSA_{mode[0]}"] = m
    else:
        notes.append("official PSA skipped: no --official folder")
    mods["ours paper auto"] = sa.create("polarized", C, mode=mode)
    mods["ours paper explicit"] = sa.create("polarized", C, mode=mode, attn_impl="explicit")
    mods["ours paper explicit"].load_state_dict(mods["ours paper auto"].state_dict())
    return mods, notes




def run(title, mods, notes, x, repeats, ref):
    grad = torch.randn_like(x)
    for label, make in (("forward (no_grad)", lambda m: forward_case(m, x)),
                        ("forward + backward", lambda m: train_case(m, x, grad))):
        cases = {n: make(m) for n, m in mods.items()}
        times = interleaved_times(cases, repeats)
        peaks = {n: peak_memory_bytes(c, "cpu", [x, *mods[n].parameters()])
                 for n, c in cases.items()}
        print(f"\n#### {title}, {label}\n")
        print(ratio_table(times, peaks, ref if ref in times else next(iter(times)), mib_digits=1))
    for note in notes:
        print(f"\n{note}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--official", default=None, help="folder with the transcribed modules")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--cc-repeats", type=int, default=5)
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="glibc: no page faults on reallocation (see keep_freed_memory)")
    p.add_argument("--mechanisms", default="criss_cross,polarized",
                   help="comma-separated subset to run")
    args = p.parse_args()
    only = set(args.mechanisms.split(","))
    torch.set_num_threads(args.threads)
    allocator = keep_freed_memory() if args.keep_freed_memory else "default allocator"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU, "
          f"{allocator}")
    if "criss_cross" in only:
        for shape in ((4, 64, 64, 64), (1, 512, 64, 64), (8, 64, 17, 97)):
            torch.manual_seed(0)
            x = torch.randn(shape)
            run(f"criss_cross (R = 2) on {shape}", *cc_modules(args, shape[1]), x,
                args.cc_repeats, "official CrissCrossAttention x 2")
    if "polarized" in only:
        for shape in ((8, 64, 56, 56), (8, 256, 28, 28), (2, 32, 64, 48)):
            for mode in ("parallel", "sequential"):
                torch.manual_seed(0)
                x = torch.randn(shape)
                small = x.numel() < 2**20  # about a millisecond a call: more rounds
                run(f"polarized {mode} on {shape}", *psa_modules(args, shape[1], mode), x,
                    4 * args.repeats if small else args.repeats, f"official PSA_{mode[0]}")


if __name__ == "__main__":
    main()
