"""CBAM and GAM: ours against the implementations people use, and against the machine.

    python benchmarks/conv_attention_cbam_gam.py --official /tmp/cbam_official --threads 2

``--official`` is a checkout of the official CBAM release (``Jongchan/attention-module``);
its ``MODELS/cbam.py`` is imported from there at run time. timm's ``CbamModule``,
``EcaModule`` and ``SqueezeExcite`` and Ultralytics' ``CBAM`` are measured when
importable and skipped (with the reason) when not.

Every case runs once per round, rounds interleave all cases (so a noisy neighbour slows
all of them alike), and each case reports the median and minimum over ``--repeats``
rounds. Ratios are taken between minima and between medians.

Limits, measured here on the same inputs:

* CBAM is memory-bound. Its bandwidth floor is the traffic a fully fused gate cannot
  avoid, read ``x`` and write ``y`` forward, read ``x`` and ``dy`` and write ``dx``
  backward (2 and 5 tensors of the input's size), at the copy bandwidth of
  ``dst.copy_(src)`` on tensors of that size.
* GAM is compute-bound. Its roofline is its convolution and matmul FLOPs (multiply-add
  = 2, backward = 2x forward) at the best of a large matmul and of GAM's own 7x7
  convolution, measured alone.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import statistics
import sys
import types
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import spatial_attention as sa
from spatial_attention.apps.bench import (
    forward_case,
    interleaved_times,
    keep_freed_memory,
    train_case,
)

Case = Callable[[], object]


# -- timing: round-robin, see spatial_attention.apps.bench.interleaved_times ------------
def interleaved(cases: dict[str, Case], repeats: int, warmup: int = 2) -> dict[str, list]:
    return interleaved_times(cases, repeats, warmup)


# -- competitors -------------------------------------------------------------------------
def load_official(path: str | None):
    if not path:
        return None, "no --official checkout given"
    file = Path(path) / "MODELS" / "cbam.py"
    if not file.exists():
        return None, f"{file} not found"
    spec = importlib.util.spec_from_file_location("official_cbam", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, ""


def import_timm_layers():
    """timm's layer modules, or None and why not.

    timm imports torchvision at package import; where the installed torchvision does not
    load with this torch (a binary mismatch, not a timm question), we load ``timm.layers``
    alone with torchvision shown as absent, except the one class name timm's norm-layer
    registry imports from it.
    """
    try:
        return importlib.import_module("timm.layers"), ""
    except ImportError as e:
        return None, f"timm not importable ({e})"
    except Exception as e:  # noqa: BLE001 - a broken torchvision raises RuntimeError
        first_error = f"{type(e).__name__}: {e}"
    spec = importlib.util.find_spec("timm")
    for name in [k for k in sys.modules if k.split(".")[0] in ("timm", "torchvision")]:
        del sys.modules[name]
    misc = types.ModuleType("torchvision.ops.misc")
    misc.FrozenBatchNorm2d = type("FrozenBatchNorm2d", (torch.nn.Module,), {})
    for name in ("torchvision", "torchvision.ops"):
        sys.modules[name] = types.ModuleType(name)
        sys.modules[name].__path__ = []
    sys.modules["torchvision.ops.misc"] = misc
    timm = types.ModuleType("timm")
    timm.__path__ = list(spec.submodule_search_locations)
    sys.modules["timm"] = timm
    try:
        return importlib.import_module("timm.layers"), f"(timm.layers alone: {first_error})"
    except Exception as e:  # noqa: BLE001
        return None, f"timm not importable ({first_error}; then {e})"


def competitors(args, C: int) -> tuple[dict[str, torch.nn.Module], list[str]]:
    mods, notes = {}, []
    official, why = load_official(args.official)
    if official is not None:
        mods["official CBAM"] = official.CBAM(C)
    else:
        notes.append(f"official CBAM skipped: {why}")
    layers, why = import_timm_layers()
    if layers is not None:
        if why:
            notes.append(f"timm loaded {why}")
        from timm.layers.cbam import CbamModule
        from timm.layers.eca import EcaModule
        from timm.layers.squeeze_excite import SqueezeExcite

        mods["timm CbamModule"] = CbamModule(C)
        mods["timm EcaModule"] = EcaModule(C)
        mods["timm SqueezeExcite"] = SqueezeExcite(C)
    else:
        notes.append(f"timm skipped: {why}")
    try:
        from ultralytics.nn.modules.conv import CBAM as UltralyticsCBAM

        mods["Ultralytics CBAM"] = UltralyticsCBAM(C)
    except Exception as e:  # noqa: BLE001 - any failure to import means: not measured
        notes.append(f"Ultralytics CBAM skipped: {type(e).__name__}: {e}")
    return mods, notes


# -- the machine -------------------------------------------------------------------------
def copy_bandwidth(x: torch.Tensor, repeats: int) -> float:
    """Bytes per second of ``dst.copy_(src)`` (read + write) at the size of ``x``."""
    src, dst = x.clone(), torch.empty_like(x)
    t = interleaved({"copy": lambda: dst.copy_(src)}, repeats * 3)["copy"]
    return 2 * x.numel() * x.element_size() / min(t)


def peak_cases(gam, x: torch.Tensor) -> tuple[dict[str, Case], dict[str, float]]:
    """A 2048^3 matmul and GAM's own first 7x7 convolution, fp32 and bf16, with FLOPs."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    conv = gam.spatial_attention.conv1
    xc = x.detach()
    cases, flops = {}, {}
    conv_flops = 2 * x.shape[0] * x.shape[2] * x.shape[3] * conv.weight.numel()
    for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        def mm(dtype=dtype):
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                a @ b

        def cv(dtype=dtype):
            with torch.no_grad(), torch.autocast("cpu", dtype=dtype,
                                                 enabled=dtype != torch.float32):
                F.conv2d(xc, conv.weight, conv.bias, padding=conv.padding, groups=conv.groups)

        cases[f"peak {tag}: matmul 2048^3"], flops[f"peak {tag}: matmul 2048^3"] = mm, 2 * 2048**3
        cases[f"peak {tag}: GAM 7x7 conv"], flops[f"peak {tag}: GAM 7x7 conv"] = cv, conv_flops
    return cases, flops


def gam_flops(m, x: torch.Tensor) -> float:
    """Forward FLOPs of GAM's MLP and convolutions (multiply-add = 2)."""
    B, C, H, W = x.shape
    sp = m.spatial_attention
    mlp = m.channel_attention.mlp
    per_pixel = mlp[0].weight.numel() + mlp[2].weight.numel()
    per_pixel += sp.conv1.weight.numel() + sp.conv2.weight.numel()
    return 2 * B * H * W * per_pixel


# -- report ------------------------------------------------------------------------------
def stats(t: list[float]) -> tuple[float, float]:
    return statistics.median(t) * 1e3, min(t) * 1e3


def table(rows: list[tuple[str, list[float]]], ref: str | None = None) -> str:
    ref_t = dict(rows).get(ref)
    out = ["| case | median ms | min ms |" + (" x ours (median / min) |" if ref_t else ""),
           "|---|---:|---:|" + ("---:|" if ref_t else "")]
    for name, t in rows:
        med, mn = stats(t)
        line = f"| {name} | {med:.2f} | {mn:.2f} |"
        if ref_t:
            rmed, rmin = stats(ref_t)
            line += f" {med / rmed:.2f} / {mn / rmin:.2f} |"
        out.append(line)
    return "\n".join(out)


def bench_cbam(args, notes: list[str]) -> None:
    B, C, S = args.batch, args.channels, args.size
    torch.manual_seed(0)
    x = torch.randn(B, C, S, S)
    grad = torch.randn_like(x)
    ours = sa.create("cbam", C)
    explicit = sa.create("cbam", C)
    explicit.load_state_dict(ours.state_dict())
    for m in explicit.modules():
        if hasattr(m, "fused"):
            m.attn_impl = "explicit"
    others, more = competitors(args, C)
    notes.extend(more)
    if "official CBAM" in others:  # same weights: check the outputs agree before timing
        others["official CBAM"].eval()
        ours.eval().load_official_state_dict(others["official CBAM"].state_dict())
        with torch.no_grad():
            err = (ours(x) - others["official CBAM"](x)).abs().max().item()
        notes.append(f"ours vs official CBAM, same weights, eval: max |diff| {err:.2e}")
    modules = {"ours cbam (fused)": ours, "ours cbam (explicit)": explicit, **others}
    if args.compile:  # ours and every other CBAM compiled alike, for a fair comparison
        modules["ours cbam, torch.compile (inductor)"] = torch.compile(ours)
        for name in [n for n in others if n.endswith("CBAM") or "Cbam" in n]:
            modules[f"{name}, torch.compile (inductor)"] = torch.compile(others[name])
    bw = copy_bandwidth(x, args.repeats)
    nbytes = x.numel() * x.element_size()
    floor_fwd, floor_train = 2 * nbytes / bw * 1e3, 5 * nbytes / bw * 1e3
    for m in modules.values():
        m.eval()
    fwd = interleaved({n: forward_case(m, x) for n, m in modules.items()}, args.repeats)
    for m in modules.values():
        m.train()
    train = interleaved({n: train_case(m, x, grad) for n, m in modules.items()}, args.repeats)

    print(f"\n### CBAM on ({B}, {C}, {S}, {S}) float32, {torch.get_num_threads()} threads\n")
    print(f"copy bandwidth {bw / 1e9:.1f} GB/s; floor: forward {floor_fwd:.2f} ms "
          f"(read x, write y), forward+backward {floor_train:.2f} ms (+ read x, dy, write dx)\n")
    print("Forward (eval, no grad):\n")
    print(table([(n, fwd[n]) for n in modules], "ours cbam (fused)"))
    print("\nForward + backward (train mode, gradient to x and parameters):\n")
    print(table([(n, train[n]) for n in modules], "ours cbam (fused)"))
    ours_med, ours_min = stats(train["ours cbam (fused)"])
    fastest = [n for n in others if n.endswith("CBAM") or "Cbam" in n]
    if fastest:
        best = min(fastest, key=lambda n: stats(train[n])[0])
        bmed, bmin = stats(train[best])
        print(f"\nfastest other CBAM, forward+backward: {best}, {bmed:.2f} ms median; ours / it "
              f"= {ours_med / bmed:.2f} (median), {ours_min / bmin:.2f} (min); target <= 0.5")
    compiled = [n for n in modules if n.endswith("(inductor)") and not n.startswith("ours")]
    if compiled:
        best = min(compiled, key=lambda n: stats(train[n])[0])
        bmed, bmin = stats(train[best])
        cmed, cmin = stats(train["ours cbam, torch.compile (inductor)"])
        print(f"compiled: fastest other CBAM {best}, {bmed:.2f} ms median; ours compiled / it "
              f"= {cmed / bmed:.2f} (median), {cmin / bmin:.2f} (min); ours eager / it = "
              f"{ours_med / bmed:.2f}")
    print(f"ours / bandwidth floor, forward+backward: {ours_med / floor_train:.2f} (median), "
          f"{ours_min / floor_train:.2f} (min); target <= 2. Forward: "
          f"{stats(fwd['ours cbam (fused)'])[1] / floor_fwd:.2f} (min)")


def bench_gam(args, notes: list[str]) -> None:
    B, C, S = args.batch, args.channels, args.size
    torch.manual_seed(0)
    x = torch.randn(B, C, S, S)
    grad = torch.randn_like(x)
    ours = sa.create("gam", C)
    explicit = sa.create("gam", C)
    explicit.load_state_dict(ours.state_dict())
    for m in explicit.modules():
        if hasattr(m, "fused"):
            m.attn_impl = "explicit"
    fl = gam_flops(ours, x)
    peaks, peak_flops = peak_cases(ours, x)

    def autocast(case: Case) -> Case:
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                case()
        return run

    modules = {"ours gam (fused)": ours, "ours gam (explicit)": explicit}
    for m in modules.values():
        m.eval()
    fwd_cases = {n: forward_case(m, x) for n, m in modules.items()}
    fwd_cases["ours gam (fused), bf16 autocast"] = autocast(forward_case(ours, x))
    fwd = interleaved({**fwd_cases, **peaks}, args.gam_repeats)
    rate = {n: peak_flops[n] / min(fwd.pop(n)) for n in peaks}
    peak32 = max(v for n, v in rate.items() if "fp32" in n)
    peak16 = max(v for n, v in rate.items() if "bf16" in n)
    detail = ", ".join(f"{n[5:]} {v / 1e9:.0f}" for n, v in rate.items())
    for m in modules.values():
        m.train()
    train_cases = {n: train_case(m, x, grad) for n, m in modules.items()}
    train_cases["ours gam (fused), bf16 autocast"] = autocast(train_case(ours, x, grad))
    train = interleaved(train_cases, args.gam_repeats)

    print(f"\n### GAM on ({B}, {C}, {S}, {S}), {torch.get_num_threads()} threads\n")
    print(f"FLOPs: forward {fl / 1e9:.1f} G, forward+backward {3 * fl / 1e9:.1f} G. Peaks "
          f"(GFLOP/s, measured interleaved with the forward): {detail}; fp32 peak "
          f"{peak32 / 1e9:.0f}, bf16 peak {peak16 / 1e9:.0f}\n")
    passes = (("Forward (eval, no grad)", fwd, 1), ("Forward + backward (train)", train, 3))
    for title, res, mult in passes:
        print(f"{title}:\n")
        print(table(list(res.items()), "ours gam (fused)"))
        lines = []
        for n, t in res.items():
            peak = peak16 if "bf16" in n else peak32
            lines.append(f"{n}: {mult * fl / min(t) / 1e9:.0f} GFLOP/s = "
                         f"{mult * fl / min(t) / peak:.0%} of its dtype's peak (min)")
        f32, b16 = stats(res["ours gam (fused)"]), stats(res["ours gam (fused), bf16 autocast"])
        lines.append(f"bf16 autocast speed-up over fp32: {f32[0] / b16[0]:.2f}x (median), "
                     f"{f32[1] / b16[1]:.2f}x (min); target >= 3")
        print("\n" + "\n".join(f"- {line}" for line in lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--official", help="checkout of Jongchan/attention-module")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--channels", type=int, default=256)
    p.add_argument("--size", type=int, default=56)
    p.add_argument("--repeats", type=int, default=30, help="rounds for CBAM and the machine")
    p.add_argument("--gam-repeats", type=int, default=5)
    p.add_argument("--only", choices=["cbam", "gam"])
    p.add_argument("--compile", action="store_true",
                   help="also time ours and the other CBAMs under torch.compile")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="glibc: no page faults on reallocation (see keep_freed_memory)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    allocator = keep_freed_memory() if args.keep_freed_memory else "default allocator"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{torch.backends.cpu.get_cpu_capability()}, {allocator}")
    notes: list[str] = []
    if args.only in (None, "cbam"):
        bench_cbam(args, notes)
    if args.only in (None, "gam"):
        bench_gam(args, notes)
    if notes:
        print("\nNotes:\n" + "\n".join(f"- {n}" for n in notes))


if __name__ == "__main__":
    main()
