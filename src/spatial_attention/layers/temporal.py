"""Temporal attention on clip features ``(B, T, C, H, W)``: over frames, at each position.

Two mechanisms, both registered with layout ``"clip"`` and family ``"temporal"`` (a clip
is a stack of ``T`` frame maps):

* ``temporal``: TimeSformer's *time attention* (Bertasius et al. ICML 2021): every
  position attends, by multi-head scaled dot-product, to the same position in every frame.
* ``temporal_channel``: TAM, the Temporal Adaptive Module (Liu et al. ICCV 2021): a
  channel-by-frame importance map and a per-channel, input-adaptive temporal kernel.

Both take and return ``(B, T, C, H, W)``. A ``(B*T, C, H, W)`` batch of frames is
rejected with a ValueError naming the mechanism (``x.unflatten(0, (B, T))`` makes a clip).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import (
    check_divisible,
    check_dtype_matches,
    check_floating,
    check_positive,
    check_probability,
)
from ..functional.dispatch import attention
from ..registry import register
from .base import AttentionModule

__all__ = ["ClipAttention", "TemporalSelfAttention", "TemporalAdaptiveModule"]

_CLIP_AXES = "(B, T, C, H, W)"


class ClipAttention(AttentionModule):
    """Base of the temporal mechanisms: 5-D clip validation and a clip example. Not registered.

    ``check_input`` expects ``(B, T, C, H, W)`` (channels in dim 2, ``T`` frames in dim
    1); ``example`` builds a clip of :attr:`example_frames` frames.
    """

    layout = "clip"
    #: clip length of :meth:`example` (the 8-frame clips of TSN/TAM/TimeSformer)
    example_frames: ClassVar[int] = 8

    def check_input(
        self, x: Tensor, channels: int | None = None, frames: int | None = None
    ) -> None:
        name = self.mechanism_name
        if not hasattr(x, "dim"):
            raise ValueError(f"{name}: expected a clip tensor {_CLIP_AXES}, got {type(x).__name__}")
        if x.dim() != 5:
            hint = (" (a batch of frames? make it a clip with x.unflatten(0, (B, T)))"
                    if x.dim() == 4 else "")
            raise ValueError(
                f"{name}: expected a 5-D clip {_CLIP_AXES}, got shape {tuple(x.shape)}{hint}"
            )
        if channels is not None and x.shape[2] != channels:
            raise ValueError(
                f"{name}: expected {channels} channels in dim 2 of {_CLIP_AXES}, got shape "
                f"{tuple(x.shape)}"
            )
        if frames is not None and x.shape[1] != frames:
            raise ValueError(
                f"{name}: expected {frames} frames in dim 1 of {_CLIP_AXES} (num_frames), got "
                f"shape {tuple(x.shape)}"
            )
        if any(s == 0 for s in x.shape):
            raise ValueError(f"{name}: got an empty tensor of shape {tuple(x.shape)}")
        check_floating(name, x)
        check_dtype_matches(name, x, self)

    @classmethod
    def example(
        cls, name: str, batch: int, channels: int, size: tuple[int, int], **kwargs: Any
    ) -> tuple[nn.Module, tuple[Tensor, ...]]:
        """The mechanism and a clip ``(batch, 8, channels, H, W)``."""
        from ..registry import create

        H, W = size
        module = create(name, channels, **kwargs)
        return module, (torch.randn(batch, cls.example_frames, channels, H, W),)


@register(
    "temporal",
    family="temporal",
    layout="clip",
    paper="Bertasius et al., Is Space-Time Attention All You Need for Video Understanding? "
    "(TimeSformer, Sec. 3, divided space-time attention: the time attention)",
    year=2021,
    cost="8·B·T·H·W·C² (qkv, proj) + 4·B·H·W·T²·C (scores, weighting)",
    captures="(B, heads, H, W, T, T) attention over frames at each position",
)
class TemporalSelfAttention(ClipAttention):
    """Time attention of TimeSformer (Bertasius et al. ICML 2021, divided space-time).

    Bertasius et al., *Is Space-Time Attention All You Need for Video
    Understanding?*, ICML 2021, Sec. 3 (time attention). At every position ``p`` and frame
    ``t``, per head, ``alpha_(p,t) = softmax_t'(q_(p,t) . k_(p,t') / sqrt(D_h))`` over the
    ``T`` frames of the same position; ``y_(p,t) = W_O concat_heads(sum_t' alpha_(p,t),t'
    v_(p,t'))``. Shapes: ``(B, T, C, H, W) -> (B, T, C, H, W)``, any ``T``, ``H``, ``W``.

    Args: ``channels`` ``C``; ``num_heads`` 8 (``D_h = C / heads``); ``qkv_bias`` True (as
    the released models); ``dropout`` on the attention weights.
    Cost: ``8·B·T·H·W·C²`` (qkv, proj) ``+ 4·B·H·W·T²·C`` (scores, weighting).
    ``qkv`` (``C -> 3C``, output laid out ``(3, heads, D_h)``) and ``proj`` (``W_O``) have
    the names and layout of the official ``blocks.{i}.temporal_attn``, so those weights load
    after stripping that prefix. As in the official code (unlike the paper's equation), no
    class token takes part; the block around it (``temporal_norm1``, ``temporal_fc``, the
    residual) is the caller's.
    attn_impl: ``auto``, ``sdpa``, ``kept_probs`` (one attention call over the ``B·H·W``
    sequences of length ``T``), ``explicit`` (the softmax written out, recorded as
    ``(B, heads, H, W, T, T)``; ``spatial_map`` gives the share of attention each position
    sends to *other* frames). On CUDA in float32 with narrow heads the explicit path can be
    the faster one; measured in benchmarks/conv_attention.md.
    """

    attn_impls = ("auto", "explicit", "sdpa", "kept_probs")

    def __init__(
        self, channels: int, num_heads: int = 8, qkv_bias: bool = True, dropout: float = 0.0,
        attn_impl: str | None = None,
    ) -> None:
        super().__init__(attn_impl=attn_impl)
        check_divisible("temporal", channels, num_heads)
        check_probability("temporal", dropout=dropout)
        self.channels, self.num_heads, self.head_dim = channels, num_heads, channels // num_heads
        self.qkv = nn.Linear(channels, 3 * channels, bias=qkv_bias)
        self.proj = nn.Linear(channels, channels)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x, self.channels)
        B, T, C, H, W = x.shape
        # one length-T sequence per (sample, position): (B*H*W, T, C)
        seqs = x.permute(0, 3, 4, 1, 2).reshape(B * H * W, T, C)
        qkv = self.qkv(seqs).reshape(B * H * W, T, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B*H*W, heads, T, D_h)
        p = self.dropout if self.training else 0.0
        if self.use_fused:
            out = attention(q, k, v, dropout_p=p, impl=self.impl)
        else:
            out, weights = attention(q, k, v, dropout_p=p, impl="explicit", return_weights=True)
            self.record(weights.reshape(B, H, W, self.num_heads, T, T).permute(0, 3, 1, 2, 4, 5))
        out = self.proj(out.transpose(1, 2).reshape(B * H * W, T, C))  # (B*H*W, T, C)
        return out.reshape(B, H, W, T, C).permute(0, 3, 4, 1, 2)

    @classmethod
    def example(cls, name, batch, channels, size, **kwargs: Any):
        # the largest head count <= 8 that divides the width
        kwargs.setdefault("num_heads", math.gcd(channels, 8))
        return super().example(name, batch, channels, size, **kwargs)

    @classmethod
    def spatial_map(cls, weights: Tensor, size: tuple[int, int]) -> Tensor:
        """``(B, heads, H, W, T, T)`` -> ``(B, H, W)``: attention sent to other frames.

        ``1 - mean(diag)``, averaged over heads and query frames: 0 where every frame
        keeps to itself, up to ``1 - 1/T`` where frames mix evenly or more.
        """
        H, W = size
        if weights.dim() != 6 or tuple(weights.shape[2:4]) != (H, W):
            raise ValueError(
                f"{cls.__name__}: expected a (B, heads, {H}, {W}, T, T) record, got "
                f"{tuple(weights.shape)}"
            )
        return 1.0 - weights.float().diagonal(dim1=-2, dim2=-1).mean((1, -1))


@register(
    "temporal_channel",
    family="temporal",
    layout="clip",
    paper="Liu et al., TAM: Temporal Adaptive Module for Video Recognition (local and "
    "global branches)",
    year=2021,
    cost="B·T·C·H·W (pool) + 2·B·C²·T·K/β (local) + 2·B·C·T·(αT + K) (global) "
    "+ B·T·C·H·W·(1 + 2T) (rescale, banded aggregation)",
    captures="(B, T, C, 1, 1) channel-frame importance, then (B, C, K) temporal kernels",
)
class TemporalAdaptiveModule(ClipAttention):
    """TAM (Liu et al. ICCV 2021), channel-temporal attention over a clip.

    Liu et al., *TAM: Temporal Adaptive Module for Video Recognition*, ICCV 2021.
    From the frame-pooled descriptor ``x_hat = GAP_(H,W)(X)`` (``C x T``):

    * local branch (location-sensitive importance): ``V = sigmoid(Conv1D_1(ReLU(BN(
      Conv1D_K(x_hat, C/beta))), C))`` in (0, 1)^(C x T), ``Z = V * X``;
    * global branch (location-invariant adaptive kernel): per channel ``theta_c =
      softmax(FC(ReLU(BN(FC(x_hat_c, alpha*T))), K))``, ``Y_(c,t) = sum_k theta_(c,k)
      Z_(c, t + k - K//2)`` (a depthwise temporal conv with zero padding).

    Shapes: ``(B, T, C, H, W) -> (B, T, C, H, W)`` with ``T == num_frames``.
    Args (the paper's and official defaults): ``channels``; ``num_frames`` 8 (fixed: the FCs
    read all ``T`` frames); ``kernel_size`` ``K = 3``; ``alpha`` 2; ``beta`` 4.
    Cost: ``B·T·C·H·W`` (pool) ``+ 2·B·C²·T·K/beta`` (local) ``+ 2·B·C·T·(alpha·T + K)``
    (global) ``+ B·T·C·H·W·(1 + 2T)`` (rescale, banded aggregation).
    Bias-free convs and FCs; official names (``G.0``, ``G.1``, ``G.3``, ``L.0``, ``L.1``,
    ``L.3``), so a TAM state dict loads after stripping its prefix (``...tam.``). Deviation:
    local hidden width ``max(1, C // beta)``, so narrow maps work.
    attn_impl: ``auto`` (the kernels as a banded ``(T, T)`` matrix per sample and channel, one
    batched matmul, instead of the official grouped conv over ``B·C`` groups), ``explicit``
    (the sum over ``K`` shifted frames); records the ``(B, T, C, 1, 1)`` importance map, then
    the ``(B, C, K)`` kernels. Measured in benchmarks/conv_attention.md.
    """

    def __init__(
        self,
        channels: int,
        num_frames: int = 8,
        kernel_size: int = 3,
        alpha: int = 2,
        beta: int = 4,
        attn_impl: str | None = None,
    ) -> None:
        super().__init__(attn_impl=attn_impl)
        check_positive("temporal_channel", channels=channels, num_frames=num_frames,
                       kernel_size=kernel_size, alpha=alpha, beta=beta)
        if kernel_size % 2 == 0:
            raise ValueError(f"temporal_channel: kernel_size must be odd, got {kernel_size}")
        self.channels, self.num_frames, self.kernel_size = channels, num_frames, kernel_size
        hidden = max(1, channels // beta)
        self.G = nn.Sequential(
            nn.Linear(num_frames, num_frames * alpha, bias=False),
            nn.BatchNorm1d(num_frames * alpha),
            nn.ReLU(inplace=True),
            nn.Linear(num_frames * alpha, kernel_size, bias=False),
            nn.Softmax(-1),
        )
        self.L = nn.Sequential(
            nn.Conv1d(channels, hidden, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv1d(hidden, channels, 1, bias=False),
            nn.Sigmoid(),
        )
        # band[t, s] reads tap s - t + K//2 of the kernel; taps outside [0, K) are zero.
        # Fixed by (T, K), so built once (not saved: state dicts keep the official keys).
        frames = torch.arange(num_frames)
        tap = frames[None, :] - frames[:, None] + kernel_size // 2  # (T, T)
        inside = (tap >= 0) & (tap < kernel_size)
        self.register_buffer("band_tap", tap.clamp(0, kernel_size - 1), persistent=False)
        self.register_buffer("band_mask", inside.float(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x, self.channels, self.num_frames)
        B, T, C, H, W = x.shape
        K, pad = self.kernel_size, self.kernel_size // 2
        desc = x.mean((3, 4)).transpose(1, 2)  # (B, C, T)
        importance = self.L(desc)  # (B, C, T), local branch
        kernels = self.G(desc.reshape(B * C, T)).reshape(B, C, K)  # global branch
        z = x * importance.transpose(1, 2)[..., None, None]  # (B, T, C, H, W)
        if self.use_fused:
            band = kernels[:, :, self.band_tap] * self.band_mask  # (B, C, T, T)
            out = band @ z.flatten(3).transpose(1, 2)  # (B, C, T, H*W)
            return out.transpose(1, 2).unflatten(3, (H, W))
        self.record(importance.transpose(1, 2)[..., None, None])
        self.record(kernels)
        z_pad = F.pad(z, (0, 0, 0, 0, 0, 0, pad, pad))  # zero frames before and after
        out = kernels[:, None, :, 0, None, None] * z_pad[:, 0:T]
        for k in range(1, K):
            out = out + kernels[:, None, :, k, None, None] * z_pad[:, k:k + T]
        return out

    @classmethod
    def spatial_map(cls, weights: Tensor, size: tuple[int, int]) -> Tensor:
        raise ValueError(
            f"{cls.__name__}: records channel-frame weights {tuple(weights.shape)}, which "
            "have no spatial map"
        )
