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

    At every position ``p`` and frame ``t``, ``alpha_(p,t) = softmax_t'(q_(p,t) .
    k_(p,t') / sqrt(D_h))`` over the ``T`` frames of the same position, per head;
    ``y_(p,t) = W_O concat_heads(sum_t' alpha_(p,t),t' v_(p,t'))``. ``q, k, v`` come from
    one linear map ``qkv`` (``C -> 3C``, output laid out ``(3, heads, D_h)``) and ``proj``
    is ``W_O``: the parameter names and layout of ``temporal_attn`` in the official
    TimeSformer blocks (``blocks.{i}.temporal_attn.qkv/proj``), so those weights load
    after stripping that prefix. ``qkv_bias=True`` as in the released models.

    As in the official code (and unlike the paper's time-attention equation in Sec. 3),
    no class token takes part in
    the time attention; the block around it (``temporal_norm1``, ``temporal_fc``, the
    residual) is the caller's. Fast path: ``F.scaled_dot_product_attention`` over the
    ``B*H*W`` sequences of length ``T`` (through ``functional.scoring.attention``);
    explicit path: the softmax of the scaled scores, recorded. Measured: on CPU the fused
    path is 1.1-1.6x faster; on CUDA in float32, where SDPA has no flash kernel and picks
    the memory-efficient one, thousands of length-8 sequences of head width 8 run 3.5x
    slower than the explicit math (1.1x at head width 64); bf16/fp16 get flash.

    Shapes: ``(B, T, C, H, W) -> (B, T, C, H, W)``, any ``T``, ``H``, ``W``. Records the
    ``(B, heads, H, W, T, T)`` weights; ``spatial_map`` turns them into the share of
    attention each position sends to *other* frames.
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

    From the frame-pooled descriptor ``x_hat = GAP_(H,W)(X)`` (``C x T``):

    * local branch (location-sensitive importance): ``V = sigmoid(Conv1D_1(ReLU(BN(
      Conv1D_K(x_hat, C/beta))), C))`` in (0, 1)^(C x T), ``Z = V * X``;
    * global branch (location-invariant adaptive kernel): per channel ``theta_c =
      softmax(FC(ReLU(BN(FC(x_hat_c, alpha*T))), K))``, ``Y_(c,t) = sum_k theta_(c,k)
      Z_(c, t + k - K//2)`` (a depthwise temporal conv with zero padding).

    Defaults are the paper's and the official code's: ``K = 3``, ``alpha = 2``,
    ``beta = 4``, bias-free convs and FCs. The FCs read all ``T`` frames at once, so the
    clip length is fixed at construction (``num_frames``, 8 as in the released models).
    Parameter names are the official ones (``G.0``, ``G.1``, ``G.3`` for the global
    branch, ``L.0``, ``L.1``, ``L.3`` for the local one), so a TAM state dict loads
    after stripping its prefix (``...tam.``). Deviation: the local hidden width is
    ``max(1, C // beta)`` so narrow maps work.

    Fast path: the adaptive kernels become a banded ``(T, T)`` matrix per sample and
    channel (its tap index is built once, as non-persistent buffers) and the aggregation
    is one batched matmul. The official code's grouped conv over ``B*C`` groups measured
    2.4-8x slower on CPU; on an H100 it is 6-28 microseconds faster (both launch-bound at
    ``(2, 8, 64, 28, 28)`` and ``(8, 8, 256, 14, 14)``). Explicit path: the sum over the
    ``K`` shifted frames as written above.

    Shapes: ``(B, T, C, H, W) -> (B, T, C, H, W)`` with ``T == num_frames``. Records the
    ``(B, T, C, 1, 1)`` importance map, then the ``(B, C, K)`` kernels.
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
