import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spatial_attention as sa
from spatial_attention import capture_attention, explicit_path
from spatial_attention.functional.gates import channel_shuffle
from spatial_attention.layers.gam import GAM, convert_common_gam_keys


def _randomise(module):
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(-0.3, 0.3)
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return module


def _bn(t, bn, train):
    """BatchNorm written out: batch statistics in training, running ones in eval."""
    if train:
        mean = t.mean((0, 2, 3))
        var = t.var((0, 2, 3), unbiased=False)
    else:
        mean, var = bn.running_mean, bn.running_var
    shape = (1, -1, 1, 1)
    return (t - mean.view(shape)) / torch.sqrt(var.view(shape) + bn.eps) * bn.weight.view(
        shape
    ) + bn.bias.view(shape)


def _gam_eq(m, x, train=False):
    """The paper's GAM (Sec. 3): per-pixel MLP channel gate, two 7x7 convs spatial gate."""
    ca, sp = m.channel_attention, m.spatial_attention
    fc1, fc2 = ca.mlp[0], ca.mlp[2]
    h = torch.einsum("bchw,kc->bkhw", x, fc1.weight) + fc1.bias[:, None, None]
    z = torch.einsum("bkhw,ck->bchw", torch.relu(h), fc2.weight) + fc2.bias[:, None, None]
    mc = torch.sigmoid(z)  # the paper's sigmoid, which the YOLO copy drops
    x1 = mc * x
    g = sp.groups
    t = F.conv2d(x1, sp.conv1.weight, sp.conv1.bias, padding=3, groups=g)
    t = torch.relu(_bn(t, sp.bn1, train))
    if g > 1:  # channel shuffle between the group convolutions, written with indices
        k = t.shape[1] // g
        t = t[:, [i * k + j for j in range(k) for i in range(g)]]
    t = F.conv2d(t, sp.conv2.weight, sp.conv2.bias, padding=3, groups=g)
    ms = torch.sigmoid(_bn(t, sp.bn2, train))
    return ms * x1, mc, ms


@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("fused", [True, False])
def test_gam_matches_equations(groups, train, fused):
    torch.manual_seed(0)
    m = _randomise(sa.create("gam", 32, groups=groups)).train(train)
    for mod in m.modules():
        if hasattr(mod, "fused"):
            mod.attn_impl = None if fused else "explicit"
    x = torch.randn(2, 32, 9, 7)
    ref, _, _ = _gam_eq(m, x, train)
    torch.testing.assert_close(m(x), ref, atol=2e-5, rtol=1e-4)


def test_structure_and_parameter_count():
    m = sa.create("gam", 64)
    sp = m.spatial_attention
    assert m.channel_attention.mlp[0].out_features == 16  # rate 4
    assert sp.conv1.kernel_size == (7, 7) and sp.conv1.out_channels == 16
    assert sp.conv2.out_channels == 64 and sp.conv1.groups == 1
    C, h = 64, 16
    expected = (C * h + h + h * C + C) + (C * h * 49 + h + 2 * h) + (h * C * 49 + C + 2 * C)
    assert sum(p.numel() for p in m.parameters()) == expected
    grouped = sa.create("gam", 64, groups=4)
    assert grouped.spatial_attention.conv1.groups == 4
    assert sum(p.numel() for p in grouped.parameters()) < expected


def test_channel_shuffle_interleaves_groups():
    x = torch.arange(8.0).view(1, 8, 1, 1)
    assert channel_shuffle(x, 2).flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_capture_records_both_full_size_gates():
    m = sa.create("gam", 16).eval()
    x = torch.randn(2, 16, 5, 7)
    out = m(x)
    with capture_attention(m) as maps:
        captured = m(x)
    assert set(maps) == {"channel_attention", "spatial_attention"}
    _, mc, ms = _gam_eq(m, x)
    torch.testing.assert_close(maps["channel_attention"], mc, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(maps["spatial_attention"], ms, atol=1e-5, rtol=1e-5)
    assert ((mc > 0) & (mc < 1)).all()
    torch.testing.assert_close(captured, out, atol=1e-5, rtol=1e-5)


def _grads(m, x, g):
    y = m(x)
    return [y, *torch.autograd.grad(y, [x, *m.parameters()], g)]


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_equals_explicit_with_gradients(train, channels_last):
    torch.manual_seed(0)
    m = _randomise(sa.create("gam", 16, groups=2)).double().train(train)
    x = torch.randn(2, 16, 6, 5, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    g = torch.randn(x.shape, dtype=torch.float64)
    fused = _grads(m, x, g)
    with explicit_path(m):
        explicit = _grads(m, x, g)
    for a, b in zip(fused, explicit, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_gradcheck_float64_grouped_training_mode():  # plain, eval mode: test_conformance.py
    m = _randomise(sa.create("gam", 8, groups=2)).double().train()
    x = torch.randn(1, 8, 3, 2, dtype=torch.float64, requires_grad=True)
    for fused in (True, False):
        for mod in m.modules():
            if hasattr(mod, "fused"):
                mod.attn_impl = None if fused else "explicit"
        torch.autograd.gradcheck(m, (x,))


@pytest.mark.parametrize("shape", [(1, 16, 7, 5), (2, 16, 1, 1), (3, 16, 13, 2)])
def test_shape_preserved_odd_sizes_and_batch_one(shape):
    m = sa.create("gam", 16).eval()
    assert m(torch.randn(shape)).shape == shape
    assert m(torch.randn(shape).contiguous(memory_format=torch.channels_last)).shape == shape


def test_bfloat16_autocast_close_to_float32():
    m = _randomise(sa.create("gam", 32)).eval()
    x = torch.randn(2, 32, 8, 8)
    ref = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
        with explicit_path(m):
            out_explicit = m(x)
    for o in (out, out_explicit):
        torch.testing.assert_close(o.float(), ref, atol=0.1, rtol=0.05)


def test_clear_errors():
    m = sa.create("gam", 8)
    with pytest.raises(ValueError, match=r"gam.*8 channels"):
        m(torch.randn(2, 4, 5, 5))
    with pytest.raises(ValueError, match=r"4-D"):
        m(torch.randn(2, 8, 5))
    with pytest.raises(ValueError, match="channels-last"):
        m(torch.randn(2, 5, 5, 8))
    with pytest.raises(ValueError, match="positive"):
        sa.create("gam", 0)
    with pytest.raises(ValueError, match="divisible by groups"):
        sa.create("gam", 16, groups=3)
    with pytest.raises(ValueError, match="odd"):
        sa.create("gam", 16, kernel_size=6)


def test_convert_common_keys():
    """The widely copied GAM_Attention layout (nn.Sequential indices) loads into ours."""
    C, h = 16, 4
    common = {
        "channel_attention.0.weight": torch.randn(h, C), "channel_attention.0.bias": torch.randn(h),
        "channel_attention.2.weight": torch.randn(C, h), "channel_attention.2.bias": torch.randn(C),
        "spatial_attention.0.weight": torch.randn(h, C, 7, 7),
        "spatial_attention.0.bias": torch.randn(h),
        "spatial_attention.3.weight": torch.randn(C, h, 7, 7),
        "spatial_attention.3.bias": torch.randn(C),
    }
    for i, n in (("1", h), ("4", C)):
        common.update({f"spatial_attention.{i}.{k}": torch.rand(n) + 0.5
                       for k in ("weight", "bias", "running_mean", "running_var")})
        common[f"spatial_attention.{i}.num_batches_tracked"] = torch.tensor(0)
    m = GAM(C)
    m.load_common_state_dict(common)
    conv2 = m.spatial_attention.conv2.weight
    torch.testing.assert_close(conv2, common["spatial_attention.3.weight"])
    out = convert_common_gam_keys({f"neck.gam.{k}": v for k, v in common.items()})
    assert "neck.gam.spatial_attention.bn2.running_var" in out


def test_grouped_variant_compiles_and_exports_to_onnx(tmp_path):
    m = _randomise(sa.create("gam", 16, groups=2)).eval()
    x = torch.randn(2, 16, 5, 7)
    ref = m(x)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), ref, atol=1e-5, rtol=1e-5)
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    path = tmp_path / "gam_grouped.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(m, (x,), str(path), dynamo=False, input_names=["x"],
                          output_names=["y"])
    (out,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy()}
    )
    torch.testing.assert_close(torch.from_numpy(out), ref.detach(), atol=1e-4, rtol=1e-4)
