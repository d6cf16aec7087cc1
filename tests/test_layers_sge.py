"""SGE: the module against Eq. 1-5 written out group by group, and its group rules."""

import pytest
import torch

import spatial_attention as sa
from spatial_attention import capture_attention


def paper_sge(x, gamma, beta, groups, eps=1e-5):
    """Eq. 1-5 one group at a time, positions as the rows of a (HW, C/G) matrix."""
    B, C, H, W = x.shape
    out = torch.empty_like(x)
    k = C // groups
    for b in range(B):
        for j in range(groups):
            X = x[b, j * k:(j + 1) * k].reshape(k, H * W).T  # (HW, C/G): x_i in rows
            g = X.sum(0) / (H * W)  # Eq. 1
            c = X @ g  # Eq. 2: (HW,)
            mu = c.sum() / c.numel()
            std = torch.sqrt(((c - mu) ** 2).sum() / (c.numel() - 1))  # official: unbiased
            a = gamma[j] * (c - mu) / (std + eps) + beta[j]  # Eq. 3-4
            gate = 1 / (1 + torch.exp(-a))
            out[b, j * k:(j + 1) * k] = (X * gate[:, None]).T.reshape(k, H, W)  # Eq. 5
    return out


def _randomised(C, groups, impl):
    m = sa.create("sge", C, groups=groups, attn_impl=impl).double()
    with torch.no_grad():
        m.weight.normal_()
        m.bias.normal_()
    return m


@pytest.mark.parametrize("impl", ["auto", "explicit"])
@pytest.mark.parametrize("shape,groups", [((2, 12, 5, 7), 4), ((1, 8, 1, 6), 8),
                                          ((2, 6, 9, 1), 2), ((1, 4, 2, 2), 1)])
def test_matches_paper_float64(impl, shape, groups):
    m = _randomised(shape[1], groups, impl)
    x = torch.randn(shape, dtype=torch.float64)
    ref = paper_sge(x, m.weight.flatten(), m.bias.flatten(), groups)
    torch.testing.assert_close(m(x), ref, rtol=1e-12, atol=1e-12)


def test_official_defaults():
    m = sa.create("sge", 256)
    assert m.groups == 64 and m.eps == 1e-5
    assert m.weight.shape == m.bias.shape == (1, 64, 1, 1)
    assert (m.weight == 0).all() and (m.bias == 1).all()
    # zero gamma: every position gets sigmoid(beta), the group's feature passes evenly
    x = torch.randn(2, 256, 5, 4)
    torch.testing.assert_close(m(x), x * torch.sigmoid(torch.tensor(1.0)))


def test_groups_larger_than_channels_are_clamped():
    m = sa.create("sge", 16)
    assert m.groups == 16 and m.weight.shape == (1, 16, 1, 1)


@pytest.mark.parametrize("impl", ["auto", "explicit"])
def test_single_position_is_finite(impl):
    """The official unbiased std is NaN at H*W = 1; here the normalised similarity is 0."""
    m = _randomised(8, 4, impl)
    x = torch.randn(3, 8, 1, 1, dtype=torch.float64, requires_grad=True)
    y = m(x)
    gate = torch.sigmoid(m.bias.flatten()).repeat_interleave(2)[None, :, None, None]
    torch.testing.assert_close(y, x * gate)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_capture_group_gate():
    m = _randomised(8, 4, "auto").float()
    x = torch.randn(2, 8, 5, 3)
    with capture_attention(m) as maps:
        y = m(x)
    gate = maps[""]
    assert gate.shape == (2, 4, 5, 3)
    torch.testing.assert_close(y, x * gate.repeat_interleave(2, dim=1))
    assert sa.info("sge").cls.spatial_map(gate, (5, 3)).shape == (2, 5, 3)


def test_bad_arguments():
    with pytest.raises(ValueError, match="sge: groups 64 must divide channels 96"):
        sa.create("sge", 96)
    with pytest.raises(ValueError, match="sge.*groups"):
        sa.create("sge", 8, groups=0)
    with pytest.raises(ValueError, match="sge.*eps"):
        sa.create("sge", 8, eps=-1.0)
    with pytest.raises(ValueError, match="sge.*8 channels"):
        sa.create("sge", 8)(torch.randn(1, 4, 5, 5))
