"""BOAT-Swin / CSWin / BOAT-CSWin: the reference's parameter counts and key layout
(a state dict built with the reference's names and shapes loads; wrong keys are named),
any input size, and the reference quirks behind ``reference_quirks``."""

import pytest
import torch

from spatial_attention.models import boat as boat_models
from spatial_attention.models import create_model
from spatial_attention.models import cswin as cswin_models

# counted on the reference code (mahaoyuHKU/pytorch-boat) with 1000 classes
REFERENCE_PARAMS = {
    "boat_swin_tiny": 30_265_186, "boat_swin_small": 55_158_898, "boat_swin_base": 97_612_960,
    "boat_cswin_tiny": 26_390_952, "boat_cswin_small": 40_112_488,
    "boat_cswin_base": 89_628_712, "cswin_tiny": 22_320_552,
}


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_parameter_counts_equal_the_reference(name):
    with torch.device("meta"):
        model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == REFERENCE_PARAMS[name]


def reference_cswin_keys(dim, depth, heads, boat=True, classes=10):
    """Keys and shapes of the reference's CSWinTransformer, written from its structure."""
    keys = {"stage1_conv_embed.0.weight": (dim, 3, 7, 7), "stage1_conv_embed.0.bias": (dim,),
            "stage1_conv_embed.2.weight": (dim,), "stage1_conv_embed.2.bias": (dim,)}
    for i, (n, _h) in enumerate(zip(depth, heads, strict=False)):
        c = dim * 2**i
        if i:
            keys[f"merge{i}.conv.weight"] = (c, c // 2, 3, 3)
            keys[f"merge{i}.conv.bias"] = (c,)
            keys[f"merge{i}.norm.weight"] = keys[f"merge{i}.norm.bias"] = (c,)
        for j in range(n):
            p = f"stage{i + 1}.{j}."
            keys |= {p + "qkv.weight": (3 * c, c), p + "qkv.bias": (3 * c,),
                     p + "proj.weight": (c, c), p + "proj.bias": (c,),
                     p + "mlp.fc1.weight": (4 * c, c), p + "mlp.fc1.bias": (4 * c,),
                     p + "mlp.fc2.weight": (c, 4 * c), p + "mlp.fc2.bias": (c,)}
            for norm in ("norm1", "norm2") + (("norm3",) if boat and j % 2 == 0 else ()):
                keys[p + norm + ".weight"] = keys[p + norm + ".bias"] = (c,)
            branches = 1 if i == 3 else 2
            for b in range(branches):
                keys[p + f"attns.{b}.get_v.weight"] = (c // branches, 1, 3, 3)
                keys[p + f"attns.{b}.get_v.bias"] = (c // branches,)
            if boat and j % 2 == 0:
                q = p + "content_attn."
                keys |= {q + "qkv.weight": (3 * c, c), q + "qkv.bias": (3 * c,),
                         q + "proj.weight": (c, c), q + "proj.bias": (c,),
                         q + "get_v.weight": (c, 1, 3, 3), q + "get_v.bias": (c,)}
    c = dim * 8
    keys |= {"norm.weight": (c,), "norm.bias": (c,), "head.weight": (classes, c),
             "head.bias": (classes,)}
    return {k: torch.randn(s) for k, s in keys.items()}


def small_boat_cswin(**kw):
    return create_model("boat_cswin_tiny", embed_dim=16, depth=(1, 2, 2, 1),
                        num_heads=(2, 2, 4, 4), num_classes=10, **kw)


def test_boat_cswin_loads_a_reference_layout_state_dict(tmp_path):
    state = reference_cswin_keys(16, (1, 2, 2, 1), (2, 2, 4, 4))
    model = small_boat_cswin()
    torch.save({"state_dict": state}, tmp_path / "ckpt.pth.tar")
    cswin_models.load_pretrained(model, tmp_path / "ckpt.pth.tar")
    assert torch.equal(model.stage3[0].content_attn.get_v.weight,
                       state["stage3.0.content_attn.get_v.weight"])
    bad = dict(state)
    bad["stage2.1.content_attn.qkv.weight"] = bad.pop("stage2.1.qkv.weight")
    with pytest.raises(ValueError, match=r"stage2\.1\.qkv\.weight"):
        cswin_models.load_pretrained(small_boat_cswin(), bad)


def reference_boat_swin_keys(dim, depths, heads, window=7, classes=10):
    """The reference BOAT-Swin's keys (official Swin layout + attnC / norm4)."""
    keys = {"patch_embed.proj.weight": (dim, 3, 4, 4), "patch_embed.proj.bias": (dim,),
            "patch_embed.norm.weight": (dim,), "patch_embed.norm.bias": (dim,)}
    last = len(depths) - 1
    for i, (n, h) in enumerate(zip(depths, heads, strict=False)):
        c = dim * 2**i
        for j in range(n):
            p = f"layers.{i}.blocks.{j}."
            keys |= {p + "attn.qkv.weight": (3 * c, c), p + "attn.qkv.bias": (3 * c,),
                     p + "attn.proj.weight": (c, c), p + "attn.proj.bias": (c,),
                     p + "attn.relative_position_bias_table": ((2 * window - 1) ** 2, h),
                     p + "attn.relative_position_index": (window**2, window**2),
                     p + "mlp.fc1.weight": (4 * c, c), p + "mlp.fc1.bias": (4 * c,),
                     p + "mlp.fc2.weight": (c, 4 * c), p + "mlp.fc2.bias": (c,)}
            norms = ("norm1", "norm2")
            if j % 2 == 1 and i < last:
                norms += ("norm4",)
                keys[p + "attn_mask"] = (1, window**2, window**2)
                q = p + "attnC."
                keys |= {q + "qkv.weight": (3 * c, c), q + "qkv.bias": (3 * c,),
                         q + "proj.weight": (c, c), q + "proj.bias": (c,),
                         q + "get_v.weight": (c, 1, 3, 3), q + "get_v.bias": (c,)}
            for norm in norms:
                keys[p + norm + ".weight"] = keys[p + norm + ".bias"] = (c,)
        if i < last:
            keys[f"layers.{i}.downsample.norm.weight"] = (4 * c,)
            keys[f"layers.{i}.downsample.norm.bias"] = (4 * c,)
            keys[f"layers.{i}.downsample.reduction.weight"] = (2 * c, 4 * c)
    c = dim * 2**last
    keys |= {"norm.weight": (c,), "norm.bias": (c,), "head.weight": (classes, c),
             "head.bias": (classes,)}
    return {k: torch.randn(s) for k, s in keys.items()}


def test_boat_swin_loads_a_reference_layout_state_dict():
    kw = dict(embed_dim=12, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), num_classes=10)
    state = reference_boat_swin_keys(12, kw["depths"], kw["num_heads"])
    model = create_model("boat_swin_tiny", **kw)
    boat_models.load_pretrained(model, state)
    assert torch.equal(model.layers[2].blocks[1].attnC.qkv.weight,
                       state["layers.2.blocks.1.attnC.qkv.weight"])
    assert not hasattr(model.layers[3].blocks[1], "attnC")
    state.pop("layers.1.blocks.1.norm4.weight")
    with pytest.raises(ValueError, match=r"layers\.1\.blocks\.1\.norm4\.weight"):
        boat_models.load_pretrained(create_model("boat_swin_tiny", **kw), state)


def test_any_input_size_and_batch_one():
    torch.manual_seed(0)
    model = small_boat_cswin().eval()
    swin = create_model("boat_swin_tiny", embed_dim=12, depths=(2, 2, 2, 2),
                        num_heads=(1, 2, 2, 4), num_classes=10).eval()
    with torch.no_grad():
        for net in (model, swin):
            y = net(torch.randn(1, 3, 75, 53))
            assert y.shape == (1, 10) and torch.isfinite(y).all()


def test_reference_quirks_flag():
    quirky = small_boat_cswin(reference_quirks=True).eval()
    assert quirky.stage1[0].content_attn.scale == 1.0
    assert quirky.stage4[0].content_attn.pair_batch
    assert small_boat_cswin().stage1[0].content_attn.scale == pytest.approx(8**-0.5)
    with torch.no_grad(), pytest.raises(ValueError, match="pair_batch"):
        quirky(torch.randn(1, 3, 64, 64))  # the 2x2 last stage has one group per image
