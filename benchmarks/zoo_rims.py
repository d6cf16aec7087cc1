"""RIMs: ours (fused and explicit, both communications) against ``RIM.py``, same weights.

    python benchmarks/zoo_rims.py --official /tmp/rims/official --threads 1

``--official`` is a folder holding ``RIM.py`` of ``dido1998/Recurrent-Independent-Mechanisms``
(the ``RIMCell`` / ``RIM`` the issue names), unchanged. Its ``RIM`` takes ``(T, B, C)``
and is wrapped here to take ``(B, T, C)`` and the same initial state as ours (it would
draw a random one). Ours ranks units by score (``rank_by="score"``) so that both pick the
same units. Every case runs once per round, rounds interleave all cases (see
:func:`spatial_attention.apps.bench.interleaved_times`); medians and minima over
``--repeats`` rounds, peak memory of one call from the tensor-storage tracker.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch
from torch import nn

from spatial_attention.apps.bench import (
    forward_case,
    interleaved_times,
    ratio_table,
    train_case,
)
from spatial_attention.apps.bench.memory import peak_memory_bytes
from spatial_attention.layers.rims import RIMs, convert_reference_state_dict


class OfficialRIM(nn.Module):
    """``RIM.py``'s one-layer ``RIM`` taking ``(B, T, C)`` and a fixed initial state."""

    def __init__(self, rim: nn.Module, h0: torch.Tensor, c0: torch.Tensor | None) -> None:
        super().__init__()
        self.rim, self.h0, self.c0 = rim, h0, c0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.rim(x.transpose(0, 1), self.h0[None], None if self.c0 is None else self.c0[None])
        return out[0].transpose(0, 1)


class WithState(nn.Module):
    """Ours from the same initial state."""

    def __init__(self, rims: RIMs, h0: torch.Tensor, c0: torch.Tensor | None) -> None:
        super().__init__()
        self.rims, self.h0, self.c0 = rims, h0, c0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rims(x, state=(self.h0, self.c0))


def modules(args, cell: str, B: int, C: int):
    H, U, k = args.hidden, args.units, args.k
    torch.manual_seed(0)
    ours = RIMs(C, H, U, k, rnn_cell=cell, rank_by="score")
    with torch.no_grad():  # queries large enough that the units' scores differ
        ours.input_query.mul_(10)
    h0 = torch.randn(B, U * H) * 0.5
    c0 = torch.randn(B, U * H) * 0.5 if cell == "LSTM" else None
    mods, notes = {"ours auto": WithState(ours, h0, c0)}, []
    explicit = RIMs(C, H, U, k, rnn_cell=cell, rank_by="score", attn_impl="explicit")
    explicit.load_state_dict(ours.state_dict())
    mods["ours explicit"] = WithState(explicit, h0, c0)
    ws = RIMs(C, H, U, k, rnn_cell=cell, communication="workspace")
    mods["ours workspace auto (no official)"] = WithState(ws, h0, c0)
    if args.official and (Path(args.official) / "RIM.py").exists():
        sys.path.insert(0, args.official)
        rim_py = importlib.import_module("RIM")
        ref = rim_py.RIM("cpu", C, H, U, k, cell, 1, False)
        theirs = {next(iter(convert_reference_state_dict({n: t}))): n  # ours -> theirs
                  for n, t in ref.state_dict().items()}
        ref.load_state_dict({theirs[n]: t for n, t in ours.state_dict().items()})
        mods["official RIM.py"] = OfficialRIM(ref, h0, c0)
        with torch.no_grad():
            x = torch.randn(B, 7, C)
            diff = (mods["official RIM.py"].eval()(x) - mods["ours auto"].eval()(x)).abs().max()
        notes.append(f"{cell}: max abs diff ours auto vs RIM.py on (B, 7, C): {diff:.2e}")
    else:
        notes.append("official RIM.py skipped: no --official folder")
    return mods, notes




def run(title, mods, notes, x, repeats):
    for m in mods.values():
        m.eval()  # dropout off: RIM.py's 0.1 would make the runs differ
    grad = torch.randn(x.shape[0], x.shape[1], next(iter(mods.values())).h0.shape[1])
    ref = next(iter(mods))
    for label, make in (("forward (no_grad)", lambda m: forward_case(m, x)),
                        ("forward + backward", lambda m: train_case(m, x, grad))):
        cases = {n: make(m) for n, m in mods.items()}
        times = interleaved_times(cases, repeats)
        peaks = {n: peak_memory_bytes(c, "cpu", [x, *mods[n].parameters()])
                 for n, c in cases.items()}
        print(f"\n#### {title}, {label}\n")
        print(ratio_table(times, peaks, ref, ms_digits=1, mib_digits=1))
    for note in notes:
        print(f"\n{note}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--official", default=None, help="folder with RIM.py")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--hidden", type=int, default=100)
    p.add_argument("--units", type=int, default=6)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--cells", default="LSTM,GRU")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU")
    B, T, C = args.batch, args.steps, args.channels
    x = torch.randn(B, T, C)
    for cell in args.cells.split(","):
        run(f"{cell}: B {B}, T {T}, C {C}, {args.units} units of {args.hidden}, k {args.k}",
            *modules(args, cell, B, C), x, args.repeats)


if __name__ == "__main__":
    main()
