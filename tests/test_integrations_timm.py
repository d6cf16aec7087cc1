"""timm integration: every map mechanism as timm's ``attn_layer``."""

from __future__ import annotations

import os
import pickle

import _torchvision_shim  # noqa: F401  (before anything imports torchvision)
import pytest
import torch

import spatial_attention as sa
from spatial_attention.capture import capture_attention
from spatial_attention.integrations.timm import (
    AttnLayer,
    attn_layer,
    compatible_mechanisms,
    frame_map_problem,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
timm = pytest.importorskip("timm", reason="timm is not installed (pip install timm)")

MAP = sa.list_mechanisms(layout="map")
BLOCKS = 16  # ResNet-50 bottlenecks: 3 + 4 + 6 + 3


def _attn_modules(model, name):
    cls = sa.info(name).cls
    return [m for m in model.modules() if type(m) is cls]


def test_compatible_mechanisms_are_the_frame_maps():
    compatible = compatible_mechanisms()
    assert {"se", "eca"} <= set(compatible) <= set(MAP)
    for name in set(MAP) - set(compatible):
        assert frame_map_problem(name)  # e.g. clips (B, T, C, H, W): no drop-in for a CNN


@pytest.mark.parametrize("name", MAP)
def test_every_map_mechanism_as_attn_layer(name):
    """ResNet-50 wiring for every map mechanism, and a real forward/backward in ResNet-18.

    ResNet-50 is built on the meta device: GAM alone makes it 0.5 G parameters, and the
    wiring (which module sits where, for which channels) is what is under test there.
    """
    problem = frame_map_problem(name)
    if problem:  # a map mechanism over clips: refused up front, with the reason
        with pytest.raises(ValueError, match="not one \\(B, C, H, W\\) map"):
            attn_layer(name)
        return
    layer = attn_layer(name)
    model = timm.create_model(
        "resnet50", pretrained=False, device="meta", block_args=dict(attn_layer=layer)
    )
    stages = (model.layer1, model.layer2, model.layer3, model.layer4)
    blocks = [b for stage in stages for b in stage]
    assert [b.se for b in blocks] == _attn_modules(model, name)
    assert len(blocks) == BLOCKS
    assert all(p.device.type == "meta" for b in blocks for p in b.se.parameters())
    want = {256: 3, 512: 4, 1024: 6, 2048: 3}  # outplanes of each stage
    assert {c: sum(b.bn3.num_features == c for b in blocks) for c in want} == want

    small = timm.create_model("resnet18", pretrained=False, block_args=dict(attn_layer=layer))
    found = _attn_modules(small, name)
    assert len(found) == 8
    out = small(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 1000)
    out.sum().backward()
    assert all(p.grad is not None for m in found for p in m.parameters())


@pytest.mark.parametrize("name", ["se", "eca"])
def test_resnet50_forward(name):
    model = timm.create_model(
        "resnet50", pretrained=False, block_args=dict(attn_layer=attn_layer(name))
    ).eval()
    assert len(_attn_modules(model, name)) == BLOCKS
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_basic_block_kwargs_and_capture():
    model = timm.create_model(
        "resnet18", pretrained=False, block_args=dict(attn_layer=attn_layer("se", reduction=4))
    ).eval()
    se = model.layer1[0].se
    assert isinstance(se, sa.SqueezeExcite)
    assert se.fc[0].out_features == 64 // 4
    with capture_attention(model) as maps, torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert len(maps) == 8
    assert maps["layer1.0.se"].shape == (1, 64, 1, 1)


def test_state_dict_round_trip_and_features_only():
    layer = attn_layer("eca")
    a = timm.create_model("resnet18", pretrained=False, block_args=dict(attn_layer=layer)).eval()
    b = timm.create_model("resnet18", pretrained=False, block_args=dict(attn_layer=layer)).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))
    feats = timm.create_model(
        "resnet18", pretrained=False, features_only=True, block_args=dict(attn_layer=layer)
    )
    assert [f.shape[1] for f in feats(x)] == [64, 64, 128, 256, 512]


def test_device_and_dtype_from_timm_reach_the_mechanism():
    layer = attn_layer("se")
    meta = timm.create_model(
        "resnet18", pretrained=False, device="meta", block_args=dict(attn_layer=layer)
    )
    assert all(p.device.type == "meta" for p in meta.layer1[0].se.parameters())
    f64 = timm.create_model(
        "resnet18", pretrained=False, dtype=torch.float64, block_args=dict(attn_layer=layer)
    )
    assert all(p.dtype == torch.float64 for p in f64.layer4[1].se.parameters())


def test_model_hints_refused_clearly_or_ignored():
    # EfficientNet passes act_layer to its se_layer and probes rd_ratio (catching TypeError)
    with pytest.raises(TypeError, match=r"'se' takes no such argument.*ignore=\('act_layer',\)"):
        timm.create_model("efficientnet_b0", pretrained=False, se_layer=attn_layer("se"))
    model = timm.create_model(
        "efficientnet_b0", pretrained=False, se_layer=attn_layer("se", ignore=("act_layer",))
    )
    assert len(_attn_modules(model, "se")) == 16
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_configuration_errors_are_clear():
    with pytest.raises(ValueError, match="unknown mechanism 'sse'"):
        attn_layer("sse")
    with pytest.raises(ValueError, match="'multi_head' is a 'sequence' mechanism.*'map'"):
        attn_layer("multi_head")
    with pytest.raises(TypeError, match="'se' takes no argument 'reductoin'"):
        attn_layer("se", reductoin=8)


def test_attn_layer_pickles_and_reads_well():
    layer = attn_layer("se", reduction=8)
    assert isinstance(layer, AttnLayer)
    assert repr(layer) == "attn_layer('se', reduction=8)"
    again = pickle.loads(pickle.dumps(layer))
    assert again == layer and hash(again) == hash(layer)
    assert isinstance(again(32), sa.SqueezeExcite)
    # timm's own factory accepts it as a class-like callable
    from timm.layers import create_attn, get_attn

    assert get_attn(layer) is layer
    assert create_attn(layer, 48).channels == 48


def test_train_builds_timm_resnet_with_attn():
    from spatial_attention.apps.training import build_model
    from spatial_attention.errors import UsageError

    model = build_model("timm:resnet18", 10, attn="se")
    assert len(_attn_modules(model, "se")) == 8  # one per BasicBlock, as timm places it
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(UsageError, match="ResNet family"):
        build_model("timm:vit_tiny_patch16_224", 10, attn="se")
