"""CSWin stripe attention against a stripe-by-stripe transcription, any size, errors."""

import pytest
import torch

import spatial_attention as sa
from spatial_attention import explicit_path
from spatial_attention.layers.cswin import CSWinAttention


def per_stripe(m: CSWinAttention, x: torch.Tensor) -> torch.Tensor:
    """Each stripe cut out of the map (the last one may be narrower), attended alone."""
    B, H, W, C = x.shape
    qkv = m.qkv(x).view(B, H, W, 3, C)
    c = C // m.branches
    heads = m.num_heads // m.branches
    outs = []
    for i, lepe in enumerate(m.attns):
        part = qkv[..., i * c:(i + 1) * c]
        out = torch.zeros(B, H, W, c, dtype=x.dtype)
        sw = m.split_size
        if m.branches == 1:
            cuts = [(slice(0, H), slice(0, W))]
        elif i == 0:
            cuts = [(slice(0, H), slice(s, min(s + sw, W))) for s in range(0, W, sw)]
        else:
            cuts = [(slice(s, min(s + sw, H)), slice(0, W)) for s in range(0, H, sw)]
        for rows, cols in cuts:
            t = part[:, rows, cols]  # (B, h, w, 3, c)
            h, w = t.shape[1:3]
            q, k, v = (t[..., j, :].reshape(B, h * w, heads, -1).transpose(1, 2) for j in range(3))
            att = torch.softmax(q @ k.transpose(-2, -1) * m.scale, -1) @ v  # (B, heads, hw, d)
            pos = lepe(t[..., 2, :].permute(0, 3, 1, 2))  # conv inside the stripe only
            pos = pos.reshape(B, heads, -1, h * w).transpose(-2, -1)
            out[:, rows, cols] = (att + pos).transpose(1, 2).reshape(B, h, w, c)
        outs.append(out)
    return m.proj(torch.cat(outs, -1))


@pytest.mark.parametrize("size,split,last", [((8, 8), 2, False), ((7, 9), 2, False),
                                             ((5, 6), 7, False), ((6, 5), 1, False),
                                             ((7, 7), 7, True)])
def test_matches_a_stripe_by_stripe_transcription(size, split, last):
    torch.manual_seed(0)
    m = CSWinAttention(16, 4, split_size=split, last_stage=last).double().eval()
    x = torch.randn(2, *size, 16, dtype=torch.float64)
    with torch.no_grad():
        want = per_stripe(m, x)
        torch.testing.assert_close(m(x), want)
        with explicit_path(m):
            torch.testing.assert_close(m(x), want)


def test_reference_parameter_names():
    m = CSWinAttention(16, 4)
    assert set(m.state_dict()) == {
        "qkv.weight", "qkv.bias", "proj.weight", "proj.bias",
        "attns.0.get_v.weight", "attns.0.get_v.bias", "attns.1.get_v.weight",
        "attns.1.get_v.bias",
    }
    assert m.attns[0].get_v.weight.shape == (8, 1, 3, 3)
    assert CSWinAttention(16, 4, last_stage=True).attns[0].get_v.weight.shape == (16, 1, 3, 3)


def test_errors_name_the_mechanism():
    with pytest.raises(ValueError, match="cswin_attention: two stripe branches"):
        CSWinAttention(18, 3)
    with pytest.raises(ValueError, match="cswin_attention"):
        sa.create("cswin_attention", 16, 2)(torch.randn(2, 16, 4, 4))
