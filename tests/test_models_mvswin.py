"""MV-Swin-T model: the reference's checkpoint names, parameter count and outputs; sizes."""

import json
from pathlib import Path

import pytest
import torch

from spatial_attention import capture_attention
from spatial_attention.models import create_model
from spatial_attention.models.mvswin import (
    MVSwinBlock,
    MVSwinTransformer,
    TokenFusion,
    convert_reference_mvswin,
    load_pretrained,
)

# (name, shape) of every parameter of the reference MVSwinTransformer (prithuls/MV-Swin-T)
# built with _TINY below, listed by instantiating it (fixed buffers left out).
_KEYS = json.loads((Path(__file__).parent / "mvswin_reference_keys.json").read_text())
_TINY = dict(img_size=128, patch_size=4, embed_dim=8, depths=(2, 2, 2, 2),
             num_heads=(1, 1, 2, 2), window_size=4, num_classes=3)
# the reference's sigmoid outputs and first pooled features for the seeded weights and
# inputs of _seeded(), computed with the reference code
_REF_SIGMOID = [[0.3242312967777252, 0.5325636863708496, 0.5391567945480347],
                [0.32200634479522705, 0.5308265089988708, 0.5402560234069824]]
_REF_FEATURES = [[-0.007808406837284565, -0.03289753943681717, 0.27468353509902954,
                  0.15597863495349884, 0.1872030794620514, -0.007767470087856054],
                 [-0.007914651185274124, -0.04413779824972153, 0.27484509348869324,
                  0.15576952695846558, 0.19336673617362976, -0.011881573125720024]]


def _seeded():
    g = torch.Generator().manual_seed(0)
    state = {k: 0.2 * torch.randn(tuple(s), generator=g) for k, s in sorted(_KEYS)}
    x = torch.randn(2, 2, 3, 128, 128, generator=g)
    return state, x


def test_reference_checkpoint_loads_and_gives_the_reference_outputs():
    state, x = _seeded()
    model = MVSwinTransformer(**_TINY).eval()
    assert sum(p.numel() for p in model.parameters()) == sum(
        torch.Size(s).numel() for _, s in _KEYS)
    load_pretrained(model, state)
    with torch.no_grad():
        torch.testing.assert_close(torch.sigmoid(model(x[:, 0], x[:, 1])),
                                   torch.tensor(_REF_SIGMOID), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.forward_features(x)[:, :6],
                                   torch.tensor(_REF_FEATURES), atol=1e-5, rtol=1e-5)


def test_mvswin_tiny_has_the_reference_parameter_count():
    with torch.device("meta"):
        model = create_model("mvswin_tiny")
    # the reference's MVSwinTransformer(img_size=384, window_size=12) has 29,746,261
    assert sum(p.numel() for p in model.parameters()) == 29_746_261
    assert model.fusion.weight.shape == (576, 1152)  # its fc_layer_fused
    assert model.head.out_features == 1


def test_load_pretrained_names_wrong_keys_and_reads_files(tmp_path):
    state, _ = _seeded()
    model = MVSwinTransformer(**_TINY)
    broken = dict(state)
    del broken["layers.1.blocks.0.attn.proj_concat_2.weight"]
    broken["layers.9.extra"] = torch.zeros(1)
    named = r"missing keys: layers\.1\.blocks\.0\.attn\.mix_weight[\s\S]*proj_concat_1\.weight"
    with pytest.raises(ValueError, match=named + r"[\s\S]*layers\.9\.extra"):
        load_pretrained(model, broken)
    torch.save({"model": state}, tmp_path / "ref.pth")
    load_pretrained(model, tmp_path / "ref.pth")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(tmp_path / "ours.safetensors"))
    again = MVSwinTransformer(**_TINY)
    load_pretrained(again, tmp_path / "ours.safetensors")  # our own names pass through
    for k, v in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v)
    converted = convert_reference_mvswin(state)
    assert converted["patch_embed.proj.weight"].shape == (16, 3, 4, 4)
    assert converted["layers.1.blocks.1.attn.mix_weight"].shape == (2, 1, 2)
    assert converted["layers_fused.0.blocks.0.attn.qkv_weight"].shape == (1, 96, 32)


def test_any_size_and_two_calling_conventions():
    torch.manual_seed(0)
    model = create_model("mvswin_micro_cifar", drop_path_rate=0.0).eval()
    a, b = torch.randn(2, 3, 29, 35), torch.randn(2, 3, 29, 35)
    out = model(a, b)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    torch.testing.assert_close(model(torch.stack((a, b), 1)), out)
    assert model(torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert model(torch.randn(1, 3, 5, 3), torch.randn(1, 3, 5, 3)).shape == (1, 10)


def test_fusion_is_the_reference_linear_at_the_nominal_grid_and_resamples_elsewhere():
    torch.manual_seed(0)
    fusion = TokenFusion(2, (4, 4))
    x = torch.randn(3, 2, 4, 4, 5)
    tokens = torch.cat((x[:, 0].reshape(3, 16, 5), x[:, 1].reshape(3, 16, 5)), dim=1)
    expected = (tokens.transpose(1, 2) @ fusion.weight.T + fusion.bias).transpose(1, 2)
    torch.testing.assert_close(fusion(x)[:, 0].reshape(3, 16, 5), expected)
    # a constant weight sums a constant map to the same value at any grid
    with torch.no_grad():
        fusion.weight.fill_(0.01)
        fusion.bias.fill_(0.5)
    for h, w in ((4, 4), (6, 3), (2, 2)):
        out = fusion(torch.ones(1, 2, h, w, 1))
        torch.testing.assert_close(out, torch.full((1, 1, h, w, 1), 0.01 * 32 + 0.5))


def test_blocks_start_as_identity_and_both_views_get_gradients():
    torch.manual_seed(0)
    model = create_model("mvswin_micro_cifar")
    block = model.layers[1].blocks[0]
    assert isinstance(block, MVSwinBlock) and block.attn.mode == "mix"
    x = torch.randn(2, 2, 8, 8, 128)
    torch.testing.assert_close(block(x), x)  # res-post-norm LayerNorms start at zero
    out = model(torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32))
    torch.nn.functional.cross_entropy(out, torch.tensor([1, 2])).backward()
    grad = model.patch_embed.proj.weight.grad
    assert grad[:64].abs().sum() > 0 and grad[64:].abs().sum() > 0


def test_capture_has_self_stage_then_cross_stage():
    torch.manual_seed(0)
    model = create_model("mvswin_micro_cifar", num_classes=1)
    with capture_attention(model) as maps:
        out = model(torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 1)
    assert maps["layers.0.blocks.0.attn"].shape[3] == 1  # per-view self-attention
    assert maps["layers.1.blocks.1.attn"].shape[3] == 2  # own + cross map (W-MDA)
    assert maps["layers_fused.0.blocks.0.attn"].shape[:4] == (1, 1, 1, 1)


def test_variants_and_errors():
    m = create_model("mvswin_micro_cifar", cross_mode="concat", share_weights=True)
    assert m.layers[1].blocks[0].attn.mode == "concat"
    assert m.layers[1].blocks[0].attn.qkv_weight.shape[0] == 1
    with pytest.raises(ValueError, match="mvswin: expected 2 images"):
        m(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="same shape"):
        m(torch.randn(1, 3, 32, 32), torch.randn(1, 3, 16, 32))
    with pytest.raises(ValueError, match="multi_view_stages"):
        MVSwinTransformer(depths=(2, 2), num_heads=(1, 2), multi_view_stages=2)
    with pytest.raises(ValueError, match="cross_mode"):
        MVSwinTransformer(cross_mode="sum")
