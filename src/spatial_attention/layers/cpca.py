"""Channel prior convolutional attention (CPCA) on ``(B, C, H, W)``.

CPCA first weighs channels (a CBAM-style channel attention whose output, the *channel
prior*, rescales the features), then derives a full ``C x H x W`` spatial attention from
the prior with a multi-scale depthwise pyramid: a 5x5 depthwise conv followed by three
depthwise strip-conv pairs (1x7/7x1, 1x11/11x1, 1x21/21x1) whose outputs are summed with
the 5x5 one, and a 1x1 conv that mixes channels.

The depthwise pyramid is shared with CPMS (``layers/cpms.py``) through
:class:`DepthwisePyramid`, which keeps the official parameter names (``dconv5_5``,
``dconv1_7``, ``dconv7_1``, ...).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_positive
from ..registry import register
from .base import AttentionModule

__all__ = [
    "DepthwisePyramid",
    "ChannelPriorConvAttention",
    "official_cpca_state_dict",
    "find_official_cpca_blocks",
]


class DepthwisePyramid(AttentionModule):
    """Base of CPCA and CPMS: the multi-scale depthwise branch. Not registered itself.

    ``S(F) = D + sum_k V_k(H_k(D))`` with ``D = DW5x5(F)``, ``H_k`` a depthwise ``1 x k``
    and ``V_k`` a depthwise ``k x 1`` conv (CPCA, Huang et al. 2024: the spatial attention
    before its 1x1 channel-mixing conv). Every conv is biased, as in the official code.

    One path for both modes: each strip is its own native depthwise conv. Batching the
    strips (kernels zero-padded to the widest, one depthwise conv with ``n`` outputs per
    channel, then one grouped conv, or one depthwise conv and a sum) does the same math with
    ``n * max(k)`` instead of ``sum(k)`` taps and was slower on CPU and, in all but one
    layout, on an H100 (measured in benchmarks/conv_attention.md). The modules' fused paths
    batch what does batch (the channel descriptors through the MLP).
    """

    def _build_gated_pyramid(self, name: str, channels: int, reduction: int,
                             kernel_sizes: Sequence[int], gate: type[nn.Module]) -> None:
        """What CPCA and CPMS share: a channel gate of ``channels // reduction`` hidden
        units, the depthwise pyramid and the closing 1x1 convolution (in this order, the
        official parameter order)."""
        check_positive(name, channels=channels, reduction=reduction)
        self.channels, self.reduction = channels, reduction
        self.ca = gate(channels, max(1, channels // reduction))
        self._build_pyramid(channels, kernel_sizes)
        self.conv = nn.Conv2d(channels, channels, kernel_size=1)

    def _build_pyramid(self, channels: int, kernel_sizes: Sequence[int]) -> None:
        name = self.mechanism_name
        kernel_sizes = tuple(int(k) for k in kernel_sizes)
        if not kernel_sizes:
            raise ValueError(f"{name}: kernel_sizes must name at least one strip size")
        for k in kernel_sizes:
            check_positive(name, kernel_size=k)
            if k % 2 == 0:
                raise ValueError(f"{name}: strip kernel sizes must be odd, got {kernel_sizes}")
        if len(set(kernel_sizes)) != len(kernel_sizes):
            raise ValueError(f"{name}: kernel_sizes must differ, got {kernel_sizes}")
        self.kernel_sizes = kernel_sizes
        C = channels
        self.dconv5_5 = nn.Conv2d(C, C, kernel_size=5, padding=2, groups=C)
        for k in kernel_sizes:
            # official names: dconv1_7 is the horizontal strip, dconv7_1 the vertical one
            setattr(self, f"dconv1_{k}", nn.Conv2d(C, C, (1, k), padding=(0, k // 2), groups=C))
            setattr(self, f"dconv{k}_1", nn.Conv2d(C, C, (k, 1), padding=(k // 2, 0), groups=C))

    def _strips(self) -> list[tuple[nn.Conv2d, nn.Conv2d]]:
        return [
            (getattr(self, f"dconv1_{k}"), getattr(self, f"dconv{k}_1")) for k in self.kernel_sizes
        ]

    def pyramid(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, C, H, W)``: ``D + sum_k V_k(H_k(D))``, ``D = DW5x5(x)``."""
        base = self.dconv5_5(x)
        out = base
        for horizontal, vertical in self._strips():
            out = out + vertical(horizontal(base))
        return out


class _ChannelPrior(nn.Module):
    """CPCA's channel attention: ``sigmoid(MLP(avg)) + sigmoid(MLP(max))`` (official code).

    Parameter names ``fc1`` / ``fc2`` (biased 1x1 convs) follow the official release.
    """

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1, bias=True)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1, bias=True)

    def mlp(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(x)))

    def forward(self, x: Tensor, fused: bool) -> Tensor:
        if fused:
            # both descriptors through the shared MLP in one call: (B, C, 1, 2)
            pooled = torch.cat([x.mean((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)], 3)
            return torch.sigmoid(self.mlp(pooled)).sum(3, keepdim=True)
        avg = torch.sigmoid(self.mlp(F.adaptive_avg_pool2d(x, 1)))
        mx = torch.sigmoid(self.mlp(F.adaptive_max_pool2d(x, 1)))
        return avg + mx


@register(
    "cpca",
    family="channel_spatial",
    layout="map",
    paper="Huang et al., Channel prior convolutional attention for medical image "
    "segmentation (CPCA as in the official CPCANet RepBlock)",
    year=2024,
    cost="6·B·C²·H·W (shared 1x1 conv, 3 uses) + 2·B·C·H·W·(25 + 2·(7+11+21)) (depthwise) "
    "+ 8·B·C²/r (MLP)",
    captures="(B, C, 1, 1) channel prior, then (B, C, H, W) spatial attention",
)
class ChannelPriorConvAttention(DepthwisePyramid):
    """CPCA (Huang et al., Computers in Biology and Medicine 2024), as the official code.

    Huang et al., *Channel prior convolutional attention for medical image
    segmentation*, Comput. Biol. Med. 2024. Following ``RepBlock`` of the official CPCANet
    release (Cuthbert-Huang/CPCANet), one biased 1x1 conv ``P`` (``conv``) serves 3 steps::

        X  = GELU(P(x))                                          input projection
        Ca = sigmoid(MLP(AvgPool X)) + sigmoid(MLP(MaxPool X))   (B, C, 1, 1)
        F  = Ca * X                                              the channel prior
        D  = DW5x5(F);  S = D + sum_k DW_kx1(DW_1xk(D)),  k in (7, 11, 21)
        y  = P(P(S) * F)                                         spatial attention P(S)

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``, any ``H, W``. Args: ``channels``,
    ``reduction`` 4 (channel MLP), ``kernel_sizes`` ``(7, 11, 21)`` (strip pairs).
    Cost: ``6·B·C²·H·W`` (``P``, 3 uses) ``+ 2·B·C·H·W·(25 + 2·(7+11+21))`` (depthwise)
    ``+ 8·B·C²/r`` (MLP).
    Faithful to the code where it differs from the paper's text: the pooled branches are
    squashed separately and summed (``Ca`` in (0, 2)), the spatial attention has no sigmoid,
    one ``P`` projects in, mixes the pyramid and projects out. Official names (``ca.fc1``,
    ``ca.fc2``, ``dconv5_5``, ``dconv1_7``, ..., ``conv``): a ``RepBlock`` state dict loads;
    :func:`official_cpca_state_dict` strips the CPCANet prefix, :meth:`from_official` builds
    and loads. Deviation: MLP width ``max(1, C // reduction)``, so ``C < reduction`` works.
    attn_impl: ``auto`` (channel MLP batched over both pooled descriptors), ``explicit``;
    records ``Ca``, then the ``(B, C, H, W)`` spatial attention (which ``spatial_map``
    averages). Measured in benchmarks/conv_attention.md.
    """

    layout = "map"

    def __init__(
        self, channels: int, reduction: int = 4, kernel_sizes: Sequence[int] = (7, 11, 21),
        attn_impl: str | None = None,
    ) -> None:
        super().__init__(attn_impl=attn_impl)
        self._build_gated_pyramid("cpca", channels, reduction, kernel_sizes, _ChannelPrior)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x, self.channels)
        x = self.act(self.conv(x))
        channel_prior = self.ca(x, self.use_fused)  # (B, C, 1, 1)
        prior = channel_prior * x
        spatial = self.conv(self.pyramid(prior))  # (B, C, H, W), the shared conv again
        self.record(channel_prior)
        self.record(spatial)
        return self.conv(spatial * prior)

    @classmethod
    def from_official(
        cls, state_dict: Mapping[str, Tensor], prefix: str = ""
    ) -> ChannelPriorConvAttention:
        """Build a CPCA from an official ``RepBlock`` state dict (optionally prefixed).

        ``channels`` and ``reduction`` are read from the shapes of ``conv`` and ``ca.fc1``.
        """
        sd = official_cpca_state_dict(state_dict, prefix)
        channels, hidden = sd["conv.weight"].shape[0], sd["ca.fc1.weight"].shape[0]
        module = cls(channels, reduction=max(1, channels // hidden))
        if module.ca.fc1.out_channels != hidden:
            raise ValueError(
                f"cpca: official ca.fc1 has {hidden} outputs for {channels} channels, which no "
                "integer reduction reproduces"
            )
        module.load_state_dict(sd)
        return module


_OFFICIAL_CPCA_KEYS = (
    "ca.fc1.weight", "ca.fc1.bias", "ca.fc2.weight", "ca.fc2.bias",
    "dconv5_5.weight", "dconv5_5.bias",
    *(f"dconv{a}_{b}.{p}" for k in (7, 11, 21) for a, b in ((1, k), (k, 1))
      for p in ("weight", "bias")),
    "conv.weight", "conv.bias",
)


def find_official_cpca_blocks(state_dict: Mapping[str, Tensor]) -> list[str]:
    """Prefixes of every CPCA block in an official checkpoint (e.g. a whole CPCANet).

    A prefix is returned when every official CPCA key exists under it, e.g.
    ``"model_down.layers.0.blocks.0.repmlp_block."``; ``""`` for a bare block.
    """
    suffix = "dconv5_5.weight"
    prefixes = [k[: -len(suffix)] for k in state_dict if k.endswith(suffix)]
    return sorted(p for p in prefixes if all(p + key in state_dict for key in _OFFICIAL_CPCA_KEYS))


def official_cpca_state_dict(
    state_dict: Mapping[str, Tensor], prefix: str = ""
) -> dict[str, Tensor]:
    """The keys of one official CPCA block, with ``prefix`` stripped, for ``load_state_dict``.

    Our parameter names equal the official ones, so the mapping is the identity after the
    prefix; a missing key raises a ValueError naming it (and the blocks that were found).
    """
    missing = [prefix + k for k in _OFFICIAL_CPCA_KEYS if prefix + k not in state_dict]
    if missing:
        found = find_official_cpca_blocks(state_dict)
        raise ValueError(
            f"cpca: the state dict lacks {missing[:3]}{' ...' if len(missing) > 3 else ''} "
            f"under prefix {prefix!r}; CPCA blocks found under: {found or 'none'}"
        )
    return {k: state_dict[prefix + k] for k in _OFFICIAL_CPCA_KEYS}
