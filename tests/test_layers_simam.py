"""SimAM: the module against the paper's energy written out per neuron, and its edges."""

import pytest
import torch

import spatial_attention as sa
from spatial_attention import capture_attention


def paper_simam(x, lam=1e-4):
    """Eq. 16-17 neuron by neuron: the energy of t against the other neurons of its channel."""
    B, C, H, W = x.shape
    out = torch.empty_like(x)
    for b in range(B):
        for c in range(C):
            plane = x[b, c].flatten()
            mu = plane.sum() / plane.numel()
            var = ((plane - mu) ** 2).sum() / (plane.numel() - 1)  # the official n = M - 1
            for i in range(H):
                for j in range(W):
                    t = x[b, c, i, j]
                    e = 4 * (var + lam) / ((t - mu) ** 2 + 2 * var + 2 * lam)
                    out[b, c, i, j] = t / (1 + torch.exp(-1 / e))
    return out


@pytest.mark.parametrize("impl", ["auto", "explicit"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 2, 1, 6), (2, 2, 9, 1), (1, 1, 2, 2)])
def test_matches_paper_float64(impl, shape):
    x = torch.randn(shape, dtype=torch.float64)
    m = sa.create("simam", shape[1], attn_impl=impl)
    torch.testing.assert_close(m(x), paper_simam(x), rtol=1e-12, atol=1e-12)


def test_e_lambda_is_used():
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    m = sa.create("simam", 2, e_lambda=0.5)
    torch.testing.assert_close(m(x), paper_simam(x, 0.5), rtol=1e-12, atol=1e-12)
    assert sa.create("simam", 2).e_lambda == 1e-4
    assert not list(m.parameters())


@pytest.mark.parametrize("impl", ["auto", "explicit"])
def test_single_neuron_is_finite(impl):
    """The official n = H*W - 1 is 0 here (NaN); ours keeps n >= 1: weight sigmoid(1/2)."""
    x = torch.randn(3, 4, 1, 1, dtype=torch.float64, requires_grad=True)
    m = sa.create("simam", 4, attn_impl=impl)
    y = m(x)
    torch.testing.assert_close(y, x * torch.sigmoid(torch.tensor(0.5, dtype=torch.float64)))
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_capture_weights():
    m = sa.create("simam", 6)
    x = torch.randn(2, 6, 5, 3)
    with capture_attention(m) as maps:
        y = m(x)
    w = maps[""]
    assert w.shape == (2, 6, 5, 3)
    assert ((w >= torch.sigmoid(torch.tensor(0.5)) - 1e-6) & (w < 1)).all()  # 1/E >= 1/2
    torch.testing.assert_close(y, x * w)


def test_bad_arguments():
    with pytest.raises(ValueError, match="simam.*channels"):
        sa.create("simam", 0)
    with pytest.raises(ValueError, match="simam.*e_lambda"):
        sa.create("simam", 4, e_lambda=0)
    with pytest.raises(ValueError, match="simam.*4 channels"):
        sa.create("simam", 4)(torch.randn(1, 3, 5, 5))
