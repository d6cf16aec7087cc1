import pytest
import torch

import spatial_attention as sa
from spatial_attention import capture_attention


def _randomise(m, gamma=0.8):
    torch.manual_seed(3)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
        m.gamma.fill_(gamma)
    return m


def _conv1x1(conv, t):
    return torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], t) + conv.bias[:, None, None]


def _dense_reference(m, x):
    """Eq. 1-2 over all H·W keys, the criss-cross set as a mask: key (h', w') is in u's
    set when it shares u's row or column (u itself once). Returns the output and each
    loop's (B, HW, HW) weights."""
    B, C, H, W = x.shape
    hh, ww = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    hh, ww = hh.flatten(), ww.flatten()
    allowed = (hh[:, None] == hh[None, :]) | (ww[:, None] == ww[None, :])  # (HW, HW)
    weights = []
    for _ in range(m.recurrence):
        q = _conv1x1(m.query_conv, x).flatten(2)  # (B, Ci, HW)
        k = _conv1x1(m.key_conv, x).flatten(2)
        v = _conv1x1(m.value_conv, x).flatten(2)  # (B, C, HW)
        scores = torch.einsum("bcu,bcj->buj", q, k).masked_fill(~allowed, float("-inf"))
        a = torch.softmax(scores, -1)
        weights.append(a)
        x = m.gamma * torch.einsum("buj,bcj->bcu", a, v).reshape(B, C, H, W) + x
    return x, weights


SHAPES = [(2, 16, 5, 7), (1, 8, 1, 1), (1, 8, 1, 9), (3, 16, 6, 1), (1, 8, 4, 4)]


@pytest.mark.parametrize("impl", ["auto", "explicit"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("recurrence", [1, 2])
def test_matches_dense_masked_equations_float64(impl, shape, recurrence):
    m = _randomise(sa.create("criss_cross", shape[1], recurrence=recurrence,
                             attn_impl=impl)).double()
    x = torch.randn(shape, dtype=torch.float64)
    ref, _ = _dense_reference(m, x)
    torch.testing.assert_close(m(x), ref, rtol=1e-10, atol=1e-10)


def test_capture_records_each_loop_as_row_and_column_weights():
    m = _randomise(sa.create("criss_cross", 16)).double()
    x = torch.randn(2, 16, 4, 5, dtype=torch.float64)
    with capture_attention(m) as maps:
        m(x)
    _, dense = _dense_reference(m, x)
    calls = maps.calls("")
    assert len(calls) == 2 and all(c.shape == (2, 4, 5, 9) for c in calls)
    H, W = 4, 5
    for rec, a in zip(calls, dense, strict=True):
        a = a.reshape(2, H, W, H, W)  # [b, h, w, h', w']
        col = torch.einsum("bhwgw->bhwg", a).clone()  # keys (h', w): u's column
        row = torch.einsum("bhwhv->bhwv", a)  # keys (h, v): u's row
        col[:, torch.arange(H), :, torch.arange(H)] = 0  # u itself is counted in its row
        torch.testing.assert_close(rec, torch.cat([col, row], -1))
        torch.testing.assert_close(rec.sum(-1), torch.ones(2, H, W, dtype=torch.float64))
    received = m.spatial_map(calls[-1], (H, W))
    assert received.shape == (2, H, W)
    torch.testing.assert_close(received.sum((1, 2)), torch.ones(2))
    with pytest.raises(ValueError, match="criss_cross"):
        m.spatial_map(calls[-1], (5, 4))


def test_official_layout_defaults_and_identity_init():
    m = sa.create("criss_cross", 64)
    assert (m.inter_channels, m.recurrence) == (8, 2)
    assert set(m.state_dict()) == {  # the official CrissCrossAttention's names
        "gamma", "query_conv.weight", "query_conv.bias", "key_conv.weight", "key_conv.bias",
        "value_conv.weight", "value_conv.bias"}
    assert m.query_conv.weight.shape == (8, 64, 1, 1)
    assert m.value_conv.weight.shape == (64, 64, 1, 1)
    assert m.gamma.item() == 0
    x = torch.randn(2, 64, 5, 3)
    torch.testing.assert_close(m(x), x)
    assert sa.create("criss_cross", 4).inter_channels == 1


def test_load_official_state_dict_unwraps_and_selects_prefix():
    src = _randomise(sa.create("criss_cross", 16))
    whole = {f"module.head.cca.{k}": v for k, v in src.state_dict().items()}
    whole["module.head.conva.0.weight"] = torch.zeros(1)
    m = sa.create("criss_cross", 16)
    m.load_official_state_dict({"state_dict": whole}, prefix="head.cca.")
    for k, v in src.state_dict().items():
        torch.testing.assert_close(m.state_dict()[k], v)
    m2 = sa.create("criss_cross", 16)
    m2.load_official_state_dict(src.state_dict())  # a bare module's dict loads as is
    torch.testing.assert_close(m2.gamma, src.gamma)


def test_fast_path_keeps_channels_last_and_matches_explicit():
    fast = _randomise(sa.create("criss_cross", 16))
    slow = sa.create("criss_cross", 16, attn_impl="explicit")
    slow.load_state_dict(fast.state_dict())
    x = torch.randn(2, 16, 7, 5)
    cl = x.contiguous(memory_format=torch.channels_last)
    y = fast(cl)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert fast(x).is_contiguous()
    torch.testing.assert_close(y, slow(x), rtol=1e-5, atol=1e-5)


def test_gradcheck_recurrence_three():
    m = _randomise(sa.create("criss_cross", 8, recurrence=3)).double()
    x = torch.randn(1, 8, 3, 4, dtype=torch.float64, requires_grad=True)
    for impl in ("auto", "explicit"):
        m.attn_impl = impl
        torch.autograd.gradcheck(m, (x,))


def test_clear_errors():
    m = sa.create("criss_cross", 8)
    with pytest.raises(ValueError, match=r"criss_cross.*8 channels"):
        m(torch.randn(2, 4, 5, 5))
    with pytest.raises(ValueError, match="criss_cross"):
        m(torch.randn(2, 8, 5))
    for bad in ({"reduction": 0}, {"recurrence": 0}):
        with pytest.raises(ValueError, match="criss_cross"):
            sa.create("criss_cross", 8, **bad)
    with pytest.raises(ValueError, match="criss_cross: channels must be positive"):
        sa.create("criss_cross", 0)
