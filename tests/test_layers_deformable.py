"""deformable_conv / modulated_deformable_conv / dynamic_conv against brute-force loops."""

import itertools
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import spatial_attention as sa
from spatial_attention import capture_attention, explicit_path
from spatial_attention.functional.sampling import deform_conv2d, deform_conv2d_explicit


def _bilinear(img, y, x):
    """torchvision's rule on a nested list ``img[H][W]``: zero outside, per corner."""
    H, W = len(img), len(img[0])
    if y <= -1 or y >= H or x <= -1 or x >= W:
        return 0.0
    y0, x0 = math.floor(y), math.floor(x)
    ly, lx = y - y0, x - x0
    total = 0.0
    for yy, xx, wgt in ((y0, x0, (1 - ly) * (1 - lx)), (y0, x0 + 1, (1 - ly) * lx),
                        (y0 + 1, x0, ly * (1 - lx)), (y0 + 1, x0 + 1, ly * lx)):
        if 0 <= yy < H and 0 <= xx < W:
            total += wgt * img[yy][xx]
    return total


def _brute_force(x, offset, weight, bias, stride, padding, dilation, mask):
    """Every output value as its own sum over input channels and taps (plain Python)."""
    B, C, H, W = x.shape
    cout, cpg, kh, kw = weight.shape
    groups = C // cpg
    K = kh * kw
    G = offset.shape[1] // (2 * K)
    ho, wo = offset.shape[-2:]
    xs, offs, ws = x.tolist(), offset.tolist(), weight.tolist()
    ms = mask.tolist() if mask is not None else None
    out = torch.zeros(B, cout, ho, wo, dtype=x.dtype)
    for b, co, oy, ox in itertools.product(range(B), range(cout), range(ho), range(wo)):
        g_w = co // (cout // groups)
        acc = bias[co].item() if bias is not None else 0.0
        for ci_local, i, j in itertools.product(range(cpg), range(kh), range(kw)):
            ci = g_w * cpg + ci_local
            g = ci // (C // G)
            k = i * kw + j
            dy = offs[b][2 * (g * K + k)][oy][ox]
            dx = offs[b][2 * (g * K + k) + 1][oy][ox]
            y = oy * stride[0] - padding[0] + i * dilation[0] + dy
            xx = ox * stride[1] - padding[1] + j * dilation[1] + dx
            m = ms[b][g * K + k][oy][ox] if ms is not None else 1.0
            acc += ws[co][ci_local][i][j] * m * _bilinear(xs[b][ci], y, xx)
        out[b, co, oy, ox] = acc
    return out


CONFIGS = [  # (C, Cout, kernel, stride, padding, dilation, groups, offset_groups, H, W)
    (2, 3, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, 4, 5),
    (4, 2, (3, 2), (2, 1), (0, 1), (1, 2), 2, 2, 5, 6),
    (4, 4, (2, 3), (1, 2), (2, 1), (2, 1), 4, 4, 3, 4),
]


def _inputs(cfg, modulated, seed=0, integer_shifts=True):
    C, cout, (kh, kw), stride, padding, dilation, groups, G, H, W = cfg
    g = torch.Generator().manual_seed(seed)
    ho = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    x = torch.randn(2, C, H, W, generator=g, dtype=torch.float64)
    offset = 2.5 * torch.randn(2, 2 * G * kh * kw, ho, wo, generator=g, dtype=torch.float64)
    if integer_shifts:  # corners exactly on pixels too (where the gradient has a kink)
        offset[:, :4] = offset[:, :4].round()
    weight = torch.randn(cout, C // groups, kh, kw, generator=g, dtype=torch.float64)
    bias = torch.randn(cout, generator=g, dtype=torch.float64)
    mask = (torch.rand(2, G * kh * kw, ho, wo, generator=g, dtype=torch.float64)
            if modulated else None)
    return x, offset, weight, bias, dict(stride=stride, padding=padding, dilation=dilation,
                                         mask=mask)


@pytest.mark.parametrize("modulated", [False, True])
@pytest.mark.parametrize("cfg", CONFIGS)
def test_deform_conv2d_matches_brute_force(cfg, modulated):
    x, offset, weight, bias, kw = _inputs(cfg, modulated)
    expected = _brute_force(x, offset, weight, bias, kw["stride"], kw["padding"],
                            kw["dilation"], kw["mask"])
    torch.testing.assert_close(deform_conv2d(x, offset, weight, bias, **kw), expected)
    torch.testing.assert_close(deform_conv2d_explicit(x, offset, weight, bias, **kw), expected)


def test_samples_on_and_beyond_the_border_follow_torchvision_s_rule():
    x = torch.arange(1.0, 10.0, dtype=torch.float64).reshape(1, 1, 3, 3)
    weight = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    # one 1x1 tap at output (0, 0): move it to y = -1, -0.5, 2.5, 3 and x = 0
    for fn in (deform_conv2d, deform_conv2d_explicit):
        got = []
        for dy in (-1.0, -0.5, 2.5, 3.0, -1.5, 4.0):
            offset = torch.zeros(1, 2, 3, 3, dtype=torch.float64)
            offset[0, 0, 0, 0] = dy
            got.append(fn(x, offset, weight)[0, 0, 0, 0].item())
        # the fast path scales positions into grid_sample's [-1, 1] and back: a point on
        # the border may land one rounding step inside, with a weight of ~1e-16
        assert got == pytest.approx([0.0, 0.5 * 1.0, 0.5 * 7.0, 0.0, 0.0, 0.0], abs=1e-12)


@pytest.mark.parametrize("modulated", [False, True])
def test_fast_and_explicit_gradients_agree_and_gradcheck(modulated):
    x, offset, weight, bias, kw = _inputs(CONFIGS[1], modulated, seed=1, integer_shifts=False)
    args = [x, offset, weight, bias] + ([kw["mask"]] if modulated else [])
    args = [a.clone().requires_grad_() for a in args]
    static = {k: v for k, v in kw.items() if k != "mask"}

    def run(fn, *a):
        return fn(*a[:4], **static, mask=a[4] if modulated else None)

    grads = []
    for fn in (deform_conv2d, deform_conv2d_explicit):
        out = run(fn, *args)
        grads.append(torch.autograd.grad(out, args, torch.randn_like(out,
                                         generator=torch.Generator().manual_seed(2))))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)
    small = [a.detach()[:1].clone().requires_grad_() if a.dim() == 4 and a is not args[2]
             else a.detach().clone().requires_grad_() for a in args]
    assert torch.autograd.gradcheck(lambda *a: run(deform_conv2d, *a), small, fast_mode=True)


def test_matches_torchvision_where_its_operator_runs():
    sys.path.insert(0, str(Path(__file__).parent))
    import _torchvision_shim  # noqa: F401

    tv = pytest.importorskip("torchvision.ops")
    x, offset, weight, bias, kw = _inputs(CONFIGS[1], True)
    try:
        expected = tv.deform_conv2d(x, offset, weight, bias, **kw)
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"torchvision's deform_conv2d does not run here: {str(exc)[:80]}")
    torch.testing.assert_close(deform_conv2d(x, offset, weight, bias, **kw), expected)


@pytest.mark.parametrize("modulated", [False, True])
def test_layer_starts_as_a_plain_convolution(modulated):
    name = "modulated_deformable_conv" if modulated else "deformable_conv"
    m = sa.create(name, 6, groups=2, deform_groups=3, dilation=2)
    x = torch.randn(2, 6, 7, 5)
    plain = F.conv2d(x, m.weight, m.bias, padding=2, dilation=2, groups=2)
    if modulated:  # sigmoid(0) = 1/2 on every tap
        plain = F.conv2d(x, m.weight * 0.5, m.bias, padding=2, dilation=2, groups=2)
    torch.testing.assert_close(m(x), plain, atol=1e-5, rtol=1e-5)
    with explicit_path(m):
        torch.testing.assert_close(m(x), plain, atol=1e-5, rtol=1e-5)
    keys = {"weight", "bias", "conv_offset.weight", "conv_offset.bias"}
    assert set(m.state_dict()) == keys
    assert m.conv_offset.weight.shape[0] == 3 * 9 * (3 if modulated else 2)


@pytest.mark.parametrize("name", ["deformable_conv", "modulated_deformable_conv"])
def test_layer_captures_offsets_and_modulation(name):
    module, (x,) = sa.info(name).cls.example(name, 2, 8, (5, 4))
    with capture_attention(module) as maps:
        out = module(x)
    records = maps.calls("")
    assert records[0].shape == (2, 1, 9, 2, 5, 4) and records[0].abs().sum() > 0
    if name == "modulated_deformable_conv":
        assert records[1].shape == (2, 1, 9, 5, 4)
        assert ((records[1] > 0) & (records[1] < 1)).all()
    heat = type(module).spatial_map(records[-1], (5, 4))
    assert heat.shape == (2, 5, 4)
    torch.testing.assert_close(out, module(x), atol=1e-5, rtol=1e-5)


def test_layer_strided_output_and_errors():
    m = sa.create("deformable_conv", 4, 8, kernel_size=3, stride=2)
    assert m(torch.randn(1, 4, 7, 6)).shape == (1, 8, 4, 3)
    with pytest.raises(ValueError, match="deformable_conv: expected 4 channels"):
        m(torch.randn(1, 3, 7, 6))
    with pytest.raises(ValueError, match="does not fit"):
        sa.create("deformable_conv", 4, kernel_size=5, padding=0)(torch.randn(1, 4, 3, 3))
    with pytest.raises(ValueError, match="deform_groups 3 must divide"):
        sa.create("deformable_conv", 4, deform_groups=3)
    with pytest.raises(ValueError, match="modulated_deformable_conv: groups 3"):
        sa.create("modulated_deformable_conv", 4, groups=3)
    with pytest.raises(ValueError, match="kernel_h must be a positive int"):
        sa.create("deformable_conv", 4, kernel_size=0)
    x = torch.randn(1, 4, 5, 5)
    with pytest.raises(ValueError, match="offset must be"):
        deform_conv2d(x, torch.zeros(1, 18, 4, 4), torch.randn(4, 4, 3, 3), padding=1)
    with pytest.raises(ValueError, match="offset needs"):
        deform_conv2d(x, torch.zeros(1, 10, 5, 5), torch.randn(4, 4, 3, 3), padding=1)


# -- dynamic convolution -------------------------------------------------------------------

def _dynamic_brute_force(m, x):
    """Each output value from its own window, kernels from the 1x1 prediction."""
    B, C, H, W = x.shape
    k, d, z = m.kernel_size, m.dilation, m.num_heads
    logits = torch.einsum("oc,bchw->bohw", m.weight_linear.weight[:, :, 0, 0], x)
    if m.weight_linear.bias is not None:
        logits = logits + m.weight_linear.bias.reshape(1, -1, 1, 1)
    logits = logits.reshape(B, z, k * k, H, W)
    out = torch.zeros_like(x)
    for b, c, py, px in itertools.product(range(B), range(C), range(H), range(W)):
        h = c // (C // z)
        taps = [(t, py + (t // k - k // 2) * d, px + (t % k - k // 2) * d) for t in range(k * k)]
        inside = [t for t, yy, xx in taps if 0 <= yy < H and 0 <= xx < W]
        chosen = inside if m.renorm_padding else list(range(k * k))
        scores = logits[b, h, chosen, py, px]
        wts = scores.softmax(0) if m.weight_softmax else scores
        for w_t, t in zip(wts, chosen, strict=True):
            _, yy, xx = taps[t]
            if 0 <= yy < H and 0 <= xx < W:
                out[b, c, py, px] += w_t * x[b, c, yy, xx]
    return out


@pytest.mark.parametrize("kw", [
    dict(num_heads=2),
    dict(num_heads=4, renorm_padding=False, bias=True),
    dict(num_heads=1, kernel_size=5, dilation=2),
    dict(num_heads=2, weight_softmax=False),
])
def test_dynamic_conv_matches_brute_force(kw):
    torch.manual_seed(0)
    m = sa.create("dynamic_conv", 4, **kw).double()
    if m.weight_linear.bias is not None:
        torch.nn.init.normal_(m.weight_linear.bias)
    x = torch.randn(2, 4, 5, 3, dtype=torch.float64)
    expected = _dynamic_brute_force(m, x)
    torch.testing.assert_close(m(x), expected)
    with explicit_path(m):
        torch.testing.assert_close(m(x), expected)


def test_dynamic_conv_kernels_are_a_distribution_over_the_taps_inside():
    m = sa.create("dynamic_conv", 8, num_heads=2)
    x = torch.randn(1, 8, 4, 6)
    with capture_attention(m) as maps:
        m(x)
    kernels = maps[""]
    assert kernels.shape == (1, 2, 9, 4, 6)
    torch.testing.assert_close(kernels.sum(2), torch.ones(1, 2, 4, 6))
    assert (kernels[:, :, :3, 0] == 0).all()  # the top row of taps at the top border
    # a constant map stays constant (weights sum to one over the taps that exist)
    const = torch.full((1, 8, 4, 6), 3.0)
    torch.testing.assert_close(m(const), const)
    heat = type(m).spatial_map(kernels, (4, 6))
    assert heat.shape == (1, 4, 6)
    torch.testing.assert_close(heat.sum(), torch.tensor(24.0))  # every query sends 1


def test_dynamic_conv_errors():
    with pytest.raises(ValueError, match="dynamic_conv: dim 6 is not divisible"):
        sa.create("dynamic_conv", 6, num_heads=4)
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        sa.create("dynamic_conv", 8, kernel_size=4)
    with pytest.raises(ValueError, match="dynamic_conv: expected 8 channels"):
        sa.create("dynamic_conv", 8)(torch.randn(1, 4, 3, 3))


def test_resnet_dcn_replaces_the_first_conv_of_the_last_two_stages():
    from spatial_attention.layers.deformable import DeformableConv2d
    from spatial_attention.models import create_model

    net = create_model("resnet18_cifar_dcn", width=8, layers=(1, 1, 1, 1))
    names = [n for n, m in net.named_modules() if isinstance(m, DeformableConv2d)]
    assert names == ["layer3.0.conv1", "layer4.0.conv1"]
    assert net.layer3[0].conv1.stride == (2, 2)
    assert not net.layer3[0].conv1.conv_offset.weight.any()  # zero offsets at the start
    out = net(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    out.sum().backward()
    assert net.layer3[0].conv1.conv_offset.weight.grad.abs().sum() > 0
