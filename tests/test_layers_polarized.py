import pytest
import torch

import spatial_attention as sa
from spatial_attention import capture_attention, explicit_path
from spatial_attention.layers.polarized import convert_official_psa_keys

COMBOS = [(mode, variant) for mode in ("parallel", "sequential")
          for variant in ("paper", "official")]


def _randomise(m):
    torch.manual_seed(5)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.4)
    return m


def _w(conv):
    return conv.weight[:, :, 0, 0]


def _layer_norm(z, ln):
    """LayerNorm over every axis but the batch, written out (biased variance, eps)."""
    dims = tuple(range(1, z.dim()))
    mu = z.mean(dims, keepdim=True)
    var = ((z - mu) ** 2).mean(dims, keepdim=True)
    return (z - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def _channel_gate(m, x):
    """A_ch (B, C): softmax over positions of W_q X pools W_v X into C/2 values."""
    p = torch.softmax(torch.einsum("oc,bcn->bon", _w(m.ch_wq), x.flatten(2))[:, 0], -1)
    z = torch.einsum("oc,bcn,bn->bo", _w(m.ch_wv), x.flatten(2), p)  # (B, C/2)
    if m.variant == "paper":  # W_z, LayerNorm over C, sigmoid
        return torch.sigmoid(_layer_norm(z @ _w(m.ch_wz).T, m.ch_norm))
    if m.mode == "parallel":  # released PSA_p: a plain W_z
        return torch.sigmoid(z @ _w(m.ch_wz).T)
    c1, ln, _, c2 = m.ch_wz  # released PSA_s: conv, LayerNorm, ReLU, conv
    h = torch.relu(_layer_norm(z @ _w(c1).T + c1.bias, _LN(ln)))
    return torch.sigmoid(h @ _w(c2).T + c2.bias)


class _LN:
    """A [mid, 1, 1] LayerNorm's parameters seen on a (B, mid) tensor."""

    def __init__(self, ln):
        self.eps, self.weight, self.bias = ln.eps, ln.weight.flatten(), ln.bias.flatten()


def _spatial_gate(m, u):
    """A_sp (B, H·W) of the spatial-only branch on u."""
    q = torch.einsum("oc,bcn->bo", _w(m.sp_wq), u.flatten(2)) / u[0, 0].numel()  # GAP
    v = torch.einsum("oc,bcn->bon", _w(m.sp_wv), u.flatten(2))  # (B, C/2, N)
    if m.variant == "paper":
        s = torch.einsum("bo,bon->bn", torch.softmax(q, -1), v)
    elif m.mode == "parallel":  # released PSA_p: softmax over positions after the product
        s = torch.softmax(torch.einsum("bo,bon->bn", q, v), -1)
    else:  # released PSA_s: softmax over the positions of each value channel
        s = torch.einsum("bo,bon->bn", q, torch.softmax(v, -1))
    return torch.sigmoid(s)


def _reference(m, x):
    B, C, H, W = x.shape
    a_ch = _channel_gate(m, x)[:, :, None, None]
    if m.mode == "parallel":
        a_sp = _spatial_gate(m, x).view(B, 1, H, W)
        return x * a_ch + x * a_sp, a_ch, a_sp
    y = x * a_ch
    a_sp = _spatial_gate(m, y).view(B, 1, H, W)
    return y * a_sp, a_ch, a_sp


SHAPES = [(2, 16, 5, 7), (1, 8, 1, 1), (1, 8, 1, 9), (3, 16, 6, 1)]


@pytest.mark.parametrize("mode,variant", COMBOS)
@pytest.mark.parametrize("impl", ["auto", "explicit"])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_equations_float64(mode, variant, impl, shape):
    m = _randomise(sa.create("polarized", shape[1], mode=mode, variant=variant,
                             attn_impl=impl)).double()
    x = torch.randn(shape, dtype=torch.float64)
    ref, _, _ = _reference(m, x)
    torch.testing.assert_close(m(x), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode,variant", COMBOS)
def test_capture_records_both_gates(mode, variant):
    m = _randomise(sa.create("polarized", 16, mode=mode, variant=variant)).double()
    x = torch.randn(2, 16, 5, 3, dtype=torch.float64)
    with capture_attention(m) as maps:
        m(x)
    _, a_ch, a_sp = _reference(m, x)
    rec_ch, rec_sp = maps.calls("")
    torch.testing.assert_close(rec_ch, a_ch)
    torch.testing.assert_close(rec_sp, a_sp)
    assert maps[""].shape == (2, 1, 5, 3) and m.spatial_map(maps[""], (5, 3)).shape == (2, 5, 3)


@pytest.mark.parametrize("mode,variant", COMBOS)
def test_fast_equals_explicit_gradients_and_gradcheck(mode, variant):
    m = _randomise(sa.create("polarized", 8, mode=mode, variant=variant)).double()
    x = torch.randn(2, 8, 3, 5, dtype=torch.float64)
    grads = []
    for explicit in (False, True):
        m.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        with explicit_path(m, explicit=explicit):
            (m(xi) * torch.linspace(-1, 1, x.numel()).view_as(x)).sum().backward()
        grads.append([xi.grad] + [p.grad for p in m.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    xg = torch.randn(1, 8, 2, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(m, (xg,))


def test_defaults_widths_and_official_init():
    m = sa.create("polarized", 64)
    assert (m.mode, m.variant, m.inter_channels) == ("sequential", "paper", 32)
    assert _w(m.ch_wq).shape == (1, 64) and _w(m.ch_wv).shape == (32, 64)
    assert _w(m.ch_wz).shape == (64, 32) and m.ch_wz.bias is None
    assert m.ch_norm.normalized_shape == (64,) and m.ch_norm.eps == 1e-5
    assert all(c.bias is None for c in (m.ch_wq, m.ch_wv, m.sp_wq, m.sp_wv))
    torch.manual_seed(0)
    big = sa.create("polarized", 2048)  # kaiming normal, fan_in, ReLU gain: std sqrt(2/C)
    assert abs(big.sp_wv.weight.std().item() - (2 / 2048) ** 0.5) < 2e-3
    s = sa.create("polarized", 64, variant="official")
    assert s.ch_norm is None and s.ch_wz[1].normalized_shape == (8, 1, 1)
    assert s.ch_wz[0].bias is not None and s.ch_wz[3].weight.shape == (64, 8, 1, 1)
    p = sa.create("polarized", 64, mode="parallel", variant="official")
    assert isinstance(p.ch_wz, torch.nn.Conv2d) and p.ch_wz.bias is None
    assert sa.create("polarized", 1).inter_channels == 1


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_official_keys_convert_and_load(mode):
    official = {"conv_q_right.weight", "conv_v_right.weight", "conv_q_left.weight",
                "conv_v_left.weight"}
    if mode == "parallel":
        official |= {"conv_up.weight"}
    else:
        official |= {f"conv_up.{i}.{p}" for i in (0, 1, 3) for p in ("weight", "bias")}
    m = sa.create("polarized", 16, mode=mode, variant="official")
    assert set(convert_official_psa_keys({k: None for k in official})) == set(m.state_dict())
    nested = {"layer1.0.deattn.conv_up.1.weight": 1, "layer1.0.conv1.weight": 2}
    assert convert_official_psa_keys({"state_dict": {f"module.{k}": v for k, v in
                                                     nested.items()}}) == {
        "layer1.0.deattn.ch_wz.1.weight": 1, "layer1.0.conv1.weight": 2}
    src = _randomise(sa.create("polarized", 16, mode=mode, variant="official"))
    back = {k.replace("ch_wq.", "conv_q_right.").replace("ch_wv.", "conv_v_right.")
            .replace("ch_wz.", "conv_up.").replace("sp_wq.", "conv_q_left.")
            .replace("sp_wv.", "conv_v_left."): v for k, v in src.state_dict().items()}
    m.load_official_state_dict(back)
    x = torch.randn(2, 16, 4, 3)
    torch.testing.assert_close(m(x), src(x))
    with pytest.raises(ValueError, match="polarized: official checkpoints need"):
        sa.create("polarized", 16, mode=mode).load_official_state_dict(back)


def test_export_official_sequential():
    m = _randomise(sa.create("polarized", 8, variant="official")).eval()
    x = torch.randn(2, 8, 5, 3)
    ep = torch.export.export(m, (x,))
    torch.testing.assert_close(ep.module()(x), m(x))


def test_clear_errors():
    m = sa.create("polarized", 8)
    with pytest.raises(ValueError, match=r"polarized.*8 channels"):
        m(torch.randn(2, 4, 5, 5))
    with pytest.raises(ValueError, match="polarized"):
        m(torch.randn(2, 8, 5))
    with pytest.raises(ValueError, match="polarized: mode"):
        sa.create("polarized", 8, mode="both")
    with pytest.raises(ValueError, match="polarized: variant"):
        sa.create("polarized", 8, variant="psa")
    with pytest.raises(ValueError, match="polarized: channels must be positive"):
        sa.create("polarized", 0)
