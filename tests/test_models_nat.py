"""NAT models: paper sizes, official checkpoint names, any input size, DiNAT dilations."""

import pytest
import torch

from spatial_attention import explicit_path
from spatial_attention.apps.bench.flops import count_flops
from spatial_attention.errors import UsageError
from spatial_attention.models import create_model
from spatial_attention.models import nat as nat_mod

# name: (params in millions, GFLOPs as multiply-adds), the paper's / official README's
PAPER = {"nat_mini": (20, 2.7), "nat_tiny": (28, 4.3), "nat_small": (51, 7.8),
         "nat_base": (90, 13.7)}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_params_and_flops_match_the_paper_within_one_percent(name):
    params, gflops = PAPER[name]
    with torch.device("meta"):
        model = create_model(name).eval()
        x = torch.empty(1, 3, 224, 224)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(n - params) / params < 0.01, f"{name}: {n:.2f}M params, paper {params}M"
    if name != "nat_mini":  # FLOPs: one model (the count takes ~10 s on meta tensors)
        return
    with explicit_path(model):  # k^2 keys per query, the papers' count
        flops, out = count_flops(model, x)
    assert out.shape == (1, 1000)
    macs = flops / 2 / 1e9
    assert abs(macs - gflops) / gflops < 0.01, f"{name}: {macs:.3f} GMACs, paper {gflops}G"


def _official_keys(depths=(3, 4, 6, 5), dim=64, heads=(2, 4, 8, 16), ratio=3, k=7,
                   layer_scale=False):
    """Key -> shape of the official NAT (classification/nat.py) state dict."""
    keys = {"patch_embed.proj.0.weight": (dim // 2, 3, 3, 3),
            "patch_embed.proj.0.bias": (dim // 2,),
            "patch_embed.proj.1.weight": (dim, dim // 2, 3, 3), "patch_embed.proj.1.bias": (dim,),
            "patch_embed.norm.weight": (dim,), "patch_embed.norm.bias": (dim,)}
    for i, (depth, h) in enumerate(zip(depths, heads, strict=True)):
        c = dim * 2**i
        for j in range(depth):
            p = f"levels.{i}.blocks.{j}."
            keys.update({p + "norm1.weight": (c,), p + "norm1.bias": (c,),
                         p + "attn.rpb": (h, 2 * k - 1, 2 * k - 1),
                         p + "attn.qkv.weight": (3 * c, c), p + "attn.qkv.bias": (3 * c,),
                         p + "attn.proj.weight": (c, c), p + "attn.proj.bias": (c,),
                         p + "norm2.weight": (c,), p + "norm2.bias": (c,),
                         p + "mlp.fc1.weight": (ratio * c, c), p + "mlp.fc1.bias": (ratio * c,),
                         p + "mlp.fc2.weight": (c, ratio * c), p + "mlp.fc2.bias": (c,)})
            if layer_scale:
                keys.update({p + "gamma1": (c,), p + "gamma2": (c,)})
        if i < len(depths) - 1:
            keys.update({f"levels.{i}.downsample.reduction.weight": (2 * c, c, 3, 3),
                         f"levels.{i}.downsample.norm.weight": (2 * c,),
                         f"levels.{i}.downsample.norm.bias": (2 * c,)})
    c = dim * 2 ** (len(depths) - 1)
    keys.update({"norm.weight": (c,), "norm.bias": (c,), "head.weight": (1000, c),
                 "head.bias": (1000,)})
    return keys


@pytest.mark.parametrize("name,kw", [("nat_mini", {}), ("nat_small", dict(
    depths=(3, 4, 18, 5), dim=96, heads=(3, 6, 12, 24), ratio=2, layer_scale=True))])
def test_official_checkpoint_names_load(name, kw):
    shapes = _official_keys(**kw)
    model = create_model(name, device="meta")
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    if name != "nat_mini":
        return
    torch.manual_seed(0)
    official = {"module." + k: torch.randn(s) for k, s in shapes.items()}
    model = nat_mod.load_pretrained(create_model(name), {"model": official})
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, official["module." + k])
    del official["module.levels.2.blocks.5.attn.rpb"]
    with pytest.raises(UsageError, match="levels.2.blocks.5.attn.rpb"):
        nat_mod.load_pretrained(create_model(name), official)


def test_official_init():
    torch.manual_seed(0)
    m = create_model("nat_mini")
    attn = m.levels[0].blocks[0].attn
    assert m.levels[0].blocks[0].mlp.fc1.out_features == 192  # ratio 3
    assert abs(attn.qkv.weight.std().item() - 0.02) < 0.003 and not attn.qkv.bias.any()
    assert 0.015 < attn.rpb.std().item() < 0.025
    assert m.levels[3].downsample is None and m.levels[0].downsample.reduction.bias is None
    assert [lvl.blocks[-1].drop_path2.p for lvl in m.levels][-1] == pytest.approx(0.2)


@pytest.mark.parametrize("size", [(45, 37), (17, 9)])
def test_any_input_size_and_dilations(size):
    torch.manual_seed(0)
    model = create_model("nat_mini", num_classes=10, depths=(1, 1, 1, 1),
                         dilations=((2,), (1,), (1,), (1,))).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        out = model(x)
        with explicit_path(model):
            ref = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert model.levels[0].blocks[0].attn.dilation == (2, 2)


def test_fast_equals_explicit_on_a_model():
    torch.manual_seed(0)
    model = create_model("nat_mini", num_classes=10, depths=(1, 2, 1, 1)).eval()
    x = torch.randn(1, 3, 64, 52)
    with torch.no_grad():
        fast = model(x)
        with explicit_path(model):
            slow = model(x)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
