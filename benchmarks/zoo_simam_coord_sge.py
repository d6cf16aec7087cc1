"""SimAM, coordinate attention and SGE: ours against the official modules, same weights.

    python benchmarks/zoo_simam_coord_sge.py --official /tmp/official --threads 1

``--official`` is a folder holding the three official modules as files, taken from the
authors' repositories and kept outside this project: ``simam_official.py``
(``simam_module`` from ZjjConan/SimAM), ``coordatt_official.py`` (``CoordAtt`` from
houqb/CoordAttention) and ``sge_official.py`` (``SpatialGroupEnhance`` from
implus/PytorchInsight). timm's ``CoordAttn`` joins the coordinate-attention rows when
importable. Each case is checked against ours on the same input before it is timed.

Every case runs once per round, rounds interleave all cases of one mechanism (a noisy
neighbour slows them alike), and each reports the median and minimum over ``--repeats``
rounds. Peak memory is the live tensor storage of one forward+backward
(:class:`~spatial_attention.apps.bench.memory.TensorMemoryTracker`), input and
parameters excluded.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

import spatial_attention as sa
from spatial_attention.apps.bench import forward_case, interleaved_times, train_case
from spatial_attention.apps.bench.memory import TensorMemoryTracker

Case = Callable[[], object]


def load(folder: str, stem: str, cls: str):
    file = Path(folder) / f"{stem}.py"
    if not file.exists():
        return None
    spec = importlib.util.spec_from_file_location(stem, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, cls)


def timm_coord_attn():
    try:  # timm imports torchvision; its test shim makes a CUDA-only wheel importable
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        import _torchvision_shim  # noqa: F401
        from timm.layers.coord_attn import CoordAttn
        return CoordAttn
    except Exception:  # noqa: BLE001 - not importable: not measured
        return None


def peak_mib(module, x, grad) -> float:
    x = x.detach().requires_grad_()
    with TensorMemoryTracker() as mem:
        torch.autograd.backward(module(x), grad)
    return mem.peak_bytes / 2**20


def competitors(name: str, C: int, folder: str):
    """Ours (auto, explicit) and the others, all with the weights of ours (auto)."""
    ours = sa.create(name, C)
    if name == "sge":  # the zero/one init gives a flat gate: time a non-trivial one
        with torch.no_grad():
            ours.weight.normal_()
            ours.bias.normal_()
    explicit = sa.create(name, C, attn_impl="explicit")
    explicit.load_state_dict(ours.state_dict())
    mods = {f"ours {name} (auto)": ours, f"ours {name} (explicit)": explicit}
    if name == "simam":
        cls = load(folder, "simam_official", "simam_module")
        if cls is not None:
            mods["official simam_module"] = cls(C)
    elif name == "coord":
        cls = load(folder, "coordatt_official", "CoordAtt")
        if cls is not None:
            mods["official CoordAtt"] = cls(C, C)
        timm_cls = timm_coord_attn()
        if timm_cls is not None:
            mods["timm CoordAttn"] = timm_cls(C, rd_channels=ours.conv1.out_channels, bias=True)
    else:
        cls = load(folder, "sge_official", "SpatialGroupEnhance")
        if cls is not None:
            mods["official SpatialGroupEnhance"] = cls(ours.groups)
    for m in mods.values():
        if list(m.state_dict()):
            m.load_state_dict(ours.state_dict())
    return mods


def stats(t: list[float]) -> tuple[float, float]:
    return statistics.median(t) * 1e3, min(t) * 1e3


def table(res: dict[str, list[float]], ref: str, mem: dict[str, float] | None = None) -> str:
    out = ["| case | median ms | min ms | x ours auto (median / min) |"
           + (" peak MiB |" if mem else ""),
           "|---|---:|---:|---:|" + ("---:|" if mem else "")]
    rmed, rmin = stats(res[ref])
    for n, t in res.items():
        med, mn = stats(t)
        line = f"| {n} | {med:.2f} | {mn:.2f} | {med / rmed:.2f} / {mn / rmin:.2f} |"
        out.append(line + (f" {mem[n]:.1f} |" if mem else ""))
    return "\n".join(out)


def bench(name: str, args) -> None:
    B, C, S = args.batch, args.channels, args.size
    torch.manual_seed(0)
    x = torch.randn(B, C, S, S)
    grad = torch.randn_like(x)
    mods = competitors(name, C, args.official)
    ref = f"ours {name} (auto)"
    checks = []
    for m in mods.values():
        m.eval()
    with torch.no_grad():
        want = mods[ref](x)
        for n, m in mods.items():
            if n != ref:
                checks.append(f"{n}: max |diff| {(m(x) - want).abs().max().item():.1e}")
    fwd = interleaved_times({n: forward_case(m, x) for n, m in mods.items()}, args.repeats)
    for m in mods.values():
        m.train()
    train = interleaved_times({n: train_case(m, x, grad) for n, m in mods.items()},
                              args.repeats)
    mem = {n: peak_mib(m, x, grad) for n, m in mods.items()}
    print(f"\n### {name} on ({B}, {C}, {S}, {S}) float32, {torch.get_num_threads()} thread(s)\n")
    print("Same weights, eval, against ours (auto): " + "; ".join(checks) + "\n")
    print("Forward (eval, no grad):\n")
    print(table(fwd, ref))
    print("\nForward + backward (train mode, gradient to x and parameters):\n")
    print(table(train, ref, mem))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--official", default="/tmp/official", help="folder of the official files")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--size", type=int, default=56)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--only", choices=["simam", "coord", "sge"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"{torch.backends.cpu.get_cpu_capability()}")
    for name in ("simam", "coord", "sge"):
        if args.only in (None, name):
            bench(name, args)


if __name__ == "__main__":
    main()
