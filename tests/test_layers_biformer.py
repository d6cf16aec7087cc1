"""Bi-level routing attention against a region-by-region transcription of the paper."""

import math

import pytest
import torch

import spatial_attention as sa
from spatial_attention import capture_attention, explicit_path
from spatial_attention.layers.biformer import BiLevelRoutingAttention, convert_official_bra_keys

NAME = "bi_level_routing_attention"


def by_region(m: BiLevelRoutingAttention, x: torch.Tensor):
    """Sec. 3.2 one image and one region at a time, on the real tokens only: regions of
    ``ceil(H/S) x ceil(W/S)`` tokens, a region's query/key the mean of its real tokens',
    regions without real tokens never routed to, then plain softmax attention per head
    over the real tokens of the routed regions, LCE of the values, ``wo``."""
    B, H, W, C = x.shape
    S, cq, h, n = m.n_win, m.qk_dim, m.num_heads, m.topk
    rh, rw = math.ceil(H / S), math.ceil(W / S)
    W_, b_ = m.qkv.weight, m.qkv.bias
    q, k, v = (x @ W_.T + b_).split([cq, cq, C], dim=-1)
    out = torch.zeros(B, H, W, C, dtype=x.dtype)
    routes, weights = [], []
    for b in range(B):
        members = []  # the real tokens of each region, row-major
        for ry in range(S):
            for rx in range(S):
                members.append([(i, j) for i in range(ry * rh, min(ry * rh + rh, H))
                                for j in range(rx * rw, min(rx * rw + rw, W))])
        q_r = torch.stack([q[b][tuple(zip(*t, strict=True))].mean(0) if t else
                           torch.zeros(cq, dtype=x.dtype) for t in members])
        k_r = torch.stack([k[b][tuple(zip(*t, strict=True))].mean(0) if t else
                           torch.zeros(cq, dtype=x.dtype) for t in members])
        if m.router_emb is not None:
            q_r, k_r = m.router_emb(q_r), m.router_emb(k_r)
        logits = (q_r * m.scale) @ k_r.T
        logits[:, [len(t) == 0 for t in members]] = float("-inf")
        top, idx = logits.topk(n, dim=-1)
        r_weight = top.softmax(-1)
        routes.append(idx)
        weights.append(r_weight)
        for r, tokens in enumerate(members):
            if not tokens:
                continue
            keys, values = [], []
            for j, s in enumerate(idx[r].tolist()):
                rows = tuple(zip(*members[s], strict=True)) if members[s] else None
                if rows is None:
                    continue
                scale = r_weight[r, j] if m.soft_routing else 1.0
                keys.append(k[b][rows] * scale)
                values.append(v[b][rows] * scale)
            K, V = torch.cat(keys), torch.cat(values)
            Q = q[b][tuple(zip(*tokens, strict=True))]
            heads = []
            for i in range(h):
                qs, ks = Q.chunk(h, -1)[i], K.chunk(h, -1)[i]
                a = torch.softmax(qs @ ks.T * m.scale, dim=-1)
                heads.append(a @ V.chunk(h, -1)[i])
            out[b][tuple(zip(*tokens, strict=True))] = torch.cat(heads, -1)
    if m.lepe is not None:
        out = out + m.lepe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    return m.wo(out), torch.stack(routes), torch.stack(weights)


CASES = [
    dict(size=(8, 8), n_win=2, topk=2),
    dict(size=(7, 9), n_win=3, topk=4),  # padded regions, partly real
    dict(size=(1, 10), n_win=4, topk=3),  # 1xN: whole rows of empty regions
    dict(size=(5, 5), n_win=7, topk=9),  # more routed regions than real ones
    dict(size=(6, 4), n_win=2, topk=4, qk_dim=8),  # routes to every region
    dict(size=(6, 6), n_win=3, topk=2, soft_routing=True),
    dict(size=(5, 7), n_win=2, topk=3, soft_routing=True, diff_routing=True,
         param_routing=True),
    dict(size=(4, 6), n_win=2, topk=1, side_dwconv=0, param_attention="qkv"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: str(c))
def test_matches_the_region_by_region_transcription(case):
    case = dict(case)
    size = case.pop("size")
    torch.manual_seed(0)
    m = BiLevelRoutingAttention(16, 2, **case).double().eval()
    x = torch.randn(2, *size, 16, dtype=torch.float64)
    with torch.no_grad():
        want, routes, r_weights = by_region(m, x)
        torch.testing.assert_close(m(x), want)
        with capture_attention(m) as maps:
            torch.testing.assert_close(m(x), want)
    idx, rw, att = maps.calls("")
    real = [i for i, t in enumerate(_region_has_tokens(size, m.n_win)) if t]
    torch.testing.assert_close(idx[:, real], routes[:, real])  # routes of real regions
    torch.testing.assert_close(rw[:, real], r_weights[:, real])
    S2, T = m.n_win**2, math.ceil(size[0] / m.n_win) * math.ceil(size[1] / m.n_win)
    assert att.shape == (2, S2, 2, T, m.topk * T)
    torch.testing.assert_close(att.sum(-1), torch.ones_like(att.sum(-1)))


def _region_has_tokens(size, S):
    rh, rw = math.ceil(size[0] / S), math.ceil(size[1] / S)
    return [ry * rh < size[0] and rx * rw < size[1] for ry in range(S) for rx in range(S)]


@pytest.mark.parametrize("impl", ["auto", "sdpa", "kept_probs"])
def test_every_impl_equals_explicit_values_and_gradients(impl):
    torch.manual_seed(1)
    m = BiLevelRoutingAttention(16, 2, n_win=3, topk=3, soft_routing=True, diff_routing=True,
                                param_routing=True).double()
    x = torch.randn(2, 7, 8, 16, dtype=torch.float64)
    outs = []
    for chosen in (impl, "explicit"):
        m.attn_impl = chosen
        m.zero_grad(set_to_none=True)
        xr = x.clone().requires_grad_()
        y = m(xr)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        outs.append([y, xr.grad] + [p.grad for p in m.parameters()])
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b)
    assert m.router_emb.weight.grad.abs().sum() > 0  # the routing Linear trains


def test_routing_is_detached_unless_differentiable():
    torch.manual_seed(2)
    x = torch.randn(1, 6, 6, 8, dtype=torch.float64)
    m = BiLevelRoutingAttention(8, 1, n_win=3, topk=2, soft_routing=True).double()
    for diff in (False, True):
        m.diff_routing = diff
        q, k = (torch.randn(1, 6, 6, 8, dtype=torch.float64, requires_grad=True)
                for _ in range(2))
        r_weight, _ = m.route(x, q, k, (2, 2), None)
        assert r_weight.requires_grad == diff


def test_half_precision_routes_in_float32_from_the_input():
    """In bfloat16 the region affinities come from W applied to the region means of x in
    float32: the float32 routes, where the bf16 queries' rounding would move some."""
    torch.manual_seed(6)
    m = BiLevelRoutingAttention(32, 2, n_win=4, topk=3).eval()
    x = torch.randn(2, 16, 16, 32)
    with torch.no_grad(), capture_attention(m) as maps:
        m(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            m(x)
    full, low = maps.calls("")[0], maps.calls("")[3]
    assert torch.equal(full, low)


def test_spatial_map_counts_routes():
    m = sa.create(NAME, 16, 2, n_win=2, topk=1)
    x = torch.randn(1, 4, 6, 16)
    with torch.no_grad(), capture_attention(m) as maps:
        m(x)
    idx = maps.calls("")[0]
    grid = BiLevelRoutingAttention.spatial_map(idx, (4, 6))
    assert grid.shape == (1, 4, 6) and grid.sum() == 4 * 6  # each of 4 regions routes once
    with pytest.raises(ValueError, match="routed-index record"):
        BiLevelRoutingAttention.spatial_map(maps[""], (4, 6))


def test_official_keys_load():
    m = BiLevelRoutingAttention(16, 2, n_win=2, topk=2, qk_dim=8, soft_routing=True,
                                diff_routing=True, param_routing=True)
    torch.manual_seed(4)
    official = {  # the official module's names and shapes (QKVLinear, TopkRouting)
        "lepe.weight": torch.randn(16, 1, 5, 5), "lepe.bias": torch.randn(16),
        "router.emb.weight": torch.randn(8, 8), "router.emb.bias": torch.randn(8),
        "qkv.qkv.weight": torch.randn(32, 16), "qkv.qkv.bias": torch.randn(32),
        "wo.weight": torch.randn(16, 16), "wo.bias": torch.randn(16),
    }
    m.load_official_state_dict({"model": {f"module.{k}": v for k, v in official.items()}})
    assert torch.equal(m.qkv.weight, official["qkv.qkv.weight"])
    assert torch.equal(m.router_emb.bias, official["router.emb.bias"])
    assert torch.equal(m.lepe.weight, official["lepe.weight"])
    nested = convert_official_bra_keys({"stages.0.0.attn.qkv.qkv.weight": 1,
                                        "stages.3.0.attn.qkv.weight": 2})
    assert nested == {"stages.0.0.attn.qkv.weight": 1, "stages.3.0.attn.qkv.weight": 2}


def test_default_scale_is_the_official_one():
    assert BiLevelRoutingAttention(64, 2).scale == 64**-0.5  # qk_dim, not the head width
    assert BiLevelRoutingAttention(64, 2, qk_scale=0.1).scale == 0.1


@pytest.mark.parametrize("kwargs,match", [
    (dict(topk=50), "topk 50 exceeds the n_win"),
    (dict(n_win=2, topk=5), "exceeds"),
    (dict(topk=0), "topk must be positive"),
    (dict(qk_dim=10), "qk_dim 10 is not divisible"),
    (dict(param_routing=True), "needs diff_routing"),
    (dict(diff_routing=True), "needs soft_routing"),
    (dict(kv_downsample_mode="ada_avgpool"), "not offered"),
    (dict(side_dwconv=4), "odd kernel"),
    (dict(param_attention="none"), "param_attention"),
])
def test_refusals_name_the_mechanism(kwargs, match):
    with pytest.raises(ValueError, match=f"{NAME}: .*{match}"):
        sa.create(NAME, 16, 4, **kwargs)


def test_input_errors_name_the_mechanism():
    m = sa.create(NAME, 16, 2)
    with pytest.raises(ValueError, match=NAME):
        m(torch.randn(2, 16, 5, 5))
    with pytest.raises(ValueError, match=NAME):
        m(torch.randn(5, 5, 16))


def test_explicit_path_switch_and_odd_batch_one():
    torch.manual_seed(5)
    m = sa.create(NAME, 32, 4, n_win=7, topk=4).eval()
    x = torch.randn(1, 13, 17, 32)
    with torch.no_grad():
        fast = m(x)
        with explicit_path(m):
            torch.testing.assert_close(m(x), fast, atol=1e-5, rtol=1e-5)
