"""Coordinate attention: the module against Eq. 2-7 written out here, timm's CoordAttn."""

import _torchvision_shim  # noqa: F401  (before anything imports torchvision)
import pytest
import torch

import spatial_attention as sa
from spatial_attention import capture_attention


def _randomise(m):
    """Non-trivial weights, BN statistics and affine, so every term of Eq. 4 matters."""
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5)
        m.bn1.running_mean.normal_()
        m.bn1.running_var.uniform_(0.5, 2.0)
    return m


def paper_coord(m, x):
    """Eq. 2-7 with plain sums and matrix products over the module's weights (eval BN)."""
    B, C, H, W = x.shape
    z_h = x.sum(3) / W  # Eq. 2: (B, C, H)
    z_w = x.sum(2) / H  # Eq. 3: (B, C, W)
    z = torch.cat([z_h, z_w], dim=2)  # (B, C, H + W)
    w1 = m.conv1.weight[:, :, 0, 0]
    u = torch.einsum("mc,bcl->bml", w1, z) + m.conv1.bias[None, :, None]
    bn = m.bn1
    u = (u - bn.running_mean[None, :, None]) / torch.sqrt(bn.running_var[None, :, None] + bn.eps)
    u = u * bn.weight[None, :, None] + bn.bias[None, :, None]
    f = u * torch.minimum(torch.relu(u + 3), torch.full_like(u, 6.0)) / 6  # h_swish
    f_h, f_w = f[:, :, :H], f[:, :, H:]
    wh, ww = m.conv_h.weight[:, :, 0, 0], m.conv_w.weight[:, :, 0, 0]
    a_h = torch.einsum("cm,bmh->bch", wh, f_h) + m.conv_h.bias[None, :, None]  # Eq. 5
    a_w = torch.einsum("cm,bmw->bcw", ww, f_w) + m.conv_w.bias[None, :, None]  # Eq. 6
    g_h, g_w = 1 / (1 + torch.exp(-a_h)), 1 / (1 + torch.exp(-a_w))
    return x * g_h[:, :, :, None] * g_w[:, :, None, :]  # Eq. 7


@pytest.mark.parametrize("impl", ["auto", "explicit"])
@pytest.mark.parametrize("shape", [(2, 16, 5, 7), (1, 16, 1, 6), (2, 16, 9, 1), (1, 16, 1, 1)])
def test_matches_paper_float64(impl, shape):
    m = _randomise(sa.create("coord", 16, attn_impl=impl)).double().eval()
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(m(x), paper_coord(m, x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("C,mip", [(16, 8), (256, 8), (512, 16), (1024, 32)])
def test_bottleneck_width(C, mip):
    m = sa.create("coord", C)
    assert m.conv1.out_channels == mip  # max(8, C // 32)
    assert m.bn1.eps == 1e-5
    assert sa.create("coord", 64, reduction=4).conv1.out_channels == 16


def test_training_batch_norm_sees_both_strips():
    """Train-mode BN takes its statistics over the H and W strips together (official)."""
    m = _randomise(sa.create("coord", 16)).double().train()
    x = torch.randn(3, 16, 5, 4, dtype=torch.float64)
    z = torch.cat([x.mean(3), x.mean(2)], dim=2)  # (B, C, H + W)
    u = torch.einsum("mc,bcl->bml", m.conv1.weight[:, :, 0, 0], z) + m.conv1.bias[None, :, None]
    before = m.bn1.running_mean.clone()
    m(x)
    torch.testing.assert_close(m.bn1.running_mean, 0.9 * before + 0.1 * u.mean((0, 2)))


def test_timm_coord_attn_same_weights():
    try:
        from timm.layers.coord_attn import CoordAttn
    except Exception as e:  # noqa: BLE001 - absent or not importable: nothing to compare
        pytest.skip(f"timm CoordAttn not importable: {e}")
    ours = _randomise(sa.create("coord", 64)).eval()
    theirs = CoordAttn(64, rd_channels=8, bias=True).eval()  # official width and biases
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 64, 11, 6)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)


def test_capture_weights_are_the_outer_product():
    m = _randomise(sa.create("coord", 8)).eval()
    x = torch.randn(2, 8, 5, 3)
    with capture_attention(m) as maps:
        y = m(x)
    w = maps[""]
    assert w.shape == (2, 8, 5, 3)
    torch.testing.assert_close(y, x * w)
    # rank one per (b, c): every 2x2 minor of the H x W weight vanishes
    torch.testing.assert_close(w[..., :1, :1] * w[..., 1:, 1:], w[..., :1, 1:] * w[..., 1:, :1])


def test_no_grad_path_equals_grad_path():
    m = _randomise(sa.create("coord", 8)).eval()
    x = torch.randn(2, 8, 6, 5)
    with torch.no_grad():
        a = m(x)
    torch.testing.assert_close(a, m(x))


def test_bad_arguments():
    with pytest.raises(ValueError, match="coord.*channels"):
        sa.create("coord", 0)
    with pytest.raises(ValueError, match="coord.*reduction"):
        sa.create("coord", 8, reduction=0)
    with pytest.raises(ValueError, match="coord.*8 channels"):
        sa.create("coord", 8)(torch.randn(1, 4, 5, 5))
