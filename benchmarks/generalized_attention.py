"""Benchmark: generalized_attention (fused and explicit) against mmcv's forward.

mmcv does not install here, so ``mmcv_style_forward`` below is an independent plain
re-statement of the computation in mmcv's ``GeneralizedAttention.forward`` (read from
its source for the math: 1x1-pool subsampling, per-head ``matmul`` energies held as a
``(n, heads, h, w, h_kv, w_kv)`` tensor, position features repeated over the batch,
``masked_fill`` of the local range, softmax, value matmul, projection, ``gamma * out +
x``). It runs on the same parameters as our module and is checked equal to it before
any timing.

For every ``attention_type`` (all 15), it reports the median forward time, forward +
backward time, and peak tensor memory of forward + backward (parameters and input
included; spatial_attention.apps.bench.memory) of: mmcv's computation, our fused path, our
explicit path.

    python benchmarks/generalized_attention.py --threads 2 --repeats 15 \
        --out benchmarks/generalized_attention.csv
    python benchmarks/generalized_attention.py --threads 1 --clock cpu --repeats 9 \
        --out benchmarks/generalized_attention_cpu1.csv
    python benchmarks/generalized_attention.py --instances --channels 64 --threads 1 \
        --clock cpu --repeats 9 --out benchmarks/generalized_attention_instances_cpu1.csv
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from spatial_attention import create, explicit_path
from spatial_attention.apps.bench import keep_freed_memory, profile_table
from spatial_attention.apps.bench.memory import peak_memory_bytes
from spatial_attention.functional import scoring


def _mmcv_embedding(n_q, n_k, q_stride, kv_stride, magnitude, feat_dim, x, wave=1000.0):
    # one axis of mmcv's get_position_embedding: (n_q, n_k, feat_dim/2)
    qi = torch.linspace(0, n_q - 1, n_q).to(x).view(n_q, 1) * q_stride
    kj = torch.linspace(0, n_k - 1, n_k).to(x).view(n_k, 1) * kv_stride
    diff = (qi.unsqueeze(1) - kj.unsqueeze(0)) * magnitude  # (n_q, n_k, 1)
    rng = torch.arange(0, feat_dim / 4).to(x)
    dim_mat = (torch.tensor([wave]).to(x) ** ((4.0 / feat_dim) * rng)).view(1, 1, -1)
    return torch.cat(((diff / dim_mat).sin(), (diff / dim_mat).cos()), dim=2)


def mmcv_style_forward(m, x_input):
    """mmcv's GeneralizedAttention forward, re-stated on module ``m``'s parameters."""
    e1, e2, e3, e4 = m.terms
    heads, d = m.num_heads, m.qk_embed_dim
    x_q = F.avg_pool2d(x_input, 1, m.q_stride) if m.q_stride > 1 else x_input
    x_kv = F.avg_pool2d(x_input, 1, m.kv_stride) if m.kv_stride > 1 else x_input
    n, _, h, w = x_q.shape
    _, _, h_kv, w_kv = x_kv.shape
    if e1 or e2:
        proj_query = m.query_conv(x_q).view(n, heads, d, h * w).permute(0, 1, 3, 2)
    if e1 or e3:
        proj_key = m.key_conv(x_kv).view(n, heads, d, h_kv * w_kv)
    if e2 or e4:
        emb_x = _mmcv_embedding(w, w_kv, m.q_stride, m.kv_stride, m.position_magnitude,
                                m.position_embedding_dim, x_input)
        emb_y = _mmcv_embedding(h, h_kv, m.q_stride, m.kv_stride, m.position_magnitude,
                                m.position_embedding_dim, x_input)
        feat_x = m.appr_geom_fc_x(emb_x).view(1, w, w_kv, heads, d).permute(0, 3, 1, 2, 4)
        feat_x = feat_x.repeat(n, 1, 1, 1, 1) / math.sqrt(2)
        feat_y = m.appr_geom_fc_y(emb_y).view(1, h, h_kv, heads, d).permute(0, 3, 1, 2, 4)
        feat_y = feat_y.repeat(n, 1, 1, 1, 1) / math.sqrt(2)
    if (e1, e2, e3, e4) == (False, False, True, False):
        bias = m.appr_bias.view(1, heads, 1, d).repeat(n, 1, 1, 1)
        energy = torch.matmul(bias, proj_key).view(n, heads, 1, h_kv * w_kv)
        h = w = 1
    else:
        if not e1:
            energy = torch.zeros(n, heads, h, w, h_kv, w_kv, dtype=x_input.dtype)
        if e1 and e3:
            qb = proj_query + m.appr_bias.view(1, heads, 1, d)
            energy = torch.matmul(qb, proj_key).view(n, heads, h, w, h_kv, w_kv)
        elif e1:
            energy = torch.matmul(proj_query, proj_key).view(n, heads, h, w, h_kv, w_kv)
        elif e3:
            bias = m.appr_bias.view(1, heads, 1, d).repeat(n, 1, 1, 1)
            energy = energy + torch.matmul(bias, proj_key).view(n, heads, 1, 1, h_kv, w_kv)
        if e2 or e4:
            if e2:
                pq = proj_query + m.geom_bias.view(1, heads, 1, d) if e4 else proj_query
                pq = pq.view(n, heads, h, w, d)
                ex = torch.matmul(pq.permute(0, 1, 3, 2, 4), feat_x.permute(0, 1, 2, 4, 3))
                ex = ex.permute(0, 1, 3, 2, 4).unsqueeze(4)
                ey = torch.matmul(pq, feat_y.permute(0, 1, 2, 4, 3)).unsqueeze(5)
            else:
                g = m.geom_bias.view(1, heads, d, 1).repeat(n, 1, 1, 1)
                ex = torch.matmul(feat_x.reshape(n, heads, w * w_kv, d), g)
                ex = ex.view(n, heads, 1, w, 1, w_kv)
                ey = torch.matmul(feat_y.reshape(n, heads, h * h_kv, d), g)
                ey = ey.view(n, heads, h, 1, h_kv, 1)
            energy = energy + ex + ey
        energy = energy.view(n, heads, h * w, h_kv * w_kv)
    if m.spatial_range >= 0:
        r, s = m.spatial_range, m.kv_stride
        table = torch.ones(h, w, h_kv, w_kv, dtype=torch.bool)
        for iy in range(h):  # mmcv builds this table once, in __init__, with numpy
            for ix in range(w):
                table[iy, ix, max((iy - r) // s, 0):(iy + r + 1) // s + 1,
                      max((ix - r) // s, 0):(ix + r + 1) // s + 1] = False
        energy = energy.masked_fill(table.view(1, 1, h * w, h_kv * w_kv), float("-inf"))
    attention = F.softmax(energy, 3)
    value = m.value_conv(x_kv).view(n, heads, m.v_dim, h_kv * w_kv).permute(0, 1, 3, 2)
    out = torch.matmul(attention, value).permute(0, 1, 3, 2).contiguous()
    out = m.proj_conv(out.view(n, m.v_dim * heads, h, w))
    if m.q_stride > 1:
        out = F.interpolate(out, size=x_input.shape[2:], mode="bilinear", align_corners=False)
    return m.gamma * out + x_input


CLOCK = time.perf_counter


def _interleaved_medians(fns: dict, repeats: int, warmup: int = 2) -> dict:
    """Median ms of each callable, timed round-robin so that load from other processes
    falls on every implementation alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = CLOCK()
            fn()
            times[k].append(CLOCK() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def measure(attention_type: str, args) -> list[dict]:
    torch.manual_seed(0)
    m = create("generalized_attention", args.channels, num_heads=args.heads,
               attention_type=attention_type, kv_stride=args.kv_stride,
               q_stride=args.q_stride, spatial_range=args.spatial_range,
               attn_impl="sdpa" if args.memory_efficient else None)
    with torch.no_grad():
        m.gamma.fill_(1.0)
    x = torch.randn(args.batch, args.channels, args.size, args.size)
    with torch.no_grad():
        ref = mmcv_style_forward(m, x)
        torch.testing.assert_close(m(x), ref, atol=1e-4, rtol=1e-4)
        with explicit_path(m):
            torch.testing.assert_close(m(x), ref, atol=1e-4, rtol=1e-4)
    params = list(m.parameters())

    def runner(kind):
        def call(inp):
            if kind == "mmcv":
                return mmcv_style_forward(m, inp)
            with explicit_path(m, explicit=(kind == "explicit")):
                return m(inp)

        def fwd():
            with torch.no_grad():
                call(x)

        def fwd_bwd():
            xg = x.detach().requires_grad_()
            call(xg).sum().backward()
            for p in params:
                p.grad = None

        return fwd, fwd_bwd

    kinds = tuple(args.impls)
    runners = {kind: runner(kind) for kind in kinds}
    if args.profile:
        profile(runners[kinds[0]][1], f"{attention_type} {kinds[0]}")
    fwd = _interleaved_medians({k: r[0] for k, r in runners.items()}, args.repeats)
    fwd_bwd = _interleaved_medians({k: r[1] for k, r in runners.items()}, args.repeats)
    rows = []
    for kind in kinds:
        peak = peak_memory_bytes(runners[kind][1], "cpu", params + [x])
        rows.append({
            "attention_type": attention_type,
            "impl": kind,
            "forward_ms": round(fwd[kind], 2),
            "forward_backward_ms": round(fwd_bwd[kind], 2),
            "peak_MiB": round(peak / 2**20, 1),
        })
    return rows


def profile(fn, title: str, calls: int = 5) -> None:
    """Where one call's time goes: torch.profiler's table by op and input shape."""
    print(f"\nprofile of {calls} forward + backward calls, {title}:\n")
    print(profile_table(fn, calls))


def measure_instances(args) -> list[dict]:
    """deformable_conv / modulated_deformable_conv / dynamic_conv: fast vs explicit path."""
    rows = []
    for name in ("deformable_conv", "modulated_deformable_conv", "dynamic_conv"):
        torch.manual_seed(0)
        cls = __import__("spatial_attention").info(name).cls
        m, (x,) = cls.example(name, args.batch, args.channels, (args.size, args.size))
        params = list(m.parameters())

        def runner(explicit, m=m, x=x, params=params):
            def f_fwd():
                with torch.no_grad(), explicit_path(m, explicit=explicit):
                    m(x)

            def f_fwd_bwd():
                with explicit_path(m, explicit=explicit):
                    m(x.detach().requires_grad_()).sum().backward()
                for p in params:
                    p.grad = None

            return f_fwd, f_fwd_bwd

        runners = {"fused": runner(False), "explicit": runner(True)}
        fwd = _interleaved_medians({k: r[0] for k, r in runners.items()}, args.repeats)
        fwd_bwd = _interleaved_medians({k: r[1] for k, r in runners.items()}, args.repeats)
        for kind in runners:
            peak = peak_memory_bytes(runners[kind][1], "cpu", params + [x])
            rows.append({"attention_type": name, "impl": kind,
                         "forward_ms": round(fwd[kind], 2),
                         "forward_backward_ms": round(fwd_bwd[kind], 2),
                         "peak_MiB": round(peak / 2**20, 1)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--channels", type=int, default=256)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-stride", type=int, default=2)
    p.add_argument("--q-stride", type=int, default=1)
    p.add_argument("--spatial-range", type=int, default=-1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--types", nargs="*", default=None,
                   help="attention types to run (default: all 15)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: perf_counter; cpu: process CPU time (all threads), which a "
                   "machine shared with other jobs inflates less (use with --threads 1)")
    p.add_argument("--memory-efficient", action="store_true",
                   help="build generalized_attention with memory_efficient=True")
    p.add_argument("--instances", action="store_true",
                   help="time deformable_conv, modulated_deformable_conv and dynamic_conv "
                   "(fast vs explicit path) instead of generalized_attention")
    p.add_argument("--impls", nargs="+", default=["mmcv", "fused", "explicit"],
                   choices=["mmcv", "fused", "explicit"],
                   help="implementations to time (one per process: no interleaving effects "
                   "between them on the heap)")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="glibc keeps freed memory (spatial_attention.apps.bench.keep_freed_memory)")
    p.add_argument("--tile-bytes", type=int, default=None,
                   help="functional.scoring.TILE_BYTES for the kept probabilities (0: untiled)")
    p.add_argument("--profile", action="store_true",
                   help="print a torch.profiler table of the first impl's forward + backward")
    p.add_argument("--out", type=Path, default=None, help="CSV to write")
    args = p.parse_args()
    if args.keep_freed_memory:
        print(keep_freed_memory())
    if args.tile_bytes is not None:
        scoring.TILE_BYTES = args.tile_bytes if args.tile_bytes > 0 else 2**62
    global CLOCK
    CLOCK = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(args.threads)
    types = args.types or ["".join(b) for b in itertools.product("01", repeat=4)][1:][::-1]
    rows = []
    print("| attention_type / mechanism | impl | forward ms | fwd+bwd ms | peak MiB |")
    print("|---|---|---:|---:|---:|")
    batches = [measure_instances(args)] if args.instances else (measure(t, args) for t in types)
    for batch_rows in batches:
        for r in batch_rows:
            rows.append(r)
            print(f"| {r['attention_type']} | {r['impl']} | {r['forward_ms']} | "
                  f"{r['forward_backward_ms']} | {r['peak_MiB']} |", flush=True)
            if args.out:
                with args.out.open("w", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=list(rows[0]))
                    w.writeheader()
                    w.writerows(rows)


if __name__ == "__main__":
    main()
