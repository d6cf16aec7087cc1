"""Balanced grouping of tokens in feature space: BOAT's hierarchical binary clustering.

BOAT (Yu, Zhao, Li, Yu, BMVC 2022, Sec. 3.2, "balanced hierarchical clustering") groups
the ``N`` tokens of an image into ``2^L`` clusters of exactly ``g`` tokens each, so that
attention inside a cluster costs what attention inside a ``g``-token window costs. Each
of ``L`` levels splits every cluster into two equal halves:

1. two centroids start as the (normalised) means of the cluster's first and second half
   in the current order;
2. ``iters`` rounds of soft k-means on cosine similarity: ``a = softmax(T * cos(x, c))``
   over the two centroids, ``c_j = normalise(sum_i a_ij x_i)``;
3. every token gets ``r = (cos(x, c_0) + 1) / (cos(x, c_1) + 1)``, the cluster is sorted
   by ``r`` and cut in the middle.

Defaults (``iters=2``, ``T=100``) and the order of operations are those of the reference
implementation (mahaoyuHKU/pytorch-boat, ``ContentAttention.forward``). The grouping is
a permutation of the tokens; nothing here is differentiated (callers gather with it).

Any ``N``: the sequence is padded with zero vectors to ``g * 2^L`` slots, ``L =
ceil(log2(ceil(N / g)))``. Padding never moves a real token: zero vectors add nothing
to a centroid sum, and padding slots get ``r = +inf`` (real tokens are capped below it),
so the sort keeps them at the end of their cluster. By induction every padding slot
ends in the last ``Np - N`` positions of the final order, so the first ``ceil(N / g)``
leaves hold all real tokens and only the last of them can be partial. For ``N = g * 2^L``
this is exactly the reference's grouping.

Cost per level: ``O(M N d)`` for the scores and centroids plus one sort of ``N`` keys
split into ``2^level`` segments, batched over every ``(batch, head)`` pair and every
cluster of the level at once; memory ``O(M N d)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..tracing import building_graph, exporting_graph

__all__ = ["num_levels", "balanced_binary_clustering", "inverse_permutation"]


def num_levels(num_tokens: int, group_size: int) -> int:
    """Levels ``L`` of binary splits so that ``2^L`` groups of ``group_size`` hold the tokens."""
    groups = max(1, (num_tokens + group_size - 1) // group_size)
    return math.ceil(math.log2(groups)) if groups > 1 else 0


@torch.no_grad()
def balanced_binary_clustering(
    x: Tensor,
    group_size: int = 49,
    *,
    iters: int = 2,
    temperature: float = 100.0,
) -> Tensor:
    """Order the tokens of ``x`` so that consecutive runs of ``group_size`` are clusters.

    Args:
        x: ``(..., N, d)`` features to group (BOAT uses the queries, per head).
        group_size: ``g``, tokens per leaf cluster (49 in BOAT: the 7x7 window area).
        iters: soft k-means iterations per split (2 in the reference).
        temperature: softmax temperature on the cosine similarities (100).

    Returns:
        ``(..., Np)`` int64 permutation of ``range(Np)``, ``Np = g * 2^L``: slot ``p``
        of the clustered order holds token ``perm[p]``; leaf ``j`` is ``perm[..., j*g :
        (j+1)*g]``. Entries ``>= N`` are padding and fill exactly the last ``Np - N``
        slots. Deterministic for a given input.

    Implementation notes (same result as the steps in the module docstring, fewer passes
    over the features): the cosine ``cos(x, c)`` is ``(x . c) / |x|`` with the norms
    computed once; a softmax over two centroids is ``sigmoid(T (cos_0 - cos_1))``, so a
    soft k-means round needs one product with the centroids and one product with both
    sides' weights, ``sigmoid(z)`` and ``sigmoid(-z)``, ``z = T (cos_0 - cos_1)``.
    Features are moved by row gathers (``index_select`` on ``(M * Np, d)``), never by an
    expanded index; level 0 reads them in place, later levels gather into one buffer
    reused level after level.
    """
    if x.dim() < 2:
        raise ValueError(f"balanced_binary_clustering: expected (..., N, d), got {tuple(x.shape)}")
    if group_size < 1 or iters < 0:
        raise ValueError(
            f"balanced_binary_clustering: group_size must be >= 1 and iters >= 0, got "
            f"{group_size}, {iters}"
        )
    if torch.is_autocast_enabled(x.device.type):
        # autocast would run the score and centroid products in bf16/fp16, and the groups
        # would then differ from fp32's: the sort keys are ratios of cosines near 1
        with torch.autocast(x.device.type, enabled=False):
            return balanced_binary_clustering(
                x.detach().float(), group_size, iters=iters, temperature=temperature
            )
    *lead, N, d = x.shape
    levels = num_levels(N, group_size)
    Np = group_size * 2**levels
    M = math.prod(lead)
    x = x.detach().reshape(M, N, d)
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()  # cosines near 1 and sort keys need more than 8-11 bits
    if Np > N:
        x = F.pad(x, (0, 0, 0, Np - N))
    flat = x.reshape(M * Np, d)
    # F.normalize's convention: |x| clamped at 1e-12, so a zero vector has cosine 0
    inv_norm = flat.norm(dim=-1).clamp_min(1e-12).reciprocal().view(M, Np)
    base = torch.arange(0, M * Np, Np, device=x.device)[:, None]  # row offset of each m
    perm = torch.arange(Np, device=x.device).expand(M, Np)
    # every level's gather lands in one buffer allocated here: a fresh multi-MB tensor per
    # level costs a page fault per 4 KiB on first touch (on CPU that tripled the gather)
    buf = None if building_graph() or exporting_graph() or levels < 2 else flat.new_empty(
        flat.shape)
    for level in range(levels):
        c, n = 2**level, Np >> level
        if level == 0:  # the identity order: no gather
            xs, inv_n = flat.view(M, 1, Np, d), inv_norm.view(M, 1, Np)
        else:
            rows = (perm + base).flatten()
            xs = (flat.index_select(0, rows) if buf is None else
                  torch.index_select(flat, 0, rows, out=buf)).view(M, c, n, d)
            inv_n = inv_norm.gather(1, perm).view(M, c, n)
        cent = F.normalize(xs.view(M, c, 2, n // 2, d).sum(3), dim=-1)  # (M, c, 2, d)
        # scores as (centroids) @ (tokens)^T, (M, c, 2, n): on CPU this product runs twice
        # as fast as (tokens) @ (centroids)^T, whose output rows are only 2 wide
        xt = xs.transpose(-2, -1)
        for _ in range(iters):
            dots = cent @ xt  # (M, c, 2, n)
            z = (dots[:, :, 0] - dots[:, :, 1]) * inv_n * temperature
            # each side's weights are their own sigmoid, summed in one product: the second
            # centroid taken as (total - first), or weighted by (1 - a), cancels to rounding
            # noise where the sigmoid saturates, and a 1e-7 change of the input regroups
            weights = torch.sigmoid(torch.stack([z, -z], dim=2))  # (M, c, 2, n)
            cent = F.normalize(weights @ xs, dim=-1)
        cos = (cent @ xt) * inv_n.unsqueeze(2)  # (M, c, 2, n)
        ratio = (cos[:, :, 0] + 1) / (cos[:, :, 1] + 1)
        # padding slots sort strictly last in their cluster: real tokens are capped below
        # +inf (cos_1 = -1 gives inf, 0/0 NaN), so no tie can interleave them. The sort
        # is not asked to be stable because ONNX export has no stable sort; equal keys
        # among real tokens still come out in the same order for the same input.
        big = torch.finfo(ratio.dtype).max
        ratio = torch.nan_to_num(ratio, nan=big, posinf=big)
        ratio = ratio.masked_fill((perm >= N).view(M, c, n), float("inf"))
        order = torch.sort(ratio, dim=-1).indices  # within each cluster
        offsets = torch.arange(0, Np, n, device=x.device).view(1, c, 1)
        perm = perm.gather(1, (order + offsets).view(M, Np))
    return perm.reshape(*lead, Np)


def inverse_permutation(perm: Tensor) -> Tensor:
    """``inv`` with ``inv[..., perm[..., p]] = p`` (a scatter, no second sort)."""
    positions = torch.arange(perm.shape[-1], device=perm.device).expand_as(perm)
    return torch.empty_like(perm).scatter_(-1, perm, positions)
