"""Deformable convolution (v1 and v2): our fast path against the explicit one and others.

    git show 91f0822:src/spatial_attention/functional/sampling.py > /tmp/sampling_gather.py
    python benchmarks/deformable_conv.py --threads 1 --previous /tmp/sampling_gather.py

``deform_conv2d`` with a 3x3 kernel (padding 1, one offset group, one weight group), the
offsets and the modulation mask as learned inputs (their gradients are computed), on the
three maps where ``spatial-attention compare`` puts the layer (airbench's half-width
stages at batch 256) and on one detection-sized map (DCNv2 in ResNet-50's third stage at
an 800-pixel input, batch 2). Timed, interleaved round by round:

* ``ours auto``: :func:`spatial_attention.functional.sampling.deform_conv2d`, the
  columns read by ``grid_sample``;
* ``ours explicit``: the reference path, per-tap corner gathers and an einsum;
* with ``--previous FILE``: the ``deform_conv2d`` of another version of
  ``functional/sampling.py`` (before this benchmark: four corner gathers of all taps at
  once, whose backward is a scatter), loaded from the file given;
* ``torchvision.ops.deform_conv2d`` where it runs (its compiled operator; on a CPU-only
  machine without a torchvision build it is skipped).

Every case is checked against ``ours auto`` on the same tensors before timing.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch
from torch import Tensor, nn

from spatial_attention.apps.bench import interleaved_times, ratio_table, train_case
from spatial_attention.apps.bench.memory import peak_memory_bytes
from spatial_attention.functional.sampling import deform_conv2d, deform_conv2d_explicit

# (label, batch, channels, size)
SHAPES = [
    ("compare stage 1", 256, 32, 16),
    ("compare stage 2", 256, 128, 8),
    ("compare stage 3", 256, 128, 4),
    ("ResNet-50 stage 3, 800 px", 2, 256, 50),
]


class Deform(nn.Module):
    """One deformable convolution whose offsets and mask are parameters, so a training
    step computes their gradients as a network's would."""

    def __init__(self, fn, batch: int, channels: int, size: int, modulated: bool):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fn = fn
        self.weight = nn.Parameter(torch.randn(channels, channels, 3, 3, generator=g) * 0.05)
        self.offset = nn.Parameter(torch.randn(batch, 18, size, size, generator=g) * 2)
        self.mask = (nn.Parameter(torch.rand(batch, 9, size, size, generator=g))
                     if modulated else None)

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x, self.offset, self.weight, None, 1, 1, 1, self.mask)


def previous_fn(file: str | None):
    if not file:
        return None
    spec = importlib.util.spec_from_file_location("sampling_previous", Path(file))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.deform_conv2d


def torchvision_fn():
    try:
        from torchvision.ops import deform_conv2d as tv

        x = torch.randn(1, 1, 3, 3)
        tv(x, torch.zeros(1, 18, 3, 3), torch.randn(1, 1, 3, 3), padding=1)
        return tv
    except Exception as exc:  # no torchvision, or its compiled ops do not load
        print(f"torchvision.ops.deform_conv2d skipped: {str(exc)[:90]}")
        return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--previous", default=None, help="another version of sampling.py")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), float32, CPU")
    fns = {"ours auto (grid_sample)": deform_conv2d,
           "ours explicit (per-tap gathers)": deform_conv2d_explicit}
    prev = previous_fn(args.previous)
    if prev is not None:
        fns["previous auto (corner gathers)"] = prev
    tv = torchvision_fn()
    if tv is not None:
        fns["torchvision.ops"] = tv
    ref = "ours auto (grid_sample)"
    for modulated in (False, True):
        for label, B, C, S in SHAPES:
            torch.manual_seed(1)
            x = torch.randn(B, C, S, S)
            mods = {n: Deform(f, B, C, S, modulated) for n, f in fns.items()}
            with torch.no_grad():
                want = mods[ref](x)
                for n, m in mods.items():
                    diff = (m(x) - want).abs().max().item()
                    assert diff < 1e-3, f"{n} differs from {ref} by {diff}"
            grad = torch.randn_like(want)
            cases = {n: train_case(m, x, grad) for n, m in mods.items()}
            times = interleaved_times(cases, args.repeats, warmup=1)
            peaks = {n: peak_memory_bytes(c, "cpu", [x, *mods[n].parameters()])
                     for n, c in cases.items()}
            kind = "v2 (modulated)" if modulated else "v1"
            print(f"\n#### {kind}, {label}: ({B}, {C}, {S}, {S}), forward + backward, "
                  f"{args.repeats} rounds\n")
            print(ratio_table(times, peaks, ref, ms_digits=1))


if __name__ == "__main__":
    main()
