"""permute_rows: an index_select whose backward is a gather by the inverse index."""

import pytest
import torch

import spatial_attention as sa
from spatial_attention.functional import permute
from spatial_attention.functional.permute import inverse_index, permute_rows


def _grads(x, index, inverse, weight, zero_row=False, plain=False):
    x = x.detach().requires_grad_()
    if plain:
        y = x.index_select(1, index)
    else:
        y = permute_rows(x, 1, index, inverse, zero_row=zero_row)
    (y * weight).sum().backward()
    return y.detach(), x.grad


def test_a_permutation_gets_the_index_select_gradient():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 3, dtype=torch.float64)
    index = torch.randperm(7)
    inverse = inverse_index(index, 7)
    assert torch.equal(index[inverse], torch.arange(7))
    w = torch.randn(2, 7, 3, dtype=torch.float64)
    y, g = _grads(x, index, inverse, w)
    y_ref, g_ref = _grads(x, index, inverse, w, plain=True)
    assert torch.equal(y, y_ref)
    torch.testing.assert_close(g, g_ref)


def test_padding_slots_with_zero_gradient_and_rows_nobody_reads():
    """Gather with padding slots (they read row 0 and receive no gradient), then the
    way back, where the padding slots are sources that no output reads (zero_row)."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    gather = torch.tensor([3, 0, 4, 0, 1, 2, 0])  # slots 3 and 6 are padding
    real = torch.tensor([1, 1, 1, 0, 1, 1, 0], dtype=torch.bool)
    scatter = torch.tensor([1, 4, 5, 0, 2])  # the slot of every row
    w = torch.randn(2, 7, 3, dtype=torch.float64) * real[None, :, None]
    y, g = _grads(x, gather, scatter, w)
    y_ref, g_ref = _grads(x, gather, scatter, w, plain=True)
    assert torch.equal(y, y_ref)
    torch.testing.assert_close(g, g_ref)

    slots = torch.randn(2, 7, 3, dtype=torch.float64)
    unscatter = inverse_index(scatter, 7)
    assert unscatter.tolist() == [3, 0, 4, 5, 1, 2, 5]  # 5: read from a zero row
    w_back = torch.randn(2, 5, 3, dtype=torch.float64)
    y, g = _grads(slots, scatter, unscatter, w_back, zero_row=True)
    y_ref, g_ref = _grads(slots, scatter, unscatter, w_back, plain=True)
    assert torch.equal(y, y_ref)
    torch.testing.assert_close(g, g_ref)
    assert not g[:, real.logical_not()].any()


def test_plain_index_select_when_no_gradient_or_exporting():
    x = torch.randn(3, 4)
    index = torch.tensor([2, 0, 1])
    with torch.no_grad():
        assert permute_rows(x.requires_grad_(), 0, index, inverse_index(index, 3)).grad_fn is None
    traced = torch.jit.trace(lambda t: permute_rows(t, 0, index, inverse_index(index, 3)),
                             (torch.randn(3, 4, requires_grad=True),))
    assert "PythonOp" not in str(traced.graph)


@pytest.mark.parametrize("size, shift", [((14, 14), 3), ((13, 10), 3), ((13, 10), 0)])
def test_window_attention_gradients_equal_the_plain_gather(size, shift, monkeypatch):
    """Shifted and/or padded window attention: the gather-backward path gives the
    gradients autograd derives for index_select (input and every parameter)."""
    torch.manual_seed(0)
    m = sa.create("window_attention", 16, 2, window_size=7, shift_size=shift).double()
    x = torch.randn(2, *size, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, *size, 16, dtype=torch.float64)

    def grads():
        m.zero_grad()
        x.grad = None
        (m(x) * w).sum().backward()
        return [x.grad.clone()] + [p.grad.clone() for p in m.parameters()]

    fast = grads()
    monkeypatch.setattr(permute, "exporting_graph", lambda: True)
    plain = grads()
    for a, b in zip(fast, plain, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
