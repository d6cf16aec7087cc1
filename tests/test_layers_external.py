import pytest
import torch

import spatial_attention as sa
from spatial_attention import capture_attention


def _randomise(m):
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        bn = m.conv2[1]
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    return m


def _ea_by_hand(m, x):
    """Guo et al. Eq. 5-6 in the paper's (N, d) orientation, the EANet head around them."""
    B, C, H, W = x.shape
    F_ = x.flatten(2).transpose(1, 2)  # (B, N, C)
    F_ = F_ @ m.conv1.weight[:, :, 0, 0].T + m.conv1.bias  # W_1
    Mk = m.linear_0.weight[:, :, 0]  # (S, C)
    Mv = m.linear_1.weight[:, :, 0].T  # (S, C)
    a = F_ @ Mk.T  # (B, N, S): F M_k^T
    a = torch.exp(a - a.amax(1, keepdim=True))
    a = a / a.sum(1, keepdim=True)  # softmax over the N positions
    a = a / (1e-9 + a.sum(2, keepdim=True))  # l1 over the S units
    out = a @ Mv  # (B, N, C): A M_v
    out = out @ m.conv2[0].weight[:, :, 0, 0].T  # W_2
    bn = m.conv2[1]
    if bn.training:
        mean, var = out.mean((0, 1)), out.var((0, 1), unbiased=False)
    else:
        mean, var = bn.running_mean, bn.running_var
    out = (out - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias
    y = torch.clamp(x + out.transpose(1, 2).reshape(B, C, H, W), min=0)
    return y, a.transpose(1, 2)


@pytest.mark.parametrize("impl", ["auto", "explicit"])
@pytest.mark.parametrize("train", [False, True])
def test_matches_equations_float64(impl, train):
    torch.manual_seed(0)
    m = _randomise(sa.create("external", 16, k=8, attn_impl=impl)).double().train(train)
    x = torch.randn(2, 16, 5, 7, dtype=torch.float64)
    ref, _ = _ea_by_hand(m, x)
    torch.testing.assert_close(m(x), ref, rtol=1e-10, atol=1e-10)


def test_defaults_and_official_init():
    torch.manual_seed(0)
    m = sa.create("external", 256)
    assert m.k == 64 and m.linear_0.weight.shape == (64, 256, 1)
    torch.testing.assert_close(m.linear_1.weight, m.linear_0.weight.transpose(0, 1))
    assert m.linear_1.weight.data_ptr() != m.linear_0.weight.data_ptr()  # trained apart
    assert abs(m.linear_0.weight.std().item() - (2 / 256) ** 0.5) < 0.01
    assert m.conv2[1].eps == 1e-5 and m.conv2[1].momentum == 0.1
    keys = {"conv1.weight", "conv1.bias", "linear_0.weight", "linear_1.weight",
            "conv2.0.weight"} | {f"conv2.1.{n}" for n in (
                "weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    assert set(m.state_dict()) == keys  # the official External_attention's names


@pytest.mark.parametrize("shape", [(1, 8, 7, 5), (3, 8, 1, 1), (2, 8, 13, 2), (1, 8, 1, 9)])
def test_odd_sizes_fast_equals_explicit(shape):
    fast = _randomise(sa.create("external", 8, k=4)).eval()
    slow = sa.create("external", 8, k=4, attn_impl="explicit").eval()
    slow.load_state_dict(fast.state_dict())
    x = torch.randn(shape)
    torch.testing.assert_close(fast(x), slow(x), rtol=1e-5, atol=1e-5)
    xc = x.to(memory_format=torch.channels_last)
    torch.testing.assert_close(fast(xc), slow(x), rtol=1e-5, atol=1e-5)


def test_capture_double_normalised_attention():
    torch.manual_seed(0)
    m = _randomise(sa.create("external", 8, k=4)).double().eval()
    x = torch.randn(2, 8, 5, 3, dtype=torch.float64)
    with capture_attention(m) as maps:
        m(x)
    _, a = _ea_by_hand(m, x)
    assert maps[""].shape == (2, 4, 15)
    torch.testing.assert_close(maps[""], a)
    torch.testing.assert_close(maps[""].sum(1), torch.ones(2, 15, dtype=torch.float64))
    assert m.spatial_map(maps[""], (5, 3)).shape == (2, 5, 3)


def test_clear_errors():
    m = sa.create("external", 8)
    with pytest.raises(ValueError, match=r"external.*8 channels"):
        m(torch.randn(2, 4, 5, 5))
    with pytest.raises(ValueError, match="4-D"):
        m(torch.randn(2, 8, 5))
    with pytest.raises(ValueError, match="external: k must be positive"):
        sa.create("external", 8, k=0)
    with pytest.raises(ValueError, match="external: channels must be positive"):
        sa.create("external", 0)


@pytest.mark.parametrize("impl", ["auto", "explicit"])
def test_result_may_be_modified_in_place(impl):
    """timm's blocks add their shortcut to the attention's result in place."""
    m = sa.create("external", 8, k=4, attn_impl=impl)
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    y = m(x)
    y += 1.0
    y.relu_().sum().backward()
    assert x.grad is not None
