"""Subspace attention (SSA) on ``(B, C, H, W)``: NBNet's projection onto learned bases.

NBNet (Cheng et al., "NBNet: Noise Basis Learning for Image Denoising with Subspace
Projection", CVPR 2021, Sec. 3.2, Eq. 3-6) estimates ``K`` basis vectors of length
``N = H * W`` from image features, and projects a feature map onto their span:

    V  = L1-normalise(bases)              (N, K), each column summing |v| to 1
    P  = V (V^T V)^-1 V^T                 (N, N), Eq. 5: orthogonal projection onto span(V)
    Y  = P X                              X: (N, C) features, one column per channel

The projection keeps the components of ``X`` that lie in the signal subspace and drops
the rest (in NBNet, the noise). The basis network is the official code's ``Subspace``
block: one residual conv block (two 3x3 convs with LeakyReLU(0.2), plus a 1x1 shortcut)
and a second 1x1 shortcut around it.

Two paths, held equal by the tests:

* fused: ``P`` is never formed. With ``G = V^T V`` (K x K) and ``A = V^T X`` (K x C), the
  coefficients ``Z = G^-1 A`` come from one batched linear solve and ``Y = V Z``: three
  batched matrix products, ``O(B N K (K + C) + B K^3)`` FLOPs and ``O(B N K)`` memory.
* explicit: Eq. 5 as written, ``P = V G^-1 V^T`` materialised as an ``(N, N)`` matrix and
  applied to ``X``: ``O(B N^2 (K + C))`` FLOPs and ``O(B N^2)`` memory; for tests and
  teaching only.

Numerical safety (a deviation, documented): the official code inverts ``G`` with an
explicit matrix inverse and no regularisation, which fails (or returns garbage) when the
bases are linearly dependent, e.g. on maps with fewer positions than bases (N < K). Here
``G`` gets a relative ridge ``G + (ridge * tr(G) / K + tiny) I`` (``ridge = 1e-6`` by
default, a perturbation far below float32 resolution of the learned projection) and is
solved, never inverted. The Gram matrix and the solve run in float32 for half-precision
inputs (bf16/fp16: a 16 x 16 solve is not defined, or not accurate, in half precision)
and the result is cast back.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..checks import check_dtype_matches, check_layout, check_positive
from ..registry import register
from .base import AttentionModule

__all__ = [
    "ResidualConvBlock",
    "BasisNet",
    "SubspaceAttention",
    "l1_normalise_bases",
    "subspace_project",
    "projection_matrix",
]

#: the official code's constant in the L1 normalisation of each basis
L1_EPS = 1e-6


class ResidualConvBlock(nn.Module):
    """NBNet's ``UNetConvBlock``: ``LReLU(conv3x3(LReLU(conv3x3(x)))) + conv1x1(x)``.

    With ``downsample=True`` it also returns a stride-2 4x4 convolution (no bias) of its
    output, as the official encoder does: ``forward`` then gives ``(down, out)``.
    Parameter names (``block.0``, ``block.2``, ``shortcut``, ``downsample``) are the
    official ones.
    """

    def __init__(self, in_channels: int, out_channels: int, downsample: bool = False,
                 relu_slope: float = 0.2) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=True),
            nn.LeakyReLU(relu_slope),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=True),
            nn.LeakyReLU(relu_slope),
        )
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, bias=True)
        self.downsample = (
            nn.Conv2d(out_channels, out_channels, 4, stride=2, padding=1, bias=False)
            if downsample else None
        )

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        out = self.block(x) + self.shortcut(x)
        if self.downsample is None:
            return out
        return self.downsample(out), out


class BasisNet(nn.Module):
    """The official ``Subspace`` block: ``ResidualConvBlock(x) + conv1x1(x)`` -> K maps."""

    def __init__(self, in_channels: int, num_bases: int, relu_slope: float = 0.2) -> None:
        super().__init__()
        # a one-element list so the parameter names match the official ``blocks.0``
        self.blocks = nn.ModuleList(
            [ResidualConvBlock(in_channels, num_bases, relu_slope=relu_slope)]
        )
        self.shortcut = nn.Conv2d(in_channels, num_bases, 1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        out = x
        for block in self.blocks:
            out = block(out)
        return out + self.shortcut(x)


def l1_normalise_bases(bases: Tensor) -> Tensor:
    """``(B, K, H, W)`` -> ``(B, K, N)``: each basis divided by ``eps + sum |v|`` (Eq. 4)."""
    v = bases.flatten(2)
    return v / (L1_EPS + v.abs().sum(-1, keepdim=True))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _ridge_gram(v: Tensor, ridge: float) -> Tensor:
    """``G = V^T V + (ridge * tr(G) / K + tiny) I`` for ``v`` of shape ``(B, K, N)``."""
    gram = v @ v.transpose(1, 2)  # (B, K, K)
    K = gram.shape[-1]
    eye = torch.eye(K, dtype=gram.dtype, device=gram.device)
    diag = torch.diagonal(gram, dim1=-2, dim2=-1)  # (B, K)
    # tiny keeps the all-zero-bases case finite (then A = 0 and Z = 0)
    shift = ridge * diag.mean(-1) + torch.finfo(gram.dtype).tiny ** 0.5  # (B,)
    return gram + shift[:, None, None] * eye


def _unrolled_spd_solve(gram: Tensor, rhs: Tensor) -> Tensor:
    """Cholesky solve of ``gram @ Z = rhs`` in plain tensor ops (for ONNX export).

    ONNX has no linear-solve operator; this unrolls the K x K factorisation and the two
    triangular solves over the K basis index (K^2 small ops, independent of H, W, C).
    ``gram``: ``(B, K, K)`` symmetric positive definite; ``rhs``: ``(B, K, C)``.
    """
    K = gram.shape[-1]
    tiny = torch.finfo(gram.dtype).tiny
    L: list[list[Tensor]] = [[] for _ in range(K)]  # L[i][j], j <= i, each (B,)
    for j in range(K):
        s = gram[:, j, j]
        for p in range(j):
            s = s - L[j][p] * L[j][p]
        d = s.clamp_min(tiny).sqrt()
        L[j].append(d)
        for i in range(j + 1, K):
            s = gram[:, i, j]
            for p in range(j):
                s = s - L[i][p] * L[j][p]
            L[i].append(s / d)
    # forward substitution L y = rhs, then back substitution L^T z = y
    y: list[Tensor] = []
    for i in range(K):
        s = rhs[:, i]
        for p in range(i):
            s = s - L[i][p][:, None] * y[p]
        y.append(s / L[i][i][:, None])
    z: list[Tensor] = [y[0]] * K
    for i in reversed(range(K)):
        s = y[i]
        for p in range(i + 1, K):
            s = s - L[p][i][:, None] * z[p]
        z[i] = s / L[i][i][:, None]
    return torch.stack(z, 1)


def _solve(gram: Tensor, rhs: Tensor) -> Tensor:
    if torch.onnx.is_in_onnx_export():
        return _unrolled_spd_solve(gram, rhs)
    # solve_ex skips linalg.solve's error check (a device sync on CUDA); the ridge keeps
    # gram invertible
    return torch.linalg.solve_ex(gram, rhs)[0]


def projection_matrix(bases: Tensor, ridge: float = 1e-6) -> Tensor:
    """Eq. 5 written out: ``P = V (V^T V)^-1 V^T`` as ``(B, N, N)`` from ``(B, K, H, W)``.

    Computed in float32 at least (float64 stays float64). ``O(N^2)`` memory: for tests,
    teaching and small maps.
    """
    v = l1_normalise_bases(bases.to(_compute_dtype(bases.dtype)))  # (B, K, N)
    gram = _ridge_gram(v, ridge)
    return v.transpose(1, 2) @ torch.linalg.solve_ex(gram, v)[0]  # (B, N, K) @ (B, K, N)


def subspace_project(x: Tensor, bases: Tensor, ridge: float = 1e-6, fused: bool = True
                     ) -> Tensor:
    """Project ``x`` ``(B, C, H, W)`` onto the span of ``bases`` ``(B, K, H, W)`` (Eq. 3-6).

    ``fused=True`` solves for the K x C coefficients and never forms the N x N matrix;
    ``fused=False`` materialises ``P`` (:func:`projection_matrix`). Returns ``x``'s shape
    and dtype; channels-last inputs give channels-last outputs on the fused path. Under
    autocast the projection still runs in float32 (autocast would hand the solve bf16).
    """
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return _project(x, bases, ridge, fused)
    return _project(x, bases, ridge, fused)


def _project(x: Tensor, bases: Tensor, ridge: float, fused: bool) -> Tensor:
    B, C, H, W = x.shape
    cdt = _compute_dtype(torch.promote_types(x.dtype, bases.dtype))
    v = l1_normalise_bases(bases.to(cdt))  # (B, K, N)
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and C > 1
    if channels_last:
        feats = x.permute(0, 2, 3, 1).reshape(B, H * W, C).to(cdt)  # (B, N, C), a view
    else:
        feats = x.reshape(B, C, H * W).to(cdt).transpose(1, 2)  # (B, N, C), strided view
    if not fused:
        P = projection_matrix(bases.to(cdt), ridge)  # (B, N, N)
        out = P @ feats  # (B, N, C)
    else:
        gram = _ridge_gram(v, ridge)  # (B, K, K)
        coeff = _solve(gram, v @ feats)  # (B, K, C) = G^-1 V^T X
        out = v.transpose(1, 2) @ coeff  # (B, N, C)
    if channels_last:
        return out.reshape(B, H, W, C).permute(0, 3, 1, 2).to(x.dtype)
    return out.transpose(1, 2).reshape(B, C, H, W).to(x.dtype)


@register(
    "ssa",
    family="restoration",
    layout="map",
    paper="Cheng et al., NBNet: Noise Basis Learning for Image Denoising with Subspace "
          "Projection (Sec. 3.2, Eq. 3-6)",
    year=2021,
    cost="basis net ~18·B·N·K·(Cin + K) + projection 2·B·N·K·(K + 2C) + B·K³ (fused); "
         "explicit adds 2·B·N²·(K + C)",
    captures="(B, K, H, W) L1-normalised bases",
)
class SubspaceAttention(AttentionModule):
    """Subspace attention (NBNet, Cheng et al. CVPR 2021, Sec. 3.2, Eq. 3-6).

    Cheng et al., *NBNet: Noise Basis Learning for Image Denoising with Subspace
    Projection*, CVPR 2021, Sec. 3.2, Eq. 3-6: ``bases = BasisNet(cat[guide, x])`` (``K``
    maps), L1-normalised over positions; the output is ``x`` projected onto their span,
    ``V (V^T V)^-1 V^T x`` per channel (Eq. 5).
    Shapes: ``x`` ``(B, C, H, W)``, ``guide`` ``(B, guide_channels, H, W)`` ->
    ``(B, C, H, W)``; any ``H, W`` (``N < K`` works thanks to the ridge).

    Args:
        channels: ``C`` of ``x`` (the skip features in NBNet).
        num_bases: ``K``, 16 in NBNet.
        guide_channels: channels of an optional second input the bases also read. NBNet
            passes the upsampled decoder features (``guide_channels = channels``, bases from
            ``cat([up, skip])`` as the official code); 0 (default) reads ``x`` alone, a
            one-input drop-in map attention.
        ridge: relative Tikhonov term on ``V^T V``, 1e-6 (a deviation: module docstring).
        relu_slope: LeakyReLU slope of the basis network (0.2 officially).

    Cost: basis net ``~18·B·N·K·(Cin + K)`` ``+ 2·B·N·K·(K + 2C) + B·K³`` (projection);
    the explicit path adds ``2·B·N²·(K + C)``, ``N = H·W``.
    attn_impl: ``auto`` (one batched solve, ``P`` never formed, ``O(N K)`` memory),
    ``explicit`` (Eq. 5 with ``P`` as an ``(N, N)`` matrix). Records the ``(B, K, H, W)`` bases,
    the same tensor on both paths, so capture keeps ``auto``;
    :func:`~spatial_attention.explicit_path` switches to Eq. 5.
    """

    layout = "map"

    def __init__(self, channels: int, num_bases: int = 16, guide_channels: int = 0,
                 ridge: float = 1e-6, relu_slope: float = 0.2,
                              attn_impl: str | None = None) -> None:
        super().__init__(attn_impl=attn_impl)
        check_positive("ssa", channels=channels, num_bases=num_bases)
        if guide_channels < 0:
            raise ValueError(f"ssa: guide_channels must be >= 0, got {guide_channels!r}")
        if not ridge >= 0:
            raise ValueError(f"ssa: ridge must be >= 0, got {ridge!r}")
        self.channels, self.num_bases = channels, num_bases
        self.guide_channels, self.ridge = guide_channels, float(ridge)
        self.subnet = BasisNet(guide_channels + channels, num_bases, relu_slope)

    def forward(self, x: Tensor, guide: Tensor | None = None) -> Tensor:
        self.check_input(x, self.channels)
        if self.guide_channels:
            if guide is None:
                raise ValueError(
                    f"ssa: built with guide_channels={self.guide_channels}, so forward "
                    "needs a guide tensor (B, guide_channels, H, W)"
                )
            check_layout("ssa", guide, "map", self.guide_channels)
            check_dtype_matches("ssa", guide, self)
            if guide.shape[0] != x.shape[0] or guide.shape[-2:] != x.shape[-2:]:
                raise ValueError(
                    f"ssa: guide shape {tuple(guide.shape)} does not match x "
                    f"{tuple(x.shape)} in batch and H, W"
                )
            feats = torch.cat([guide, x], 1)  # official order: cat([up, bridge])
        else:
            if guide is not None:
                raise ValueError("ssa: got a guide but was built with guide_channels=0")
            feats = x
        bases = self.subnet(feats)  # (B, K, H, W)
        if self.capturing:
            self.record(l1_normalise_bases(bases.float()).view_as(bases))
        # the module's choice, not self.impl: the record above exists on both paths
        return subspace_project(x, bases, self.ridge, fused=self.fused)

    @classmethod
    def example(cls, name: str, batch: int, channels: int, size: tuple[int, int],
                **kwargs: Any) -> tuple[nn.Module, tuple[Tensor, ...]]:
        """The one-input form (bases from ``x``); pass ``guide_channels`` for two inputs."""
        from ..registry import create

        H, W = size
        module = create(name, channels, **kwargs)
        x = torch.randn(batch, channels, H, W)
        if module.guide_channels:
            return module, (x, torch.randn(batch, module.guide_channels, H, W))
        return module, (x,)
