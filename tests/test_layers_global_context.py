import _torchvision_shim  # noqa: F401  (before anything imports torchvision)
import pytest
import torch

import spatial_attention as sa
from spatial_attention import capture_attention


def _randomise(m):
    # the zero-initialised last convs would hide the transform: give every weight a value
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return m


def _gc_by_hand(m, x):
    """Cao et al. Eq. 3-4 element by element: a_j, the pooled context, LN bottleneck."""
    B, C, H, W = x.shape
    xs = x.reshape(B, C, H * W)
    if m.pooling_type == "att":
        wk, bk = m.conv_mask.weight.reshape(C), m.conv_mask.bias
        logit = torch.einsum("c,bcn->bn", wk, xs) + bk
        a = torch.exp(logit - logit.max(1, keepdim=True).values)
        a = a / a.sum(1, keepdim=True)
    else:
        a = torch.full((B, H * W), 1.0 / (H * W), dtype=x.dtype)
    ctx = torch.einsum("bn,bcn->bc", a, xs)

    def transform(seq):
        w1, b1 = seq[0].weight.reshape(-1, C), seq[0].bias
        h = ctx @ w1.T + b1
        mu = h.mean(1, keepdim=True)
        var = ((h - mu) ** 2).mean(1, keepdim=True)
        h = (h - mu) / torch.sqrt(var + seq[1].eps)
        h = h * seq[1].weight.reshape(-1) + seq[1].bias.reshape(-1)
        h = torch.clamp(h, min=0)
        return h @ seq[3].weight.reshape(C, -1).T + seq[3].bias

    out = x
    if m.channel_mul_conv is not None:
        out = out * (1 / (1 + torch.exp(-transform(m.channel_mul_conv))))[:, :, None, None]
    if m.channel_add_conv is not None:
        out = out + transform(m.channel_add_conv)[:, :, None, None]
    return out, a.reshape(B, 1, H, W)


CONFIGS = [
    dict(),
    dict(fusion_types=("channel_mul",)),
    dict(fusion_types=("channel_add", "channel_mul"), ratio=0.25),
    dict(pooling_type="avg"),
]


@pytest.mark.parametrize("kwargs", CONFIGS)
@pytest.mark.parametrize("impl", ["auto", "explicit"])
def test_matches_equations_float64(kwargs, impl):
    torch.manual_seed(0)
    m = _randomise(sa.create("global_context", 32, attn_impl=impl, **kwargs)).double()
    x = torch.randn(2, 32, 5, 7, dtype=torch.float64)
    ref, _ = _gc_by_hand(m, x)
    torch.testing.assert_close(m(x), ref, rtol=1e-12, atol=1e-12)


def test_defaults_and_identity_init():
    m = sa.create("global_context", 64)
    assert m.planes == 4 and m.pooling_type == "att" and m.fusion_types == ("channel_add",)
    assert m.channel_add_conv[1].eps == 1e-5 and m.channel_mul_conv is None
    x = torch.randn(2, 64, 6, 5)
    torch.testing.assert_close(m(x), x)  # the last conv starts at zero
    assert sa.create("global_context", 8).planes == 1  # 8 / 16 rounds to 0


@pytest.mark.parametrize("kwargs", CONFIGS)
@pytest.mark.parametrize("shape", [(1, 8, 7, 5), (3, 8, 1, 1), (2, 8, 13, 2), (1, 8, 1, 9)])
def test_odd_sizes_fast_equals_explicit(kwargs, shape):
    kwargs = dict(ratio=0.5) | kwargs
    fast = _randomise(sa.create("global_context", 8, **kwargs))
    slow = sa.create("global_context", 8, attn_impl="explicit", **kwargs)
    slow.load_state_dict(fast.state_dict())
    x = torch.randn(shape)
    torch.testing.assert_close(fast(x), slow(x), rtol=1e-5, atol=1e-5)
    xc = x.to(memory_format=torch.channels_last)
    torch.testing.assert_close(fast(xc), slow(x), rtol=1e-5, atol=1e-5)


def test_capture_context_weights():
    torch.manual_seed(0)
    m = _randomise(sa.create("global_context", 8))
    x = torch.randn(2, 8, 5, 3)
    with capture_attention(m) as maps:
        m(x)
    _, a = _gc_by_hand(m, x)
    assert maps[""].shape == (2, 1, 5, 3)
    torch.testing.assert_close(maps[""], a)
    torch.testing.assert_close(maps[""].sum((2, 3)), torch.ones(2, 1))


def test_clear_errors():
    m = sa.create("global_context", 8)
    with pytest.raises(ValueError, match=r"global_context.*8 channels"):
        m(torch.randn(2, 4, 5, 5))
    with pytest.raises(ValueError, match="4-D"):
        m(torch.randn(2, 8, 5))
    for bad, match in [(dict(channels=0), "positive"), (dict(ratio=0), "positive"),
                       (dict(pooling_type="max"), "pooling_type"),
                       (dict(fusion_types=()), "fusion_types"),
                       (dict(fusion_types=("channel_concat",)), "fusion_types")]:
        kwargs = dict(channels=8) | bad
        with pytest.raises(ValueError, match=rf"global_context: .*{match}"):
            sa.create("global_context", kwargs.pop("channels"), **kwargs)


def _timm_gc():
    timm_layers = pytest.importorskip("timm.layers", reason="timm is not installed")
    return timm_layers.GlobalContext


@pytest.mark.parametrize("fusion", ["channel_add", "channel_mul"])
@pytest.mark.parametrize("pooling", ["att", "avg"])
def test_matches_timm_global_context(fusion, pooling):
    """timm's GlobalContext with our fusion, the same bottleneck width and LayerNorm eps."""
    GlobalContext = _timm_gc()
    C, P = 32, 2
    ours = _randomise(sa.create("global_context", C, pooling_type=pooling,
                                fusion_types=(fusion,)))
    theirs = GlobalContext(C, use_attn=pooling == "att", fuse_add=fusion == "channel_add",
                           fuse_scale=fusion == "channel_mul", rd_channels=P)
    mlp = theirs.mlp_add if fusion == "channel_add" else theirs.mlp_scale
    mlp.norm.eps = 1e-5  # timm's LayerNorm2d defaults to 1e-6, the official one to 1e-5
    seq = ours.channel_add_conv if fusion == "channel_add" else ours.channel_mul_conv
    with torch.no_grad():
        if pooling == "att":
            theirs.conv_attn.weight.copy_(ours.conv_mask.weight)
            theirs.conv_attn.bias.copy_(ours.conv_mask.bias)
        mlp.fc1.weight.copy_(seq[0].weight)
        mlp.fc1.bias.copy_(seq[0].bias)
        mlp.norm.weight.copy_(seq[1].weight.reshape(-1))
        mlp.norm.bias.copy_(seq[1].bias.reshape(-1))
        mlp.fc2.weight.copy_(seq[3].weight)
        mlp.fc2.bias.copy_(seq[3].bias)
    ours, theirs = ours.double(), theirs.double()
    for shape in [(2, C, 7, 9), (1, C, 1, 5)]:
        x = torch.randn(shape, dtype=torch.float64)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-12, atol=1e-12)


def test_official_state_dict_keys_load_unchanged():
    m = sa.create("global_context", 16, fusion_types=("channel_add", "channel_mul"))
    keys = {"conv_mask.weight", "conv_mask.bias"}
    for t in ("channel_add_conv", "channel_mul_conv"):
        keys |= {f"{t}.{i}.{p}" for i in (0, 1, 3) for p in ("weight", "bias")}
    assert set(m.state_dict()) == keys
