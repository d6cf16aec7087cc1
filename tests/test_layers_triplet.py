import pytest
import torch
import torch.nn.functional as F

import spatial_attention as sa
from spatial_attention import capture_attention
from spatial_attention.layers.triplet import convert_official_triplet_keys


def _randomise(m):
    torch.manual_seed(1)
    for p in m.parameters():
        p.data.normal_()
    for name, b in m.named_buffers():
        if "running_var" in name:
            b.data.uniform_(0.5, 2.0)
        elif "running_mean" in name:
            b.data.normal_()
    return m.eval()


def _gate(branch, plane):
    """sigmoid(BN(conv(plane))) written out: eval-mode BN is an affine map per channel."""
    k = branch.conv.weight.shape[-1]
    z = F.conv2d(plane, branch.conv.weight, padding=k // 2)
    bn = branch.bn
    z = (z - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    return torch.sigmoid(z)


def _reference(m, x):
    """Sec. 3.2 with explicit indices: each branch's gate indexed back onto (b, c, h, w)."""
    zc = torch.stack([x.max(2).values, x.mean(2)], 1)  # pool H -> plane (C, W)
    zw = torch.stack([x.max(3).values.transpose(1, 2), x.mean(3).transpose(1, 2)], 1)  # (H, C)
    zh = torch.stack([x.max(1).values, x.mean(1)], 1)  # pool C -> plane (H, W)
    g1 = _gate(m.cw, zc)[:, 0]  # g1[b, c, w]
    g2 = _gate(m.hc, zw)[:, 0]  # g2[b, h, c]
    y1 = x * g1[:, :, None, :]
    y2 = x * g2.transpose(1, 2)[:, :, :, None]
    if m.hw is None:
        return (y1 + y2) / 2
    g3 = _gate(m.hw, zh)[:, 0]  # g3[b, h, w]
    return (y1 + y2 + x * g3[:, None]) / 3


@pytest.mark.parametrize("no_spatial", [False, True])
@pytest.mark.parametrize("impl", ["auto", "explicit"])
@pytest.mark.parametrize("shape", [(2, 6, 9, 5), (1, 3, 1, 7), (3, 5, 4, 1), (1, 1, 1, 1)])
def test_matches_equations(no_spatial, impl, shape):
    m = _randomise(sa.create("triplet", shape[1], no_spatial=no_spatial, attn_impl=impl)).double()
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(m(x), _reference(m, x), atol=1e-12, rtol=1e-12)


def test_official_defaults():
    m = sa.create("triplet", 16)
    assert m.cw.conv.weight.shape == (1, 2, 7, 7) and m.cw.conv.bias is None
    assert m.hw.bn.eps == 1e-5 and m.hw.bn.momentum == 0.01
    assert sum(p.numel() for p in m.parameters()) == 3 * (2 * 49 + 2)
    assert sa.create("triplet", 16, no_spatial=True).hw is None


def test_train_mode_fast_equals_explicit():
    fast = sa.create("triplet", 8).double().train()
    slow = sa.create("triplet", 8, attn_impl="explicit").double().train()
    slow.load_state_dict(fast.state_dict())
    x = torch.randn(2, 8, 6, 5, dtype=torch.float64)
    torch.testing.assert_close(fast(x), slow(x))
    torch.testing.assert_close(fast.hc.bn.running_var, slow.hc.bn.running_var)


def test_capture_combined_gate():
    m = sa.create("triplet", 8)
    x = torch.randn(2, 8, 5, 3)
    with capture_attention(m) as maps:
        y = m(x)
    assert maps[""].shape == (2, 8, 5, 3)
    torch.testing.assert_close(y, x * maps[""])


def test_official_keys_converted():
    ours = sa.create("triplet", 8).state_dict()
    new = {k.replace("cw.", "cw.conv.").replace("hc.", "hc.conv.").replace("hw.", "hw.conv."): v
           for k, v in ours.items()}
    assert convert_official_triplet_keys({"state_dict": {f"module.{k}": v
                                                         for k, v in new.items()}}).keys() \
        == ours.keys()
    old = {k.replace("cw.", "ChannelGateH.spatial.").replace("hc.", "ChannelGateW.spatial.")
           .replace("hw.", "SpatialGate.spatial."): v for k, v in ours.items()}
    sa.create("triplet", 8).load_official_state_dict(old)


def test_clear_errors():
    m = sa.create("triplet", 8)
    with pytest.raises(ValueError, match=r"triplet.*8 channels"):
        m(torch.randn(2, 4, 5, 5))
    with pytest.raises(ValueError, match="triplet.*odd"):
        sa.create("triplet", 8, kernel_size=4)
    with pytest.raises(ValueError, match="triplet.*positive"):
        sa.create("triplet", 0)
