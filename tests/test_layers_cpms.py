import pytest
import torch
import torch.nn.functional as F

import spatial_attention as sa
from spatial_attention import capture_attention, explicit_path


def reference_cpms(m, x):
    """Our CPMS formula, re-stated with raw tensors and the module's weights."""
    C = x.shape[1]
    w1, b1 = m.ca.fc1.weight, m.ca.fc1.bias
    w2, b2 = m.ca.fc2.weight, m.ca.fc2.bias

    def mlp(t):
        return F.conv2d(F.relu(F.conv2d(t, w1, b1)), w2, b2)

    avg, mx = x.mean((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    mc = torch.sigmoid(mlp(x) + mlp(avg) + mlp(mx))
    prior = mc * x

    def dw(t, conv, pad):
        return F.conv2d(t, conv.weight, conv.bias, padding=pad, groups=C)

    d = dw(prior, m.dconv5_5, 2)
    s = d
    for k in (7, 11, 21):
        rows = dw(d, getattr(m, f"dconv1_{k}"), (0, k // 2))
        s = s + dw(rows, getattr(m, f"dconv{k}_1"), (k // 2, 0))
    ms = torch.sigmoid(F.conv2d(s, m.conv.weight, m.conv.bias))
    return ms * prior, mc, ms


@pytest.mark.parametrize("C,r", [(32, 4), (16, 16)])
def test_matches_formula_on_both_paths(C, r):
    m = sa.create("cpms", C, reduction=r).eval()
    assert m.ca.fc1.out_channels == max(1, C // r)
    x = torch.randn(2, C, 9, 6)
    ref, mc, ms = reference_cpms(m, x)
    torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)
    with capture_attention(m) as maps:  # the explicit path
        torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)
    rec_c, rec_s = maps.calls("")
    torch.testing.assert_close(rec_c, mc, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(rec_s, ms, atol=1e-6, rtol=1e-5)
    assert ((rec_c > 0) & (rec_c < 1)).all() and ((rec_s > 0) & (rec_s < 1)).all()


def test_is_a_gate_of_the_input():
    # both gates are sigmoids: |y| <= |x| everywhere, unlike CPCA which projects
    m = sa.create("cpms", 8)
    x = torch.randn(2, 8, 7, 7)
    assert (m(x).abs() <= x.abs() + 1e-6).all()


@pytest.mark.parametrize("shape", [(1, 8, 7, 5), (2, 8, 1, 1), (1, 8, 13, 2)])
def test_shape_preserved_odd_sizes_and_channels_last(shape):
    m = sa.create("cpms", 8).eval()
    x = torch.randn(shape)
    out = m(x)
    assert out.shape == shape
    mc = m.to(memory_format=torch.channels_last)
    torch.testing.assert_close(mc(x.to(memory_format=torch.channels_last)), out, atol=1e-5,
                               rtol=1e-5)


def test_gradcheck_both_paths():
    m = sa.create("cpms", 4, reduction=2, kernel_sizes=(3, 5)).double()
    x = torch.randn(1, 4, 3, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(m, (x,))
    with explicit_path(m):
        torch.autograd.gradcheck(m, (x,))


def test_clear_errors():
    m = sa.create("cpms", 8)
    with pytest.raises(ValueError, match=r"cpms.*8 channels"):
        m(torch.randn(2, 4, 5, 5))
    with pytest.raises(ValueError, match=r"cpms.*4-D"):
        m(torch.randn(8, 5, 5))
    with pytest.raises(ValueError, match="positive"):
        sa.create("cpms", 8, reduction=0)
    with pytest.raises(ValueError, match="differ"):
        sa.create("cpms", 8, kernel_sizes=(7, 7))
