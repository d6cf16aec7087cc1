"""DAT deformable attention: the module against Sec. 3.2 written out here, and the key map."""

import math

import pytest
import torch
import torch.nn.functional as F

import spatial_attention as sa
from spatial_attention import capture_attention
from spatial_attention.layers.deformable_attention import convert_official_dat_keys


def _build(dim=12, heads=4, groups=2, q_size=(5, 6), impl=None, **kw):
    torch.manual_seed(0)
    m = sa.create("deformable_attention", dim, num_heads=heads, groups=groups, q_size=q_size,
                  attn_impl=impl, **kw)
    with torch.no_grad():  # offsets of a few cells and a visible table
        m.offset_proj.weight.normal_(0, 1.0)
        if m.rpe_table is not None:
            m.rpe_table.normal_(0, 0.5)
    return m


def _coords(n, version, keys):
    """Grid point coordinates in [-1, 1] as each release of the official code puts them."""
    i = torch.arange(n, dtype=torch.float64)
    if version == "dat":
        return (2 * i + 1) / n - 1
    if n == 1:
        return torch.zeros(1, dtype=torch.float64)
    return 2 * (i + 0.5 if keys else i) / (n - 1) - 1


def _bilinear(img, u, v):
    """``img`` (C, H, W) at normalised points (u: y, v: x) of any shape, align_corners
    (-1 the first pixel's centre, +1 the last's), zero outside."""
    C, H, W = img.shape
    py, px = (u + 1) / 2 * (H - 1), (v + 1) / 2 * (W - 1)
    y0, x0 = torch.floor(py), torch.floor(px)
    out = torch.zeros(C, *u.shape, dtype=img.dtype)
    for dy in (0, 1):
        for dx in (0, 1):
            yy, xx = y0 + dy, x0 + dx
            w = (1 - (py - yy).abs()) * (1 - (px - xx).abs())
            ok = (yy >= 0) & (yy <= H - 1) & (xx >= 0) & (xx <= W - 1)
            flat = (yy.clamp(0, H - 1) * W + xx.clamp(0, W - 1)).long()
            out = out + img.reshape(C, -1)[:, flat] * (w * ok)
    return out


def dat_by_hand(m, x):
    """Sec. 3.2 for every sample and group: offsets, sampled keys and values, the
    interpolated bias, softmax attention. Returns the output, positions and weights."""
    B, H, W, C = x.shape
    g, M = m.groups, m.num_heads
    Cg, d, hg = C // g, C // M, M // g
    s, ver = m.offset_range_factor, m.version
    q = x @ m.q.weight.T + m.q.bias  # (B, H, W, C)
    wk, wv, bk, bv = m.k.weight, m.v.weight, m.k.bias, m.v.bias
    outs, positions, weights = [], [], []
    for b in range(B):
        feats, pos_b = [], []
        for gi in range(g):
            ch = slice(gi * Cg, (gi + 1) * Cg)
            t = F.conv2d(q[b, :, :, ch].permute(2, 0, 1)[None], m.offset_dw.weight,
                         m.offset_dw.bias, m.stride, m.padding, groups=Cg)[0]  # (Cg, Hk, Wk)
            t = t.permute(1, 2, 0)
            mu, var = t.mean(-1, keepdim=True), t.var(-1, unbiased=False, keepdim=True)
            t = (t - mu) / torch.sqrt(var + 1e-5) * m.offset_norm.weight + m.offset_norm.bias
            t = 0.5 * t * (1 + torch.erf(t / math.sqrt(2)))  # GELU
            off = t @ m.offset_proj.weight.T  # (Hk, Wk, 2): dy, dx
            Hk, Wk = off.shape[:2]
            ry, rx = _coords(Hk, ver, True), _coords(Wk, ver, True)
            ref = torch.stack([ry[:, None].expand(Hk, Wk), rx[None, :].expand(Hk, Wk)], -1)
            if (ver == "dat" and s > 0) or (ver == "dat++" and s >= 0):
                den = [Hk, Wk] if ver == "dat" else [max(Hk - 1, 1), max(Wk - 1, 1)]
                p = ref + torch.tanh(off) * s / torch.tensor(den, dtype=off.dtype)
            elif s >= 0:
                p = ref + off
            else:
                p = torch.tanh(ref + off) if ver == "dat" else (ref + off).clamp(-1, 1)
            pos_b.append(p)
            img = x[b, :, :, ch].permute(2, 0, 1)  # (Cg, H, W)
            feats.append(_bilinear(img, p[..., 0], p[..., 1]).reshape(Cg, -1))
        xs = torch.cat(feats).T  # (Ns, C): group gi's channels read at its own points
        k, v = xs @ wk.T + bk, xs @ wv.T + bv
        qy, qx = _coords(H, ver, False), _coords(W, ver, False)
        qyx = torch.stack([qy[:, None].expand(H, W), qx[None, :].expand(H, W)], -1)
        heads_out, w_b = [], []
        for h in range(M):
            qh = q[b].reshape(H * W, M, d)[:, h]
            kh, vh = k.reshape(-1, M, d)[:, h], v.reshape(-1, M, d)[:, h]
            logits = qh @ kh.T / math.sqrt(d)
            if m.rpe_table is not None:
                p = pos_b[h // hg].reshape(1, -1, 2)
                R = (qyx.reshape(-1, 1, 2) - p) / 2  # (N, Ns, 2)
                logits = logits + _bilinear(m.rpe_table[h][None], R[..., 0], R[..., 1])[0]
            a = torch.softmax(logits, -1)
            w_b.append(a)
            heads_out.append(a @ vh)
        o = torch.cat(heads_out, -1) @ m.proj.weight.T + m.proj.bias
        outs.append(o.reshape(H, W, C))
        positions.append(torch.stack(pos_b))
        weights.append(torch.stack(w_b))
    return torch.stack(outs), torch.stack(positions), torch.stack(weights)


CASES = [
    dict(size=(5, 6)),  # the table's own size
    dict(size=(7, 3), version="dat++"),  # another size: the table stretches
    dict(size=(6, 5), stride=2, ksize=3),
    dict(size=(1, 7), version="dat++", ksize=3),  # one row: the n == 1 rule
    dict(size=(4, 4), offset_range_factor=-1.0),
    dict(size=(4, 5), offset_range_factor=-1.0, version="dat++"),
    dict(size=(3, 4), offset_range_factor=0.0, use_pe=False),
    dict(size=(8, 8), stride=4, ksize=4, version="dat++"),  # no padding (ksize == stride)
]


@pytest.mark.parametrize("impl", ["auto", "explicit"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_matches_section_3_2_float64(impl, case):
    case = dict(case)
    size = case.pop("size")
    m = _build(impl=impl, **case).double().eval()
    x = torch.randn(2, *size, 12, dtype=torch.float64)
    ref, _, _ = dat_by_hand(m, x)
    torch.testing.assert_close(m(x), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", [(1, 7, 5, 12), (2, 1, 1, 12), (1, 1, 9, 12), (2, 13, 2, 12)])
@pytest.mark.parametrize("version", ["dat", "dat++"])
def test_odd_sizes_fast_equals_explicit(shape, version):
    fast = _build(version=version, ksize=3).train()  # grad mode: the lean-bias kernel
    slow = _build(version=version, ksize=3, impl="explicit").train()
    x = torch.randn(shape)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ys = [fast(xs[0]), slow(xs[1])]
    torch.testing.assert_close(ys[0], ys[1], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(ys[0]).all()
    for y in ys:
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-4, atol=1e-5)
    for a, b in zip(fast.parameters(), slow.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # SDPA with the bias as its float mask
        torch.testing.assert_close(fast.eval()(x), slow.eval()(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["auto", "explicit"])
def test_gradcheck_float64(impl):
    m = _build(dim=8, heads=2, groups=2, q_size=(3, 2), impl=impl, ksize=3).double()
    x = torch.randn(1, 3, 2, 8, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(m, (x,))
    table = m.rpe_table
    torch.autograd.gradcheck(lambda t: torch.func.functional_call(m, {"rpe_table": t}, (x,)),
                             (table.detach().clone().requires_grad_(),))


def test_capture_positions_then_weights():
    m = _build().double().eval()
    x = torch.randn(2, 5, 6, 12, dtype=torch.float64)
    with capture_attention(m) as maps:
        y = m(x)
    out, pos, weights = dat_by_hand(m, x)
    recorded = maps.calls("")
    assert len(recorded) == 2
    assert recorded[0].shape == (2, 2, 5, 6, 2)  # (B, groups, Hk, Wk, (y, x))
    torch.testing.assert_close(recorded[0], pos)
    torch.testing.assert_close(maps[""], weights)  # (B, heads, N, Ns)
    torch.testing.assert_close(maps[""].sum(-1), torch.ones(2, 4, 30, dtype=torch.float64))
    torch.testing.assert_close(y, out)
    assert m.spatial_map(maps[""], (5, 6)).shape == (2, 5, 6)
    assert m.spatial_map(recorded[0], (5, 6)).shape == (2, 5, 6)
    s2 = _build(stride=2, ksize=3).eval()
    with capture_attention(s2) as maps:
        s2(torch.randn(1, 7, 5, 12))
    assert maps[""].shape == (1, 4, 35, 12)  # 4 x 3 keys
    assert s2.spatial_map(maps[""], (7, 5)).shape == (1, 7, 5)


def test_positions_in_float32_under_autocast():
    m = _build().eval()
    x = torch.randn(2, 5, 6, 12)
    with torch.no_grad():
        ref = m(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = m(x)
            with capture_attention(m) as maps:
                m(x)
    assert maps.calls("")[0].dtype == torch.float32
    assert (low.float() - ref).norm() / ref.norm() < 0.05


def test_defaults_init_and_keys():
    torch.manual_seed(0)
    m = sa.create("deformable_attention", 384, num_heads=12, groups=3)
    assert m.q_size == (14, 14) and m.ksize == 5 and m.stride == 1 and m.version == "dat"
    assert m.offset_range_factor == 2.0 and m.offset_norm.eps == 1e-5
    assert m.rpe_table.shape == (12, 27, 27)
    # timm's trunc_normal_(std=0.01) as the official: cut at +-2 (absolute), so in effect normal
    assert abs(m.rpe_table.std().item() - 0.01) < 0.001 and m.rpe_table.abs().max() < 0.06
    assert m.offset_dw.weight.shape == (128, 1, 5, 5) and m.offset_proj.bias is None
    assert set(m.state_dict()) == {
        "q.weight", "q.bias", "k.weight", "k.bias", "v.weight", "v.bias", "proj.weight",
        "proj.bias",
        "offset_dw.weight", "offset_dw.bias", "offset_norm.weight", "offset_norm.bias",
        "offset_proj.weight", "rpe_table"}
    assert "rpe_table" not in sa.create("deformable_attention", 8, 2, use_pe=False).state_dict()


def _official_state(C=12, heads=4, groups=2, k=5, q=(5, 6)):
    """Keys and shapes of the official DAttentionBaseline (1x1 convs, LayerNormProxy)."""
    Cg = C // groups
    shapes = {"proj_q.weight": (C, C, 1, 1), "proj_q.bias": (C,),
              "proj_k.weight": (C, C, 1, 1), "proj_k.bias": (C,),
              "proj_v.weight": (C, C, 1, 1), "proj_v.bias": (C,),
              "proj_out.weight": (C, C, 1, 1), "proj_out.bias": (C,),
              "conv_offset.0.weight": (Cg, 1, k, k), "conv_offset.0.bias": (Cg,),
              "conv_offset.1.norm.weight": (Cg,), "conv_offset.1.norm.bias": (Cg,),
              "conv_offset.3.weight": (2, Cg, 1, 1),
              "rpe_table": (heads, 2 * q[0] - 1, 2 * q[1] - 1)}
    torch.manual_seed(1)
    return {k: torch.randn(s) for k, s in shapes.items()}


def test_official_keys_load():
    state = _official_state()
    m = _build()
    m.load_official_state_dict(state)
    torch.testing.assert_close(m.q.weight, state["proj_q.weight"][:, :, 0, 0])
    torch.testing.assert_close(m.k.weight, state["proj_k.weight"][:, :, 0, 0])
    torch.testing.assert_close(m.v.weight, state["proj_v.weight"][:, :, 0, 0])
    torch.testing.assert_close(m.v.bias, state["proj_v.bias"])
    torch.testing.assert_close(m.proj.bias, state["proj_out.bias"])
    torch.testing.assert_close(m.offset_dw.weight, state["conv_offset.0.weight"])
    torch.testing.assert_close(m.offset_norm.weight, state["conv_offset.1.norm.weight"])
    torch.testing.assert_close(m.offset_proj.weight, state["conv_offset.3.weight"][:, :, 0, 0])
    torch.testing.assert_close(m.rpe_table, state["rpe_table"])
    # inside a model, as saved ({'model': ...}, DataParallel's prefix): only DAT modules renamed
    nested = {f"module.stages.2.attns.1.{k}": v for k, v in state.items()}
    nested["module.stages.2.attns.0.proj_out.weight"] = torch.ones(1)  # a window block's key
    got = convert_official_dat_keys({"model": nested})
    assert "stages.2.attns.0.proj_out.weight" in got  # untouched
    assert {k for k in got if k.startswith("stages.2.attns.1.")} == {
        f"stages.2.attns.1.{k}" for k in m.state_dict()}


def test_clear_errors():
    with pytest.raises(ValueError, match="deformable_attention: num_heads 4 is not divisible"):
        sa.create("deformable_attention", 12, num_heads=4, groups=3)
    with pytest.raises(ValueError, match="deformable_attention: dim 10 is not divisible"):
        sa.create("deformable_attention", 10, num_heads=4)
    with pytest.raises(ValueError, match="deformable_attention: version"):
        sa.create("deformable_attention", 8, num_heads=2, version="v3")
    with pytest.raises(ValueError, match="deformable_attention: ksize must be positive"):
        sa.create("deformable_attention", 8, num_heads=2, ksize=0)
    m = _build()
    with pytest.raises(ValueError, match=r"deformable_attention.*12 channels"):
        m(torch.randn(2, 12, 5, 6))  # channels first
    with pytest.raises(ValueError, match="deformable_attention.*4-D"):
        m(torch.randn(2, 30, 12))
    tiled = _build(stride=4, ksize=4, version="dat++")
    with pytest.raises(ValueError, match="deformable_attention: a 3x9 map is smaller"):
        tiled(torch.randn(1, 3, 9, 12))


def test_bias_kernel_equals_its_reference():
    """DeformableBias (grid rebuilt in backward) against the plain grid_sample."""
    from spatial_attention.functional.kernels.deformable_bias import (
        DeformableBias,
        deformable_bias_reference,
    )

    torch.manual_seed(0)
    table = torch.randn(4, 5, 7, dtype=torch.float64, requires_grad=True)
    pos = (torch.rand(2, 2, 6, 2, dtype=torch.float64) * 2.4 - 1.2).requires_grad_()
    queries = torch.rand(9, 2, dtype=torch.float64) * 2 - 1
    fast = DeformableBias.apply(table, pos, queries)
    ref = deformable_bias_reference(table, pos, queries)
    torch.testing.assert_close(fast, ref, rtol=0, atol=0)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(fast, (table, pos), grad)
    want = torch.autograd.grad(ref, (table, pos), grad)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.autograd.gradcheck(lambda t, p: DeformableBias.apply(t, p, queries), (table, pos))
