"""BAM on ``(B, C, H, W)``: a residual channel + spatial gate (Park et al. BMVC 2018).

The channel branch is SE-like (global average pool, a bottleneck MLP with BatchNorm);
the spatial branch is a 1x1 reduction followed by dilated 3x3 convolutions, for a wide
receptive field at little cost. The two broadcast into one ``(B, C, H, W)`` map, which
gates the input residually: ``y = x * (1 + sigmoid(...))``. BAM sits at the bottlenecks
between a network's stages, not in every block.

Submodule and parameter names are the official release's (``Jongchan/attention-module``,
``MODELS/bam.py``: ``channel_att.gate_c.gate_c_fc_0``, ``spatial_att.gate_s.gate_s_conv_di_0``,
...), so its checkpoints load as they are (:meth:`BAM.load_official_state_dict` only
strips the ``DataParallel`` wrapping).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..checks import check_positive
from ..registry import register
from .base import AttentionModule

__all__ = ["BAM"]

_COMBINE = ("sum", "product")


@register(
    "bam",
    family="channel_spatial",
    layout="map",
    paper="Park, Woo, Lee, Kweon, BAM: Bottleneck Attention Module (Eq. 1-4)",
    year=2018,
    cost="B·C·H·W (pool) + 4·B·C²/r (MLP) + 2·B·H·W·(C²/r + 9·n·C²/r² + C/r) (convs) "
         "+ 3·B·C·H·W (gate)",
    captures="(B, C, H, W) attention map M(F) = sigmoid(Mc + Ms)",
)
class BAM(AttentionModule):
    """Bottleneck Attention Module (Park, Woo, Lee, Kweon; BMVC 2018).

    ``F' = F + F * M(F)`` (Eq. 1), ``M(F) = sigmoid(Mc(F) + Ms(F))`` (Eq. 2), with
    ``Mc = MLP(AvgPool(F))`` (Eq. 3: ``C -> C/r`` with BatchNorm and ReLU ``-> C``) and
    ``Ms = f_1x1(f_3x3(f_3x3(f_1x1(F))))`` (Eq. 4: ``C -> C/r``, ``n`` dilated 3x3 convs,
    ``-> 1``; BatchNorm and ReLU after each but the last), broadcast ``(B, C, 1, 1)`` +
    ``(B, 1, H, W)``. Shapes: ``(B, C, H, W) -> (B, C, H, W)``; records ``M(F)``.
    Arguments (paper defaults): ``reduction=16``, ``dilation_conv_num=2``,
    ``dilation_val=4``, ``num_layers=1`` (hidden MLP layers), ``combine="sum"``.
    Cost: ``2·B·H·W·(C²/r + 9·n·C²/r² + C/r) + 4·B·C²/r + 4·B·C·H·W``.
    Deviations from the official code: (1) it combines the branches by a product,
    ``sigmoid(Mc * Ms)``, against Eq. 2; ``combine="product"`` reproduces it for its
    checkpoints. (2) Its pool is ``avg_pool2d(x, H)``, global only on square inputs; this
    one averages all of ``H x W``. (3) The hidden width is ``max(1, C // r)`` (zero-width
    layers there for ``C < r``). (4) Eq. 3-4's final BatchNorms are absent there, and here.
    Like the official ``BatchNorm1d`` over the pooled ``(B, C/r)`` descriptor, training
    needs batch >= 2 (one sample has no batch variance): batch 1 raises a ValueError in
    train mode, and works in eval mode.
    ``attn_impl``: auto (the gate as one ``addcmul``), explicit (Eq. 1-2 as written).
    """

    layout = "map"

    def __init__(self, channels: int, reduction: int = 16, dilation_conv_num: int = 2,
                 dilation_val: int = 4, num_layers: int = 1, combine: str = "sum",
                 attn_impl: str | None = None) -> None:
        super().__init__(attn_impl=attn_impl)
        check_positive("bam", channels=channels, reduction=reduction,
                       dilation_val=dilation_val, num_layers=num_layers)
        if dilation_conv_num < 0:
            raise ValueError(f"bam: dilation_conv_num must be >= 0, got {dilation_conv_num!r}")
        if combine not in _COMBINE:
            raise ValueError(f"bam: combine must be one of {_COMBINE}, got {combine!r}")
        self.channels, self.reduction, self.combine = channels, reduction, combine
        hidden = max(1, channels // reduction)

        gate_c = nn.Sequential()
        widths = [channels] + [hidden] * num_layers
        for i in range(num_layers):
            gate_c.add_module(f"gate_c_fc_{i}", nn.Linear(widths[i], widths[i + 1]))
            gate_c.add_module(f"gate_c_bn_{i + 1}", nn.BatchNorm1d(widths[i + 1]))
            gate_c.add_module(f"gate_c_relu_{i + 1}", nn.ReLU())
        gate_c.add_module("gate_c_fc_final", nn.Linear(hidden, channels))
        self.channel_att = nn.ModuleDict({"gate_c": gate_c})

        gate_s = nn.Sequential()
        gate_s.add_module("gate_s_conv_reduce0", nn.Conv2d(channels, hidden, 1))
        gate_s.add_module("gate_s_bn_reduce0", nn.BatchNorm2d(hidden))
        gate_s.add_module("gate_s_relu_reduce0", nn.ReLU())
        for i in range(dilation_conv_num):
            # padding = dilation keeps every size, 1xN included (zeros beyond the border)
            gate_s.add_module(f"gate_s_conv_di_{i}", nn.Conv2d(
                hidden, hidden, 3, padding=dilation_val, dilation=dilation_val))
            gate_s.add_module(f"gate_s_bn_di_{i}", nn.BatchNorm2d(hidden))
            gate_s.add_module(f"gate_s_relu_di_{i}", nn.ReLU())
        gate_s.add_module("gate_s_conv_final", nn.Conv2d(hidden, 1, 1))
        self.spatial_att = nn.ModuleDict({"gate_s": gate_s})

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x, self.channels)
        if self.training and x.shape[0] == 1:
            raise ValueError(
                "bam: training needs batch >= 2: the channel MLP's BatchNorm1d (as in the "
                "official code) normalises the pooled (B, C/r) descriptors over the batch; "
                "call .eval() for batch 1")
        mc = self.channel_att["gate_c"](x.mean((2, 3)))[:, :, None, None]  # (B, C, 1, 1) Eq. 3
        ms = self.spatial_att["gate_s"](x)  # (B, 1, H, W) Eq. 4
        logits = mc + ms if self.combine == "sum" else mc * ms  # (B, C, H, W)
        if self.impl == "explicit":
            attn = torch.sigmoid(logits)  # M(F), Eq. 2
            self.record(attn)
            return x + x * attn  # Eq. 1
        # F + F * M in one pass over the output instead of a product and a sum
        return torch.addcmul(x, x, torch.sigmoid(logits))

    def load_official_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True):
        """Load an official ``BAM`` module's state dict (its keys are ours), accepting the
        ``{'state_dict': ...}`` checkpoint wrapping and ``module.`` prefixes."""
        if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
            state_dict = state_dict["state_dict"]
        return self.load_state_dict(
            {k[len("module."):] if k.startswith("module.") else k: v
             for k, v in state_dict.items()}, strict=strict)
