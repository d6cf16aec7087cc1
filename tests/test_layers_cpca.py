import pytest
import torch
import torch.nn.functional as F

import spatial_attention as sa
from spatial_attention import capture_attention, explicit_path
from spatial_attention.layers.cpca import (
    ChannelPriorConvAttention,
    find_official_cpca_blocks,
    official_cpca_state_dict,
)

PREFIX = "model_down.layers.0.blocks.1.repmlp_block."


def official_block(C=8, hidden=2, prefix=PREFIX):
    """A state dict with the official CPCANet names and shapes (RepBlock inside a Block)."""
    g = torch.Generator().manual_seed(1)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    sd = {
        "ca.fc1.weight": r(hidden, C, 1, 1), "ca.fc1.bias": r(hidden),
        "ca.fc2.weight": r(C, hidden, 1, 1), "ca.fc2.bias": r(C),
        "dconv5_5.weight": r(C, 1, 5, 5), "dconv5_5.bias": r(C),
        "conv.weight": r(C, C, 1, 1), "conv.bias": r(C),
    }
    for k in (7, 11, 21):
        sd[f"dconv1_{k}.weight"], sd[f"dconv1_{k}.bias"] = r(C, 1, 1, k), r(C)
        sd[f"dconv{k}_1.weight"], sd[f"dconv{k}_1.bias"] = r(C, 1, k, 1), r(C)
    full = {prefix + k: v for k, v in sd.items()}
    # the rest of the CPCANet Block around it
    block = prefix[: -len("repmlp_block.")]
    full[block + "dwconv.weight"] = r(C, 1, 7, 7)
    full[block + "bn.weight"] = r(C)
    return full, sd


def reference_cpca(sd, x):
    """RepBlock.forward of the official code, re-stated with raw tensors."""
    C = x.shape[1]

    def conv(t):  # the one shared 1x1 conv
        return F.conv2d(t, sd["conv.weight"], sd["conv.bias"])

    def mlp(t):
        h = F.relu(F.conv2d(t, sd["ca.fc1.weight"], sd["ca.fc1.bias"]))
        return torch.sigmoid(F.conv2d(h, sd["ca.fc2.weight"], sd["ca.fc2.bias"]))

    def dw(t, name, pad):
        return F.conv2d(t, sd[name + ".weight"], sd[name + ".bias"], padding=pad, groups=C)

    x = F.gelu(conv(x))
    ca = mlp(x.mean((2, 3), keepdim=True)) + mlp(x.amax((2, 3), keepdim=True))
    prior = ca * x
    x0 = dw(prior, "dconv5_5", 2)
    s = x0
    for k in (7, 11, 21):
        s = s + dw(dw(x0, f"dconv1_{k}", (0, k // 2)), f"dconv{k}_1", (k // 2, 0))
    return conv(conv(s) * prior)


def test_official_state_dict_loads_and_matches_official_forward():
    full, sd = official_block()
    assert find_official_cpca_blocks(full) == [PREFIX]
    m = ChannelPriorConvAttention.from_official(full, PREFIX).eval()
    assert m.channels == 8 and m.reduction == 4
    # the names are the official ones: a bare block loads with strict=True as is
    m2 = sa.create("cpca", 8)
    m2.load_state_dict(sd)
    x = torch.randn(2, 8, 9, 7)
    ref = reference_cpca(sd, x)
    torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)
    with explicit_path(m):
        torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m2(x), ref, atol=1e-5, rtol=1e-5)


def test_official_loader_errors_name_the_missing_key():
    full, _ = official_block()
    del full[PREFIX + "dconv11_1.bias"]
    with pytest.raises(ValueError, match=r"cpca.*dconv11_1\.bias"):
        official_cpca_state_dict(full, PREFIX)
    full, _ = official_block()
    with pytest.raises(ValueError, match="found under.*repmlp_block"):
        official_cpca_state_dict(full, "wrong.prefix.")


def test_parameter_names_are_official():
    names = set(sa.create("cpca", 8).state_dict())
    _, sd = official_block()
    assert names == set(sd)


@pytest.mark.parametrize("shape", [(1, 8, 7, 5), (2, 8, 1, 1), (1, 8, 13, 2)])
def test_shape_preserved_odd_sizes_and_channels_last(shape):
    m = sa.create("cpca", 8).eval()
    x = torch.randn(shape)
    out = m(x)
    assert out.shape == shape
    xc, mc = x.to(memory_format=torch.channels_last), m.to(memory_format=torch.channels_last)
    torch.testing.assert_close(mc(xc), out, atol=1e-5, rtol=1e-5)


def test_capture_records_channel_prior_then_spatial_attention():
    m = sa.create("cpca", 8)
    x = torch.randn(2, 8, 6, 5)
    with capture_attention(m) as maps:
        m(x)
    prior, spatial = maps.calls("")
    assert prior.shape == (2, 8, 1, 1) and spatial.shape == (2, 8, 6, 5)
    assert ((prior > 0) & (prior < 2)).all()  # two sigmoids summed, as in the official code
    assert ChannelPriorConvAttention.spatial_map(maps[""], (6, 5)).shape == (2, 6, 5)


def test_narrow_maps_and_gradcheck():
    m = sa.create("cpca", 2).double()  # C < reduction: hidden width max(1, 2 // 4) = 1
    assert m.ca.fc1.out_channels == 1
    x = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(m, (x,))


def test_clear_errors():
    m = sa.create("cpca", 8)
    with pytest.raises(ValueError, match=r"cpca.*8 channels"):
        m(torch.randn(2, 4, 5, 5))
    with pytest.raises(ValueError, match=r"cpca.*4-D"):
        m(torch.randn(2, 8, 5))
    with pytest.raises(ValueError, match="positive"):
        sa.create("cpca", 0)
    with pytest.raises(ValueError, match="odd"):
        sa.create("cpca", 8, kernel_sizes=(7, 10))
