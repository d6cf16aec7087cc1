"""CIFAR ResNets for Zhu et al.'s ablation: generalized attention or deformable convolution.

*An Empirical Study of Spatial Attention Mechanisms in Deep Networks* (Zhu et al. ICCV
2019) compares generalized attention with deformable convolution. Its released detection
configs (mmdetection's ``configs/empirical_attention``) put ``GeneralizedAttention``
(``num_heads=8``, ``kv_stride=2``) in the blocks of the last two stages (``stages=(False,
False, True, True)``) after the bottleneck's 3x3 convolution (plugin position
``after_conv2``: after ``conv2 -> norm2 -> relu``, before the next convolution); their
``-dcn`` variants make that 3x3 convolution deformable in the last three stages. Here
the deformable variant uses the same two stages as the attention by default (a like-for-
like comparison; ``stages`` changes it). A CIFAR BasicBlock has two 3x3
convolutions; the first one (which carries the stride, like the bottleneck's 3x3 in
torchvision's v1.5) plays that role here:

    conv1 (3x3, or deformable) -> BN -> ReLU -> [generalized attention] -> conv2 -> BN
      + shortcut -> ReLU

Everything else is :mod:`.resnet`'s CIFAR ResNet (3x3 stem, four stages at strides 1, 2,
2, 2, width ``width * (1, 2, 4, 8)``). With ``stages`` all False the network is the plain
CIFAR ResNet (the ablation's baseline, same code path).

>>> from spatial_attention.models import create_model
>>> net = create_model("resnet18_cifar_ga", attention_type="0010", width=16)

The backbone interface is :mod:`.resnet`'s (timm's ResNet levels, checkpointing, factory
arguments).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from ..layers.deformable import DeformableConv2d
from ..layers.generalized import GeneralizedAttention
from . import register_model
from .features import ResNetStages, factory_kwargs, feature_info

__all__ = ["PluginBasicBlock", "CifarResNetPlugin", "resnet18_cifar_ga", "resnet18_cifar_dcn"]


class PluginBasicBlock(nn.Module):
    """A BasicBlock whose first 3x3 conv can be replaced and followed by a plugin.

    ``conv1`` is ``make_conv(cin, planes, stride)`` (default: a plain 3x3 convolution)
    and ``plugin`` (default: identity) runs after ``bn1``/ReLU. Shapes: ``(B, cin, H, W)
    -> (B, planes, ceil(H/stride), ceil(W/stride))``.
    """

    expansion = 1

    def __init__(
        self,
        cin: int,
        planes: int,
        stride: int = 1,
        make_conv: Callable[[int, int, int], nn.Module] | None = None,
        make_plugin: Callable[[int], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if make_conv is None:
            self.conv1 = nn.Conv2d(cin, planes, 3, stride=stride, padding=1, bias=False)
        else:
            self.conv1 = make_conv(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.plugin = make_plugin(planes) if make_plugin is not None else nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.plugin(self.act(self.bn1(self.conv1(x))))
        out = self.bn2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class CifarResNetPlugin(ResNetStages, nn.Module):
    """CIFAR ResNet of :class:`PluginBasicBlock`; ``stages[i]`` switches stage ``i``'s
    conv replacement / plugin on. ``(B, in_chans, H, W) -> (B, num_classes)``.
    ``device``, ``dtype``: where and in what precision to build."""

    model_name = "CifarResNetPlugin"

    @factory_kwargs
    def __init__(
        self,
        layers: Sequence[int] = (2, 2, 2, 2),
        num_classes: int = 10,
        in_chans: int = 3,
        width: int = 64,
        stages: Sequence[bool] = (False, False, True, True),
        make_conv: Callable[[int, int, int], nn.Module] | None = None,
        make_plugin: Callable[[int], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if len(layers) != 4 or len(stages) != 4:
            raise ValueError(
                f"CifarResNetPlugin: layers and stages need 4 entries, got {list(layers)} "
                f"and {list(stages)}"
            )
        if width < 1 or num_classes < 1 or in_chans < 1 or min(layers) < 1:
            raise ValueError(
                f"CifarResNetPlugin: width, num_classes, in_chans and layers must be "
                f"positive, got {width}, {num_classes}, {in_chans}, {list(layers)}"
            )
        self.num_classes = num_classes
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        cin, blocks_per_stage = width, []
        for i, (n, on) in enumerate(zip(layers, stages, strict=True)):
            planes = width * 2**i
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(PluginBasicBlock(cin, planes, stride,
                                               make_conv if on else None,
                                               make_plugin if on else None))
                cin = planes
            blocks_per_stage.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = blocks_per_stage
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        self.num_features = cin
        self.feature_info = feature_info(
            [width] + [width * 2**i for i in range(4)], (1, 1, 2, 4, 8),
            ("stem", "layer1", "layer2", "layer3", "layer4"),
        )
        _init_convs(self)

    def stem_pool(self, x: Tensor) -> Tensor:
        return x  # the CIFAR stem has no max-pool

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.forward_features(x)).flatten(1))


def _init_convs(module: nn.Module) -> None:
    """He init of the network's own convs; the mechanisms keep their papers' init
    (zero offsets, mmcv's Kaiming-uniform), so their subtrees are skipped."""
    for child in module.children():
        if isinstance(child, GeneralizedAttention | DeformableConv2d):
            continue
        if isinstance(child, nn.Conv2d):
            nn.init.kaiming_normal_(child.weight, mode="fan_out", nonlinearity="relu")
        _init_convs(child)


_PAPER = ("Zhu et al., An Empirical Study of Spatial Attention Mechanisms in Deep Networks "
          "(CIFAR ResNet-18 form of the ablation)")


@register_model("resnet18_cifar_ga", paper=_PAPER, year=2019)
def resnet18_cifar_ga(
    attention_type: str = "1111",
    num_heads: int = 8,
    kv_stride: int = 2,
    q_stride: int = 1,
    spatial_range: int = -1,
    stages: Sequence[bool] = (False, False, True, True),
    layers: Sequence[int] = (2, 2, 2, 2),
    **kwargs: Any,
) -> CifarResNetPlugin:
    """CIFAR ResNet-18 with generalized attention after the first 3x3 conv of each block
    of the last two stages (``stages``); all False gives the plain network."""
    ga = dict(attention_type=attention_type, num_heads=num_heads, kv_stride=kv_stride,
              q_stride=q_stride, spatial_range=spatial_range)

    def plugin(channels: int) -> nn.Module:
        return GeneralizedAttention(channels, **ga)

    return CifarResNetPlugin(layers, stages=stages, make_plugin=plugin, **kwargs)


@register_model("resnet18_cifar_dcn", paper=_PAPER, year=2019)
def resnet18_cifar_dcn(
    modulated: bool = False,
    deform_groups: int = 1,
    stages: Sequence[bool] = (False, False, True, True),
    layers: Sequence[int] = (2, 2, 2, 2),
    **kwargs: Any,
) -> CifarResNetPlugin:
    """CIFAR ResNet-18 whose first 3x3 conv in each block of the last two stages is a
    deformable convolution (v1, or v2 with ``modulated=True``)."""

    def conv(cin: int, cout: int, stride: int) -> nn.Module:
        return DeformableConv2d(cin, cout, 3, stride=stride, padding=1, bias=False,
                                deform_groups=deform_groups, modulated=modulated)

    return CifarResNetPlugin(layers, stages=stages, make_conv=conv, **kwargs)
