"""Bilinear sampling at fractional positions and deformable convolution, in plain PyTorch.

Deformable convolution (Dai et al. ICCV 2017; modulated: Zhu, Hu, Lin, Dai CVPR 2019)
reads every kernel tap ``p_k`` of output position ``p`` at ``p * stride - padding
+ p_k * dilation + delta_p_k`` with bilinear interpolation, scales it by ``m_k`` (v2) and
applies the convolution weights:

    y(p) = sum_k w_k * m_k(p) * x(p * stride - padding + p_k * dilation + delta_p_k(p))

:func:`deform_conv2d` follows ``torchvision.ops.deform_conv2d``: same arguments in the
same order, same offset layout (channel ``2 * (g * K + k) + {0: dy, 1: dx}`` for offset
group ``g`` and tap ``k = i * kw + j``), same mask layout (``g * K + k``), the same
zero-outside bilinear rule (a corner outside the image reads 0; a point at or beyond
``-1`` / ``H`` reads 0), the weight groups read from ``weight.shape[1]`` and the offset
groups from ``offset.shape[1]``. It is differentiable in every argument through
autograd (``grid_sample``, gathers and their backwards), so no compiled extension is needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair

__all__ = [
    "bilinear_corners",
    "deform_conv2d",
    "deform_conv2d_explicit",
    "deform_sampling_positions",
    "check_deform_args",
]


def bilinear_corners(y: Tensor, x: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """The four corners of fractional points as flat indices and bilinear weights.

    ``y``, ``x``: positions of any shape ``S`` in pixels. Returns ``index`` (long,
    ``(4, *S)``, into a flattened ``height * width`` map, clamped so it is always valid)
    and ``weight`` (``(4, *S)``, zero for corners outside the map, infinite positions
    included; NaN for a NaN position, so NaN offsets propagate), corners ordered
    top-left, top-right, bottom-left, bottom-right.
    """
    # Every point at or beyond -2 / size + 1 has all four corners outside, so the clamp
    # changes no finite result; it turns an infinite position into an ordinary
    # out-of-range one (zero weight, as torchvision's range test) instead of inf - inf.
    # clamp keeps NaN, so a NaN position gives NaN weights below.
    y = y.clamp(-2, height + 1)
    x = x.clamp(-2, width + 1)
    y0, x0 = torch.floor(y), torch.floor(x)
    ly, lx = y - y0, x - x0  # distance past the top-left corner, in [0, 1)
    hy, hx = 1 - ly, 1 - lx
    ys = torch.stack((y0, y0, y0 + 1, y0 + 1))
    xs = torch.stack((x0, x0 + 1, x0, x0 + 1))
    w = torch.stack((hy * hx, hy * lx, ly * hx, ly * lx))
    inside = (ys >= 0) & (ys <= height - 1) & (xs >= 0) & (xs <= width - 1)
    # a NaN corner would become INT64_MIN (an out-of-bounds gather): read pixel 0 there
    # instead; its weight is NaN * 0 = NaN, so the NaN still reaches the output
    row = ys.clamp(0, height - 1).nan_to_num(0.0).long()
    col = xs.clamp(0, width - 1).nan_to_num(0.0).long()
    return row * width + col, w * inside


def check_deform_args(
    name: str, input: Tensor, offset: Tensor, weight: Tensor, stride, padding, dilation,
    mask: Tensor | None,
) -> tuple[int, int, int, int]:
    """Validate deform_conv2d's arguments; returns ``(groups, offset_groups, Ho, Wo)``."""
    if input.dim() != 4 or offset.dim() != 4 or weight.dim() != 4:
        raise ValueError(
            f"{name}: expected 4-D input (B, C, H, W), offset (B, 2*G*kh*kw, Ho, Wo) and "
            f"weight (Cout, C/groups, kh, kw), got {tuple(input.shape)}, "
            f"{tuple(offset.shape)}, {tuple(weight.shape)}"
        )
    B, C, H, W = input.shape
    kh, kw = weight.shape[-2:]
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    if min(sh, sw, dh, dw) < 1 or min(ph, pw) < 0:
        raise ValueError(f"{name}: stride and dilation must be >= 1 and padding >= 0")
    ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if ho < 1 or wo < 1:
        raise ValueError(
            f"{name}: a {kh}x{kw} kernel (dilation {dh}x{dw}, padding {ph}x{pw}) does not "
            f"fit a {H}x{W} input"
        )
    if weight.shape[1] == 0 or C % weight.shape[1] or weight.shape[0] % (C // weight.shape[1]):
        raise ValueError(
            f"{name}: weight {tuple(weight.shape)} does not split {C} input channels into "
            "groups"
        )
    K = kh * kw
    if offset.shape[1] == 0 or offset.shape[1] % (2 * K) or C % (offset.shape[1] // (2 * K)):
        raise ValueError(
            f"{name}: offset needs 2 * offset_groups * {K} channels with offset_groups "
            f"dividing {C}, got {offset.shape[1]}"
        )
    if tuple(offset.shape) != (B, offset.shape[1], ho, wo):
        raise ValueError(
            f"{name}: offset must be (B, 2*G*{K}, {ho}, {wo}) for this input, got "
            f"{tuple(offset.shape)}"
        )
    groups = C // weight.shape[1]
    offset_groups = offset.shape[1] // (2 * K)
    if mask is not None and tuple(mask.shape) != (B, offset_groups * K, ho, wo):
        raise ValueError(
            f"{name}: mask must be (B, {offset_groups * K}, {ho}, {wo}), got "
            f"{tuple(mask.shape)}"
        )
    return groups, offset_groups, ho, wo


def deform_sampling_positions(
    offset: Tensor, kernel_size: tuple[int, int], stride, padding, dilation
) -> tuple[Tensor, Tensor]:
    """``(y, x)`` sampling positions, each ``(B, G, K, Ho, Wo)``, of every tap, in float32
    (float64 for float64 offsets)."""
    B, _, ho, wo = offset.shape
    kh, kw = kernel_size
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    # at least float32, as torchvision computes them: in bfloat16 (autocast) a position
    # past 64 px would be rounded to half a pixel, past 128 to a whole one
    dtype = torch.promote_types(offset.dtype, torch.float32)
    off = offset.to(dtype).unflatten(1, (-1, kh * kw, 2))  # (B, G, K, 2, Ho, Wo)
    kw_ = dict(device=offset.device, dtype=dtype)
    tap_y = (torch.arange(kh, **kw_) * dh).repeat_interleave(kw)  # (K,)
    tap_x = (torch.arange(kw, **kw_) * dw).repeat(kh)
    grid_y = torch.arange(ho, **kw_) * sh - ph  # (Ho,)
    grid_x = torch.arange(wo, **kw_) * sw - pw
    y = off[:, :, :, 0] + (tap_y[:, None, None] + grid_y[None, :, None])
    x = off[:, :, :, 1] + (tap_x[:, None, None] + grid_x[None, None, :])
    return y, x


def _grouped_conv_of_columns(cols: Tensor, weight: Tensor, groups: int, bias: Tensor | None,
                             ho: int, wo: int) -> Tensor:
    """``cols`` ``(B, C, K, L)`` times ``weight`` ``(Cout, C/groups, kh, kw)``."""
    B, C, K, L = cols.shape
    cout = weight.shape[0]
    cols = cols.reshape(B, groups, (C // groups) * K, L)
    w = weight.reshape(groups, cout // groups, (C // groups) * K)
    out = torch.matmul(w, cols).reshape(B, cout, ho, wo)  # (B, groups, Cout/g, L)
    return out if bias is None else out + bias.reshape(1, -1, 1, 1)


def deform_conv2d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    mask: Tensor | None = None,
) -> Tensor:
    """Deformable convolution v1 (``mask=None``) or v2, as ``torchvision.ops.deform_conv2d``.

    Shapes: input ``(B, C, H, W)``, offset ``(B, 2*G*kh*kw, Ho, Wo)``, weight ``(Cout,
    C/groups, kh, kw)``, bias ``(Cout,)``, mask ``(B, G*kh*kw, Ho, Wo)`` -> ``(B, Cout,
    Ho, Wo)``. Fast path (deformable im2col): one ``grid_sample`` per offset group reads
    every tap of every output position at once into the ``(B, C, K, Ho*Wo)`` columns
    (its zero padding is torchvision's rule: a corner outside the map reads 0), scaled
    by the mask, then one grouped matmul with the kernel. ``grid_sample`` has fused
    bilinear kernels for the forward and the backward, where four corner gathers would
    need a scatter in the backward (timings: ``benchmarks/deformable_conv.md``).
    The sampling runs in at least float32: a half or bfloat16 grid would place a tap
    past 64 pixels to within half a pixel only. A NaN offset makes every output at its
    position NaN (the gather paths send it to the output channels that read that
    offset group only; torchvision leaves a NaN position undefined).
    Cost: ``2 * B * Ho * Wo * K * (4 C + Cout * C / groups)`` FLOPs; the columns take
    ``K`` times the output map's memory.
    """
    groups, G, ho, wo = check_deform_args("deform_conv2d", input, offset, weight, stride,
                                          padding, dilation, mask)
    B, C, H, W = input.shape
    kh, kw = weight.shape[-2:]
    K, L, cg = kh * kw, ho * wo, C // G
    y, x = deform_sampling_positions(offset, (kh, kw), stride, padding, dilation)
    # Points at or beyond -2 / size + 1 read only zeros either way; the clamp turns an
    # infinite position into such a point before it is scaled into grid_sample's [-1, 1].
    # align_corners=False puts pixel i's centre at (2 i + 1) / size - 1, for any size.
    gx = (2 * x.clamp(-2, W + 1) + 1) / W - 1
    gy = (2 * y.clamp(-2, H + 1) + 1) / H - 1
    grid = torch.stack((gx, gy), dim=-1).reshape(B * G, K * ho, wo, 2)
    src = input.reshape(B * G, cg, H, W).to(grid.dtype)
    cols = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False)  # (B*G, cg, K*Ho, Wo)
    cols = cols.reshape(B, G, cg, K * L)
    if mask is not None:
        cols = cols * mask.reshape(B, G, 1, K * L).to(cols.dtype)
    cols = cols.to(input.dtype).reshape(B, C, K, L)
    out = _grouped_conv_of_columns(cols, weight, groups, bias, ho, wo)
    # grid_sample reads a NaN position as outside the map (0); keep NaN visible instead
    # (an infinite offset is no NaN: it reads zeros, as the clamp above arranges)
    return out.masked_fill(offset.isnan().any(1, keepdim=True), float("nan"))


def deform_conv2d_explicit(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    mask: Tensor | None = None,
) -> Tensor:
    """The same as :func:`deform_conv2d`, written as the paper's sum over kernel taps.

    For each tap ``k``: bilinear-sample every channel at its shifted positions (each of
    the four corners gathered along the flattened map), scale by ``m_k``, and add the
    tap's ``Cout x C/groups`` weights applied to it. Plain and slow; the reference the
    fast path is tested against.
    """
    groups, G, ho, wo = check_deform_args("deform_conv2d", input, offset, weight, stride,
                                          padding, dilation, mask)
    B, C, H, W = input.shape
    kh, kw = weight.shape[-2:]
    cg, cout = C // G, weight.shape[0]
    y, x = deform_sampling_positions(offset, (kh, kw), stride, padding, dilation)
    flat = input.reshape(B, G, cg, H * W)
    out = input.new_zeros(B, cout, ho * wo)
    for k in range(kh * kw):
        index, w = bilinear_corners(y[:, :, k], x[:, :, k], H, W)  # (4, B, G, Ho, Wo)
        w = w.to(input.dtype)
        tap = input.new_zeros(B, G, cg, ho * wo)
        for c in range(4):
            idx = index[c].reshape(B, G, 1, ho * wo).expand(B, G, cg, ho * wo)
            tap = tap + torch.gather(flat, 3, idx) * w[c].reshape(B, G, 1, ho * wo)
        if mask is not None:
            tap = tap * mask.reshape(B, G, kh * kw, 1, ho * wo)[:, :, k]
        tap = tap.reshape(B, groups, C // groups, ho * wo)
        wk = weight[:, :, k // kw, k % kw].reshape(groups, cout // groups, C // groups)
        out = out + torch.einsum("goc,bgcl->bgol", wk, tap).reshape(B, cout, ho * wo)
    out = out.reshape(B, cout, ho, wo)
    return out if bias is None else out + bias.reshape(1, -1, 1, 1)
