"""Swin / Twins token attention: ours against timm's, side by side in one run.

    python benchmarks/token_attention.py --threads 2 --out benchmarks/token_attention.csv

Three parts, each case measured round-robin with the others (``interleaved_times``), so
a noisy neighbour slows all of them alike; medians and minima are reported:

* ``layers``: the issue's shapes. Shifted-window attention on (8, 56, 56, 96), 3 heads,
  window 7, shift 3 (timm: ``SwinTransformerBlock._attn``, i.e. shift, partition,
  ``WindowAttention``, reverse; timm's default leaves SDPA off for Swin, and its fused
  variant is measured too). Twins LSA (window 7) and GSA (sr 8) on (8, 56, 56, 64), 2
  heads (timm: ``LocallyGroupedAttn``, ``GlobalSubSampleAttn``, SDPA on by default).
  ``ours (save_probs)`` is the opt-in CPU path that keeps the window probabilities for
  backward (``WindowAttention.save_probs``).
  Forward (no grad) and forward+backward; peak memory of forward+backward (live tensor
  storage on CPU, the allocator peak on CUDA).
* ``models``: swin_tiny and twins_svt_small training steps (forward, backward, SGD
  step) at 224 (batch 8) and 512 (batch 1), ours against timm's with the same weights.
* ``micro``: the study's three ~5.4M-parameter models (micro Swin, micro Twins-SVT, a
  patch-2 ViT with global attention), training steps at 32x32, batch 64.
* ``scaling``: window attention against global attention (one SDPA call over all
  tokens) from 28^2 to 112^2 tokens, batch 1, C 96, 3 heads: time per token stays flat
  for windows and grows linearly for global attention; FLOPs from ``count_flops``.

timm is imported through tests/_torchvision_shim.py (torchvision's CPU build is missing
here); without timm, only our rows are measured.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from spatial_attention.apps.bench import interleaved_times
from spatial_attention.apps.bench.flops import count_flops
from spatial_attention.apps.bench.memory import peak_memory_bytes
from spatial_attention.layers.global_attention import GlobalAttention, GlobalSubsampledAttention
from spatial_attention.layers.window import WindowAttention
from spatial_attention.models import create_model

ROOT = Path(__file__).resolve().parents[1]


def _timm():
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        import _torchvision_shim  # noqa: F401
        import timm

        return timm
    except Exception as exc:  # noqa: BLE001  (any import failure means: no timm rows)
        print(f"timm unavailable ({type(exc).__name__}: {exc}); measuring ours only")
        return None


def _fwd(module: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run():
        with torch.no_grad():
            return module(x)

    return run


def _fwd_bwd(module: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    xg = x.clone().requires_grad_()

    def run():
        module.zero_grad(set_to_none=True)
        out = module(xg)
        out.sum().backward()

    return run


class _Adapter(torch.nn.Module):
    """timm's Twins attentions take ``(B, N, C), (H, W)``; ours take ``(B, H, W, C)``."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        B, H, W, C = x.shape
        return self.inner(x.reshape(B, H * W, C), (H, W)).view(B, H, W, C)


class _SwinAttn(torch.nn.Module):
    """timm's shifted-window attention path of a block (no norm, no MLP)."""

    def __init__(self, block: torch.nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block._attn(x)


def _summary(times: list[float]) -> tuple[float, float]:
    return statistics.median(times) * 1e3, min(times) * 1e3


def layer_cases(timm, device):
    cases = {}
    torch.manual_seed(0)
    x96 = torch.randn(8, 56, 56, 96, device=device)
    x64 = torch.randn(8, 56, 56, 64, device=device)
    ours = WindowAttention(96, 3, window_size=7, shift_size=3).to(device)
    ours_sp = WindowAttention(96, 3, window_size=7, shift_size=3).to(device)
    ours_sp.load_state_dict(ours.state_dict())
    ours_sp.attn_impl = "kept_probs"  # CPU: probabilities kept for backward (more memory)
    cases["sw-msa"] = {"ours": ours, "ours (save_probs)": ours_sp}
    if timm is not None:
        from timm.models.swin_transformer import SwinTransformerBlock

        for fused in (False, True):
            block = SwinTransformerBlock(96, (56, 56), num_heads=3, window_size=7, shift_size=3)
            block.attn.load_state_dict(ours.state_dict(), strict=False)
            block.attn.fused_attn = fused
            label = "timm (fused_attn=True)" if fused else "timm (default)"
            cases["sw-msa"][label] = _SwinAttn(block).to(device)
    lsa = WindowAttention(64, 2, window_size=7, position_bias=False).to(device)
    gsa = GlobalSubsampledAttention(64, 2, sr_ratio=8).to(device)
    lsa_sp = WindowAttention(64, 2, window_size=7, position_bias=False).to(device)
    lsa_sp.load_state_dict(lsa.state_dict())
    lsa_sp.attn_impl = "kept_probs"
    cases["twins-lsa"] = {"ours": lsa, "ours (save_probs)": lsa_sp}
    cases["twins-gsa"] = {"ours": gsa}
    if timm is not None:
        from timm.models.twins import GlobalSubSampleAttn, LocallyGroupedAttn

        t_lsa = LocallyGroupedAttn(64, 2, ws=7)
        t_lsa.load_state_dict(lsa.state_dict())
        t_gsa = GlobalSubSampleAttn(64, 2, sr_ratio=8)
        t_gsa.load_state_dict(gsa.state_dict())
        cases["twins-lsa"]["timm (default)"] = _Adapter(t_lsa).to(device)
        cases["twins-gsa"]["timm (default)"] = _Adapter(t_gsa).to(device)
    inputs = {"sw-msa": x96, "twins-lsa": x64, "twins-gsa": x64}
    return cases, inputs


def run_layers(timm, device, repeats, rows):
    cases, inputs = layer_cases(timm, device)
    for case, impls in cases.items():
        x = inputs[case]
        tokens = x.shape[0] * x.shape[1] * x.shape[2]
        fwd = {k: _fwd(m, x) for k, m in impls.items()}
        bwd = {k: _fwd_bwd(m, x) for k, m in impls.items()}
        tf = interleaved_times(fwd, repeats, device=device)
        tb = interleaved_times(bwd, repeats, device=device)
        for impl, m in impls.items():
            mem = peak_memory_bytes(bwd[impl], device, list(m.parameters()) + [x])
            f_med, f_min = _summary(tf[impl])
            b_med, b_min = _summary(tb[impl])
            rows.append(dict(part="layers", case=case, shape=str(tuple(x.shape)), impl=impl,
                             fwd_ms=f_med, fwd_min_ms=f_min, fwd_bwd_ms=b_med,
                             fwd_bwd_min_ms=b_min, tokens_per_s=tokens / (b_med / 1e3),
                             peak_mb=mem / 2**20))
            print(_line(rows[-1]), flush=True)


def _blocks(model):
    return [m for m in model.modules() if hasattr(m, "drop_path1")]


def _train_step(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def run():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return run


def run_models(timm, device, repeats, rows, sizes):
    for name, tname in (("swin_tiny", "swin_tiny_patch4_window7_224"),
                        ("twins_svt_small", "twins_svt_small")):
        for size, batch in sizes:
            torch.manual_seed(0)
            ours = create_model(name).to(device)
            impls = {"ours": ours}
            if timm is not None:
                # the same stochastic depth as ours (the paper's), so both do the same work
                rate = max(b.drop_path1.p for b in _blocks(ours))
                kwargs = {"img_size": size} if name.startswith("swin") else {}
                ref = timm.create_model(tname, drop_path_rate=rate, **kwargs).to(device)
                impls["timm"] = ref
            x = torch.randn(batch, 3, size, size, device=device)
            y = torch.randint(0, 1000, (batch,), device=device)
            steps = {k: _train_step(m, x, y) for k, m in impls.items()}
            times = interleaved_times(steps, repeats, warmup=1, device=device)
            for impl, m in impls.items():
                med, mn = _summary(times[impl])
                mem = peak_memory_bytes(steps[impl], device, list(m.parameters()) + [x])
                rows.append(dict(part="models", case=f"{name}@{size}", shape=f"batch {batch}",
                                 impl=impl, fwd_bwd_ms=med, fwd_bwd_min_ms=mn,
                                 images_per_s=batch / (med / 1e3), peak_mb=mem / 2**20))
                print(_line(rows[-1]), flush=True)


def run_micro(device, repeats, rows):
    """The study's three ~5.4M models: training steps on 32x32, batch 64, interleaved."""
    torch.manual_seed(0)
    x = torch.randn(64, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (64,), device=device)
    models = {
        "swin_micro_cifar": create_model("swin_micro_cifar"),
        "twins_svt_micro_cifar": create_model("twins_svt_micro_cifar"),
        "vit_tiny_p2_cifar+global_attention": create_model(
            "vit_tiny_p2_cifar", attn_layer="global_attention"
        ),
    }
    models = {k: m.to(device) for k, m in models.items()}
    steps = {k: _train_step(m, x, y) for k, m in models.items()}
    times = interleaved_times(steps, repeats, warmup=1, device=device)
    for name, m in models.items():
        med, mn = _summary(times[name])
        mem = peak_memory_bytes(steps[name], device, list(m.parameters()) + [x])
        rows.append(dict(part="micro", case=name, shape="(64, 3, 32, 32)", impl="ours",
                         fwd_bwd_ms=med, fwd_bwd_min_ms=mn, images_per_s=64 / (med / 1e3),
                         peak_mb=mem / 2**20))
        print(_line(rows[-1]), flush=True)


def run_scaling(device, repeats, rows):
    for side in (28, 56, 84, 112):
        x = torch.randn(1, side, side, 96, device=device)
        impls = {"window_attention": WindowAttention(96, 3, 7, 3).to(device),
                 "global_attention": GlobalAttention(96, 3).to(device)}
        bwd = {k: _fwd_bwd(m, x) for k, m in impls.items()}
        times = interleaved_times(bwd, repeats, device=device)
        for impl, m in impls.items():
            flops, _ = count_flops(lambda m=m, x=x: m(x.requires_grad_()).sum().backward())
            med, mn = _summary(times[impl])
            rows.append(dict(part="scaling", case=f"{side}x{side}", shape=f"{side * side} tokens",
                             impl=impl, fwd_bwd_ms=med, fwd_bwd_min_ms=mn,
                             tokens_per_s=side * side / (med / 1e3), gflops=flops / 1e9,
                             us_per_token=med * 1e3 / (side * side)))
            print(_line(rows[-1]), flush=True)


def _line(row: dict) -> str:
    return "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="layers,models,scaling,micro")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-512", action="store_true", help="models at 224 only")
    p.add_argument("--out", default=None, help="CSV of every row")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    timm = _timm()
    rows: list[dict] = []
    parts = args.parts.split(",")
    print(f"torch {torch.__version__}, {args.threads} threads, device {args.device}")
    if "layers" in parts:
        run_layers(timm, args.device, args.repeats, rows)
    if "models" in parts:
        sizes = [(224, 8)] + ([] if args.no_512 else [(512, 1)])
        run_models(timm, args.device, max(3, args.repeats // 2), rows, sizes)
    if "scaling" in parts:
        run_scaling(args.device, args.repeats, rows)
    if "micro" in parts:
        run_micro(args.device, args.repeats, rows)
    if args.out:
        keys = sorted({k for r in rows for k in r}, key=lambda k: list(rows[0]).index(k)
                      if k in rows[0] else 99)
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
