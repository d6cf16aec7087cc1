import pytest
import torch
import torch.nn.functional as F

import spatial_attention as sa
from spatial_attention import capture_attention


def _randomise(m):
    torch.manual_seed(1)
    for p in m.parameters():
        p.data.normal_(0, 0.5)
    return m


def _reference(m, x):
    """Sec. 2 / Fig. 3 group by group, with the weights read off the module."""
    B, C, H, W = x.shape
    G = m.groups
    cg = C // G
    W1 = m.conv1x1.weight[:, :, 0, 0]
    out = torch.empty_like(x)
    for b in range(B):
        for g in range(G):
            xg = x[b, g * cg:(g + 1) * cg]  # (cg, H, W)
            h = torch.sigmoid(W1 @ xg.mean(2) + m.conv1x1.bias[:, None])  # (cg, H)
            w = torch.sigmoid(W1 @ xg.mean(1) + m.conv1x1.bias[:, None])  # (cg, W)
            t = xg * h[:, :, None] * w[:, None, :]
            mu = t.mean((1, 2), keepdim=True)
            var = ((t - mu) ** 2).mean((1, 2), keepdim=True)
            x1 = (t - mu) / torch.sqrt(var + m.gn.eps) * m.gn.weight[:, None, None] \
                + m.gn.bias[:, None, None]
            x2 = F.conv2d(xg[None], m.conv3x3.weight, m.conv3x3.bias, padding=1)[0]
            s1 = torch.softmax(x1.mean((1, 2)), 0)  # (cg,)
            s2 = torch.softmax(x2.mean((1, 2)), 0)
            a = (s1[:, None, None] * x2).sum(0) + (s2[:, None, None] * x1).sum(0)  # (H, W)
            out[b, g * cg:(g + 1) * cg] = xg * torch.sigmoid(a)
    return out


@pytest.mark.parametrize("impl", ["auto", "explicit"])
@pytest.mark.parametrize("C,factor,shape", [
    (64, 32, (2, 9, 5)), (12, 4, (1, 1, 7)), (8, 32, (3, 4, 1)), (6, 2, (1, 1, 1)),
    (16, 1, (2, 3, 3)),
])
def test_matches_equations(impl, C, factor, shape):
    m = _randomise(sa.create("ema", C, factor=factor, attn_impl=impl)).double()
    x = torch.randn(shape[0], C, *shape[1:], dtype=torch.float64)
    torch.testing.assert_close(m(x), _reference(m, x), atol=1e-12, rtol=1e-10)


def test_official_defaults():
    m = sa.create("ema", 64)
    assert m.groups == 32 and m.gn.num_groups == 2 and m.gn.num_channels == 2
    assert m.conv3x3.padding == (1, 1) and m.conv1x1.bias is not None
    assert sorted(k for k, _ in m.named_parameters()) == [
        "conv1x1.bias", "conv1x1.weight", "conv3x3.bias", "conv3x3.weight", "gn.bias",
        "gn.weight"]


def test_groups_clamped_below_factor():
    m = sa.create("ema", 8)
    assert m.groups == 8 and m.gn.num_channels == 1


def test_gradients_agree():
    x = torch.randn(2, 16, 5, 6, dtype=torch.float64)
    grads = []
    for impl in ("auto", "explicit"):
        m = _randomise(sa.create("ema", 16, factor=4, attn_impl=impl)).double()
        xi = x.clone().requires_grad_()
        m(xi).square().sum().backward()
        grads.append([xi.grad] + [p.grad for p in m.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_capture_group_gates():
    m = sa.create("ema", 16, factor=4)
    x = torch.randn(2, 16, 5, 3)
    with capture_attention(m) as maps:
        y = m(x)
    assert maps[""].shape == (2, 4, 5, 3)
    torch.testing.assert_close(y, x * maps[""].repeat_interleave(4, 1))


def test_clear_errors():
    with pytest.raises(ValueError, match="ema.*divisible by factor 32"):
        sa.create("ema", 48)
    with pytest.raises(ValueError, match="ema.*positive"):
        sa.create("ema", 16, factor=0)
    with pytest.raises(ValueError, match=r"ema.*64 channels"):
        sa.create("ema", 64)(torch.randn(2, 32, 5, 5))
