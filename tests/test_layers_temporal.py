import pytest
import torch
import torch.nn.functional as F

import spatial_attention as sa
from spatial_attention import capture_attention, explicit_path
from spatial_attention.layers.temporal import TemporalAdaptiveModule, TemporalSelfAttention


def strip(sd, prefix):
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


# -- temporal: TimeSformer time attention ---------------------------------------------------
def timesformer_block(C=16, prefix="model.blocks.3."):
    g = torch.Generator().manual_seed(3)
    sd = {
        "temporal_attn.qkv.weight": torch.randn(3 * C, C, generator=g) * 0.3,
        "temporal_attn.qkv.bias": torch.randn(3 * C, generator=g) * 0.1,
        "temporal_attn.proj.weight": torch.randn(C, C, generator=g) * 0.3,
        "temporal_attn.proj.bias": torch.randn(C, generator=g) * 0.1,
        "temporal_norm1.weight": torch.ones(C), "temporal_fc.weight": torch.zeros(C, C),
    }
    return {prefix + k: v for k, v in sd.items()}


def reference_time_attention(sd, x, heads):
    """alpha_(p,t) = softmax_t'(q_(p,t) . k_(p,t') / sqrt(D_h)), per head; then W_O."""
    B, T, C, H, W = x.shape
    tok = x.permute(0, 3, 4, 1, 2)  # (B, H, W, T, C)
    qkv = tok @ sd["qkv.weight"].T + sd["qkv.bias"]
    q, k, v = qkv.unflatten(-1, (3, heads, C // heads)).unbind(-3)  # (B, H, W, T, h, d)
    scores = torch.einsum("bxytnd,bxysnd->bnxyts", q, k) / (C // heads) ** 0.5
    alpha = scores.softmax(-1)  # (B, heads, H, W, T, T)
    out = torch.einsum("bnxyts,bxysnd->bxytnd", alpha, v).flatten(-2)
    out = out @ sd["proj.weight"].T + sd["proj.bias"]
    return out.permute(0, 3, 4, 1, 2), alpha


def test_temporal_loads_timesformer_weights_and_matches_the_equation():
    sd = strip(timesformer_block(), "model.blocks.3.temporal_attn.")
    m = sa.create("temporal", 16, num_heads=4).eval()
    m.load_state_dict(sd)
    x = torch.randn(2, 5, 16, 3, 4)
    ref, alpha = reference_time_attention(sd, x, 4)
    torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)
    with capture_attention(m) as maps:
        torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(maps[""], alpha, atol=1e-6, rtol=1e-5)
    smap = TemporalSelfAttention.spatial_map(maps[""], (3, 4))
    assert smap.shape == (2, 3, 4) and ((smap >= 0) & (smap <= 1)).all()


def test_temporal_mixes_frames_only_at_the_same_position():
    m = sa.create("temporal", 8, num_heads=2).eval()
    x = torch.randn(1, 4, 8, 5, 3)
    y = x.clone()
    y[:, :, :, 2, 1] += torch.randn(1, 4, 8)  # change one position in every frame
    changed = (m(x) - m(y)).abs().amax((1, 2)) > 1e-6  # (B, H, W)
    assert changed[0, 2, 1] and changed.sum() == 1


def test_temporal_example_clip_and_heads():
    m, (clip,) = TemporalSelfAttention.example("temporal", 2, 12, (5, 3))
    assert clip.shape == (2, 8, 12, 5, 3) and m.num_heads == 4  # gcd(12, 8)
    assert m(clip).shape == clip.shape


# -- temporal_channel: TAM --------------------------------------------------------------------
def tam_state_dict(C=16, T=8, K=3, prefix="module.base_model.layer1.0.tam."):
    """The official TAM names and shapes (alpha = 2, beta = 4)."""
    g = torch.Generator().manual_seed(4)

    def bn(n):
        return {"weight": torch.rand(n, generator=g) + 0.5,
                "bias": torch.randn(n, generator=g) * 0.1,
                "running_mean": torch.randn(n, generator=g) * 0.1,
                "running_var": torch.rand(n, generator=g) + 0.5,
                "num_batches_tracked": torch.tensor(3)}

    sd = {"G.0.weight": torch.randn(2 * T, T, generator=g) * 0.3,
          "G.3.weight": torch.randn(K, 2 * T, generator=g) * 0.3,
          "L.0.weight": torch.randn(C // 4, C, K, generator=g) * 0.3,
          "L.3.weight": torch.randn(C, C // 4, 1, generator=g) * 0.3}
    sd.update({f"G.1.{k}": v for k, v in bn(2 * T).items()})
    sd.update({f"L.1.{k}": v for k, v in bn(C // 4).items()})
    return {prefix + k: v for k, v in sd.items()}


def bn_eval(t, sd, p, eps=1e-5):
    shape = (1, -1) + (1,) * (t.dim() - 2)
    mean, var = sd[p + "running_mean"].view(shape), sd[p + "running_var"].view(shape)
    return (t - mean) / torch.sqrt(var + eps) * sd[p + "weight"].view(shape) + sd[p + "bias"].view(
        shape
    )


def reference_tam(sd, x):
    """TAM as the official code computes it, on (B, T, C, H, W), with raw tensors."""
    B, T, C, H, W = x.shape
    xc = x.transpose(1, 2)  # (B, C, T, H, W)
    desc = xc.mean((3, 4))  # (B, C, T)
    h = F.relu(bn_eval(desc.reshape(B * C, T) @ sd["G.0.weight"].T, sd, "G.1."))
    theta = (h @ sd["G.3.weight"].T).softmax(-1)  # (B*C, K)
    h = F.relu(bn_eval(F.conv1d(desc, sd["L.0.weight"], padding=1), sd, "L.1."))
    v = torch.sigmoid(F.conv1d(h, sd["L.3.weight"]))  # (B, C, T)
    z = xc * v[..., None, None]
    y = F.conv2d(z.reshape(1, B * C, T, H * W), theta.reshape(B * C, 1, -1, 1), padding=(1, 0),
                 groups=B * C)
    return y.reshape(B, C, T, H, W).transpose(1, 2), v, theta.reshape(B, C, -1)


def test_temporal_channel_loads_official_tam_weights_and_matches():
    sd = strip(tam_state_dict(), "module.base_model.layer1.0.tam.")
    m = sa.create("temporal_channel", 16).eval()
    m.load_state_dict(sd)
    x = torch.randn(2, 8, 16, 5, 3)
    ref, v, theta = reference_tam(sd, x)
    torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)
    with capture_attention(m) as maps:
        torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)
    importance, kernels = maps.calls("")
    torch.testing.assert_close(importance[..., 0, 0], v.transpose(1, 2), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(kernels, theta, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="no spatial map"):
        TemporalAdaptiveModule.spatial_map(kernels, (5, 3))


def test_temporal_channel_other_kernel_sizes_and_training():
    m = sa.create("temporal_channel", 8, num_frames=4, kernel_size=5).train()
    x = torch.randn(2, 4, 8, 3, 3)
    out = m(x)
    with explicit_path(m):
        torch.testing.assert_close(m(x), out, atol=1e-5, rtol=1e-5)
    out.sum().backward()


# -- both --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["temporal", "temporal_channel"])
@pytest.mark.parametrize("size,batch", [((7, 5), 1), ((1, 1), 2)])
def test_shapes_and_channels_last(name, size, batch):
    m = sa.create(name, 8).eval()
    x = torch.randn(batch, 8, 8, *size)
    out = m(x)
    assert out.shape == x.shape
    xc = x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)  # channels-last frames
    torch.testing.assert_close(m(xc), out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["temporal", "temporal_channel"])
def test_clear_errors(name):
    m = sa.create(name, 8)
    with pytest.raises(ValueError, match=rf"{name}: expected a 5-D clip.*unflatten"):
        m(torch.randn(16, 8, 5, 5))  # a batch of frames
    with pytest.raises(ValueError, match=rf"{name}: expected 8 channels in dim 2"):
        m(torch.randn(2, 8, 4, 5, 5))
    with pytest.raises(ValueError, match=name):
        sa.create(name, 0)


def test_frame_count_and_heads_errors():
    with pytest.raises(ValueError, match="temporal_channel: expected 8 frames.*num_frames"):
        sa.create("temporal_channel", 8)(torch.randn(1, 5, 8, 3, 3))
    with pytest.raises(ValueError, match="odd"):
        sa.create("temporal_channel", 8, kernel_size=4)
    with pytest.raises(ValueError, match="not divisible"):
        sa.create("temporal", 12, num_heads=8)
