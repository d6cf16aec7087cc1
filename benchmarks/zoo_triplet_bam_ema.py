"""Triplet attention, BAM and EMA: ours against the official modules, same weights.

    python benchmarks/zoo_triplet_bam_ema.py --threads 1 \\
        --triplet-official <landskape-ai/triplet-attention>/triplet_attention.py \\
        --bam-official <Jongchan/attention-module>/MODELS/bam.py \\
        --ema-official <YOLOonMe/EMA-attention-module>/EMA_attention_module

Each official file is read at run time from the path given (nothing of it is kept in
this repository); a mechanism whose file is not given is timed without its official row.
Before timing, each official module's weights are loaded into ours and the outputs are
compared (max |diff| printed). Rounds interleave every case of a table (see
``interleaved_times``); tables report median and minimum per call. "saved MiB" is the
size of the tensors autograd keeps for backward (unique storages), a proxy for the
training-memory peak that works on CPU.
"""

from __future__ import annotations

import argparse
import statistics
import types
from collections.abc import Callable

import torch

import spatial_attention as sa
from spatial_attention.apps.bench import forward_case, interleaved_times, train_case

Case = Callable[[], object]


def load_file(path: str, **preset) -> types.ModuleType:
    """Execute a source file (any name, ``.py`` or not) as a fresh module."""
    module = types.ModuleType("official")
    module.__dict__.update(preset)
    with open(path) as f:
        exec(compile(f.read(), path, "exec"), module.__dict__)  # noqa: S102 - a checkout the user names
    return module


def randomise(m: torch.nn.Module) -> torch.nn.Module:
    """Non-default weights and BatchNorm statistics, so a key mix-up cannot hide."""
    for p in m.parameters():
        p.data.normal_(0, 0.5)
    for name, b in m.named_buffers():
        if name.endswith("running_var"):
            b.data.uniform_(0.5, 2.0)
        elif name.endswith("running_mean"):
            b.data.normal_()
    return m


def saved_mib(module, x) -> float:
    """MiB of distinct storages autograd saves for backward in one training forward."""
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    x = x.detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    seen.pop(x.untyped_storage().data_ptr(), None)  # the input exists anyway
    return sum(seen.values()) / 2**20


def ms(t: list[float]) -> tuple[float, float]:
    return statistics.median(t) * 1e3, min(t) * 1e3


def compare(title: str, modules: dict[str, torch.nn.Module], x, repeats: int) -> None:
    grad = torch.randn_like(x)
    ref = next(iter(modules))
    for m in modules.values():
        m.eval()
    fwd = interleaved_times({n: forward_case(m, x) for n, m in modules.items()}, repeats)
    for m in modules.values():
        m.train()
    train = interleaved_times({n: train_case(m, x, grad) for n, m in modules.items()}, repeats)
    mem = {n: saved_mib(m, x) for n, m in modules.items()}
    print(f"\n### {title} on {tuple(x.shape)} float32, {torch.get_num_threads()} thread(s)\n")
    print("| case | forward median / min ms | fwd+bwd median / min ms | saved MiB | "
          f"x {ref} (fwd / fwd+bwd, medians) |")
    print("|---|---:|---:|---:|---:|")
    for n in modules:
        f, t = ms(fwd[n]), ms(train[n])
        rf, rt = ms(fwd[ref])[0], ms(train[ref])[0]
        print(f"| {n} | {f[0]:.2f} / {f[1]:.2f} | {t[0]:.2f} / {t[1]:.2f} | {mem[n]:.1f} | "
              f"{f[0] / rf:.2f} / {t[0] / rt:.2f} |")


def max_diff(a, b, x) -> float:
    a.eval(), b.eval()
    with torch.no_grad():
        return (a(x) - b(x)).abs().max().item()


def with_impls(name: str, C: int, state: dict, **kwargs) -> dict[str, torch.nn.Module]:
    out = {}
    for impl in ("auto", "explicit"):
        m = sa.create(name, C, attn_impl=impl, **kwargs)
        m.load_state_dict(state)
        out[f"ours {name} ({impl})"] = m
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--triplet-official",
                   help="triplet_attention.py of landskape-ai/triplet-attention")
    p.add_argument("--bam-official", help="MODELS/bam.py of Jongchan/attention-module")
    p.add_argument("--ema-official", help="EMA_attention_module of YOLOonMe/EMA-attention-module")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--size", type=int, default=56)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--only", choices=["triplet", "bam", "ema"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    B, C, S = args.batch, args.channels, args.size
    x = torch.randn(B, C, S, S)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"{torch.backends.cpu.get_cpu_capability()}")

    if args.only in (None, "triplet"):
        mods = with_impls("triplet", C, randomise(sa.create("triplet", C)).state_dict())
        if args.triplet_official:
            off = load_file(args.triplet_official).TripletAttention()
            off.load_state_dict({k.replace("cw.", "cw.conv.").replace("hc.", "hc.conv.")
                                 .replace("hw.", "hw.conv."): v
                                 for k, v in mods["ours triplet (auto)"].state_dict().items()})
            mods["official TripletAttention"] = off
            print(f"triplet vs official, eval: max |diff| "
                  f"{max_diff(mods['ours triplet (auto)'], off, x):.2e}")
        compare("triplet", mods, x, args.repeats)

    if args.only in (None, "bam"):
        state = randomise(sa.create("bam", C)).state_dict()
        # the release multiplies the branches: combine="product" is the like-for-like row
        mods = with_impls("bam", C, state, combine="product")
        mods = {f"{k[:-1]}, product)": v for k, v in mods.items()}
        mods.update(with_impls("bam", C, state))
        if args.bam_official:
            # the release reads an undefined global ``gate_activation`` in ChannelGate
            off = load_file(args.bam_official, gate_activation=None).BAM(C)
            off.load_state_dict(state)
            mods["official BAM"] = off
            print(f"bam (product) vs official, eval: max |diff| "
                  f"{max_diff(mods['ours bam (auto, product)'], off, x):.2e}")
        compare("bam", mods, x, args.repeats)

    if args.only in (None, "ema"):
        mods = with_impls("ema", C, randomise(sa.create("ema", C)).state_dict())
        if args.ema_official:
            off = load_file(args.ema_official).EMA(C)
            off.load_state_dict(mods["ours ema (auto)"].state_dict())
            mods["official EMA"] = off
            print(f"ema vs official: max |diff| {max_diff(mods['ours ema (auto)'], off, x):.2e}")
        compare("ema", mods, x, args.repeats)


if __name__ == "__main__":
    main()
