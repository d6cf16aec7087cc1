"""CIFAR-style ResNets whose residual blocks take any map-attention mechanism.

He et al., *Deep Residual Learning for Image Recognition* (CVPR 2016), with the CIFAR
stem used throughout the attention literature: one 3x3 convolution, no max-pool, four
stages at strides 1, 2, 2, 2 (32x32 input -> 4x4 before pooling).

``attn_layer`` sits where SE-Net (Hu et al. 2018, Fig. 3) and CBAM (Woo et al. 2018,
Fig. 3) place their modules: on the residual branch, after the block's last
BatchNorm, before the identity is added back.

>>> from spatial_attention.models import create_model
>>> net = create_model("resnet18_cifar", num_classes=10, attn_layer="se")

timm's backbone interface (see :mod:`.features`): ``feature_info`` / ``forward_intermediates``
with timm's ResNet levels (0: the stem, 1-4: ``layer1..4``; the CIFAR stem keeps full
resolution, so the reductions are 1, 1, 2, 4, 8), ``set_grad_checkpointing`` (per block),
``device=`` / ``dtype=``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from . import register_model
from .features import ResNetStages, factory_kwargs, feature_info

__all__ = [
    "AttnLayer",
    "BasicBlock",
    "Bottleneck",
    "CifarResNet",
    "resolve_attn_layer",
    "resnet10_cifar",
    "resnet18_cifar",
    "resnet34_cifar",
    "resnet50_cifar",
]

#: what ``attn_layer`` accepts: a registered map-mechanism name, ``channels -> module``
#: or None
AttnLayer = str | Callable[[int], nn.Module] | None


def resolve_attn_layer(
    attn_layer: AttnLayer, model: str = "resnet", **kwargs: Any
) -> Callable[[int], nn.Module] | None:
    """Turn ``attn_layer`` into a ``channels -> nn.Module`` factory (or None).

    A name must be a registered mechanism of layout ``'map'`` (it is built with
    ``spatial_attention.create(name, channels, **kwargs)``); anything else is a
    ValueError naming what was expected.
    """
    if attn_layer is None or attn_layer == "none" or attn_layer == "":
        return None
    if isinstance(attn_layer, str):
        from ..registry import create, info

        entry = info(attn_layer)  # unknown names: ValueError with the closest ones
        if entry.layout != "map":
            raise ValueError(
                f"{model}: attn_layer {attn_layer!r} has layout {entry.layout!r}; a "
                "convolutional block needs a map mechanism (layout 'map', (B, C, H, W)); "
                "see `spatial-attention list --layout map`"
            )
        name = attn_layer

        def build(channels: int) -> nn.Module:
            return create(name, channels, **kwargs)

        build.__name__ = f"create_{name}"
        return build
    if callable(attn_layer):
        if kwargs:
            raise ValueError(f"{model}: attn_kwargs only apply to a registered name")
        return attn_layer
    raise ValueError(
        f"{model}: attn_layer must be a mechanism name, a callable channels -> module or "
        f"None, got {type(attn_layer).__name__}"
    )


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
    )


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN [-attn] + shortcut, ReLU: ``(B, Cin, H, W) -> (B, C, H/s, W/s)``.
    """

    expansion = 1

    def __init__(
        self,
        cin: int,
        planes: int,
        stride: int = 1,
        attn_layer: Callable[[int], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = _conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.attn = attn_layer(cout) if attn_layer is not None else nn.Identity()
        self.shortcut = _shortcut(cin, cout, stride)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.attn(self.bn2(self.conv2(out)))
        return self.act(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1-3x3-1x1 bottleneck (x4 expansion), attention after the last BN, before the add."""

    expansion = 4

    def __init__(
        self,
        cin: int,
        planes: int,
        stride: int = 1,
        attn_layer: Callable[[int], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)  # stride on the 3x3, as torchvision v1.5
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.attn = attn_layer(cout) if attn_layer is not None else nn.Identity()
        self.shortcut = _shortcut(cin, cout, stride)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.attn(self.bn3(self.conv3(out)))
        return self.act(out + self.shortcut(x))


class CifarResNet(ResNetStages, nn.Module):
    """ResNet for small images: 3x3 stem, 4 stages, global average pool, linear head.

    Shapes: ``(B, in_chans, H, W) -> (B, num_classes)``; any H, W >= 8 works (the
    stages downsample by 8 in total). ``width`` is the stem/first-stage width (64 in
    the paper); the stages use ``width * (1, 2, 4, 8)`` planes. ``device``, ``dtype``:
    where and in what precision to build.
    """

    model_name = "CifarResNet"

    @factory_kwargs
    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        num_classes: int = 10,
        in_chans: int = 3,
        width: int = 64,
        attn_layer: AttnLayer = None,
        attn_kwargs: dict[str, Any] | None = None,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if width < 1 or num_classes < 1 or in_chans < 1:
            raise ValueError(
                f"CifarResNet: width, num_classes and in_chans must be positive, got "
                f"{width}, {num_classes}, {in_chans}"
            )
        factory = resolve_attn_layer(attn_layer, "CifarResNet", **(attn_kwargs or {}))
        self.num_classes = num_classes
        self.stem = nn.Sequential(
            _conv3x3(in_chans, width), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        stages = []
        cin = width
        for i, n in enumerate(layers):
            planes = width * 2**i
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block(cin, planes, stride, factory))
                cin = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        self.num_features = cin
        self.feature_info = feature_info(
            [width] + [width * 2**i * block.expansion for i in range(4)], (1, 1, 2, 4, 8),
            ("stem", "layer1", "layer2", "layer3", "layer4"),
        )

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:  # Goyal et al. 2017: each block starts as the identity
            for m in self.modules():
                last = getattr(m, "bn3", None) if isinstance(m, Bottleneck) else (
                    getattr(m, "bn2", None) if isinstance(m, BasicBlock) else None
                )
                if last is not None:
                    nn.init.zeros_(last.weight)

    def stem_pool(self, x: Tensor) -> Tensor:
        return x  # the CIFAR stem has no max-pool

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.forward_features(x)).flatten(1))


def _resnet(block, layers, **kwargs: Any) -> CifarResNet:
    return CifarResNet(block, layers, **kwargs)


_PAPER = "He et al., Deep Residual Learning for Image Recognition (CIFAR stem)"


@register_model("resnet10_cifar", paper=_PAPER, year=2016)
def resnet10_cifar(**kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-10: one BasicBlock a stage, width 32 (1.2M params); the CPU default."""
    kwargs.setdefault("width", 32)
    return _resnet(BasicBlock, (1, 1, 1, 1), **kwargs)


@register_model("resnet18_cifar", paper=_PAPER, year=2016)
def resnet18_cifar(**kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-18: BasicBlocks (2, 2, 2, 2), width 64 (11.2M params)."""
    return _resnet(BasicBlock, (2, 2, 2, 2), **kwargs)


@register_model("resnet34_cifar", paper=_PAPER, year=2016)
def resnet34_cifar(**kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-34: BasicBlocks (3, 4, 6, 3), width 64 (21.3M params)."""
    return _resnet(BasicBlock, (3, 4, 6, 3), **kwargs)


@register_model("resnet50_cifar", paper=_PAPER, year=2016)
def resnet50_cifar(**kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-50: Bottlenecks (3, 4, 6, 3), width 64 (23.5M params)."""
    return _resnet(Bottleneck, (3, 4, 6, 3), **kwargs)
