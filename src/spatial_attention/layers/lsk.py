"""Large selective kernel (LSK) attention on ``(B, C, H, W)`` (Li et al. ICCV 2023).

Two depthwise convolutions in sequence give two receptive fields (5 and 23 pixels); a
1x1 conv reduces each to ``C/2`` channels. A spatial selection decides, per position,
how much of each kernel's features to use: the channel mean and max of both, a 7x7 conv
to one logit map per kernel and a sigmoid. The selected sum, widened back to ``C`` by a
1x1 conv, multiplies the input. It is LSKNet's ``LSKblock`` (the backbone wraps it in a
1x1 conv + GELU before and a 1x1 conv + shortcut after).

Parameter names are the official ``LSKblock``'s, so its weights load as they are
(:meth:`LargeSelectiveKernel.load_official_state_dict` also takes the
``{'state_dict': ...}`` wrapping and ``module.`` prefixes).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..checkpoint import rename_key_segments
from ..checks import check_positive
from ..registry import register
from ..tracing import building_graph, exporting_graph
from .base import AttentionModule

__all__ = ["LargeSelectiveKernel"]


def _to_phases(a: Tensor, d: int) -> tuple[Tensor, int, int]:
    """``(B, C, H, W)`` -> its ``d x d`` phase sub-maps ``a[..., r::d, s::d]`` stacked on the
    batch axis, ``(B d d, C, h, w)`` channels-last, the map zero-padded to ``(h d, w d)``."""
    B, C, H, W = a.shape
    h, w = (H + d - 1) // d, (W + d - 1) // d  # non-negative floor division: ONNX's truncates
    a = a.permute(0, 2, 3, 1)  # (B, H, W, C): a view when a is channels-last
    if (h * d, w * d) != (H, W):
        a = F.pad(a, (0, 0, 0, w * d - W, 0, h * d - H))
    a = a.reshape(B, h, d, w, d, C).permute(0, 2, 4, 1, 3, 5).reshape(B * d * d, h, w, C)
    return a.permute(0, 3, 1, 2), h, w


def _from_phases(y: Tensor, d: int, size: tuple[int, int]) -> Tensor:
    """The inverse of :func:`_to_phases`: ``(B d d, C, h, w)`` -> ``(B, C, H, W)``."""
    n, C, h, w = y.shape
    y = y.permute(0, 2, 3, 1).reshape(n // (d * d), d, d, h, w, C).permute(0, 3, 1, 4, 2, 5)
    return y.reshape(-1, h * d, w * d, C)[:, :size[0], :size[1]].permute(0, 3, 1, 2)


@register(
    "lsk",
    family="branch",
    layout="map",
    paper="Li et al., Large Selective Kernel Network for Remote Sensing Object Detection "
          "(Sec. 3.2, LK selection)",
    year=2023,
    cost="148·B·C·H·W (depthwise 5x5, 7x7) + 3·B·C²·H·W (1x1 convs) + 392·B·H·W (squeeze) "
         "+ ~6·B·C·H·W (pool, select, gate)",
    captures="(B, 2, H, W) selection maps sigmoid(SA^_i), kernel 1 (5x5) then 2 (7x7, d=3)",
)
class LargeSelectiveKernel(AttentionModule):
    """LSK: a spatial selection between two large depthwise kernels (Li et al. ICCV 2023).

    Li et al., *Large Selective Kernel Network for Remote Sensing Object Detection*, ICCV
    2023, Sec. 3.2 (``LSKblock``). ``U1 = DW5x5(X)``, ``U2 = DW7x7,d3(U1)``; ``U~i = 1x1_i(Ui)``
    (``C -> C/2``); ``SA = [mean_c; max_c]([U~1; U~2])``; ``SA^ = conv7x7_{2->2}(SA)``,
    ``SA~i = sigmoid(SA^_i)``; ``S = 1x1_{C/2->C}(SA~1 · U~1 + SA~2 · U~2)``; ``Y = X · S``.
    Shapes: ``(B, C, H, W) -> (B, C, H, W)``, any ``H, W`` ("same" padding everywhere);
    records the ``(B, 2, H, W)`` selection maps. Args: ``channels`` (at least 2; ``C/2``
    rounds down, as in the official code).
    Parameters (all convs biased) and their names are the official module's: ``conv0``,
    ``conv_spatial``, ``conv1``, ``conv2``, ``conv_squeeze``, ``conv``.
    Cost: ``148·B·C·H·W`` (depthwise) ``+ 3·B·C²·H·W`` (1x1) ``+ 392·B·H·W`` (squeeze)
    ``+ ~6·B·C·H·W``.
    Deviations: none in the math. Initialisation is PyTorch's default, as the official
    block's own; the LSKNet backbone re-draws its convs (normal, std ``sqrt(2 / fan_out)``).
    attn_impl: ``auto`` pools the two halves without concatenating them and selects with
    one ``addcmul``; on the CPU it runs the 5x5 channels-last (that copy of an NCHW input
    is recomputed in backward, not kept) and the dilated 7x7 as an undilated conv over the
    9 phase sub-maps, the 1x1 reductions there too (same sums in another order: ~1e-7
    apart in float32). ``explicit`` is the official op order and records the maps.
    """

    layout = "map"

    def __init__(self, channels: int, attn_impl: str | None = None) -> None:
        super().__init__(attn_impl=attn_impl)
        check_positive("lsk", channels=channels)
        if channels < 2:
            raise ValueError(f"lsk: channels must be at least 2 (two halves of C // 2 "
                             f"channels), got {channels}")
        self.channels = channels
        half = channels // 2
        self.conv0 = nn.Conv2d(channels, channels, 5, padding=2, groups=channels)
        self.conv_spatial = nn.Conv2d(channels, channels, 7, padding=9, groups=channels,
                                      dilation=3)
        self.conv1 = nn.Conv2d(channels, half, 1)
        self.conv2 = nn.Conv2d(channels, half, 1)
        self.conv_squeeze = nn.Conv2d(2, 2, 7, padding=3)
        self.conv = nn.Conv2d(half, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x, self.channels)
        if self.impl == "explicit":
            return self._explicit(x)
        if x.device.type == "cpu":
            # oneDNN's depthwise kernels: channels-last is several times faster for the 5x5;
            # the dilated 7x7 is far faster as an undilated 7x7 over the 9 phase sub-maps
            # (tap (p, q) of output (i, j) reads (i + 3 (p - 3), j + 3 (q - 3)), in the
            # phase of (i, j) itself); both 1x1 convs run on the phases too, so only their
            # narrower outputs are put back in place (benchmarks/zoo_lsk_shuffle.md)
            d, size = self.conv_spatial.dilation[0], x.shape[-2:]
            phases, _, _ = _to_phases(self._first_kernel(x), d)
            u1 = _from_phases(self.conv1(phases), d, size)
            phases = F.conv2d(phases, self.conv_spatial.weight, self.conv_spatial.bias,
                              padding=self.conv_spatial.padding[0] // d,
                              groups=self.conv_spatial.groups)
            u2 = _from_phases(self.conv2(phases), d, size)  # (B, C/2, H, W), as u1
            del phases  # (what autograd needs it keeps; without it, the memory goes now)
        else:
            u1 = self.conv0(x)
            u1, u2 = self.conv1(u1), self.conv2(self.conv_spatial(u1))
        # mean and max over the 2 (C/2) channels of [u1; u2], without forming the pair
        avg = (u1.sum(1, keepdim=True) + u2.sum(1, keepdim=True)) / (u1.shape[1] * 2)
        top = torch.maximum(u1.amax(1, keepdim=True), u2.amax(1, keepdim=True))
        sel = torch.sigmoid(self.conv_squeeze(torch.cat([avg, top], 1)))  # (B, 2, H, W)
        mixed = torch.addcmul(u2 * sel[:, 1:2], u1, sel[:, 0:1])
        del u1, u2
        return x * self.conv(mixed)

    def _first_kernel(self, x: Tensor) -> Tensor:
        """``conv0`` on a channels-last copy of ``x``. Under autograd the conv would keep that
        copy for its weight gradient, a map more than the official module keeps; the copy
        and the conv are recomputed in backward instead (checkpointed: a few percent of
        the layer's backward), except where ``x`` is channels-last already or a graph is
        being built or exported."""
        def first(t: Tensor) -> Tensor:
            return self.conv0(t.contiguous(memory_format=torch.channels_last))

        if (torch.is_grad_enabled() and (x.requires_grad or self.conv0.weight.requires_grad)
                and not x.is_contiguous(memory_format=torch.channels_last)
                and not (building_graph() or exporting_graph())):
            return checkpoint(first, x, use_reentrant=False, preserve_rng_state=False)
        return first(x)

    def _explicit(self, x: Tensor) -> Tensor:
        u1 = self.conv0(x)  # U1: receptive field 5
        u2 = self.conv_spatial(u1)  # U2: receptive field 5 + 3 * 6 = 23
        u1, u2 = self.conv1(u1), self.conv2(u2)  # U~1, U~2: (B, C/2, H, W)
        u = torch.cat([u1, u2], dim=1)  # (B, 2 (C/2), H, W)
        sa = torch.cat([u.mean(1, keepdim=True), u.max(1, keepdim=True).values], dim=1)
        sel = torch.sigmoid(self.conv_squeeze(sa))  # SA~: (B, 2, H, W)
        self.record(sel)
        s = self.conv(u1 * sel[:, 0:1] + u2 * sel[:, 1:2])  # S: (B, C, H, W)
        return x * s

    def load_official_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True):
        """Load an official ``LSKblock``'s state dict (its keys are ours), accepting the
        ``{'state_dict': ...}`` wrapping and ``module.`` prefixes."""
        return self.load_state_dict(rename_key_segments(state_dict, ()), strict=strict)
