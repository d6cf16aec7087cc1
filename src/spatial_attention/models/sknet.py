"""SKNet-50 (Li et al. CVPR 2019, Table 1): ResNeXt-50 (32x4d) whose grouped 3x3 convs are
Selective Kernel units (``sk``: M = 2 paths, a 3x3 and a dilated 3x3, G = 32, r = 16,
L = 32).

This is SK where the paper puts it, *replacing* the 3x3 convolution of every bottleneck
(1x1 -> SK -> 1x1), not a gate added after a block. Paper: 27.5M parameters, 4.47 GFLOPs
(multiply-adds) at 224. State-dict keys are timm's ``skresnext50_32x4d`` (``conv1``,
``bn1``, ``layerN.i.conv1.conv/bn``, ``conv2.paths.m.conv/bn``, ``conv2.attn.fc_reduce/bn/
fc_select``, ``conv3.conv/bn``, ``downsample.0/1``, ``fc``), so its weights load as is.

timm's backbone interface (see :mod:`.features`): ``feature_info`` / ``forward_intermediates``
as timm's ResNet (``act1`` at stride 2, ``layer1..4`` at 4-32), ``set_grad_checkpointing``
(per bottleneck), ``device=`` / ``dtype=``.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from ..layers.branch import SelectiveKernel
from . import register_model
from .common import load_pretrained as _load
from .features import ResNetStages, factory_kwargs, feature_info

__all__ = ["SKBottleneck", "SKNet", "load_pretrained"]

_PAPER = "Li et al., Selective Kernel Networks (SKNet-50, Table 1)"


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    """1x1 conv + BN, named ``conv`` / ``bn`` as timm's ``ConvNormAct``."""
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(cin, cout, 1, bias=False), bn=nn.BatchNorm2d(cout)
    ))


class SKBottleneck(nn.Module):
    """``ReLU(x' + BN(1x1(SK(ReLU(BN(1x1 x))))))``, SK carrying the stride."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, cardinality: int = 32,
        base_width: int = 4, downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        width = planes * base_width // 64 * cardinality
        out = planes * self.expansion
        self.conv1 = _conv_bn(inplanes, width)
        self.conv2 = SelectiveKernel(width, width, groups=cardinality, stride=stride)
        self.conv3 = _conv_bn(width, out)
        self.act = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.conv3(self.conv2(self.act(self.conv1(x))))
        return self.act(y + shortcut)


class SKNet(ResNetStages, nn.Module):
    """ResNet-style network of :class:`SKBottleneck` blocks on ``(B, 3, H, W)`` images.
    ``device``, ``dtype``: where and in what precision to build."""

    model_name = "sknet"

    @factory_kwargs
    def __init__(
        self, layers: Sequence[int] = (3, 4, 6, 3), num_classes: int = 1000,
        in_chans: int = 3, cardinality: int = 32, base_width: int = 4,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = 64
        for i, (blocks, planes) in enumerate(zip(layers, (64, 128, 256, 512), strict=False)):
            stride = 1 if i == 0 else 2
            out = planes * SKBottleneck.expansion
            down = None
            if stride != 1 or inplanes != out:
                down = nn.Sequential(
                    nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out)
                )
            stage = [SKBottleneck(inplanes, planes, stride, cardinality, base_width, down)]
            stage += [
                SKBottleneck(out, planes, 1, cardinality, base_width) for _ in range(blocks - 1)
            ]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
            inplanes = out
        self.num_features = inplanes
        self.fc = nn.Linear(inplanes, num_classes) if num_classes else nn.Identity()
        n = len(layers)
        self.feature_info = feature_info(
            [64] + [p * SKBottleneck.expansion for p in (64, 128, 256, 512)[:n]],
            [2] + [4 * 2**i for i in range(n)], ["act1"] + [f"layer{i + 1}" for i in range(n)],
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def stem(self, x: Tensor) -> Tensor:
        return self.act1(self.bn1(self.conv1(x)))

    def stem_pool(self, x: Tensor) -> Tensor:
        return self.maxpool(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.forward_features(x).mean((2, 3)))


def load_pretrained(
    model: SKNet, source: str | os.PathLike | Mapping[str, Tensor], strict: bool = True
) -> SKNet:
    """Load a timm ``skresnext50_32x4d`` checkpoint (same key names)."""
    return _load(model, source, None, strict=strict)


@register_model("sknet50", paper=_PAPER, year=2019)
def sknet50(**kwargs: Any) -> SKNet:
    """SKNet-50: ResNeXt-50 32x4d with SK units (27.5M params, 4.47G FLOPs at 224)."""
    return SKNet(**{"layers": (3, 4, 6, 3), **kwargs})
