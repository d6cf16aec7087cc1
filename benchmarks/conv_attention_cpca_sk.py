"""Fast vs explicit paths of cpca, cpms, sk, temporal, temporal_channel, and the
formulations their fast paths were chosen over.

    python benchmarks/conv_attention_cpca_sk.py --device cpu --threads 2
    python benchmarks/conv_attention_cpca_sk.py --device cuda

Prints one line per measurement: the median and the minimum over ``--repeats`` timed
groups of ``--iters`` forward passes (no grad), in milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import spatial_attention as sa
from spatial_attention import explicit_path


def timed(fn: Callable[[], object], device: str, iters: int, repeats: int) -> tuple[float, float]:
    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():
        for _ in range(2):
            fn()
        runs = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            sync()
            runs.append((time.perf_counter() - start) / iters * 1e3)
    return statistics.median(runs), min(runs)


# -- alternatives the fast paths were measured against -------------------------------------
def pyramid_grouped(m, base):
    """All strips in two convs: n outputs per channel, then n inputs per output channel."""
    strips, C = m._strips(), base.shape[1]
    n, K = len(strips), max(m.kernel_sizes)
    w_h = torch.stack([F.pad(h.weight, ((K - h.weight.shape[-1]) // 2,) * 2) for h, _ in strips], 1)
    w_v = torch.cat([F.pad(v.weight, (0, 0) + ((K - v.weight.shape[-2]) // 2,) * 2)
                     for _, v in strips], 1)
    b_h = torch.stack([h.bias for h, _ in strips], 1).reshape(C * n)
    b_v = torch.stack([v.bias for _, v in strips], 0).sum(0)
    rows = F.conv2d(base, w_h.reshape(C * n, 1, 1, K), b_h, padding=(0, K // 2), groups=C)
    return base + F.conv2d(rows, w_v, b_v, padding=(K // 2, 0), groups=C)


def pyramid_depthwise_sum(m, base):
    """Strips as one n-output depthwise conv, one depthwise conv back, then a sum over n."""
    strips, C = m._strips(), base.shape[1]
    n, K = len(strips), max(m.kernel_sizes)
    w_h = torch.stack([F.pad(h.weight, ((K - h.weight.shape[-1]) // 2,) * 2) for h, _ in strips], 1)
    w_v = torch.stack([F.pad(v.weight, (0, 0) + ((K - v.weight.shape[-2]) // 2,) * 2)
                       for _, v in strips], 1)
    b_h = torch.stack([h.bias for h, _ in strips], 1).reshape(C * n)
    b_v = torch.stack([v.bias for _, v in strips], 1).reshape(C * n)
    rows = F.conv2d(base, w_h.reshape(C * n, 1, 1, K), b_h, padding=(0, K // 2), groups=C)
    cols = F.conv2d(rows, w_v.reshape(C * n, 1, K, 1), b_v, padding=(K // 2, 0), groups=C * n)
    return base + cols.unflatten(1, (C, n)).sum(2)


def sk_merged_conv(m, x):
    """Both SK branch convs as one grouped 5x5 conv (3x3 padded, dilated 3x3 spread)."""
    w1 = F.pad(m.paths[0].conv.weight, (1, 1, 1, 1))
    w2 = torch.zeros_like(w1)
    w2[..., ::2, ::2] = m.paths[1].conv.weight
    G, C = m.groups, m.out_channels
    w = torch.stack([w1.unflatten(0, (G, C // G)), w2.unflatten(0, (G, C // G))], 1)
    return F.conv2d(x, w.reshape(2 * C, *w1.shape[1:]), padding=2, groups=G)


def sk_two_convs(m, x):
    return [m.paths[0].conv(x), m.paths[1].conv(x)]


def sk_combine_stacked(branches, weights):
    return (torch.stack(branches, 1) * weights).sum(1)


def sk_combine_addcmul(branches, weights):
    return torch.addcmul(branches[0] * weights[:, 0], branches[1], weights[:, 1])


def tam_grouped_conv(z, theta):
    """The official TAM aggregation: one conv with B*C groups over (1, B*C, T, H*W)."""
    B, T, C, H, W = z.shape
    K = theta.shape[-1]
    zz = z.permute(0, 2, 1, 3, 4).reshape(1, B * C, T, H * W)
    y = F.conv2d(zz, theta.reshape(B * C, 1, K, 1), padding=(K // 2, 0), groups=B * C)
    return y.reshape(B, C, T, H, W).permute(0, 2, 1, 3, 4)


def tam_band_index(T, K, device):
    """Built once per module (buffers ``band_tap``, ``band_mask``)."""
    t = torch.arange(T, device=device)
    tap = t[None, :] - t[:, None] + K // 2
    return tap.clamp(0, K - 1), ((tap >= 0) & (tap < K)).float()


def tam_banded(z, theta, tap, mask):
    H, W = z.shape[-2:]
    band = theta[:, :, tap] * mask
    return (band @ z.flatten(3).transpose(1, 2)).transpose(1, 2).unflatten(3, (H, W))


def tam_shifted(z, theta):
    T, K = z.shape[1], theta.shape[-1]
    zp = F.pad(z, (0, 0, 0, 0, 0, 0, K // 2, K // 2))
    out = theta[:, None, :, 0, None, None] * zp[:, :T]
    for k in range(1, K):
        out = out + theta[:, None, :, k, None, None] * zp[:, k:k + T]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    dev = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    def report(what: str, fn: Callable[[], object]) -> None:
        med, best = timed(fn, dev, args.iters, args.repeats)
        print(f"{dev:5s} {what:62s} median {med:9.3f} ms   min {best:9.3f} ms", flush=True)

    print(f"# torch {torch.__version__}, threads {torch.get_num_threads()}, device {dev}")
    maps = [(8, 64, 56), (8, 256, 20)]
    for name in ("cpca", "cpms", "sk"):
        for B, C, S in maps:
            m = sa.create(name, C).to(dev).eval().to(memory_format=torch.channels_last)
            x = torch.randn(B, C, S, S, device=dev).to(memory_format=torch.channels_last)
            report(f"{name} fused    ({B}, {C}, {S}, {S}) channels_last", lambda m=m, x=x: m(x))
            with explicit_path(m):
                report(f"{name} explicit ({B}, {C}, {S}, {S}) channels_last", lambda m=m, x=x: m(x))
    for name in ("temporal", "temporal_channel"):
        for B, C, S in [(4, 64, 28), (2, 512, 14)]:
            m = sa.create(name, C).to(dev).eval()  # temporal: 8 heads
            x = torch.randn(B, 8, C, S, S, device=dev)
            report(f"{name} fused    ({B}, 8, {C}, {S}, {S})", lambda m=m, x=x: m(x))
            with explicit_path(m):
                report(f"{name} explicit ({B}, 8, {C}, {S}, {S})", lambda m=m, x=x: m(x))

    print("# depthwise pyramid (cpca, cpms): per-strip convs (used) vs batched strips")
    for B, C, S in maps:
        m = sa.create("cpca", C).to(dev).eval()
        for fmt in (torch.contiguous_format, torch.channels_last):
            mm = m.to(memory_format=fmt)
            x = torch.randn(B, C, S, S, device=dev).to(memory_format=fmt)
            layout = "channels_last" if fmt == torch.channels_last else "NCHW"
            tag = f"({B}, {C}, {S}, {S}) {layout}"
            report(f"pyramid per-strip (used)   {tag}", lambda mm=mm, x=x: mm.pyramid(x))
            report(f"pyramid grouped            {tag}",
                   lambda mm=mm, x=x: pyramid_grouped(mm, mm.dconv5_5(x)))
            report(f"pyramid depthwise+sum      {tag}",
                   lambda mm=mm, x=x: pyramid_depthwise_sum(mm, mm.dconv5_5(x)))

    print("# sk: branch convs and the weighted sum")
    for B, C, S in maps:
        m = sa.create("sk", C).to(dev).eval().to(memory_format=torch.channels_last)
        x = torch.randn(B, C, S, S, device=dev).to(memory_format=torch.channels_last)
        tag = f"({B}, {C}, {S}, {S}) channels_last"
        report(f"sk two 3x3 convs (used)    {tag}", lambda m=m, x=x: sk_two_convs(m, x))
        report(f"sk one merged 5x5 conv     {tag}", lambda m=m, x=x: sk_merged_conv(m, x))
        branches = [p(x) for p in m.paths]
        w = torch.rand(B, 2, C, 1, 1, device=dev)
        report(f"sk combine addcmul (used)  {tag}",
               lambda b=branches, w=w: sk_combine_addcmul(b, w))
        report(f"sk combine stack+sum       {tag}",
               lambda b=branches, w=w: sk_combine_stacked(b, w))

    print("# temporal_channel (TAM) aggregation")
    for B, C, S in [(2, 64, 28), (8, 256, 14)]:
        z = torch.randn(B, 8, C, S, S, device=dev)
        theta = torch.softmax(torch.randn(B, C, 3, device=dev), -1)
        tag = f"({B}, 8, {C}, {S}, {S})"
        tap, mask = tam_band_index(8, 3, dev)
        report(f"tam banded matmul (used)   {tag}",
               lambda z=z, t=theta, tap=tap, mask=mask: tam_banded(z, t, tap, mask))
        report(f"tam grouped conv (official) {tag}", lambda z=z, t=theta: tam_grouped_conv(z, t))
        report(f"tam shifted sum (explicit) {tag}", lambda z=z, t=theta: tam_shifted(z, t))


if __name__ == "__main__":
    main()
