"""generalized_attention (Zhu et al. 2019) against an independent per-pair computation."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import spatial_attention as sa
from spatial_attention import capture_attention, explicit_path

TYPES = ["".join(b) for b in itertools.product("01", repeat=4) if "1" in b]


def _build(attention_type="1111", channels=8, heads=2, **kw):
    torch.manual_seed(0)
    m = sa.create("generalized_attention", channels, num_heads=heads,
                  attention_type=attention_type, **kw).double()
    with torch.no_grad():
        m.gamma.fill_(0.7)
    return m


def _reference_terms(m, x):
    """Each term as a (B, heads, Nq, Nk) energy, from the equations pair by pair.

    Every (query, key) pair gets its own offset embedding: no separability, no one-hot
    keys, nothing shared with the module's code paths.
    """
    e1, e2, e3, e4 = (c == "1" for c in m.attention_type)
    z, d = m.num_heads, m.qk_embed_dim
    qs, ks = m.q_stride, m.kv_stride
    xq, xk = x[:, :, ::qs, ::qs], x[:, :, ::ks, ::ks]
    hq, wq = xq.shape[-2:]
    hk, wk = xk.shape[-2:]
    B = x.shape[0]
    qpos = [(i * qs, j * qs) for i in range(hq) for j in range(wq)]
    kpos = [(i * ks, j * ks) for i in range(hk) for j in range(wk)]

    def heads(conv, t):  # (B, C, h, w) -> (B, z, N, d) by explicit weight matmul
        w = conv.weight[:, :, 0, 0]  # (z*d, C)
        flat = torch.einsum("oc,bcn->bon", w, t.flatten(2))
        return flat.reshape(B, z, d, -1).transpose(-2, -1)

    def embed(delta):
        D = m.position_embedding_dim
        f = torch.arange(D // 4, dtype=x.dtype)
        wave = 1000.0 ** (4.0 * f / D)
        return torch.cat([torch.sin(delta / wave), torch.cos(delta / wave)])

    zeros = torch.zeros(B, z, len(qpos), len(kpos), dtype=x.dtype)
    terms = [zeros.clone() for _ in range(4)]
    q = heads(m.query_conv, xq) if (e1 or e2) else None
    k = heads(m.key_conv, xk) if (e1 or e3) else None
    if e1:
        terms[0] = q @ k.transpose(-2, -1)
    if e3:
        u = m.appr_bias.reshape(z, d)
        terms[2] = torch.einsum("zd,bzkd->bzk", u, k)[:, :, None, :].expand_as(zeros).clone()
    if e2 or e4:
        wx, wy = m.appr_geom_fc_x.weight, m.appr_geom_fc_y.weight  # (z*d, D/2)
        for a, (qy, qx) in enumerate(qpos):
            for b, (ky, kx) in enumerate(kpos):
                mag = m.position_magnitude
                ex = embed(torch.tensor((qx - kx) * mag, dtype=x.dtype))
                ey = embed(torch.tensor((qy - ky) * mag, dtype=x.dtype))
                r = ((wx @ ex + wy @ ey) / math.sqrt(2)).reshape(z, d)  # (z, d)
                if e2:
                    terms[1][:, :, a, b] = (q[:, :, a, :] * r).sum(-1)
                if e4:
                    terms[3][:, :, a, b] = (m.geom_bias.reshape(z, d) * r).sum(-1)
    return terms, (hq, wq, hk, wk)


def _reference(m, x):
    terms, (hq, wq, hk, wk) = _reference_terms(m, x)
    energy = sum(terms)
    if m.spatial_range >= 0:  # mmcv's table, element by element
        r, s = m.spatial_range, m.kv_stride
        allowed = torch.zeros(hq, wq, hk, wk, dtype=torch.bool)
        for iy, ix, jy, jx in itertools.product(range(hq), range(wq), range(hk), range(wk)):
            allowed[iy, ix, jy, jx] = (max((iy - r) // s, 0) <= jy < (iy + r + 1) // s + 1
                                       and max((ix - r) // s, 0) <= jx < (ix + r + 1) // s + 1)
        energy = energy.masked_fill(~allowed.reshape(hq * wq, hk * wk), float("-inf"))
    weights = energy.softmax(-1)
    xk = x[:, :, ::m.kv_stride, ::m.kv_stride]
    v = m.value_conv(xk).flatten(2)  # (B, z*dv, Nk)
    B, z = x.shape[0], m.num_heads
    v = v.reshape(B, z, m.v_dim, -1).transpose(-2, -1)
    out = (weights @ v).transpose(-2, -1).reshape(B, z * m.v_dim, hq, wq)
    out = m.proj_conv(out)
    if m.q_stride > 1:
        out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return m.gamma * out + x, terms, weights


@pytest.mark.parametrize("attention_type", TYPES)
def test_every_attention_type_matches_the_per_pair_reference(attention_type):
    m = _build(attention_type)
    x = torch.randn(2, 8, 5, 4, dtype=torch.float64)
    expected, terms, weights = _reference(m, x)
    torch.testing.assert_close(m(x), expected)
    with capture_attention(m) as maps:
        out = m(x)
    torch.testing.assert_close(out, expected)
    recorded_terms, recorded_weights = maps.calls("")
    assert recorded_terms.shape == (2, 2, 4, 20, 6)
    for i in range(4):  # each term separately; switched-off terms are zero
        torch.testing.assert_close(recorded_terms[:, :, i], terms[i])
        if attention_type[i] == "0":
            assert not recorded_terms[:, :, i].any()
        else:
            assert recorded_terms[:, :, i].abs().sum() > 0
    torch.testing.assert_close(recorded_weights, weights)


@pytest.mark.parametrize("q_stride,kv_stride,spatial_range", [
    (1, 1, -1), (2, 1, -1), (1, 3, -1), (2, 2, 0), (1, 2, 1), (3, 2, 2), (2, 1, 0),
])
@pytest.mark.parametrize("attention_type", ["1111", "0110", "0011"])
def test_strides_local_range_and_odd_sizes(q_stride, kv_stride, spatial_range, attention_type):
    m = _build(attention_type, q_stride=q_stride, kv_stride=kv_stride,
               spatial_range=spatial_range, position_magnitude=2)
    for size in [(7, 5), (1, 1), (2, 9)]:
        x = torch.randn(1, 8, *size, dtype=torch.float64)
        expected, _, _ = _reference(m, x)
        torch.testing.assert_close(m(x), expected)
        with explicit_path(m):
            torch.testing.assert_close(m(x), expected)


def test_local_range_limits_the_keys_each_query_sees():
    m = _build("1000", kv_stride=1, spatial_range=1)
    x = torch.randn(1, 8, 6, 6, dtype=torch.float64)
    with capture_attention(m) as maps:
        m(x)
    weights = maps[""].reshape(1, 2, 6, 6, 6, 6)
    # query (3, 3) sees keys (2..5, 2..5) by mmcv's rule, max((3-1)//1, 0) <= j <
    # (3+1+1)//1 + 1: one key more after the query than before it
    seen = weights[0, :, 3, 3] > 0
    assert seen[:, 2:6, 2:6].all() and seen.sum() == 2 * 16


@pytest.mark.parametrize("attention_type,kw", [
    ("1111", dict(q_stride=2, kv_stride=1, spatial_range=1)),
    ("0101", dict(kv_stride=2)),
    ("0010", dict(spatial_range=0)),
    ("0010", {}),
])
def test_gradcheck_float64_with_strides(attention_type, kw):
    m = _build(attention_type, channels=4, heads=2, position_embedding_dim=4, **kw)
    x = torch.randn(1, 4, 3, 4, dtype=torch.float64, requires_grad=True)
    for fused in (True, False):
        m.attn_impl = None if fused else "explicit"
        assert torch.autograd.gradcheck(m, (x,), fast_mode=True)


@pytest.mark.parametrize("attention_type,kw,batch", [
    ("1111", {}, 3), ("1001", dict(spatial_range=1), 3), ("0110", {}, 3), ("0011", {}, 3),
    ("0001", {}, 3), ("0001", {}, 1), ("0101", dict(spatial_range=0), 1),
])
def test_fast_path_in_cache_tiles_matches_the_explicit_gradients(attention_type, kw, batch,
                                                                 monkeypatch):
    """With the kept probabilities run tile by tile (forced here by a tiny tile; at batch
    1 the two heads' blocks stay one tile), the fast path's output and the gradients of
    the input and every parameter equal the explicit path's (one-hot key columns carry
    no gradient, E2/E4 get theirs through the query's position columns)."""
    from spatial_attention.functional import scoring
    monkeypatch.setattr(scoring, "TILE_BYTES", 20 * 20 * 8)  # one 20 x 20 block per tile
    m = _build(attention_type, kv_stride=1, **kw)
    with torch.no_grad():
        m.gamma.fill_(0.5)
    x = torch.randn(batch, 8, 4, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(batch, 8, 4, 5, dtype=torch.float64)

    def grads():
        out = m(x)
        return [out, *torch.autograd.grad((out * weight).sum(), [x, *m.parameters()])]

    fast = grads()
    with explicit_path(m):
        explicit = grads()
    for a, b in zip(fast, explicit, strict=True):
        torch.testing.assert_close(a, b)


def test_gamma_starts_at_zero_so_the_module_starts_as_identity():
    m = sa.create("generalized_attention", 16, num_heads=4)
    x = torch.randn(2, 16, 5, 6)
    assert m.gamma.item() == 0.0
    torch.testing.assert_close(m(x), x)


def test_heads_need_not_divide_channels_as_in_mmcv():
    m = sa.create("generalized_attention", 20, num_heads=3)  # head width 6, 18 channels
    assert m.query_conv.weight.shape == (18, 20, 1, 1)
    assert m.proj_conv.weight.shape == (20, 18, 1, 1)
    assert m.appr_geom_fc_x.weight.shape == (18, 10)
    x = torch.randn(1, 20, 4, 4)
    with torch.no_grad():
        m.gamma.fill_(1.0)
    with explicit_path(m):
        explicit = m(x)
    torch.testing.assert_close(m(x), explicit, atol=1e-5, rtol=1e-5)


MMCV_KEYS = {
    "1111": {"query_conv.weight", "key_conv.weight", "value_conv.weight",
             "appr_geom_fc_x.weight", "appr_geom_fc_y.weight", "appr_bias", "geom_bias",
             "proj_conv.weight", "proj_conv.bias", "gamma"},
    "1000": {"query_conv.weight", "key_conv.weight", "value_conv.weight",
             "proj_conv.weight", "proj_conv.bias", "gamma"},
    "0010": {"key_conv.weight", "value_conv.weight", "appr_bias", "proj_conv.weight",
             "proj_conv.bias", "gamma"},
    "0001": {"value_conv.weight", "appr_geom_fc_x.weight", "appr_geom_fc_y.weight",
             "geom_bias", "proj_conv.weight", "proj_conv.bias", "gamma"},
    "0100": {"query_conv.weight", "value_conv.weight", "appr_geom_fc_x.weight",
             "appr_geom_fc_y.weight", "proj_conv.weight", "proj_conv.bias", "gamma"},
}


@pytest.mark.parametrize("attention_type", sorted(MMCV_KEYS))
def test_state_dict_keys_are_mmcv_s(attention_type):
    m = sa.create("generalized_attention", 256, attention_type=attention_type)  # 9 heads
    state = m.state_dict()
    assert set(state) == MMCV_KEYS[attention_type]
    for key in ("query_conv.weight", "key_conv.weight"):
        if key in state:
            assert state[key].shape == (252, 256, 1, 1)  # 256 // 9 * 9 as mmcv
    if "appr_geom_fc_x.weight" in state:
        assert state["appr_geom_fc_x.weight"].shape == (252, 128)


def test_mmcv_state_dict_with_its_local_table_loads_and_wrong_keys_are_named():
    src = _build("1111", spatial_range=2)
    state = {k: v.clone() for k, v in src.state_dict().items()}
    state["local_constraint_map"] = torch.ones(8, 8, 4, 4, dtype=torch.uint8)
    dst = sa.create("generalized_attention", 8, num_heads=2, spatial_range=2).double()
    dst.load_state_dict(state)  # strict: the mmcv table is dropped, the rest must match
    x = torch.randn(1, 8, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(dst(x), src(x))
    glob = sa.create("generalized_attention", 8, num_heads=2).double()
    with pytest.raises(RuntimeError, match="local_constraint_map"):
        glob.load_state_dict(state)
    del state["geom_bias"]
    with pytest.raises(RuntimeError, match="geom_bias"):
        dst.load_state_dict(state)


@pytest.mark.parametrize("bad", ["0000", "111", "11111", "11a1", "1 11", 1111, None, ""])
def test_invalid_attention_type_is_a_clear_value_error(bad):
    with pytest.raises(ValueError, match="generalized_attention: attention_type"):
        sa.create("generalized_attention", 16, num_heads=4, attention_type=bad)


def test_invalid_channels_and_hyper_parameters_are_clear_value_errors():
    with pytest.raises(ValueError, match="generalized_attention: in_channels 4 gives no"):
        sa.create("generalized_attention", 4, num_heads=8)
    with pytest.raises(ValueError, match="generalized_attention: in_channels must be"):
        sa.create("generalized_attention", 0, num_heads=1)
    with pytest.raises(ValueError, match="multiple of 4"):
        sa.create("generalized_attention", 18, num_heads=3)  # position width 18
    sa.create("generalized_attention", 18, num_heads=3, attention_type="1010")  # no positions
    with pytest.raises(ValueError, match="spatial_range"):
        sa.create("generalized_attention", 16, num_heads=4, spatial_range=-2)
    with pytest.raises(ValueError, match="kv_stride"):
        sa.create("generalized_attention", 16, num_heads=4, kv_stride=0)
    m = sa.create("generalized_attention", 16, num_heads=4)
    with pytest.raises(ValueError, match=r"generalized_attention: expected 16 channels"):
        m(torch.randn(1, 12, 4, 4))
    with pytest.raises(ValueError, match="generalized_attention: expected a 4-D"):
        m(torch.randn(16, 4, 4))


def test_spatial_map_of_the_recorded_weights():
    m = _build("1111", kv_stride=2)
    x = torch.randn(2, 8, 7, 5, dtype=torch.float64)
    with capture_attention(m) as maps:
        m(x)
    heat = type(m).spatial_map(maps[""], (7, 5))
    assert heat.shape == (2, 7, 5) and torch.isfinite(heat).all()
    # the attention each key receives, averaged over queries, sums to 1 over the key grid
    torch.testing.assert_close(heat[:, ::2, ::2].sum((1, 2)).double(),
                               torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("attention_type", ["1111", "1100", "1001", "0011"])
def test_memory_efficient_path_matches_the_reference(attention_type):
    for kw in (dict(kv_stride=2), dict(q_stride=2, kv_stride=1, spatial_range=1)):
        m = _build(attention_type, attn_impl="sdpa", **kw)
        x = torch.randn(2, 8, 5, 6, dtype=torch.float64)
        expected, _, _ = _reference(m, x)
        torch.testing.assert_close(m(x), expected)
    x = torch.randn(1, 8, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,), fast_mode=True)


def test_resnet_ga_puts_attention_after_the_first_conv_of_the_last_two_stages():
    from spatial_attention.layers.generalized import GeneralizedAttention
    from spatial_attention.models import create_model

    net = create_model("resnet18_cifar_ga", width=8, layers=(1, 1, 1, 1), num_heads=2,
                       attention_type="0101")
    names = [n for n, m in net.named_modules() if isinstance(m, GeneralizedAttention)]
    assert names == ["layer3.0.plugin", "layer4.0.plugin"]
    assert net.layer3[0].plugin.gamma.item() == 0.0  # mmcv's init kept inside the network
    x = torch.randn(2, 3, 32, 32)
    with capture_attention(net) as maps:
        out = net(x)
    assert out.shape == (2, 10) and set(maps) == set(names)
    plain = create_model("resnet18_cifar_ga", width=8, layers=(1, 1, 1, 1),
                         stages=[False] * 4)
    assert not any(isinstance(m, GeneralizedAttention) for m in plain.modules())
