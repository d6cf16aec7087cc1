"""CIFAR ResNets with attn_layer and the tiny ViTs with our token mixers."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import spatial_attention as sa
from spatial_attention.apps.training import build_model
from spatial_attention.errors import UsageError
from spatial_attention.layers.base import AttentionModule
from spatial_attention.models import create_model, list_models
from spatial_attention.models.resnet import BasicBlock, Bottleneck, CifarResNet
from spatial_attention.models.vit import VisionTransformer


class TinyGate(AttentionModule):
    """A map mechanism for tests: a sigmoid spatial gate from a 1x1 conv."""

    layout = "map"

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, 1)

    def forward(self, x):
        w = torch.sigmoid(self.conv(x))
        self.record(w)
        return x * w


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_registered():
    names = list_models()
    for n in ("resnet10_cifar", "resnet18_cifar", "resnet34_cifar", "resnet50_cifar",
              "vit_micro_cifar", "vit_tiny_cifar", "vit_tiny_p2_cifar"):
        assert n in names


@pytest.mark.parametrize("name", ["resnet18_cifar", "resnet50_cifar"])
def test_resnet_forward_any_size(name):
    m = create_model(name, num_classes=7, width=4).eval()
    for size in (32, 20):
        assert m(torch.randn(2, 3, size, size)).shape == (2, 7)


def test_resnet_param_counts():
    # the CIFAR ResNets of the attention papers (10 classes)
    assert abs(n_params(create_model("resnet18_cifar")) / 1e6 - 11.17) < 0.01
    assert abs(n_params(create_model("resnet50_cifar")) / 1e6 - 23.52) < 0.01


def test_attn_layer_placement_callable():
    """The mechanism sees the last BN's output and its output goes into the residual add."""
    m = create_model("resnet18_cifar", width=8, attn_layer=TinyGate).eval()
    blocks = [b for b in m.modules() if isinstance(b, BasicBlock)]
    assert len(blocks) == 8 and all(isinstance(b.attn, TinyGate) for b in blocks)
    b = blocks[3]
    seen = {}
    b.bn2.register_forward_hook(lambda mod, i, o: seen.__setitem__("bn", o))
    b.attn.register_forward_hook(lambda mod, i, o: seen.update(attn_in=i[0], attn_out=o))
    x = torch.randn(2, b.conv1.in_channels, 8, 8)
    out = b(x)
    assert torch.equal(seen["attn_in"], seen["bn"])
    assert torch.allclose(out, torch.relu(seen["attn_out"] + b.shortcut(x)))
    with sa.capture_attention(m) as maps:
        m(torch.randn(1, 3, 16, 16))
    assert len(maps) == 8


def test_bottleneck_attn_after_bn3():
    m = create_model("resnet50_cifar", width=4, attn_layer=TinyGate)
    blocks = [b for b in m.modules() if isinstance(b, Bottleneck)]
    assert len(blocks) == 16
    assert blocks[0].attn.conv.in_channels == blocks[0].bn3.num_features == 16


@pytest.mark.skipif("se" not in sa.list_mechanisms(), reason="se not registered")
def test_attn_layer_registered_name():
    m = create_model("resnet18_cifar", width=16, attn_layer="se")
    assert sum(type(x).__name__ == "SqueezeExcite" for x in m.modules()) == 8
    assert m(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    plain = create_model("resnet18_cifar", width=16)
    assert n_params(m) > n_params(plain)


def test_attn_layer_errors():
    with pytest.raises(ValueError, match="layout 'sequence'.*map mechanism"):
        create_model("resnet18_cifar", attn_layer="multi_head")
    with pytest.raises(ValueError, match="did you mean"):
        create_model("resnet18_cifar", attn_layer="multi_heads")
    with pytest.raises(ValueError, match="attn_layer must be"):
        CifarResNet(BasicBlock, (1, 1, 1, 1), attn_layer=3)


def test_channels_last_same_output():
    m = create_model("resnet10_cifar", width=8).eval()
    x = torch.randn(2, 3, 16, 16)
    ref = m(x)
    m = m.to(memory_format=torch.channels_last)
    out = m(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("patch", [2, 4])
def test_vit_forward(patch):
    m = VisionTransformer(img_size=16, patch_size=patch, dim=32, depth=2, num_heads=2,
                          num_classes=5).eval()
    assert m(torch.randn(2, 3, 16, 16)).shape == (2, 5)
    assert m(torch.randn(1, 3, 15, 18)).shape == (1, 5)  # padded, position resized
    with sa.capture_attention(m) as maps:
        m(torch.randn(1, 3, 16, 16))
    n = (16 // patch) ** 2
    assert maps["blocks.0.attn"].shape == (1, 2, n, n)


def test_vit_configs():
    assert abs(n_params(create_model("vit_tiny_cifar")) / 1e6 - 5.36) < 0.01
    assert abs(n_params(create_model("vit_micro_cifar")) / 1e6 - 0.68) < 0.01
    m = create_model("vit_tiny_p2_cifar", depth=1)
    assert m.patch_size == 2 and m.pos_embed.shape == (1, 16, 16, 192)


def test_vit_token_mixer_callable_and_errors():
    class Mix(nn.Module):  # (B, H, W, C) token mixer
        def __init__(self, dim, num_heads):
            super().__init__()
            self.lin = nn.Linear(dim, dim)

        def forward(self, x):
            assert x.dim() == 4
            return self.lin(x)

    m = VisionTransformer(img_size=8, patch_size=4, dim=16, depth=1, num_heads=2,
                          token_mixer=Mix)
    assert m(torch.randn(1, 3, 8, 8)).shape == (1, 10)
    if "se" in sa.list_mechanisms():
        with pytest.raises(ValueError, match="map mechanism"):
            create_model("vit_micro_cifar", attn_layer="se")
    with pytest.raises(ValueError, match="not a self-attention"):
        create_model("vit_micro_cifar", attn_layer="dot_product")
    with pytest.raises(ValueError, match="not divisible"):
        create_model("vit_micro_cifar", dim=100, num_heads=3)


def test_build_model_for_the_trainer(monkeypatch):
    m = build_model("vit_micro_cifar", 3, "multi_head", img_size=16,
                    model_args={"depth": 1})
    assert m.pos_embed.shape[1:3] == (4, 4) and m.head.out_features == 3
    with pytest.raises(UsageError, match="did you mean"):
        build_model("resnet18_cifr", 10)
    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed
    with pytest.raises(UsageError, match="timm is not installed; pip install spatial-attention"):
        build_model("timm:resnet18", 10)
