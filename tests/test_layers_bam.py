import pytest
import torch
import torch.nn.functional as F

import spatial_attention as sa
from spatial_attention import capture_attention


def _randomise(m):
    torch.manual_seed(1)
    for p in m.parameters():
        p.data.normal_(0, 0.5)
    for name, b in m.named_buffers():
        if "running_var" in name:
            b.data.uniform_(0.5, 2.0)
        elif "running_mean" in name:
            b.data.normal_()
    return m


def _bn(z, bn, train):
    """BatchNorm written out: batch statistics (biased variance) in training, running
    statistics in eval; channels on axis 1."""
    axes = [0] + list(range(2, z.dim()))
    shape = [1, -1] + [1] * (z.dim() - 2)
    if train:
        mean, var = z.mean(axes), z.var(axes, unbiased=False)
    else:
        mean, var = bn.running_mean, bn.running_var
    return ((z - mean.view(shape)) / torch.sqrt(var.view(shape) + bn.eps) * bn.weight.view(shape)
            + bn.bias.view(shape))


def _reference(m, x, train=False):
    """Eq. 1-4 with the weights read by name (one hidden MLP layer, two dilated convs)."""
    c = dict(m.channel_att["gate_c"].named_children())
    s = dict(m.spatial_att["gate_s"].named_children())
    z = x.mean((2, 3))  # AvgPool(F), (B, C)
    fc0 = c["gate_c_fc_0"]
    h = torch.relu(_bn(z @ fc0.weight.T + fc0.bias, c["gate_c_bn_1"], train))
    mc = h @ c["gate_c_fc_final"].weight.T + c["gate_c_fc_final"].bias  # (B, C)

    def conv_bn_relu(t, conv, bn, d):  # d = 0: the 1x1 reduction
        out = F.conv2d(t, conv.weight, conv.bias, padding=d, dilation=max(d, 1))
        return torch.relu(_bn(out, bn, train))

    t = conv_bn_relu(x, s["gate_s_conv_reduce0"], s["gate_s_bn_reduce0"], 0)
    t = conv_bn_relu(t, s["gate_s_conv_di_0"], s["gate_s_bn_di_0"], 4)
    t = conv_bn_relu(t, s["gate_s_conv_di_1"], s["gate_s_bn_di_1"], 4)
    ms = F.conv2d(t, s["gate_s_conv_final"].weight, s["gate_s_conv_final"].bias)  # (B, 1, H, W)
    if m.combine == "sum":
        M = torch.sigmoid(mc[:, :, None, None] + ms)
    else:
        M = torch.sigmoid(mc[:, :, None, None] * ms)
    return x + x * M


@pytest.mark.parametrize("combine", ["sum", "product"])
@pytest.mark.parametrize("impl", ["auto", "explicit"])
@pytest.mark.parametrize("shape", [(2, 32, 9, 5), (1, 32, 1, 7), (3, 8, 4, 1), (1, 17, 1, 1)])
def test_matches_equations_eval(combine, impl, shape):
    m = _randomise(sa.create("bam", shape[1], combine=combine, attn_impl=impl)).double().eval()
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(m(x), _reference(m, x), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("impl", ["auto", "explicit"])
def test_matches_equations_train(impl):
    m = _randomise(sa.create("bam", 32, attn_impl=impl)).double().train()
    x = torch.randn(3, 32, 6, 11, dtype=torch.float64)
    ref = _reference(m, x, train=True)
    torch.testing.assert_close(m(x), ref, atol=1e-12, rtol=1e-12)


def test_official_defaults():
    m = sa.create("bam", 64)
    gate_c, gate_s = m.channel_att["gate_c"], m.spatial_att["gate_s"]
    assert gate_c.gate_c_fc_0.out_features == 4  # 64 // 16
    assert isinstance(gate_c.gate_c_bn_1, torch.nn.BatchNorm1d)
    di = gate_s.gate_s_conv_di_1
    assert di.dilation == (4, 4) and di.padding == (4, 4) and di.kernel_size == (3, 3)
    assert gate_s.gate_s_conv_final.out_channels == 1 and m.combine == "sum"
    assert sa.create("bam", 8).channel_att["gate_c"].gate_c_fc_0.out_features == 1


def test_batch_one_training_is_a_clear_error():
    m = sa.create("bam", 16).train()
    with pytest.raises(ValueError, match="bam.*batch >= 2"):
        m(torch.randn(1, 16, 5, 5))
    assert m.eval()(torch.randn(1, 16, 5, 5)).shape == (1, 16, 5, 5)


def test_capture_attention_map():
    m = sa.create("bam", 16).eval()
    x = torch.randn(2, 16, 5, 3)
    with capture_attention(m) as maps:
        y = m(x)
    assert maps[""].shape == (2, 16, 5, 3)
    torch.testing.assert_close(y, x * (1 + maps[""]))


def test_official_checkpoint_wrapping_loads():
    src = _randomise(sa.create("bam", 32))
    ckpt = {"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}
    dst = sa.create("bam", 32)
    dst.load_official_state_dict(ckpt)
    torch.testing.assert_close(dst.spatial_att["gate_s"].gate_s_conv_di_0.weight,
                               src.spatial_att["gate_s"].gate_s_conv_di_0.weight)


@pytest.mark.parametrize("kwargs,match", [
    ({"reduction": 0}, "reduction"), ({"combine": "max"}, "combine"),
    ({"dilation_conv_num": -1}, "dilation_conv_num"), ({"dilation_val": 0}, "dilation_val"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=f"bam.*{match}"):
        sa.create("bam", 16, **kwargs)


def test_wrong_channels():
    with pytest.raises(ValueError, match=r"bam.*16 channels"):
        sa.create("bam", 16).eval()(torch.randn(2, 8, 5, 5))
