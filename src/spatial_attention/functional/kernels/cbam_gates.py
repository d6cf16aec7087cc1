"""CBAM's gate product with a hand-written backward (CPU, eager): one buffer, few passes.

Contract: ``CBAMGates.apply(x, channel, spatial, *params)`` equals the plain gates in
:func:`spatial_attention.functional.gates.cbam_gates_reference` (its reference twin) in
value and gradient; ties of the max pools send the gradient to the first maximum, as
``max_pool2d`` (CBAM's official pooling) does. Written plainly, autograd keeps every
full-size intermediate and its backward reads or writes a full-size tensor over thirty
times; this backward does so twelve times, into one buffer that becomes the input
gradient. The two small networks (the shared MLP, the 7x7 conv + BatchNorm) are
differentiated by hand too. Layers reach it through ``functional.gates.cbam_gates``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ...tracing import building_graph

__all__ = ["CBAMGates", "fused_path_applies"]


def fused_path_applies(x: Tensor, params: Sequence[Tensor]) -> bool:
    """Whether the custom autograd function should run: eager CPU, a gradient to compute.

    On a GPU these gates are launch-bound at common sizes and the custom function was
    slower than the plain ops (measured in benchmarks/conv_attention.md), so there the
    plain ops run.
    """
    if x.device.type != "cpu" or not torch.is_grad_enabled():
        return False
    if not (x.requires_grad or any(p.requires_grad for p in params)):
        return False
    if building_graph():
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


def _flat_index(index: Tensor, dim: int, shape: Sequence[int], layout) -> Tensor:
    """Memory offsets in a ``(B, C, N)`` tensor of ``layout`` of what ``index`` picks on ``dim``."""
    B, C, N = shape
    b = torch.arange(B, device=index.device)[:, None]
    o = torch.arange(index.shape[1], device=index.device)[None, :]
    c, n = (index, o) if dim == 1 else (o, index)
    if layout == torch.channels_last:
        return ((b * N + n) * C + c).flatten()
    return ((b * C + c) * N + n).flatten()


def _layout(x: Tensor) -> torch.memory_format:
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class CBAMGates(torch.autograd.Function):
    """``y = x * sigmoid(cz) * sigmoid(sz)`` with a fused backward (see the module doc).

    Channel gate ``cg = sigmoid(MLP(mean_hw x) + MLP(max_hw x))`` (B, C); spatial gate
    ``sg = sigmoid(BN(conv([max_c u, mean_c u])))`` (B, 1, H, W) with ``u = x * cg``. With
    ``g = dL/dy`` the gradient is, per pixel and channel,
    ``du = g*sg + ds_mean/C + [c = argmax_c u] ds_max`` and
    ``dx = cg*du + d_avg/HW + [n = argmax_hw x] d_max``, where ``ds`` pulls ``sum_c g*u``
    back through the sigmoid, BN and convolution, and ``dcg = sum_hw du*x`` back through
    the MLP. The max terms touch one element per row: index-adds of ``B*H*W`` and ``B*C``
    values.
    """

    @staticmethod
    def forward(ctx, x, mlp, net, *params):
        layout = _layout(x)
        x = x.contiguous(memory_format=layout)
        B, C, H, W = x.shape
        xv = x.flatten(2)  # (B, C, HW): a view for both NCHW and channels_last
        y = cg = avg = mx = h = hw_flat = sg = compress = c_index = t = None
        if mlp is not None:
            avg = xv.mean(2)
            mx, hw_index = _first_max(xv, 2)
            hw_flat = _flat_index(hw_index, 2, xv.shape, layout)
            h = mlp.hidden(avg, mx)  # (2B, hidden)
            z = F.linear(h, mlp.w2, mlp.b2)
            cg = torch.sigmoid(z[:B] + z[B:])  # (B, C)
            y = x * cg[:, :, None, None]
        if net is not None:
            uv = (x if y is None else y).flatten(2)
            s_max, c_index = _first_max(uv, 1)  # (B, HW)
            # mean_c(x * cg) as one matrix product over the input: no pass over y
            s_mean = uv.mean(1) if cg is None else (cg[:, None, :] @ xv).squeeze(1) / C
            compress = torch.stack([s_max, s_mean], 1).view(B, 2, H, W)
            t = net.conv(compress)
            sg = torch.sigmoid(F.batch_norm(  # updates the running statistics in training
                t, net.running_mean, net.running_var, net.bn_weight, net.bn_bias,
                net.batch_stats, net.momentum, net.eps,
            ))  # (B, 1, H, W)
            y = x * sg if y is None else y.mul_(sg)  # y is ours: gate it in place
        ctx.mlp, ctx.net, ctx.layout = mlp, net, layout
        ctx.save_for_backward(x, cg, avg, mx, h, hw_flat, sg, compress, c_index, t)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x, cg, avg, mx, h, hw_flat, sg, compress, c_index, t = ctx.saved_tensors
        mlp, net = ctx.mlp, ctx.net
        B, C, H, W = x.shape
        N = H * W
        need_dx = ctx.needs_input_grad[0]
        g = g.contiguous(memory_format=ctx.layout)
        gv, xv = g.flatten(2), x.flatten(2)
        buf = torch.mul(g, x)  # g*x now, the gradient later: one full-size buffer
        bv = buf.flatten(2)  # buf has the layout of x; flat is its memory in order
        flat = (buf if ctx.layout == torch.contiguous_format else buf.permute(0, 2, 3, 1)).view(-1)
        grads_c: tuple = (None,) * 4 if mlp is not None else ()
        grads_s: tuple = (None,) * 3 if net is not None else ()
        du = gv
        if net is not None:
            sgv = sg.view(B, 1, N)
            # sums over one axis of a product, as matrix products with the vector on the
            # left (a (B, C, N) @ (B, N, 1) product is ~5x slower on CPU)
            if mlp is not None:
                dsg = cg[:, None, :] @ bv  # (B, 1, N): sum_c g*x*cg
                dcg = (sgv @ bv.transpose(1, 2)).squeeze(1)  # (B, C): sum_hw g*x*sg
            else:
                dsg = bv.sum(1, keepdim=True)
            dlogits = torch.ops.aten.sigmoid_backward(dsg.view(B, 1, H, W), sg)
            d_compress, *grads_s = net.backward(compress, t, dlogits)
            ds_max, ds_mean = d_compress[:, 0].reshape(B, N), d_compress[:, 1].reshape(B, N)
            c_flat = _flat_index(c_index, 1, xv.shape, ctx.layout)
            if mlp is not None:
                dcg += (ds_mean[:, None, :] @ xv.transpose(1, 2)).squeeze(1) / C
                # x at the channel max is s_max / cg there; where cg underflowed to 0 the
                # sigmoid's derivative (0) discards this term anyway
                at_max = torch.zeros_like(dcg).view(-1).index_add_(
                    0, (torch.arange(B, device=x.device)[:, None] * C + c_index).flatten(),
                    (ds_max * compress[:, 0].reshape(B, N)).flatten(),
                ).view(B, C)
                dcg += torch.where(cg > 0, at_max / cg, 0)
            if need_dx:
                # du = g*sg + ds_mean/C + onehot(argmax_c) ds_max, written over g*x
                torch.addcmul(ds_mean[:, None, :] / C, gv, sgv, out=bv)
                flat.index_add_(0, c_flat, ds_max.flatten())
                du = bv
        else:
            dcg = bv.sum(2)  # sum_hw g*x
        if mlp is not None:
            dz = torch.ops.aten.sigmoid_backward(dcg, cg)
            d_avg, d_max, *grads_c = mlp.backward(avg, mx, h, dz)
            if need_dx:
                # dx = cg*du + d_avg/HW (+ d_max at each max); two in-place passes beat one
                # addcmul with two broadcast operands, which CPU kernels do not vectorise
                if du is bv:
                    bv.mul_(cg[:, :, None])
                else:
                    torch.mul(du, cg[:, :, None], out=bv)
                bv.add_(d_avg[:, :, None] / N)
                flat.index_add_(0, hw_flat, d_max.flatten())
        dx = buf if need_dx else None
        return (dx, None, None, *grads_c, *grads_s)
