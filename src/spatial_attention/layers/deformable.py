"""Deformable and dynamic convolution: the convolutional instances of generalized attention.

Zhu et al. (ICCV 2019) read both as spatial attention over a local set of keys:
deformable convolution attends, through bilinear sampling, to keys at positions the
query content shifts (its weight depends on query content and relative position, like
E2, with a sparse support); dynamic convolution attends to a fixed window of keys with
weights predicted from the query content alone (E2 restricted to the window).

* ``deformable_conv`` / ``modulated_deformable_conv``: :class:`DeformableConv2d`, DCNv1
  (Dai et al. ICCV 2017) and DCNv2 (Zhu, Hu, Lin, Dai CVPR 2019), offsets (and
  modulation) predicted by a zero-initialised convolution, the sampling in plain
  PyTorch (:mod:`..functional.sampling`).
* ``dynamic_conv``: :class:`DynamicConv2d`, the dynamic convolution of Wu et al.
  (ICLR 2019, DynamicConv) on 2-D maps: position-specific kernels predicted from the query.

Both take and return ``(B, C, H, W)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from ..checks import check_divisible, check_probability
from ..functional.sampling import deform_conv2d, deform_conv2d_explicit
from ..registry import register
from .base import AttentionModule

__all__ = ["DeformableConv2d", "DynamicConv2d"]


def _check_int(name: str, **values: Any) -> None:
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: {key} must be a positive int, got {value!r}")


@register(
    "deformable_conv",
    family="spatial",
    layout="map",
    paper="Dai et al., Deformable Convolutional Networks (deformable convolution)",
    year=2017,
    cost="2·B·Ho·Wo·K·C·(2G + Cout/groups) (offset conv, taps) + 8·B·Ho·Wo·K·C (bilinear)",
    captures="(B, G, K, 2, Ho, Wo) offsets (dy, dx) of every tap",
)
@register(
    "modulated_deformable_conv",
    family="spatial",
    layout="map",
    paper="Zhu, Hu, Lin, Dai, Deformable ConvNets v2: More Deformable, Better Results "
    "(modulated deformable convolution)",
    year=2019,
    cost="2·B·Ho·Wo·K·C·(3G + Cout/groups) (offset/mask conv, taps) + 8·B·Ho·Wo·K·C",
    captures="(B, G, K, 2, Ho, Wo) offsets, then (B, G, K, Ho, Wo) modulation in (0, 1)",
    modulated=True,
)
class DeformableConv2d(AttentionModule):
    """Deformable convolution, v1 (Dai et al. 2017) or modulated v2 (Zhu, Hu, Lin, Dai 2019).

    Dai et al., *Deformable Convolutional Networks*, ICCV 2017 (``deformable_conv``); Zhu,
    Hu, Lin, Dai, *Deformable ConvNets v2: More Deformable, Better Results*, CVPR 2019
    (``modulated_deformable_conv``): ``y(p) = sum_k w_k * m_k(p) * x(p * s - pad + p_k * dil
    + delta_p_k(p))``, bilinear sampling (zero outside the map), ``m_k = 1`` in v1.
    Shapes: ``(B, C, H, W) -> (B, out_channels, Ho, Wo)``; with the defaults the input's shape
    for any ``H, W``. Args: ``channels``; ``out_channels`` (``channels``); ``kernel_size`` 3;
    ``stride`` 1; ``padding`` (None: ``dilation * (kernel_size - 1) // 2``); ``dilation`` 1;
    ``groups``, ``deform_groups`` ``G`` 1; ``bias`` True; ``modulated`` (v2).
    Cost (``K`` taps): ``2·B·Ho·Wo·K·C·(2G + Cout/groups)`` (offset conv, taps; ``3G`` in v2)
    ``+ 8·B·Ho·Wo·K·C`` (bilinear).
    ``conv_offset`` (a ``kernel_size`` conv with this layer's stride, padding and dilation,
    zero-initialised as in both papers, so training starts from a plain convolution) predicts
    ``2·G·K`` offsets in torchvision's ``(G, K, (dy, dx))`` order, plus in v2 ``G·K``
    channels through a sigmoid for ``m_k``. Names are mmcv's ``DeformConv2dPack`` /
    ``ModulatedDeformConv2dPack`` ones (``weight``, ``bias``, ``conv_offset.*``); the kernel
    follows ``torchvision.ops.deform_conv2d`` (:func:`..functional.sampling.deform_conv2d`).
    Deviation: ``bias=True`` by default (torchvision's; mmcv's v1 has none).
    attn_impl: ``auto`` (one ``grid_sample`` of all taps, one grouped matmul), ``explicit``
    (the sum over taps, one at a time; records the offsets and, v2, the modulation);
    measured in benchmarks/deformable_conv.md.
    """

    def __init__(
        self,
        channels: int,
        out_channels: int | None = None,
        kernel_size: int | tuple[int, int] = 3,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | None = None,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        deform_groups: int = 1,
        bias: bool = True,
        modulated: bool = False,
        attn_impl: str | None = None,
    ) -> None:
        super().__init__(attn_impl=attn_impl)
        name = "modulated_deformable_conv" if modulated else "deformable_conv"
        out_channels = channels if out_channels is None else out_channels
        kh, kw = _pair(kernel_size)
        (sh, sw), (dh, dw) = _pair(stride), _pair(dilation)
        _check_int(name, channels=channels, out_channels=out_channels, kernel_h=kh,
                   kernel_w=kw, stride_h=sh, stride_w=sw, dilation_h=dh, dilation_w=dw,
                   groups=groups, deform_groups=deform_groups)
        if padding is None:
            padding = (dh * (kh - 1) // 2, dw * (kw - 1) // 2)
        ph, pw = _pair(padding)
        if min(ph, pw) < 0:
            raise ValueError(f"{name}: padding must be >= 0, got {padding!r}")
        if channels % groups or out_channels % groups:
            raise ValueError(
                f"{name}: groups {groups} must divide channels {channels} and out_channels "
                f"{out_channels}"
            )
        if channels % deform_groups:
            raise ValueError(
                f"{name}: deform_groups {deform_groups} must divide channels {channels}"
            )
        self._name = name
        self.channels, self.out_channels = channels, out_channels
        self.kernel_size, self.stride = (kh, kw), (sh, sw)
        self.padding, self.dilation = (ph, pw), (dh, dw)
        self.groups, self.deform_groups, self.modulated = groups, deform_groups, modulated
        self.weight = nn.Parameter(torch.empty(out_channels, channels // groups, kh, kw))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        per_tap = 3 if modulated else 2
        self.conv_offset = nn.Conv2d(channels, deform_groups * per_tap * kh * kw, (kh, kw),
                                     stride=(sh, sw), padding=(ph, pw), dilation=(dh, dw))
        self.reset_parameters()

    @property
    def mechanism_name(self) -> str:
        return self._name

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # as nn.Conv2d / torchvision
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.kernel_size[0] * self.kernel_size[1]
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def extra_repr(self) -> str:
        return (f"{self.channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}, deform_groups={self.deform_groups}, "
                f"modulated={self.modulated}, " + super().extra_repr())

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x, self.channels)
        H, W = x.shape[-2:]
        (kh, kw), (ph, pw), (dh, dw) = self.kernel_size, self.padding, self.dilation
        if H + 2 * ph < dh * (kh - 1) + 1 or W + 2 * pw < dw * (kw - 1) + 1:
            raise ValueError(
                f"{self._name}: a {kh}x{kw} kernel (dilation {dh}x{dw}, padding {ph}x{pw}) "
                f"does not fit a {H}x{W} input"
            )
        pred = self.conv_offset(x)
        n_off = 2 * self.deform_groups * kh * kw
        offset = pred[:, :n_off]
        mask = pred[:, n_off:].sigmoid() if self.modulated else None
        args = (self.weight, self.bias, self.stride, self.padding, self.dilation, mask)
        if self.use_fused:
            return deform_conv2d(x, offset, *args)
        if self.capturing:
            self.record(offset.unflatten(1, (self.deform_groups, kh * kw, 2)))
            if mask is not None:
                self.record(mask.unflatten(1, (self.deform_groups, kh * kw)))
        return deform_conv2d_explicit(x, offset, *args)

    @classmethod
    def example(cls, name: str, batch: int, channels: int, size: tuple[int, int],
                **kwargs: Any):
        """The layer with small random offset weights, so the sampling is deformed.

        Both papers start ``conv_offset`` at zero (a plain convolution); the example
        gives it weights of std 0.5 / sqrt(fan_in) so tests and benchmarks see
        fractional, out-of-grid and out-of-image samples.
        """
        module, inputs = super().example(name, batch, channels, size, **kwargs)
        with torch.no_grad():
            w = module.conv_offset.weight
            fan_in = w.shape[1] * w.shape[2] * w.shape[3]
            w.normal_(0.0, 2.0 / math.sqrt(fan_in), generator=torch.Generator().manual_seed(0))
            module.conv_offset.bias.uniform_(-0.5, 0.5,
                                             generator=torch.Generator().manual_seed(1))
        return module, inputs

    @classmethod
    def spatial_map(cls, weights: Tensor, size: tuple[int, int]) -> Tensor:
        """Offsets ``(B, G, K, 2, H, W)`` -> mean shift length; masks -> mean modulation."""
        H, W = size
        if weights.dim() == 6 and tuple(weights.shape[-2:]) == (H, W):
            return weights.float().norm(dim=3).mean((1, 2))
        if weights.dim() == 5 and tuple(weights.shape[-2:]) == (H, W):
            return weights.float().mean((1, 2))
        raise ValueError(
            f"{cls.__name__}: cannot turn a record of shape {tuple(weights.shape)} into a "
            f"{H}x{W} map (offsets and masks have the output's size)"
        )


@register(
    "dynamic_conv",
    family="spatial",
    layout="map",
    paper="Wu et al., Pay Less Attention with Lightweight and Dynamic Convolutions (dynamic "
    "convolution, on 2-D maps); analysed as attention by Zhu et al. 2019",
    year=2019,
    cost="2·B·H·W·C·heads·K (kernel prediction) + 2·B·H·W·C·K (aggregation), K = k²",
    captures="(B, heads, K, H, W) the kernel of every position (softmax over the K taps)",
)
class DynamicConv2d(AttentionModule):
    """Dynamic convolution (Wu et al. ICLR 2019, DynamicConv) on ``(B, C, H, W)`` maps.

    Wu et al., *Pay Less Attention with Lightweight and Dynamic Convolutions*, ICLR 2019, on
    2-D maps: at every position ``p`` a kernel over the ``k x k`` window (dilated) is
    predicted from the query, ``W(p) = softmax_k(weight_linear(x_p))`` (``heads·K`` outputs,
    one kernel per head), shared by the ``C / heads`` channels of its head:
    ``y_c(p) = sum_k W(p)_(h(c), k) x_c(p + r_k)``; in Zhu et al.'s terms, E2 over a window.
    Shapes: ``(B, C, H, W) -> (B, C, H, W)``, any ``H, W``. Args: ``channels``;
    ``kernel_size`` 3; ``num_heads`` 8; ``dilation`` 1; ``weight_softmax`` True (paper);
    ``renorm_padding`` (below); ``bias`` of ``weight_linear``; ``conv_bias`` (fairseq's
    optional per-channel bias); ``weight_dropout``. Cost: ``2·B·H·W·C·heads·K`` (kernel prediction)
    ``+ 2·B·H·W·C·K`` (aggregation), ``K = k²``.
    ``weight_linear`` is fairseq's name (a 1x1 conv here, Xavier-uniform weights, zero bias); the
    block's input/output projections are the caller's. Deviation: ``renorm_padding=True``
    (fairseq's option defaults to False) masks taps outside the map out of the softmax, the
    house rule for padding; with False they take weight and read zeros.
    attn_impl: ``auto`` (the sum over ``K`` shifted views of the zero-padded map, each times
    its tap's weight map), ``explicit`` (every window written out by ``F.unfold``; records the
    kernels); measured in benchmarks/generalized_attention.md.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        num_heads: int = 8,
        dilation: int = 1,
        weight_softmax: bool = True,
        renorm_padding: bool = True,
        bias: bool = False,
        conv_bias: bool = False,
        weight_dropout: float = 0.0,
        attn_impl: str | None = None,
    ) -> None:
        super().__init__(attn_impl=attn_impl)
        _check_int("dynamic_conv", channels=channels, kernel_size=kernel_size,
                   num_heads=num_heads, dilation=dilation)
        check_divisible("dynamic_conv", channels, num_heads)
        check_probability("dynamic_conv", weight_dropout=weight_dropout)
        if kernel_size % 2 == 0:
            raise ValueError(f"dynamic_conv: kernel_size must be odd, got {kernel_size}")
        self.channels, self.kernel_size, self.num_heads = channels, kernel_size, num_heads
        self.dilation, self.weight_dropout = dilation, weight_dropout
        self.weight_softmax, self.renorm_padding = weight_softmax, renorm_padding
        K = kernel_size * kernel_size
        self.weight_linear = nn.Conv2d(channels, num_heads * K, 1, bias=bias)
        nn.init.xavier_uniform_(self.weight_linear.weight)
        if bias:
            nn.init.zeros_(self.weight_linear.bias)
        self.conv_bias = nn.Parameter(torch.zeros(channels)) if conv_bias else None

    def _kernels(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Kernels ``(B, heads, K, H*W)`` and the inside-the-map mask ``(1, 1, K, H*W)``."""
        B, _, H, W = x.shape
        k, d = self.kernel_size, self.dilation
        logits = self.weight_linear(x).reshape(B, self.num_heads, k * k, H * W)
        ones = x.new_ones(1, 1, H, W)
        inside = F.unfold(ones, k, dilation=d, padding=d * (k // 2)).reshape(1, 1, k * k, H * W)
        inside = inside > 0
        if self.weight_softmax:
            if self.renorm_padding:
                logits = logits.masked_fill(~inside, torch.finfo(logits.dtype).min)
            kernels = logits.softmax(dim=2)
        else:
            kernels = logits
        if self.renorm_padding:
            kernels = kernels * inside
        if self.training and self.weight_dropout > 0:
            kernels = F.dropout(kernels, self.weight_dropout)
        return kernels, inside

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x, self.channels)
        B, C, H, W = x.shape
        k, d, z = self.kernel_size, self.dilation, self.num_heads
        kernels, _ = self._kernels(x)  # (B, z, K, H*W)
        if self.use_fused:
            # K shifted views of the zero-padded map, each scaled by its tap's weight
            # map and accumulated: no (B, C*K, H*W) window buffer (measured 3x faster on
            # CPU than F.unfold + one einsum, see benchmarks/generalized_attention.md)
            pad = d * (k // 2)
            padded = F.pad(x, (pad, pad, pad, pad)).reshape(B, z, C // z, H + 2 * pad, -1)
            kern = kernels.reshape(B, z, 1, k * k, H, W)
            out = padded[..., 0:H, 0:W] * kern[:, :, :, 0]
            for t in range(1, k * k):  # over the kernel taps, not over positions
                i, j = (t // k) * d, (t % k) * d
                out = out + padded[..., i:i + H, j:j + W] * kern[:, :, :, t]
            out = out.reshape(B, C, H, W)
        else:
            # the windows written out (im2col), then each position's weighted sum
            self.record(kernels.reshape(B, z, k * k, H, W))
            cols = F.unfold(x, k, dilation=d, padding=d * (k // 2))  # (B, C*K, H*W)
            cols = cols.reshape(B, z, C // z, k * k, H * W)
            out = torch.einsum("bzckn,bzkn->bzcn", cols, kernels).reshape(B, C, H, W)
        if self.conv_bias is not None:
            out = out + self.conv_bias.reshape(1, -1, 1, 1)
        return out

    @classmethod
    def example(cls, name: str, batch: int, channels: int, size: tuple[int, int],
                **kwargs: Any):
        kwargs.setdefault("num_heads", math.gcd(channels, 8))
        return super().example(name, batch, channels, size, **kwargs)

    @classmethod
    def spatial_map(cls, weights: Tensor, size: tuple[int, int]) -> Tensor:
        """Kernels ``(B, heads, K, H, W)`` -> the weight each pixel receives as a key."""
        H, W = size
        if weights.dim() != 5 or tuple(weights.shape[-2:]) != (H, W):
            raise ValueError(
                f"{cls.__name__}: expected a (B, heads, K, {H}, {W}) record, got "
                f"{tuple(weights.shape)}"
            )
        K = weights.shape[2]
        k = math.isqrt(K)
        received = F.fold(weights.float().mean(1).reshape(weights.shape[0], K, H * W),
                          (H, W), k, padding=k // 2)
        return received[:, 0]
