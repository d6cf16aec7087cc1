"""Issue #15, items 4 and 5: input dtypes and valid_lens are checked before compute."""

import pytest
import torch

import spatial_attention as sa


def test_integer_input_is_a_named_value_error():
    with pytest.raises(ValueError, match=r"se: expected a floating-point input.*int64"):
        sa.create("se", 8)(torch.randint(0, 5, (2, 8, 4, 4)))


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_ssa_refuses_non_float_input_and_guide(dtype):
    m = sa.create("ssa", 8, num_bases=2, guide_channels=4)
    x, guide = torch.randn(1, 8, 4, 4), torch.randn(1, 4, 4, 4)
    with pytest.raises(ValueError, match="ssa: expected a floating-point"):
        m((x > 0).to(dtype), guide)
    with pytest.raises(ValueError, match="ssa: expected a floating-point"):
        m(x, (guide > 0).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_float_dtype_unlike_the_parameters_is_explained(dtype):
    with pytest.raises(ValueError, match=rf"se: input dtype {dtype} differs from the "
                       r"parameters' torch.float32"):
        sa.create("se", 8)(torch.randn(2, 8, 4, 4, dtype=dtype))


def test_autocast_and_converted_modules_still_run():
    m = sa.create("se", 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m(torch.randn(2, 8, 4, 4).bfloat16()).shape == (2, 8, 4, 4)
    assert m.double()(torch.randn(2, 8, 4, 4, dtype=torch.float64)).dtype == torch.float64


def _seq(name):
    x = torch.randn(2, 5, 8)
    if name in ("dot_product", "scaled_dot_product"):
        return sa.create(name), (x, x, x)
    if name == "additive":
        return sa.create(name, 8, 8, 8), (x, x, x)
    if name == "multi_head":
        return sa.create(name, 8, 2), (x,)
    return sa.create(name, 8, num_heads=2), (x,)


SEQUENCE = ["dot_product", "scaled_dot_product", "additive", "multi_head", "shared_workspace"]


@pytest.mark.parametrize("name", SEQUENCE)
def test_valid_lens_list_is_accepted(name):
    m, xs = _seq(name)
    torch.testing.assert_close(m(*xs, valid_lens=[5, 3]), m(*xs, valid_lens=torch.tensor([5, 3])))
    torch.testing.assert_close(m(*xs, valid_lens=(5, 3)), m(*xs, valid_lens=torch.tensor([5, 3])))


@pytest.mark.parametrize("name", SEQUENCE)
@pytest.mark.parametrize("bad,match", [
    ([-1, 3], r"must be in \[0, 5\].*got -1"),
    ([5, 6], r"must be in \[0, 5\].*got 6"),
    (torch.tensor([5.0, 3.0]), "must be integers, got dtype torch.float32"),
    (torch.tensor([True, False]), "must be integers, got dtype torch.bool"),
    ([5, 3, 1], r"shape \(2,\)"),
    ("5", "must be a tensor, list or tuple"),
])
def test_bad_valid_lens_name_the_wrong_value(name, bad, match):
    m, xs = _seq(name)
    with pytest.raises(ValueError, match=f"{name}: valid_lens {match}" if "must" in match
                       else name):
        m(*xs, valid_lens=bad)


def test_masked_softmax_checks_lengths_against_the_keys():
    from spatial_attention.functional import masked_softmax

    with pytest.raises(ValueError, match=r"masked_softmax: valid_lens must be in \[0, 4\]"):
        masked_softmax(torch.randn(2, 3, 4), torch.tensor([4, 9]))
