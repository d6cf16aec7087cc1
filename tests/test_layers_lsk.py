"""LSK: the module against the paper's selection written out tap by tap, and its loader."""

import pytest
import torch

import spatial_attention as sa
from spatial_attention import capture_attention
from spatial_attention.layers.lsk import _from_phases, _to_phases

pytestmark = pytest.mark.usefixtures("one_thread")

OFFICIAL_KEYS = {f"{n}.{p}" for n in ("conv0", "conv_spatial", "conv1", "conv2",
                                      "conv_squeeze", "conv") for p in ("weight", "bias")}


def depthwise(x, w, b, dilation):
    """A depthwise 'same' convolution as a sum over its taps (zeros outside the map)."""
    B, C, H, W = x.shape
    k = w.shape[-1]
    r = dilation * (k - 1) // 2
    padded = torch.zeros(B, C, H + 2 * r, W + 2 * r, dtype=x.dtype)
    padded[:, :, r:r + H, r:r + W] = x
    out = b.view(1, C, 1, 1).expand(B, C, H, W).clone()
    for p in range(k):
        for q in range(k):
            win = padded[:, :, p * dilation:p * dilation + H, q * dilation:q * dilation + W]
            out = out + w[:, 0, p, q].view(1, C, 1, 1) * win
    return out


def pointwise(x, w, b):
    """A 1x1 convolution: every position's channel vector times the matrix."""
    return torch.einsum("oc,bchw->bohw", w[:, :, 0, 0], x) + b.view(1, -1, 1, 1)


def paper_lsk(m, x):
    """Sec. 3.2: decomposed large kernel, channel reduction, spatial selection, gate."""
    u1 = depthwise(x, m.conv0.weight, m.conv0.bias, 1)
    u2 = depthwise(u1, m.conv_spatial.weight, m.conv_spatial.bias, 3)
    t1 = pointwise(u1, m.conv1.weight, m.conv1.bias)
    t2 = pointwise(u2, m.conv2.weight, m.conv2.bias)
    both = torch.cat([t1, t2], 1)
    pooled = torch.stack([both.sum(1) / both.shape[1], both.max(1).values], 1)  # (B, 2, H, W)
    logits = torch.zeros_like(pooled) + m.conv_squeeze.bias.view(1, 2, 1, 1)
    P = torch.nn.functional.pad(pooled, (3, 3, 3, 3))
    H, W = x.shape[-2:]
    for o in range(2):  # the 2 -> 2 squeeze conv, tap by tap
        for i in range(2):
            for p in range(7):
                for q in range(7):
                    logits[:, o] += m.conv_squeeze.weight[o, i, p, q] * P[:, i, p:p + H, q:q + W]
    sel = 1 / (1 + torch.exp(-logits))
    s = pointwise(t1 * sel[:, :1] + t2 * sel[:, 1:], m.conv.weight, m.conv.bias)
    return x * s, sel


@pytest.mark.parametrize("impl", ["auto", "explicit"])
@pytest.mark.parametrize("shape", [(2, 6, 5, 7), (1, 4, 1, 9), (1, 5, 11, 1), (2, 8, 1, 1)])
def test_matches_paper_float64(impl, shape):
    torch.manual_seed(0)
    m = sa.create("lsk", shape[1], attn_impl=impl).double()
    x = torch.randn(shape, dtype=torch.float64)
    ref, _ = paper_lsk(m, x)
    torch.testing.assert_close(m(x), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("size", [(1, 1), (1, 8), (8, 1), (9, 9), (10, 14), (23, 5)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_phases_equal_the_dilated_conv(size, channels_last):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 3, 7, padding=9, dilation=3, groups=3).double()
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    phases, h, w = _to_phases(x, 3)
    assert phases.shape == (18, 3, h, w) and (h, w) == ((size[0] + 2) // 3, (size[1] + 2) // 3)
    sub = x[0, :, 1::3, 1::3]  # phase (1, 1) of sample 0, zero-padded to (h, w)
    want = torch.nn.functional.pad(sub, (0, w - sub.shape[2], 0, h - sub.shape[1]))
    torch.testing.assert_close(phases[4], want)
    torch.testing.assert_close(_from_phases(phases, 3, size), x)
    y = torch.nn.functional.conv2d(phases, conv.weight, conv.bias, padding=3, groups=3)
    torch.testing.assert_close(_from_phases(y, 3, size), conv(x))


def test_official_layers_and_names():
    m = sa.create("lsk", 64)
    assert set(m.state_dict()) == OFFICIAL_KEYS
    assert m.conv0.kernel_size == (5, 5) and m.conv0.padding == (2, 2) and m.conv0.groups == 64
    assert m.conv_spatial.kernel_size == (7, 7) and m.conv_spatial.dilation == (3, 3)
    assert m.conv_spatial.padding == (9, 9) and m.conv_spatial.groups == 64
    assert m.conv1.out_channels == m.conv2.out_channels == 32 and m.conv.out_channels == 64
    assert m.conv_squeeze.weight.shape == (2, 2, 7, 7)
    assert sa.info("lsk").family == "branch"


def test_official_state_dict_loads_with_wrappers():
    src = sa.create("lsk", 8)
    state = {"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}
    dst = sa.create("lsk", 8)
    dst.load_official_state_dict(state)
    x = torch.randn(1, 8, 6, 5)
    torch.testing.assert_close(dst(x), src(x))


def test_capture_selection_maps():
    torch.manual_seed(0)
    m = sa.create("lsk", 6)
    x = torch.randn(2, 6, 7, 4)
    with capture_attention(m) as maps:
        y = m(x)
    sel = maps[""]
    assert sel.shape == (2, 2, 7, 4) and ((sel > 0) & (sel < 1)).all()
    ref, ref_sel = paper_lsk(m.double(), x.double())
    torch.testing.assert_close(sel.double(), ref_sel.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    assert sa.info("lsk").cls.spatial_map(sel, (7, 4)).shape == (2, 7, 4)


@pytest.mark.parametrize("impl", ["auto", "explicit"])
def test_gradcheck_odd_sizes_batch_one(impl):
    torch.manual_seed(0)
    m = sa.create("lsk", 3, attn_impl=impl).double()
    for shape in [(1, 3, 1, 4), (1, 3, 5, 2)]:
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(m, (x,))


def test_no_grad_equals_grad_and_layout_kept():
    torch.manual_seed(0)
    m = sa.create("lsk", 8)
    x = torch.randn(2, 8, 9, 7)
    with torch.no_grad():
        a = m(x)
    b = m(x.requires_grad_())
    torch.testing.assert_close(a, b.detach())
    assert a.is_contiguous()
    cl = x.detach().contiguous(memory_format=torch.channels_last)
    assert m(cl).is_contiguous(memory_format=torch.channels_last)


def test_bad_arguments():
    with pytest.raises(ValueError, match="lsk: channels must be at least 2"):
        sa.create("lsk", 1)
    with pytest.raises(ValueError, match="lsk.*channels"):
        sa.create("lsk", 0)
    with pytest.raises(ValueError, match="lsk.*8 channels"):
        sa.create("lsk", 8)(torch.randn(1, 4, 5, 5))
