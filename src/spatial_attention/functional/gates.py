"""Gate products of map attention, fused: ``y = x * channel_gate(x) * spatial_gate(...)``.

CBAM (Woo et al. 2018) gates a ``(B, C, H, W)`` map twice: per channel from its average-
and max-pooled descriptors, then per pixel from the ``[max, mean]`` over channels of the
channel-gated map. Written plainly, autograd keeps every full-size intermediate alive and
its backward reads or writes a full-size tensor over thirty times (a mask for each max,
an expand for each mean, a product and a sum for each gate). :func:`cbam_gates` computes
the same function with a custom backward that does so twelve times, into one buffer that
becomes the input gradient, and a forward that allocates only its output (eight).

The channel gate's network (CBAM's shared MLP) is any function of the two pooled
descriptors, passed in by the caller; it costs microseconds, and the backward
differentiates it by recomputing it under autograd. The spatial gate's network is fixed to
CBAM's (a k x k convolution without bias, then BatchNorm), described by
:class:`SpatialConvBN`, because its backward is written out: on CPU a 2 -> 1 channel
convolution's own backward costs several times its forward, two forward convolutions do
the same job.

On GPUs, under ``torch.compile``, ``torch.export``, ONNX tracing, autocast, or when no
gradient is needed, the same math runs as plain differentiable ops (in place where nothing
needs the intermediate), which compilers fuse on their own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["SpatialConvBN", "cbam_gates", "channel_shuffle", "fused_path_applies"]

#: the channel gate: ``(logits_fn, params)`` with ``logits_fn(avg, max, *params) -> (B, C)``
ChannelGateFn = tuple[Callable[..., Tensor], Sequence[Tensor]]


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

    def logits(self, compress: Tensor) -> Tensor:
        t = F.conv2d(compress, self.weight, padding=self.weight.shape[-1] // 2)
        return F.batch_norm(t, self.running_mean, self.running_var, self.bn_weight,
                            self.bn_bias, self.batch_stats, self.momentum, self.eps)


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """ShuffleNet's channel shuffle (Zhang et al. 2018): interleave ``groups`` channel groups.

    ``(B, g*k, H, W) -> (B, k*g, H, W)``: channel ``i*k + j`` moves to ``j*g + i``, so a
    following group convolution sees one channel of every previous group.
    """
    B, C, H, W = x.shape
    return x.reshape(B, groups, C // groups, H, W).transpose(1, 2).reshape(B, C, H, W)


def fused_path_applies(x: Tensor, params: Sequence[Tensor]) -> bool:
    """Whether the custom autograd function should run: eager CPU, a gradient to compute.

    On a GPU these gates are launch-bound at common sizes (an H100 runs CBAM's plain
    forward + backward on (8, 256, 56, 56) in ~2.4 ms, the custom one in ~3.6 ms: its
    recomputation adds launches), so there the plain ops run.
    """
    if x.device.type != "cpu" or not torch.is_grad_enabled():
        return False
    if not (x.requires_grad or any(p.requires_grad for p in params)):
        return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False  # compilers and exporters trace the plain ops and fuse them themselves
    return not torch.is_autocast_enabled(x.device.type)


def _lanes(n: int) -> int:
    """The largest divisor of ``n`` up to 64: how many neighbours one vector pass compares."""
    return next(d for d in range(min(n, 64), 0, -1) if n % d == 0)


def _first_max(v: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Max of ``v`` ``(B, C, N)`` over ``dim`` (1 or 2) and the first index reaching it.

    ``torch.max(v, dim)`` computes the same, at 3-5x the cost of ``amax`` on CPU: its
    index-tracking loop is not vectorised. The channels-last max-pooling kernel is: it
    reduces over a window with the contiguous axis as vector lanes. So when the other axis
    is contiguous we pool over ``dim`` in one pass; when ``dim`` itself is contiguous we
    split it into (outer, lanes), pool over the outer part and finish over the lanes. Ties
    resolve to the first index, as ``max_pool2d`` (CBAM's official pooling) does.
    """
    other = 3 - dim
    if v.device.type != "cpu":
        return torch.max(v, dim)
    if v.stride(other) == 1:  # lanes along the other axis: one pooling pass
        t = v if dim == 2 else v.transpose(1, 2)  # (B, lanes, R)
        values, index = F.max_pool2d(t.unsqueeze(2), (1, t.shape[2]), return_indices=True)
        return values.flatten(1), index.flatten(1)
    if v.stride(dim) != 1:
        return torch.max(v, dim)
    u = v if dim == 2 else v.transpose(1, 2)  # (B, A, R), R contiguous
    B, A, R = u.shape
    L = _lanes(R)
    t = u.reshape(B * A, R // L, L).transpose(1, 2)  # (B*A, L, R/L): lanes contiguous
    values, outer = F.max_pool2d(t.unsqueeze(2), (1, R // L), return_indices=True)
    values, outer = values.view(B * A, L), outer.view(B * A, L)
    best = values.amax(1)
    index = outer * L + torch.arange(L, device=v.device)
    index = torch.where(values == best[:, None], index, R).amin(1).clamp_(max=R - 1)
    return best.view(B, A), index.view(B, A)


def _spatial_backward(net: SpatialConvBN, compress: Tensor, t: Tensor, sg: Tensor,
                      dsg: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``sigmoid(BN(conv(compress)))`` w.r.t. compress, conv weight, BN affine.

    ``t`` is the saved convolution output ``(B, 1, H, W)``. Both convolution gradients are
    forward convolutions: the input's with the flipped kernel, the weight's with the batch
    as the channel axis (oneDNN's backward of a 2 -> 1 channel 7x7 convolution costs ~5x).
    """
    dims = (0, 2, 3)
    dz = dsg * sg * (1 - sg)
    if net.batch_stats:
        mean, var = t.mean(dims, keepdim=True), t.var(dims, unbiased=False, keepdim=True)
    else:
        mean, var = net.running_mean.view(1, -1, 1, 1), net.running_var.view(1, -1, 1, 1)
    invstd = (var + net.eps).rsqrt()
    t_hat = (t - mean) * invstd
    d_bn_weight, d_bn_bias = (dz * t_hat).sum(dims), dz.sum(dims)
    scale = net.bn_weight.view(1, -1, 1, 1) * invstd
    if net.batch_stats:
        dt = scale * (dz - dz.mean(dims, keepdim=True)
                      - t_hat * (dz * t_hat).mean(dims, keepdim=True))
    else:
        dt = scale * dz
    w = net.weight
    p = w.shape[-1] // 2
    d_compress = F.conv2d(dt, w.flip(-1, -2).transpose(0, 1), padding=p)  # (B, 2, H, W)
    d_weight = F.conv2d(F.pad(compress, (p, p, p, p)).transpose(0, 1), dt.transpose(0, 1))
    return d_compress, d_weight.transpose(0, 1), d_bn_weight, d_bn_bias


def _vjp(fn: Callable[..., Tensor], inputs: Sequence[Tensor], grad_out: Tensor) -> list:
    """Recompute the small network ``fn(*inputs)`` under autograd and pull ``grad_out`` back."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in inputs]
        out = fn(*leaves)
        return list(torch.autograd.grad(out, leaves, grad_out, allow_unused=True))


def _layout(x: Tensor) -> torch.memory_format:
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class _CBAMGates(torch.autograd.Function):
    """``y = x * sigmoid(cz) * sigmoid(sz)`` with a fused backward (see the module doc).

    Channel gate ``cg = sigmoid(cfn(mean_hw x, max_hw x))`` (B, C); spatial gate
    ``sg = sigmoid(BN(conv([max_c u, mean_c u])))`` (B, 1, H, W) with ``u = x * cg``. With
    ``g = dL/dy`` the gradient is, per pixel and channel,
    ``du = g*sg + ds_mean/C + [c = argmax_c u] ds_max`` and
    ``dx = cg*du + d_avg/HW + [n = argmax_hw x] d_max``, where ``ds`` pulls ``sum_c g*u``
    back through the sigmoid, BN and convolution
    and ``dcg = sum_hw du*x`` flows back through ``cfn``. The max terms touch one element
    per row, so they are scatter-adds of ``B*C`` and ``B*H*W`` values.
    """

    @staticmethod
    def forward(ctx, x, cfn, net, n_channel_params, *params):
        layout = _layout(x)
        x = x.contiguous(memory_format=layout)
        B, C, H, W = x.shape
        xv = x.flatten(2)  # (B, C, HW): a view for both NCHW and channels_last
        cp = params[:n_channel_params]
        y = cg = avg = mx = hw_index = sg = compress = c_index = t = None
        if cfn is not None:
            avg = xv.mean(2)
            mx, hw_index = _first_max(xv, 2)
            cg = torch.sigmoid(cfn(avg, mx, *cp))  # (B, C)
            y = x * cg[:, :, None, None]
        if net is not None:
            uv = (x if y is None else y).flatten(2)
            s_max, c_index = _first_max(uv, 1)  # (B, HW)
            # mean_c(x * cg) as one matrix product over the input: no pass over y
            s_mean = uv.mean(1) if cg is None else (cg[:, None, :] @ xv).squeeze(1) / C
            compress = torch.stack([s_max, s_mean], 1).view(B, 2, H, W)
            t = F.conv2d(compress, net.weight, padding=net.weight.shape[-1] // 2)
            sg = torch.sigmoid(F.batch_norm(  # updates the running statistics in training
                t, net.running_mean, net.running_var, net.bn_weight, net.bn_bias,
                net.batch_stats, net.momentum, net.eps,
            ))  # (B, 1, H, W)
            y = x * sg if y is None else y.mul_(sg)  # y is ours: gate it in place
        ctx.cfn, ctx.net, ctx.nc, ctx.layout = cfn, net, n_channel_params, layout
        ctx.save_for_backward(x, cg, avg, mx, hw_index, sg, compress, c_index, t, *cp)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x, cg, avg, mx, hw_index, sg, compress, c_index, t, *cp = ctx.saved_tensors
        cfn, net = ctx.cfn, ctx.net
        B, C, H, W = x.shape
        N = H * W
        need_dx = ctx.needs_input_grad[0]
        g = g.contiguous(memory_format=ctx.layout)
        gv, xv = g.flatten(2), x.flatten(2)
        buf = torch.mul(g, x)  # g*x now, the gradient later: one full-size buffer
        bv = buf.flatten(2)
        grads_c: list = [None] * len(cp)
        grads_s: tuple = (None, None, None) if net is not None else ()
        dcg = None
        if net is not None:
            sgv = sg.view(B, 1, N)
            if cfn is not None:
                # sums over one axis of a product, as matrix products with the vector on
                # the left (a (B, C, N) @ (B, N, 1) product is ~5x slower on CPU)
                dsg = cg[:, None, :] @ bv  # (B, 1, N): sum_c g*x*cg
                dcg = (sgv @ bv.transpose(1, 2)).squeeze(1)  # (B, C): sum_hw g*x*sg
            else:
                dsg = bv.sum(1, keepdim=True)
            d_compress, *grads_s = _spatial_backward(net, compress, t, sg, dsg.view(B, 1, H, W))
            ds_max, ds_mean = d_compress[:, 0].reshape(B, N), d_compress[:, 1].reshape(B, N)
            if cfn is not None:
                dcg = dcg + (ds_mean[:, None, :] @ xv.transpose(1, 2)).squeeze(1) / C
                x_at_max = xv.gather(1, c_index[:, None, :]).squeeze(1)
                dcg.scatter_add_(1, c_index, ds_max * x_at_max)
            if need_dx:
                # du = g*sg + ds_mean/C + onehot(argmax_c) ds_max, written over g*x
                torch.addcmul(ds_mean[:, None, :] / C, gv, sgv, out=bv)
                bv.scatter_add_(1, c_index[:, None, :], ds_max[:, None, :])
            du = bv
        else:
            dcg = bv.sum(2)  # sum_hw g*x
            du = gv
        if cfn is not None:
            d_avg, d_max, *grads_c = _vjp(
                lambda a, m, *p: torch.sigmoid(cfn(a, m, *p)), (avg, mx, *cp), dcg
            )
            if need_dx:
                # dx = cg*du + d_avg/HW (+ d_max at each max); two in-place passes beat one
                # addcmul with two broadcast operands, which CPU kernels do not vectorise
                if du is bv:
                    bv.mul_(cg[:, :, None])
                else:
                    torch.mul(du, cg[:, :, None], out=bv)
                bv.add_(d_avg[:, :, None] / N)
                bv.scatter_add_(2, hw_index[:, :, None], d_max[:, :, None])
        dx = buf if need_dx else None
        return (dx, None, None, None, *grads_c, *grads_s)


def _cbam_gates_plain(x: Tensor, channel: ChannelGateFn | None, net: SpatialConvBN | None,
                      inplace: bool) -> Tensor:
    y = x
    if channel is not None:
        cfn, cp = channel
        cg = torch.sigmoid(cfn(x.mean((2, 3)), x.amax((2, 3)), *cp))  # (B, C)
        y = x * cg[:, :, None, None]
    if net is not None:
        compress = torch.cat([y.amax(1, keepdim=True), y.mean(1, keepdim=True)], 1)
        sg = torch.sigmoid(net.logits(compress))  # (B, 1, H, W)
        y = y.mul_(sg) if inplace and y is not x else y * sg
    return y


def cbam_gates(x: Tensor, channel: ChannelGateFn | None = None,
               spatial: SpatialConvBN | None = None) -> Tensor:
    """CBAM's gates on ``x`` ``(B, C, H, W)``: channel first, then spatial; either may be None.

    ``channel = (fn, params)`` with ``fn(avg, max, *params) -> (B, C)`` logits from the
    ``(B, C)`` average- and max-pooled descriptors (``params``: the tensors whose gradients
    the caller wants); ``spatial`` the :class:`SpatialConvBN` that turns the
    ``(B, 2, H, W)`` ``[max, mean]`` over channels into ``(B, 1, H, W)`` logits. The gates
    are the sigmoids of the logits. Returns ``x * cg * sg`` in the memory format of ``x``.

    Max-pool ties send the gradient to the first maximum (as ``max_pool2d`` does) on the
    custom path; the plain path (GPU, compile, export) uses ``amax``, which splits it.
    """
    cp = tuple(channel[1]) if channel else ()
    sp = (spatial.weight, spatial.bn_weight, spatial.bn_bias) if spatial is not None else ()
    params = (*cp, *sp)
    if fused_path_applies(x, params):
        cfn = channel[0] if channel else None
        return _CBAMGates.apply(x, cfn, spatial, len(cp), *params)
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or any(p.requires_grad for p in params)
    )
    return _cbam_gates_plain(x, channel, spatial, inplace=not needs_grad)
