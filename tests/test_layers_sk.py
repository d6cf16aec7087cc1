import pytest
import torch
import torch.nn.functional as F

import spatial_attention as sa
from spatial_attention import capture_attention, explicit_path


def timm_style_state_dict(C=64, G=32, d=32, M=2):
    """Names and shapes of timm's SelectiveKernel(split_input=False) with the paper's setup."""
    g = torch.Generator().manual_seed(2)
    sd = {}
    for m in range(M):
        sd[f"paths.{m}.conv.weight"] = torch.randn(C, C // G, 3, 3, generator=g) * 0.2
        sd[f"paths.{m}.bn.weight"] = torch.rand(C, generator=g) + 0.5
        sd[f"paths.{m}.bn.bias"] = torch.randn(C, generator=g) * 0.1
        sd[f"paths.{m}.bn.running_mean"] = torch.randn(C, generator=g) * 0.1
        sd[f"paths.{m}.bn.running_var"] = torch.rand(C, generator=g) + 0.5
        sd[f"paths.{m}.bn.num_batches_tracked"] = torch.tensor(7)
    sd["attn.fc_reduce.weight"] = torch.randn(d, C, 1, 1, generator=g) * 0.2
    sd["attn.bn.weight"] = torch.rand(d, generator=g) + 0.5
    sd["attn.bn.bias"] = torch.randn(d, generator=g) * 0.1
    sd["attn.bn.running_mean"] = torch.randn(d, generator=g) * 0.1
    sd["attn.bn.running_var"] = torch.rand(d, generator=g) + 0.5
    sd["attn.bn.num_batches_tracked"] = torch.tensor(7)
    sd["attn.fc_select.weight"] = torch.randn(M * C, d, 1, 1, generator=g) * 0.2
    return sd


def bn(t, sd, prefix, eps=1e-5):
    shape = (1, -1) + (1,) * (t.dim() - 2)
    mean, var = sd[prefix + "running_mean"].view(shape), sd[prefix + "running_var"].view(shape)
    return (t - mean) / torch.sqrt(var + eps) * sd[prefix + "weight"].view(shape) + sd[
        prefix + "bias"
    ].view(shape)


def reference_sk(sd, x, G=32, dilations=(1, 2)):
    """Li et al. 2019, Eq. 1-6, re-stated with raw tensors (BatchNorm in eval mode)."""
    C = x.shape[1]
    U = [
        F.relu(bn(F.conv2d(x, sd[f"paths.{m}.conv.weight"], padding=d, dilation=d, groups=G), sd,
                  f"paths.{m}.bn."))
        for m, d in enumerate(dilations)
    ]
    s = sum(U).mean((2, 3))  # Eq. 1-2: (B, C)
    z = F.relu(bn(s @ sd["attn.fc_reduce.weight"][:, :, 0, 0].T, sd, "attn.bn."))  # Eq. 3
    A = sd["attn.fc_select.weight"][:, :, 0, 0].reshape(len(U), C, -1)
    logits = torch.stack([z @ A[m].T for m in range(len(U))], 1)  # (B, M, C)
    a = torch.softmax(logits, 1)  # Eq. 5
    return sum(a[:, m, :, None, None] * U[m] for m in range(len(U))), a  # Eq. 6


def test_timm_names_load_and_output_matches_the_paper():
    sd = timm_style_state_dict()
    m = sa.create("sk", 64).eval()
    assert m.groups == 32 and m.attn_channels == 32  # G = 32, d = max(64 / 16, L = 32)
    m.load_state_dict(sd)  # strict: same names and shapes as timm's SelectiveKernel
    x = torch.randn(2, 64, 9, 7)
    ref, a = reference_sk(sd, x)
    torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)
    with capture_attention(m) as maps:
        torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)
    assert maps[""].shape == (2, 2, 64, 1, 1)
    torch.testing.assert_close(maps[""][..., 0, 0], a, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(maps[""].sum(1), torch.ones(2, 64, 1, 1))


@pytest.mark.parametrize("C,G,d", [(64, 32, 32), (1024, 32, 64), (16, 16, 32), (48, 16, 32)])
def test_defaults_groups_and_width(C, G, d):
    m = sa.create("sk", C)
    assert (m.groups, m.attn_channels, len(m.paths)) == (G, d, 2)
    assert m.paths[1].conv.dilation == (2, 2) and m.paths[0].conv.dilation == (1, 1)


@pytest.mark.parametrize("shape", [(1, 16, 7, 5), (2, 16, 1, 1), (1, 16, 13, 2)])
def test_drop_in_conv_shapes(shape):
    m = sa.create("sk", 16).eval()
    x = torch.randn(shape)
    out = m(x)
    assert out.shape == shape
    mc = m.to(memory_format=torch.channels_last)
    torch.testing.assert_close(mc(x.to(memory_format=torch.channels_last)), out, atol=1e-5,
                               rtol=1e-5)
    down = sa.create("sk", 16, out_channels=32, stride=2).eval()
    assert down(torch.randn(1, 16, 9, 8)).shape == (1, 32, 5, 4)


def test_three_branches_and_training_mode():
    m = sa.create("sk", 8, dilations=(1, 2, 3)).train()
    x = torch.randn(2, 8, 6, 5)
    out = m(x)
    with explicit_path(m):
        torch.testing.assert_close(m(x), out, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert m.attn.fc_select.weight.grad is not None


def test_clear_errors():
    m = sa.create("sk", 16)
    with pytest.raises(ValueError, match=r"sk.*16 channels"):
        m(torch.randn(2, 8, 5, 5))
    with pytest.raises(ValueError, match=r"sk.*4-D"):
        m(torch.randn(2, 16, 5))
    with pytest.raises(ValueError, match="two branches"):
        sa.create("sk", 16, dilations=(1,))
    with pytest.raises(ValueError, match="positive"):
        sa.create("sk", 16, dilations=(1, 0))
@pytest.mark.parametrize("weights_channels_last", [False, True])
def test_bf16_channels_last_weight_gradient_of_the_dilated_branch(weights_channels_last):
    """PyTorch 2.13's CPU kernels get the weight gradient of a grouped, dilated bf16
    convolution in the channels_last format wrong at 32x32; the layer routes around it, so
    its gradient under autocast stays close to the float32 one (measured: 0.07 relative
    error with the workaround, bf16 rounding; 1.43 without it). Both a channels_last
    input and channels_last weights (what `spatial-attention train` makes of a model)
    select that format."""
    torch.manual_seed(0)
    m = sa.create("sk", 64)
    if weights_channels_last:
        m = m.to(memory_format=torch.channels_last)
    x = torch.randn(8, 64, 32, 32).contiguous(memory_format=torch.channels_last)
    g = torch.randn(8, 64, 32, 32)

    def weight_grad(autocast: bool) -> torch.Tensor:
        m.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = m(x)
        (y.float() * g).sum().backward()
        return m.paths[1].conv.weight.grad.clone()

    ref, low = weight_grad(False), weight_grad(True)
    assert torch.isfinite(low).all()
    assert (low - ref).norm() / ref.norm() < 0.2
