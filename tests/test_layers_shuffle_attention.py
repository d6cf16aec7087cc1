"""Shuffle attention: the module against Eq. 1-3 written out group by group, its group
rules, batch 1, the two recorded gates and the official parameter names."""

import pytest
import torch

import spatial_attention as sa
from spatial_attention import capture_attention

pytestmark = pytest.mark.usefixtures("one_thread")

NAME = "shuffle_attention"


def paper_sa(x, groups, cw, cb, sw, sb, gamma, beta, eps=1e-5):
    """Eq. 1-3 one group and one channel at a time, then the 2-group channel shuffle:
    output channel 2 m + a is the regrouped channel a C/2 + m."""
    B, C, H, W = x.shape
    k = C // (2 * groups)
    pre = torch.empty_like(x)
    chan_gates = torch.empty(B, groups, k, dtype=x.dtype)
    spat_gates = torch.empty(B, groups, k, H, W, dtype=x.dtype)
    for b in range(B):
        for g in range(groups):
            base = g * 2 * k
            for j in range(k):
                xc = x[b, base + j]  # channel half, channel j
                s = xc.sum() / (H * W)  # Eq. 1
                gate = 1 / (1 + torch.exp(-(cw[j] * s + cb[j])))  # Eq. 2
                chan_gates[b, g, j] = gate
                pre[b, base + j] = gate * xc
                xs = x[b, base + k + j]  # spatial half, channel j: GN over its positions
                mu = xs.sum() / (H * W)
                var = ((xs - mu) ** 2).sum() / (H * W)
                gn = gamma[j] * (xs - mu) / torch.sqrt(var + eps) + beta[j]
                gate_s = 1 / (1 + torch.exp(-(sw[j] * gn + sb[j])))  # Eq. 3
                spat_gates[b, g, j] = gate_s
                pre[b, base + k + j] = gate_s * xs
    out = torch.empty_like(x)
    for m in range(C // 2):
        for a in range(2):
            out[:, 2 * m + a] = pre[:, a * (C // 2) + m]
    return out, chan_gates, spat_gates


def _randomised(C, groups, impl, dtype=torch.float64):
    torch.manual_seed(1)
    m = sa.create(NAME, C, groups=groups, attn_impl=impl).to(dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    return m


def _paper(m, x):
    return paper_sa(x, m.groups, m.cweight.flatten(), m.cbias.flatten(), m.sweight.flatten(),
                    m.sbias.flatten(), m.gn.weight, m.gn.bias)


@pytest.mark.parametrize("impl", ["auto", "explicit"])
@pytest.mark.parametrize("shape,groups", [((2, 16, 5, 7), 4), ((1, 12, 1, 6), 2),
                                          ((2, 8, 9, 1), 4), ((1, 12, 3, 3), 3),
                                          ((1, 24, 4, 2), 2), ((2, 4, 1, 1), 2)])
def test_matches_paper_float64(impl, shape, groups):
    m = _randomised(shape[1], groups, impl)
    x = torch.randn(shape, dtype=torch.float64)
    ref, _, _ = _paper(m, x)
    torch.testing.assert_close(m(x), ref, rtol=1e-10, atol=1e-10)


def test_official_defaults_and_names():
    m = sa.create(NAME, 256)
    assert m.groups == 64
    assert set(m.state_dict()) == {"cweight", "cbias", "sweight", "sbias", "gn.weight",
                                   "gn.bias"}
    for p in (m.cweight, m.cbias, m.sweight, m.sbias):
        assert p.shape == (1, 2, 1, 1)
    assert (m.cweight == 0).all() and (m.sweight == 0).all()
    assert (m.cbias == 1).all() and (m.sbias == 1).all()
    assert m.gn.num_groups == m.gn.num_channels == 2 and m.gn.eps == 1e-5
    # the official start: both gates are sigmoid(1), so the output is the shuffled input
    x = torch.randn(2, 256, 5, 4)
    shuffled = x.view(2, 2, 128, 5, 4).transpose(1, 2).reshape(2, 256, 5, 4)
    torch.testing.assert_close(m(x), shuffled * torch.sigmoid(torch.tensor(1.0)))


def test_group_rules():
    assert sa.create(NAME, 16).groups == 8  # clamped to channels // 2
    assert sa.create(NAME, 96).groups == 48
    assert sa.create(NAME, 384).groups == 64
    with pytest.raises(ValueError, match=r"shuffle_attention: channels 192 must be divisible "
                                         r"by 2 \* groups = 128"):
        sa.create(NAME, 192)
    with pytest.raises(ValueError, match=r"channels 36 must be divisible by 2 \* groups = 8"):
        sa.create(NAME, 36, groups=4)
    with pytest.raises(ValueError, match="shuffle_attention: channels 7 must be divisible"):
        sa.create(NAME, 7)
    with pytest.raises(ValueError, match="shuffle_attention: channels must be at least 2"):
        sa.create(NAME, 1)
    with pytest.raises(ValueError, match="shuffle_attention: groups must be positive"):
        sa.create(NAME, 8, groups=0)
    with pytest.raises(ValueError, match="shuffle_attention.*16 channels"):
        sa.create(NAME, 16)(torch.randn(1, 8, 5, 5))


@pytest.mark.parametrize("impl", ["auto", "explicit"])
def test_batch_one_and_single_position(impl):
    """Batch 1 everywhere; one position with one channel a half and one group, where
    ``F.group_norm`` would refuse (a single value): the spatial gate is sigmoid(W2 beta + b2)."""
    m = _randomised(2, 1, impl)
    x = torch.randn(1, 2, 1, 1, dtype=torch.float64, requires_grad=True)
    y = m(x)
    gc = torch.sigmoid(m.cweight.flatten() * x[0, 0, 0, 0] + m.cbias.flatten())
    gs = torch.sigmoid(m.sweight.flatten() * m.gn.bias + m.sbias.flatten())
    torch.testing.assert_close(y.flatten(), torch.cat([gc * x[0, 0, 0], gs * x[0, 1, 0]]).flatten())
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    m = _randomised(16, 4, impl)
    x = torch.randn(1, 16, 1, 7, dtype=torch.float64)
    torch.testing.assert_close(m(x), _paper(m, x)[0], rtol=1e-10, atol=1e-10)


def test_capture_both_gates():
    m = _randomised(16, 4, "auto", torch.float32)
    x = torch.randn(2, 16, 5, 3)
    with capture_attention(m) as maps:
        y = m(x)
    chan, spat = maps.calls("")
    assert chan.shape == (2, 8, 1, 1) and spat.shape == (2, 8, 5, 3)
    assert maps[""] is spat
    ref, ref_c, ref_s = _paper(m.double(), x.double())
    torch.testing.assert_close(chan.double().view(2, 4, 2), ref_c, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(spat.double().view(2, 4, 2, 5, 3), ref_s, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    assert sa.info(NAME).cls.spatial_map(spat, (5, 3)).shape == (2, 5, 3)


@pytest.mark.parametrize("impl", ["auto", "explicit"])
def test_gradcheck_odd_sizes(impl):
    for C, G, shape in [(8, 2, (1, 8, 3, 1)), (12, 3, (2, 12, 1, 3)), (8, 4, (1, 8, 2, 3))]:
        m = _randomised(C, G, impl)
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(m, (x,))


def test_no_grad_path_equals_grad_path():
    m = _randomised(32, 4, "auto", torch.float32)
    x = torch.randn(2, 32, 6, 5)
    with torch.no_grad():
        a = m(x)
    b = m(x.clone().requires_grad_())
    torch.testing.assert_close(a, b.detach())
    strided = torch.stack([x, x], -1)[..., 0]
    torch.testing.assert_close(m(strided), b)


def test_official_state_dict_loads_with_wrappers():
    src = _randomised(16, 2, "auto", torch.float32)
    state = {"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}
    dst = sa.create(NAME, 16, groups=2)
    dst.load_official_state_dict(state)
    x = torch.randn(1, 16, 4, 4)
    torch.testing.assert_close(dst(x), src(x))
