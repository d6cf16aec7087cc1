"""Gate products of map attention, fused: ``y = x * channel_gate(x) * spatial_gate(...)``.

CBAM (Woo et al. 2018) gates a ``(B, C, H, W)`` map twice: per channel from its average-
and max-pooled descriptors, then per pixel from the ``[max, mean]`` over channels of the
channel-gated map. Written plainly, autograd keeps every full-size intermediate alive and
its backward reads or writes a full-size tensor over thirty times (a mask for each max,
an expand for each mean, a product and a sum for each gate). :func:`cbam_gates` computes
the same function with a custom backward that does so twelve times, into one buffer that
becomes the input gradient, and a forward that allocates only its output (eight).

The two small networks that turn descriptors into gate logits, CBAM's shared MLP
(:class:`ChannelMLP`) and its 7x7 convolution with BatchNorm (:class:`SpatialConvBN`), are
differentiated by hand too: they cost little, but autograd's bookkeeping around them, and
oneDNN's backward of a 2 -> 1 channel convolution (~5x its forward), would not.

On GPUs, under ``torch.compile``, ``torch.export``, ONNX tracing, autocast, or when no
gradient is needed, the same math runs as plain differentiable ops (in place where nothing
needs the intermediate), which compilers fuse on their own.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .kernels.cbam_gates import CBAMGates, fused_path_applies

__all__ = ["ChannelMLP", "SpatialConvBN", "cbam_gates", "cbam_gates_reference", "channel_shuffle",
           "fused_path_applies"]


class ChannelMLP(NamedTuple):
    """CBAM's channel gate network: one MLP ``C -> hidden -> C`` shared by both descriptors.

    ``logits(avg, max) = MLP(avg) + MLP(max)`` ``(B, C)`` with
    ``MLP(d) = W2 relu(W1 d + b1) + b2``; both descriptors go through in one batched pass.
    """

    w1: Tensor
    b1: Tensor
    w2: Tensor
    b2: Tensor

    def hidden(self, avg: Tensor, mx: Tensor) -> Tensor:
        """``relu(W1 [avg; max] + b1)`` ``(2B, hidden)``."""
        return F.relu(F.linear(torch.cat([avg, mx]), self.w1, self.b1))

    def logits(self, avg: Tensor, mx: Tensor) -> Tensor:
        z = F.linear(self.hidden(avg, mx), self.w2, self.b2)
        return z[: avg.shape[0]] + z[avg.shape[0]:]

    def backward(self, avg: Tensor, mx: Tensor, h: Tensor, dz: Tensor) -> tuple[Tensor, ...]:
        """Gradients w.r.t. avg, max, w1, b1, w2, b2 from ``dz = dL/dlogits``; ``h = hidden()``."""
        B = dz.shape[0]
        dh = (dz @ self.w2).repeat(2, 1) * (h > 0)  # both halves receive dz
        dd = dh @ self.w1  # (2B, C)
        return (dd[:B], dd[B:], dh.T @ torch.cat([avg, mx]), dh.sum(0),
                dz.T @ (h[:B] + h[B:]), 2 * dz.sum(0))


class SpatialConvBN(NamedTuple):
    """CBAM's spatial gate network: ``BN(conv(compress))`` on the ``[max, mean]`` map.

    ``weight`` ``(1, 2, k, k)`` (no bias, ``k // 2`` padding), BatchNorm ``bn_weight`` and
    ``bn_bias`` ``(1,)``; ``batch_stats`` normalises with the batch's statistics (and
    updates the running ones by ``momentum`` if given), otherwise with the running ones.
    """

    weight: Tensor
    bn_weight: Tensor
    bn_bias: Tensor
    running_mean: Tensor | None
    running_var: Tensor | None
    batch_stats: bool
    momentum: float
    eps: float

    def conv(self, compress: Tensor) -> Tensor:
        return F.conv2d(compress, self.weight, padding=self.weight.shape[-1] // 2)

    def logits(self, compress: Tensor) -> Tensor:
        """``BN(conv(compress))`` ``(B, 1, H, W)``; updates running statistics in training."""
        return F.batch_norm(self.conv(compress), self.running_mean, self.running_var,
                            self.bn_weight, self.bn_bias, self.batch_stats, self.momentum,
                            self.eps)

    def backward(self, compress: Tensor, t: Tensor, dlogits: Tensor) -> tuple[Tensor, ...]:
        """Gradients w.r.t. compress, conv weight, BN weight and bias; ``t = conv(compress)``.

        The input's gradient is a forward convolution with the flipped kernel: oneDNN's
        backward-data kernel for one output channel costs ~14x that, its weight-gradient
        kernel is fine.
        """
        if self.batch_stats:
            var, mean = torch.var_mean(t, (0, 2, 3), unbiased=False)
            saved = (mean, (var + self.eps).rsqrt())
        else:
            saved = (None, None)
        dt, d_bn_weight, d_bn_bias = torch.ops.aten.native_batch_norm_backward(
            dlogits, t, self.bn_weight, self.running_mean, self.running_var, *saved,
            self.batch_stats, self.eps, [True, True, True],
        )
        w, p = self.weight, self.weight.shape[-1] // 2
        d_compress = F.conv2d(dt, w.flip(-1, -2).transpose(0, 1), padding=p)  # (B, 2, H, W)
        d_weight = torch.ops.aten.convolution_backward(
            dt, compress, w, None, [1, 1], [p, p], [1, 1], False, [0, 0], 1, [False, True, False]
        )[1]
        return d_compress, d_weight, d_bn_weight, d_bn_bias


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """ShuffleNet's channel shuffle (Zhang et al. 2018): interleave ``groups`` channel groups.

    ``(B, g*k, H, W) -> (B, k*g, H, W)``: channel ``i*k + j`` moves to ``j*g + i``, so a
    following group convolution sees one channel of every previous group.
    """
    B, C, H, W = x.shape
    return x.reshape(B, groups, C // groups, H, W).transpose(1, 2).reshape(B, C, H, W)


def cbam_gates_reference(x: Tensor, mlp: ChannelMLP | None, net: SpatialConvBN | None,
                         inplace: bool = False) -> Tensor:
    """The gates as plain differentiable ops (GPU, compile, export, no gradient)."""
    y = x
    if mlp is not None:
        cg = torch.sigmoid(mlp.logits(x.mean((2, 3)), x.amax((2, 3))))  # (B, C)
        y = x * cg[:, :, None, None]
    if net is not None:
        compress = torch.cat([y.amax(1, keepdim=True), y.mean(1, keepdim=True)], 1)
        sg = torch.sigmoid(net.logits(compress))  # (B, 1, H, W)
        y = y.mul_(sg) if inplace and y is not x else y * sg
    return y


def cbam_gates(x: Tensor, channel: ChannelMLP | None = None,
               spatial: SpatialConvBN | None = None) -> Tensor:
    """CBAM's gates on ``x`` ``(B, C, H, W)``: channel first, then spatial; either may be None.

    ``channel`` turns the ``(B, C)`` average- and max-pooled descriptors into ``(B, C)``
    logits, ``spatial`` the ``(B, 2, H, W)`` ``[max, mean]`` over channels into
    ``(B, 1, H, W)`` logits; the gates are their sigmoids. Returns ``x * cg * sg`` in the
    memory format of ``x``.

    Max-pool ties send the gradient to the first maximum (as ``max_pool2d`` does) on the
    custom path; the plain path (GPU, compile, export) uses ``amax``, which splits it.
    """
    params = (*(channel or ()), *(spatial[:3] if spatial is not None else ()))
    if fused_path_applies(x, params):
        return CBAMGates.apply(x, channel, spatial, *params)
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or any(p.requires_grad for p in params)
    )
    return cbam_gates_reference(x, channel, spatial, inplace=not needs_grad)
