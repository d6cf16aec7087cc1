"""BiFormer: the paper's size and cost, the official checkpoint keys, any input size."""

import pytest
import torch

from spatial_attention import capture_attention
from spatial_attention.apps.bench.flops import count_flops
from spatial_attention.models import create_model
from spatial_attention.models.biformer import BiFormer, load_pretrained


def tiny_net(**kwargs):
    return BiFormer(depth=(1, 1, 1, 1), embed_dim=(32, 64, 64, 64), num_classes=10,
                    **kwargs).eval()


def test_tiny_matches_the_paper_within_one_percent():
    model = create_model("biformer_tiny").eval()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(params - 13.1) / 13.1 < 0.01, params
    with torch.no_grad():
        flops, out = count_flops(model, torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000)
    macs = flops / 2 / 1e9
    assert abs(macs - 2.2) / 2.2 < 0.01, f"{macs:.3f} GMACs, paper 2.2G"


def official_keys(model: BiFormer) -> dict:
    """Our state dict under the official names: BRA's Linear sits in a ``QKVLinear``
    (``attn.qkv.qkv``) in stages 0-2; the last stage's ``AttentionLePE`` is a plain
    ``attn.qkv`` without bias."""
    out = {}
    for k, v in model.state_dict().items():
        if ".attn.qkv." in k and not k.startswith("stages.3."):
            k = k.replace(".attn.qkv.", ".attn.qkv.qkv.")
        out[k] = v.clone()
    return out


def test_official_checkpoint_keys_load():
    torch.manual_seed(0)
    ours = tiny_net()
    state = official_keys(ours)
    for key in ("downsample_layers.0.0.weight", "downsample_layers.0.1.running_var",
                "downsample_layers.3.1.weight", "stages.0.0.pos_embed.weight",
                "stages.0.0.norm1.weight", "stages.0.0.attn.qkv.qkv.weight",
                "stages.0.0.attn.lepe.weight", "stages.0.0.attn.wo.bias",
                "stages.0.0.mlp.0.weight", "stages.0.0.mlp.3.bias",
                "stages.3.0.attn.qkv.weight", "stages.3.0.attn.proj.weight",
                "stages.3.0.attn.lepe.bias", "norm.running_mean", "head.weight"):
        assert key in state, key
    assert "stages.3.0.attn.qkv.bias" not in state  # AttentionLePE: qkv_bias=False
    fresh = tiny_net()
    load_pretrained(fresh, {"model": {f"module.{k}": v for k, v in state.items()}})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), ours(x), rtol=0, atol=0)
    state.pop("stages.1.0.attn.qkv.qkv.weight")
    with pytest.raises(ValueError, match=r"stages\.1\.0\.attn\.qkv\.weight"):
        load_pretrained(tiny_net(), state)


@pytest.mark.parametrize("size", [(64, 64), (50, 37), (33, 70)])
def test_any_input_size_and_features(size):
    torch.manual_seed(1)
    net = tiny_net()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        out = net(x)
        feats = net.forward_intermediates(x, intermediates_only=True)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert [f.shape[1] for f in feats] == [32, 64, 64, 64]
    h, w = size
    for f, r in zip(feats, (4, 8, 16, 32), strict=True):
        h, w = -(-h // 2), -(-w // 2)
        if r == 4:
            h, w = -(-h // 2), -(-w // 2)
        assert f.shape[2:] == (h, w)


def test_capture_records_every_attention():
    net = tiny_net()
    with torch.no_grad(), capture_attention(net) as maps:
        net(torch.randn(1, 3, 64, 64))
    assert set(maps) == {f"stages.{i}.0.attn" for i in range(4)}
    idx, weights, att = maps.calls("stages.0.0.attn")
    assert idx.shape == (1, 49, 1) and att.shape[:3] == (1, 49, 1)
    assert maps["stages.3.0.attn"].shape == (1, 8, 4, 4)  # 2x2 map, 8 heads


def test_training_step_and_bad_config():
    net = tiny_net(drop_path_rate=0.1).train()
    net(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    with pytest.raises(ValueError, match="biformer: topk"):
        BiFormer(depth=(1, 1, 1, 1), topks=(1, 4, 0, -2))
    with pytest.raises(ValueError, match="biformer: expected images"):
        tiny_net()(torch.randn(3, 32, 32))
