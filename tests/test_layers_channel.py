import pytest
import torch

import spatial_attention as sa
from spatial_attention import capture_attention
from spatial_attention.layers.channel import eca_kernel_size


@pytest.mark.parametrize("C,k", [(64, 3), (128, 5), (256, 5), (512, 5), (1024, 5), (2048, 7)])
def test_eca_adaptive_kernel(C, k):
    assert eca_kernel_size(C) == k
    assert sa.create("eca", C).kernel_size == k


def test_se_matches_equations():
    m = sa.create("se", 32)
    x = torch.randn(2, 32, 5, 7)
    z = x.mean((2, 3))
    s = torch.sigmoid(m.fc[2](torch.relu(m.fc[0](z))))
    torch.testing.assert_close(m(x), x * s[:, :, None, None])
    assert m.fc[0].out_features == 2  # 32 // 16


def test_eca_matches_equations():
    m = sa.create("eca", 16, kernel_size=3)
    x = torch.randn(2, 16, 4, 3)
    z = x.mean((2, 3))
    w = m.conv.weight[0, 0]
    zp = torch.nn.functional.pad(z, (1, 1))
    ref = torch.sigmoid(w[0] * zp[:, :-2] + w[1] * zp[:, 1:-1] + w[2] * zp[:, 2:])
    torch.testing.assert_close(m(x), x * ref[:, :, None, None])


@pytest.mark.parametrize("name", ["se", "eca"])
@pytest.mark.parametrize("shape", [(1, 8, 7, 5), (3, 8, 1, 1), (2, 8, 13, 2)])
def test_shape_preserved_odd_sizes(name, shape):
    m = sa.create(name, 8)
    assert m(torch.randn(shape)).shape == shape
    assert m(torch.randn(shape).to(memory_format=torch.channels_last)).shape == shape


@pytest.mark.parametrize("name", ["se", "eca"])
def test_gradcheck_float64(name):
    m = sa.create(name, 4).double()
    x = torch.randn(1, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(m, (x,))


@pytest.mark.parametrize("name", ["se", "eca"])
def test_capture_channel_weights(name):
    m = sa.create(name, 8)
    with capture_attention(m) as maps:
        m(torch.randn(2, 8, 5, 5))
    assert maps[""].shape == (2, 8, 1, 1)
    assert ((maps[""] > 0) & (maps[""] < 1)).all()


@pytest.mark.parametrize("name", ["se", "eca"])
def test_clear_errors(name):
    m = sa.create(name, 8)
    with pytest.raises(ValueError, match=rf"{name}.*8 channels"):
        m(torch.randn(2, 4, 5, 5))
    with pytest.raises(ValueError, match=r"4-D"):
        m(torch.randn(2, 8, 5))
    with pytest.raises(ValueError, match="channels-last"):
        m(torch.randn(2, 5, 5, 8))
    with pytest.raises(ValueError, match="positive"):
        sa.create(name, 0)


def test_eca_even_kernel_rejected():
    with pytest.raises(ValueError, match="odd"):
        sa.create("eca", 8, kernel_size=4)


@pytest.mark.parametrize("name", ["se", "eca"])
def test_compile_fullgraph(name):
    m = sa.create(name, 8)
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(torch.compile(m, fullgraph=True, backend="aot_eager")(x), m(x))
