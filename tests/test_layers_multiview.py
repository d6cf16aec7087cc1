"""MV-Swin-T multi-view window attention: the reference's math, views, weights, sizes."""

import math

import pytest
import torch
import torch.nn.functional as F

import spatial_attention as sa
from spatial_attention import capture_attention, explicit_path
from spatial_attention.layers.multiview import MultiViewWindowAttention, log_spaced_relative_coords


def _module(dim=8, heads=2, window=4, shift=0, mode="mix", views=2, share=False, seed=0,
            dtype=torch.float64):
    torch.manual_seed(seed)
    m = MultiViewWindowAttention(dim, heads, window_size=window, shift=shift, mode=mode,
                                 num_views=views, share_weights=share)
    with torch.no_grad():  # move every parameter away from its init so nothing cancels
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.to(dtype).eval()


def _loop_reference(m, x):
    """Window by window, view by view, as the reference writes it: zero-pad, roll,
    partition, per-view cosine scores, the 2h maps mixed by a linear map over the map
    axis, logit scale, 16*sigmoid(cpb), region/padding masks, softmax, own values."""
    B, V, H, W, C = x.shape
    M = m.window_size[0]
    h, d = m.num_heads, m.head_dim
    Hp, Wp = -(-H // M) * M, -(-W // M) * M
    s = m.shift[0] if min(H, W) > M else 0
    real = torch.zeros(Hp, Wp, dtype=torch.bool)
    real[:H, :W] = True
    region = torch.zeros(Hp, Wp, dtype=torch.long)
    if s:
        cuts = (slice(0, -M), slice(-M, -s), slice(-s, None))
        for a, rows in enumerate(cuts):
            for b, cols in enumerate(cuts):
                region[rows, cols] = 3 * a + b
    xp = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))
    xp = torch.roll(xp, (-s, -s), dims=(2, 3))
    real = torch.roll(real, (-s, -s), dims=(0, 1))
    idx = m.relative_position_index
    out = torch.zeros_like(xp)
    for v in range(V):
        pv = 0 if m.share_weights else v
        tau = m.logit_scale[pv].clamp(max=math.log(100)).exp()  # (h, 1, 1)
        table = torch.relu(m.relative_coords_table.to(x.dtype) @ m.cpb_weight1[pv].T
                           + m.cpb_bias1[pv]) @ m.cpb_weight2[pv].T
        pos = 16 * torch.sigmoid(table[idx.reshape(-1)].view(M * M, M * M, h).permute(2, 0, 1))
        for i in range(0, Hp, M):
            for j in range(0, Wp, M):
                def qkv(u, i=i, j=j):
                    pu = 0 if m.share_weights else u
                    t = xp[:, u, i:i + M, j:j + M].reshape(B, M * M, C)
                    bias = torch.cat((m.q_bias[pu], torch.zeros_like(m.q_bias[pu]),
                                      m.v_bias[pu]))
                    y = (t @ m.qkv_weight[pu].T + bias).view(B, M * M, 3, h, d)
                    return [y[:, :, n].transpose(1, 2) for n in range(3)]
                q, k, val = qkv(v)
                others = [(v + o) % V for o in range(1, V)]
                qn = F.normalize(q, dim=-1)
                keep = (real[i:i + M, j:j + M].reshape(1, -1)
                        & (region[i:i + M, j:j + M].reshape(-1, 1)
                           == region[i:i + M, j:j + M].reshape(1, -1)))
                if m.mode == "mix":
                    maps = [qn @ F.normalize(k, dim=-1).transpose(-2, -1)]
                    for u in others:
                        maps.append(qn @ F.normalize(qkv(u)[1], dim=-1).transpose(-2, -1))
                    cat = torch.cat(maps, dim=1).permute(0, 2, 3, 1)  # (B, N, N, V*h)
                    mixed = (cat @ m.mix_weight[pv].T + m.mix_bias[pv]).permute(0, 3, 1, 2)
                    logits = mixed * tau + pos
                    values = val
                else:
                    keys = [k] + [qkv(u)[1] for u in others]
                    values = torch.cat([val] + [qkv(u)[2] for u in others], dim=2)
                    logits = torch.cat([qn @ F.normalize(kk, dim=-1).transpose(-2, -1) * tau
                                        + pos for kk in keys], dim=-1)
                    keep = keep.repeat(1, V)
                weights = logits.masked_fill(~keep, float("-inf")).softmax(-1)
                y = (weights @ values).transpose(1, 2).reshape(B, M, M, C)
                out[:, v, i:i + M, j:j + M] = y
    out = torch.roll(out, (s, s), dims=(2, 3))[:, :, :H, :W]
    proj = m.proj_weight if not m.share_weights else m.proj_weight.expand(V, C, C)
    pb = m.proj_bias if not m.share_weights else m.proj_bias.expand(V, C)
    return torch.einsum("bvhwc,voc->bvhwo", out, proj) + pb[None, :, None, None]


@pytest.mark.parametrize("mode", ["mix", "concat"])
@pytest.mark.parametrize("size,shift", [((8, 8), 2), ((7, 5), 0), ((9, 10), 2)])
def test_matches_the_window_by_window_reference(mode, size, shift):
    m = _module(mode=mode, shift=shift)
    x = torch.randn(2, 2, *size, 8, dtype=torch.float64)
    expected = _loop_reference(m, x)
    torch.testing.assert_close(m(x), expected)
    with explicit_path(m):
        torch.testing.assert_close(m(x), expected)


def test_zero_cross_mixing_with_identical_views_is_window_self_attention():
    mix = _module(mode="mix", shift=2)
    own = _module(mode="self", shift=2)
    h = mix.num_heads
    with torch.no_grad():
        for name in ("qkv_weight", "q_bias", "v_bias", "logit_scale", "cpb_weight1",
                     "cpb_bias1", "cpb_weight2", "proj_weight", "proj_bias"):
            getattr(own, name).copy_(getattr(mix, name))
        mix.mix_weight.zero_()
        mix.mix_weight[:, :, :h] = torch.eye(h)  # self maps pass through, cross maps zeroed
        mix.mix_bias.zero_()
    view = torch.randn(2, 7, 9, 8, dtype=torch.float64)
    x = torch.stack((view, view), dim=1)
    torch.testing.assert_close(mix(x), own(x))
    # ... and "self" is Swin-V2 window attention: one view through it equals each view
    single = MultiViewWindowAttention(8, 2, window_size=4, shift=2, mode="self", num_views=1)
    single = single.to(torch.float64)
    with torch.no_grad():
        for n, p in single.named_parameters():
            p.copy_(getattr(own, n)[1:2])
    torch.testing.assert_close(single(view[:, None])[:, 0], own(x)[:, 1])


def test_identical_views_make_cross_maps_equal_to_self_maps():
    """With equal views X = S, so the mix [A, B] acts like [A + B, 0]: the cross maps do
    read the other view's keys of the same window."""
    a = _module(mode="mix", shift=2, share=True)
    b = _module(mode="mix", shift=2, share=True)
    b.load_state_dict(a.state_dict())
    h = a.num_heads
    with torch.no_grad():
        b.mix_weight[:, :, :h] += b.mix_weight[:, :, h:]
        b.mix_weight[:, :, h:] = 0
    view = torch.randn(1, 6, 7, 8, dtype=torch.float64)
    x = torch.stack((view, view), dim=1)
    torch.testing.assert_close(a(x), b(x))
    y = torch.stack((view, torch.randn_like(view)), dim=1)
    assert not torch.allclose(a(y), b(y))


@pytest.mark.parametrize("mode", ["mix", "concat"])
def test_each_view_reads_the_other(mode):
    m = _module(mode=mode)
    x = torch.randn(1, 2, 5, 6, 8, dtype=torch.float64, requires_grad=True)
    m(x)[:, 0].sum().backward()
    assert x.grad[:, 1].abs().sum() > 0
    own = _module(mode="self")
    x.grad = None
    own(x)[:, 0].sum().backward()
    assert x.grad[:, 1].abs().sum() == 0


@pytest.mark.parametrize("mode", ["mix", "concat", "self"])
def test_shared_weights_swapping_views_swaps_outputs(mode):
    m = _module(mode=mode, shift=2, share=True)
    a, b = torch.randn(2, 2, 7, 9, 8, dtype=torch.float64).unbind(1)
    ya, yb = m(a, b)
    za, zb = m(b, a)
    torch.testing.assert_close(za, yb)
    torch.testing.assert_close(zb, ya)
    assert sum(p.numel() for p in m.parameters()) * 2 == sum(
        p.numel() for p in _module(mode=mode, share=False).parameters())
    per_view = _module(mode=mode, shift=2, share=False)
    assert not torch.allclose(per_view(b, a)[0], per_view(a, b)[1])


def test_tuple_and_stacked_calls_agree_and_three_views_work():
    m = _module(mode="mix", views=3, shift=2)
    x = torch.randn(2, 3, 5, 7, 8, dtype=torch.float64)
    stacked = m(x)
    views = m(*x.unbind(1))
    assert isinstance(views, tuple) and len(views) == 3
    torch.testing.assert_close(torch.stack(views, 1), stacked)
    torch.testing.assert_close(stacked, _loop_reference(m, x))
    with explicit_path(m):
        torch.testing.assert_close(m(x), stacked)


@pytest.mark.parametrize("mode", ["mix", "concat"])
def test_gradcheck_shifted_and_padded(mode):
    m = _module(dim=4, heads=2, window=2, shift=1, mode=mode)
    x = torch.randn(1, 2, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    for fused in (True, False):
        m.attn_impl = None if fused else "explicit"
        assert torch.autograd.gradcheck(m, (x,), fast_mode=True)
    m.attn_impl = None
def test_padding_never_changes_real_tokens():
    """A 5x6 map padded to 8x8 gives the same outputs as its top-left corner of a larger
    map whose extra tokens are far away in other windows (windows of 4 at offsets 0)."""
    m = _module(mode="mix")
    big = torch.randn(1, 2, 8, 8, 8, dtype=torch.float64)
    small = big[:, :, :4, :4].clone()
    torch.testing.assert_close(m(small), m(big)[:, :, :4, :4])
    odd = big[:, :, :5, :6].clone()
    out = m(odd)
    assert out.shape == odd.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out[:, :, :4, :4], m(big)[:, :, :4, :4])


def test_capture_self_and_cross_maps_per_window():
    m = _module(mode="mix", shift=2, dtype=torch.float32)
    x = torch.randn(2, 2, 8, 8, 8)
    with capture_attention(m) as maps:
        out = m(x)
    rec = maps[""]
    assert rec.shape == (2, 2, 4, 2, 2, 16, 16)  # (B, V, nW, own + cross, heads, N, N)
    torch.testing.assert_close(rec.sum(-1), torch.ones(2, 2, 4, 2, 2, 16))
    torch.testing.assert_close(m(x), out)
    c = _module(mode="concat", dtype=torch.float32)
    with capture_attention(c) as maps:
        c(x)
    rec = maps[""]
    assert rec.shape == (2, 2, 4, 2, 2, 16, 16)
    # one softmax over the window of both views: own + cross rows sum to 1 together
    torch.testing.assert_close(rec.sum((3, -1)), torch.ones(2, 2, 4, 2, 16))
    assert rec[:, :, :, 1].sum() > 0
    grid = MultiViewWindowAttention.spatial_map(rec, (8, 8))
    assert grid.shape == (2, 8, 8)


def test_compile_fullgraph_tuple_views_shifted():
    m = _module(mode="mix", shift=2, dtype=torch.float32)
    a, b = torch.randn(2, 2, 7, 9, 8).unbind(1)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(a, b), m(a, b), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_log_spaced_coords_are_swin_v2s():
    t = log_spaced_relative_coords((3, 3))
    assert t.shape == (25, 2)
    # offset (-2, 0) -> -8 -> -log2(9)/log2(8); offset (0, 1) -> 4 -> log2(5)/log2(8)
    assert math.isclose(t[2, 0].item(), -math.log2(9) / 3, rel_tol=1e-6)
    assert math.isclose(t[13, 1].item(), math.log2(5) / 3, rel_tol=1e-6)
    assert torch.isfinite(log_spaced_relative_coords((1, 1))).all()


def test_clear_errors():
    m = MultiViewWindowAttention(8, 2, window_size=4)
    with pytest.raises(ValueError, match="multi_view_window_attention: expected 2 views"):
        m(torch.randn(1, 4, 4, 8), torch.randn(1, 4, 4, 8), torch.randn(1, 4, 4, 8))
    with pytest.raises(ValueError, match="same shape"):
        m(torch.randn(1, 4, 4, 8), torch.randn(1, 4, 5, 8))
    with pytest.raises(ValueError, match="8 channels"):
        m(torch.randn(1, 2, 4, 4, 6))
    with pytest.raises(ValueError, match="5-D stack of views"):
        m(torch.randn(1, 4, 4, 8))
    with pytest.raises(ValueError, match="mode"):
        MultiViewWindowAttention(8, 2, mode="sum")
    with pytest.raises(ValueError, match="num_views >= 2"):
        MultiViewWindowAttention(8, 2, num_views=1)
    with pytest.raises(ValueError, match="shift"):
        MultiViewWindowAttention(8, 2, window_size=4, shift=4)
    with pytest.raises(ValueError, match="multi_view_concat_attention"):
        sa.create("multi_view_concat_attention", 8, 3)
