"""Neighbourhood attention (NAT / DiNAT) on (B, H, W, C), against NATTEN's semantics."""

import pytest
import torch
import torch.nn.functional as F

import spatial_attention as sa
from spatial_attention import capture_attention
from spatial_attention.functional.neighborhood import (
    neighborhood_bias_index,
    neighborhood_index,
    neighborhood_tiles,
)


def _window(q: int, length: int, k: int, d: int) -> list[int]:
    """The k positions of q's dilation group whose run contains q and is the most centred
    on it: NATTEN's rule, written as a choice among the valid runs of the group."""
    group = list(range(q % d, length, d))
    local = group.index(q)
    starts = range(len(group) - k + 1)
    best = min(starts, key=lambda s: abs(s + k // 2 - local))
    return group[best:best + k]


def _reference(m, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NAT Eq. 1-3 as one masked N x N softmax over the (padded) map: keys outside a
    query's neighbourhood masked, the bias read at the offset in group steps.
    Returns the output and the (B, heads, N, N) weights of the real queries."""
    B, H, W, C = x.shape
    (kh, kw), (dh, dw) = m.kernel_size, m.dilation
    Hp, Wp = max(H, kh * dh), max(W, kw * dw)  # the official module's zero padding
    xp = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))
    h, d = m.num_heads, m.head_dim
    qkv = F.linear(xp, m.qkv.weight, m.qkv.bias).view(B, Hp * Wp, 3, h, d)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, heads, Np, d)
    keep = torch.zeros(Hp * Wp, Hp * Wp, dtype=torch.bool)
    bias = torch.zeros(h, Hp * Wp, Hp * Wp, dtype=x.dtype)
    for i in range(Hp):
        rows = _window(i, Hp, kh, dh)
        for j in range(Wp):
            cols = _window(j, Wp, kw, dw)
            for r in rows:
                for c in cols:
                    keep[i * Wp + j, r * Wp + c] = True
                    if m.rpb is not None:
                        bias[:, i * Wp + j, r * Wp + c] = m.rpb[:, (r - i) // dh + kh - 1,
                                                               (c - j) // dw + kw - 1]
    scores = (q * m.scale) @ k.transpose(-2, -1) + bias
    weights = scores.masked_fill(~keep, float("-inf")).softmax(-1)
    out = (weights @ v).transpose(1, 2).reshape(B, Hp, Wp, C)[:, :H, :W]
    real = torch.zeros(Hp, Wp, dtype=torch.bool)
    real[:H, :W] = True
    return F.linear(out, m.proj.weight, m.proj.bias), weights[:, :, real.view(-1)]


def _module(dim=16, heads=2, **kw):
    torch.manual_seed(0)
    m = sa.create("neighborhood_attention", dim, heads, **kw).double()
    if m.rpb is not None:
        with torch.no_grad():
            m.rpb.normal_(0, 0.5)  # visible bias
    return m


CASES = [  # (H, W, kernel, dilation): interior and borders, odd sizes, dilation groups of
    (9, 11, 3, 1),  # unequal lengths, maps shorter than k * d (padded), 1 x N
    (13, 8, 5, 1),
    (10, 9, 3, 2),
    (17, 14, 3, 3),
    (12, 15, 3, (2, 3)),
    (5, 3, 3, 1),
    (4, 9, 3, 2),
    (1, 13, 5, 1),
    (2, 2, 7, 1),
]


@pytest.mark.parametrize("H,W,k,d", CASES)
@pytest.mark.parametrize("impl", ["auto", "explicit", "sdpa"])
def test_matches_masked_reference_float64(H, W, k, d, impl):
    m = _module(kernel_size=k, dilation=d, attn_impl=impl)
    x = torch.randn(2, H, W, 16, dtype=torch.float64)
    ref, _ = _reference(m, x)
    torch.testing.assert_close(m(x), ref, rtol=1e-10, atol=1e-10)  # training-style path
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref, rtol=1e-10, atol=1e-10)  # per-group calls


@pytest.mark.parametrize("tile", [(2, 3), (4, 4), (8, 8)])
def test_any_tile_size_and_no_bias(tile):
    m = _module(kernel_size=5, dilation=(1, 2), rel_pos_bias=False)
    m.tile = tile
    x = torch.randn(1, 11, 13, 16, dtype=torch.float64)
    torch.testing.assert_close(m(x), _reference(m, x)[0], rtol=1e-10, atol=1e-10)


def test_gradients_equal_across_impls_float64():
    torch.manual_seed(1)
    x = torch.randn(2, 9, 10, 16, dtype=torch.float64)
    g = torch.randn(2, 9, 10, 16, dtype=torch.float64)
    grads = {}
    for impl in ("auto", "explicit", "sdpa"):
        m = _module(kernel_size=3, dilation=2, attn_impl=impl)
        xi = x.clone().requires_grad_()
        m(xi).backward(g)
        grads[impl] = [xi.grad] + [p.grad for p in m.parameters()]
    for impl in ("explicit", "sdpa"):
        for a, b in zip(grads["auto"], grads[impl], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_gradcheck_with_border_and_padding():
    m = _module(8, 2, kernel_size=3, dilation=(1, 2))
    x = torch.randn(1, 4, 5, 8, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(m, (x,))


def test_index_helpers_follow_the_border_rule():
    for H, W, k, d in [(7, 9, 7, 1), (15, 14, 3, 2), (16, 21, 5, 3)]:
        idx = neighborhood_index(H, W, k, d)
        bias = neighborhood_bias_index(H, W, k, d)
        for i in range(H):
            for j in range(W):
                rows, cols = _window(i, H, k, d), _window(j, W, k, d)
                want = torch.tensor([[r * W + c for c in cols] for r in rows])
                assert torch.equal(idx[i, j], want)
                want_b = torch.tensor([[((r - i) // d + k - 1) * (2 * k - 1)
                                        + (c - j) // d + k - 1 for c in cols] for r in rows])
                assert torch.equal(bias[i, j], want_b)


@pytest.mark.parametrize("H,W,k,d,t", [(15, 14, 3, 2, 4), (9, 23, 5, 1, 8), (12, 12, 3, 3, 2)])
def test_tiles_cover_each_neighbourhood_once(H, W, k, d, t):
    tiles = neighborhood_tiles(H, W, k, d, t)
    idx = neighborhood_index(H, W, k, d).view(H * W, -1)
    flat = tiles.query.reshape(-1)
    assert torch.equal(flat[tiles.output], torch.arange(H * W))  # every token one owner
    assert torch.equal(tiles.owner[tiles.output], torch.arange(H * W))
    pattern = torch.cat([torch.full((b - a,), g) for g, (a, b) in enumerate(tiles.groups)])
    for n in range(tiles.query.shape[0]):
        for s in range(tiles.query.shape[1]):
            kept = tiles.key[n][tiles.keep[pattern[n], s]]
            assert torch.equal(kept.sort().values, idx[tiles.query[n, s]].sort().values)


def test_capture_records_weights_and_where_they_sit():
    m = _module(kernel_size=3, dilation=2)
    x = torch.randn(2, 9, 4, 16, dtype=torch.float64)  # W = 4 < k * d = 6: padded
    with capture_attention(m) as maps:
        out = m(x)
    rec = maps[""]
    assert rec.shape == (2, 2, 9, 4, 3, 3)
    torch.testing.assert_close(rec.sum((-2, -1)), torch.ones(2, 2, 9, 4, dtype=torch.float64))
    pos = m.key_positions(9, 4)
    assert pos.shape == (9, 4, 3, 3, 2)
    _, dense = _reference(m, x)  # (B, heads, N, Np) over the padded 9 x 6 map
    flat = (pos[..., 0] * 6 + pos[..., 1]).view(9 * 4, -1)
    torch.testing.assert_close(rec.reshape(2, 2, 36, 9),
                               torch.gather(dense, 3, flat.expand(2, 2, -1, -1)))
    torch.testing.assert_close(dense.sum(-1), torch.ones(2, 2, 36, dtype=torch.float64))
    torch.testing.assert_close(out, m(x))
    smap = type(m).spatial_map(rec, (9, 4), dilation=2)
    assert smap.shape == (2, 9, 4) and torch.isfinite(smap).all()


def test_flex_path_mask_and_bias_on_cpu_eager():
    pytest.importorskip("torch.nn.attention.flex_attention")
    m = _module(16, 2, kernel_size=3, dilation=(2, 1)).float().eval()
    x = torch.randn(1, 9, 7, 16)
    with torch.no_grad():
        qkv = m.qkv(x).view(1, 63, 3, 2, 8).permute(2, 0, 3, 1, 4).contiguous()
        out = m._flex(qkv, 9, 7)  # (B, heads, N, d) before proj
        y = m.proj(out.transpose(1, 2).reshape(1, 9, 7, 16))
        torch.testing.assert_close(y, _reference(m.double(), x.double())[0].float(),
                                   rtol=1e-4, atol=1e-4)


def test_cpu_never_selects_flex(monkeypatch):
    m = _module(attn_impl="flex").eval()
    monkeypatch.setattr(m, "_flex", lambda *a: (_ for _ in ()).throw(AssertionError("flex")))
    x = torch.randn(1, 8, 8, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(m(x), _reference(m, x)[0])


def test_official_names_shapes_and_init():
    torch.manual_seed(0)
    m = sa.create("neighborhood_attention", 64, 4)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {"qkv.weight": (192, 64), "qkv.bias": (192,), "rpb": (4, 13, 13),
                      "proj.weight": (64, 64), "proj.bias": (64,)}
    assert m.kernel_size == (7, 7) and m.dilation == (1, 1) and m.scale == 16**-0.5
    assert 0.015 < m.rpb.std().item() < 0.025  # trunc-normal(0.02)
    bare = sa.create("neighborhood_attention", 64, 4, rel_pos_bias=False, qkv_bias=False,
                     qk_scale=0.5)
    assert set(bare.state_dict()) == {"qkv.weight", "proj.weight", "proj.bias"}
    assert bare.scale == 0.5


def test_load_official_state_dict_from_a_nat_checkpoint():
    """NAT's checkpoints hold levels.{i}.blocks.{j}.attn.{qkv,rpb,proj}; a model saved
    through DataParallel adds module., training scripts wrap it in a dict."""
    torch.manual_seed(0)

    def attn(prefix):
        return {prefix + "qkv.weight": torch.randn(384, 128),
                prefix + "qkv.bias": torch.randn(384), prefix + "rpb": torch.randn(4, 13, 13),
                prefix + "proj.weight": torch.randn(128, 128),
                prefix + "proj.bias": torch.randn(128)}

    prefix = "levels.1.blocks.0.attn."
    one = {"module." + k: v for k, v in attn(prefix).items()}
    m = sa.create("neighborhood_attention", 128, 4)
    m.load_official_state_dict({"model": one})
    for key, value in m.state_dict().items():
        torch.testing.assert_close(value, one["module." + prefix + key])
    many = {**attn(prefix), **attn("levels.1.blocks.1.attn."), "norm.weight": torch.ones(3)}
    with pytest.raises(ValueError, match="2 attention modules.*prefix="):
        m.load_official_state_dict(many)
    m.load_official_state_dict(many, prefix="levels.1.blocks.1.attn.")
    torch.testing.assert_close(m.rpb, many["levels.1.blocks.1.attn.rpb"])
    m.load_official_state_dict(attn(""))  # a module's own state dict
    with pytest.raises(RuntimeError, match="rpb"):
        m.load_official_state_dict({k: v for k, v in one.items() if "rpb" not in k})


def test_clear_errors():
    with pytest.raises(ValueError, match="neighborhood_attention: kernel_size"):
        sa.create("neighborhood_attention", 16, 2, kernel_size=4)
    with pytest.raises(ValueError, match="neighborhood_attention: kernel_size"):
        sa.create("neighborhood_attention", 16, 2, kernel_size=1)
    with pytest.raises(ValueError, match="neighborhood_attention: dilation"):
        sa.create("neighborhood_attention", 16, 2, dilation=0)
    with pytest.raises(ValueError, match="neighborhood_attention: qk_scale"):
        sa.create("neighborhood_attention", 16, 2, qk_scale=-1.0)
    with pytest.raises(ValueError, match="neighborhood_attention.*16 channels"):
        sa.create("neighborhood_attention", 16, 2)(torch.randn(1, 5, 5, 8))


@pytest.mark.parametrize("H,W,k,d", [(9, 11, 3, 1), (13, 10, 5, 2), (15, 17, 7, 1),
                                     (15, 14, 7, 2), (11, 7, 5, 1)])
def test_auto_equals_explicit_values_and_gradients_float64(H, W, k, d):
    """The CPU fast path (halo kernel in training, SDPA per tile group in no_grad)
    against the per-query gather, on odd sizes, kernels 3/5/7, dilation 1 and 2."""
    torch.manual_seed(2)
    x = torch.randn(2, H, W, 16, dtype=torch.float64)
    g = torch.randn_like(x)
    ms = {impl: _module(kernel_size=k, dilation=d, attn_impl=impl)
          for impl in ("auto", "explicit")}
    with torch.no_grad():
        torch.testing.assert_close(ms["auto"](x), ms["explicit"](x), rtol=1e-10, atol=1e-10)
    grads = {}
    for impl, m in ms.items():
        xi = x.clone().requires_grad_()
        m(xi).backward(g)
        grads[impl] = [xi.grad] + [p.grad for p in m.parameters()]
    for a, b in zip(grads["auto"], grads["explicit"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_halo_kernel_equals_its_reference_twin():
    from spatial_attention.functional.kernels.halo_attention import HaloAttention, reference

    torch.manual_seed(3)
    nT, B, h, Q, K, d = 5, 2, 3, 4, 9, 8
    rows = torch.randn(40, d, dtype=torch.float64, requires_grad=True)
    index = tuple(torch.randint(0, 40, (nT, B * h * n)) for n in (Q, K, K))
    for mask_shape in [(nT, 1, h, Q, K), (nT, 1, 1, Q, K)]:
        mask = torch.randn(mask_shape, dtype=torch.float64, requires_grad=True)
        got = HaloAttention.apply(rows, mask, *index, (nT, B, h, Q, K), 0.3)
        want = reference(rows, mask, index, (nT, B, h, Q, K), 0.3)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        g = torch.randn_like(got)
        a = torch.autograd.grad(got, (rows, mask), g)
        b = torch.autograd.grad(want, (rows, mask), g)
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)
    torch.autograd.gradcheck(
        lambda r, m: HaloAttention.apply(r, m, *index, (nT, B, h, Q, K), 0.3),
        (rows, mask))
