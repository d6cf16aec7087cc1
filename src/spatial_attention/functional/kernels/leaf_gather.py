"""The leaf gather of BOAT's feature-space local attention: q, k, v of every leaf in one go.

After the clustering (:func:`~spatial_attention.functional.clustering.balanced_binary_clustering`)
each head's tokens sit in leaves of ``g`` slots; a leaf attends to its own ``g`` tokens and
``o`` tokens of its sibling nearest the cut (BOAT, Sec. 3.2).

* :func:`gather_leaves`: queries ``(B, h*L, g, d)``, keys and values ``(B, h*L, g+o, d)``
  and the token-order values, from the ``qkv`` projection, in one ``index_select`` with the
  overlap in place. In training it runs :class:`LeafGather`, whose backward gathers the
  gradients back to rows instead of scattering (contract: the same gradients as the plain
  ``index_select``, which is its reference twin and what exporters get).
* :func:`scatter_leaves`: the attention output of every slot back to token order.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ...tracing import exporting_graph
from ..permute import permute_rows

__all__ = ["Leaves", "LeafGather", "fsla_key_positions", "gather_leaves", "scatter_leaves"]


def fsla_key_positions(
    num_tokens: int, group_size: int, overlap: int, device: torch.device | None = None,
    leaves: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Which slots of the clustered order each leaf reads as keys, and which are real.

    Leaves pair up as siblings ``(2i, 2i+1)`` (the two halves of the last split). Leaf
    ``2i`` reads its own ``g`` slots and the *first* ``overlap`` slots of leaf ``2i+1``;
    leaf ``2i+1`` reads its own and the *last* ``overlap`` of leaf ``2i``: in both cases
    the sibling's tokens nearest the cut. Returns ``(positions, valid)``, both ``(nG, g +
    overlap)`` with ``nG = ceil(N / g)``; ``valid`` is False on padding slots (``>= N``),
    which include a missing sibling (a single leaf, or an unpaired last leaf).
    ``leaves`` asks for more rows than ``nG`` (the fast path computes the padding
    sibling of an unpaired last leaf too, and discards its output).
    """
    g, o = group_size, overlap
    groups = max(1, (num_tokens + g - 1) // g)  # not -(-a // b): traced ints truncate
    groups = groups if leaves is None else leaves
    leaf = torch.arange(groups, device=device)[:, None]
    own = leaf * g + torch.arange(g, device=device)
    odd = leaf % 2
    sibling_start = torch.where(odd.bool(), (leaf - 1) * g + (g - o), (leaf + 1) * g)
    sibling = sibling_start + torch.arange(o, device=device)
    positions = torch.cat([own, sibling], dim=1)
    return positions, positions < num_tokens


def _leaf_rows(tok: Tensor, positions: Tensor, N: int, h: int) -> Tensor:
    """Rows of the ``(B*N*3*h, d)`` q|k|v grid that the leaves read, in one flat index.

    ``tok`` ``(B, h, L*g)``: the token in each slot of the clustered order (padding slots
    point at a real token; they are masked or discarded). ``positions`` ``(L, g+o)``: the
    slots each leaf reads as keys (:func:`fsla_key_positions`). Returns the query rows of
    every slot, then the key rows and the value rows of every leaf's ``g + o`` keys, so one
    ``index_select`` builds all three with the sibling overlap already in place.
    """
    B, _, S = tok.shape
    sample = torch.arange(B, device=tok.device).view(B, 1, 1)
    head = torch.arange(h, device=tok.device).view(1, h, 1)
    key_tok = tok[..., positions.clamp(max=S - 1).flatten()]  # (B, h, L*(g+o))
    q_rows = ((sample * N + tok) * 3) * h + head
    k_rows = ((sample * N + key_tok) * 3 + 1) * h + head
    return torch.cat([q_rows.flatten(), k_rows.flatten(), (k_rows + h).flatten()])


def _split_leaves(picked: Tensor, B: int, h: int, L: int, g: int, o: int):
    """The rows gathered by :func:`_leaf_rows` as queries ``(B, h*L, g, d)`` and keys and
    values ``(B, h*L, g+o, d)``: views of the one gathered tensor, no further copy."""
    d = picked.shape[-1]
    nq = B * h * L * g
    k, v = picked[nq:].view(2, B, h * L, g + o, d).unbind(0)
    return picked[:nq].view(B, h * L, g, d), k, v


class LeafGather(torch.autograd.Function):
    """Rows of ``qkv`` -> the leaves' queries ``(B, h*L, g, d)`` and keys and values
    ``(B, h*L, g+o, d)``, and the values in token order ``(B, N, C)`` for the depthwise
    convolution, with a backward that gathers instead of scattering.

    Forward: one ``index_select`` of every leaf's query rows and key and value rows,
    overlap included (:func:`_leaf_rows`), split by views; the token-order values are a
    strided copy. Backward: the leaves' gradients are laid back into slots (the own part
    copied, each overlap part added to the sibling slots it came from, two strided adds)
    and one gather by ``inverse`` (each row's slot) returns them to rows; the convolution's
    gradient is added into the value rows in place. (Left to autograd, that second use
    of ``qkv`` would cost a zero-filled ``qkv``-sized gradient and a full-size sum.)
    Padding slots' gradients are zero (their queries are discarded, their keys masked),
    so no row needs more than its own slot. Needs ``L`` even when ``o > 0``.
    """

    @staticmethod
    def forward(ctx, rows: Tensor, index: Tensor, inverse: Tensor, shape: tuple):  # noqa: ANN001
        B, h, L, g, o = shape
        N, C = rows.shape[0] // (3 * B * h), h * rows.shape[1]
        ctx.save_for_backward(inverse)
        ctx.shape = shape
        v_tokens = rows.view(B, N, 3, C)[:, :, 2].contiguous()
        return (*_split_leaves(rows.index_select(0, index), B, h, L, g, o), v_tokens)

    @staticmethod
    @once_differentiable
    def backward(ctx, dq: Tensor, dk: Tensor, dv: Tensor, dv_tokens: Tensor):  # noqa: ANN001, ANN205
        (inverse,) = ctx.saved_tensors
        B, h, L, g, o = ctx.shape
        ref = next(t for t in (dq, dk, dv, dv_tokens) if t is not None)
        d = ref.shape[-1] // (h if ref is dv_tokens else 1)
        grad = ref.new_zeros(3, B, h, L, g, d) if None in (dq, dk, dv) else \
            ref.new_empty(3, B, h, L, g, d)
        if dq is not None:
            grad[0] = dq.view(B, h, L, g, d)
        for i, dt in ((1, dk), (2, dv)):
            if dt is None:
                continue
            dt = dt.view(B, h, L, g + o, d)
            grad[i] = dt[..., :g, :]
            if o:
                pair = dt.view(B, h, L // 2, 2, g + o, d)
                slots = grad[i].view(B, h, L // 2, 2, g, d)
                slots[:, :, :, 1, :o] += pair[:, :, :, 0, g:]  # leaf 2i read 2i+1's first o
                slots[:, :, :, 0, g - o:] += pair[:, :, :, 1, g:]  # 2i+1 read 2i's last o
        d_rows = grad.view(-1, d).index_select(0, inverse)
        if dv_tokens is not None:
            N = d_rows.shape[0] // (3 * B * h)
            d_rows.view(B, N, 3, h * d)[:, :, 2] += dv_tokens.view(B, N, h * d)
        return d_rows, None, None, None


class Leaves(NamedTuple):
    """Where every token went: what :func:`scatter_leaves` needs to bring outputs back."""

    perm: Tensor  # (B, h, S) the token in each slot (>= N: padding)
    inv: Tensor  # (B, h, N) each token's slot
    valid: Tensor  # (L, g+o) False on padding key slots
    leaves: int  # L computed (real leaves, plus an unpaired last leaf's sibling)
    real_leaves: int  # nG = ceil(N / g)
    padded: bool  # any key slot is padding or a sibling is missing


def gather_leaves(qkv: Tensor, perm: Tensor, inv: Tensor, num_heads: int, group_size: int,
                  overlap: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Leaves]:
    """``qkv`` ``(B, N, 3C)`` (channels ``(3, h, d)``) and the clustered order ``perm``
    ``(B, h, S)`` -> queries ``(B, h*L, g, d)``, keys and values ``(B, h*L, g+o, d)``,
    the token-order values ``(B, N, C)`` and the :class:`Leaves` bookkeeping."""
    B, N, C3 = qkv.shape
    h, g, o = num_heads, group_size, overlap
    d = C3 // (3 * h)
    nG = max(1, (N + g - 1) // g)  # leaves holding real tokens
    # an unpaired last leaf brings its (padding) sibling along: leaves come in sibling
    # pairs, which the backward's overlap adds need
    L = nG + nG % 2 if (o > 0 and nG > 1) else nG
    positions, valid = fsla_key_positions(N, g, o, device=qkv.device, leaves=L)  # (L, g+o)
    tok = perm[..., : L * g].clamp(max=N - 1)  # padding slots read token N-1 (unused)
    rows = qkv.reshape(B * N * 3 * h, d)  # one row per (sample, token, q|k|v, head)
    index = _leaf_rows(tok, positions, N, h)
    leaves = Leaves(perm, inv, valid, L, nG, L * g > N or (o > 0 and L == 1))
    if N <= g or not (torch.is_grad_enabled() and rows.requires_grad) or exporting_graph():
        qg, kg, vg = _split_leaves(rows.index_select(0, index), B, h, L, g, o)
        return qg, kg, vg, qkv.view(B, N, 3, h * d)[:, :, 2], leaves
    # row (b, n, w, head) sits in exactly one real slot of the q|k|v slot grid
    sample = torch.arange(B, device=qkv.device).view(B, 1, 1, 1)
    head = torch.arange(h, device=qkv.device).view(1, 1, 1, h)
    which = torch.arange(3, device=qkv.device).view(1, 1, 3, 1)
    inverse = ((which * B + sample) * h + head) * (L * g) + inv.transpose(1, 2)[:, :, None, :]
    qg, kg, vg, v_tokens = LeafGather.apply(rows, index, inverse.flatten(), (B, h, L, g, o))
    return qg, kg, vg, v_tokens, leaves


def scatter_leaves(out: Tensor, leaves: Leaves, group_size: int) -> Tensor:
    """``(B, h*L, g, d)`` outputs of every slot -> ``(B, N, h*d)`` in token order."""
    B, hL, g, d = out.shape
    h = hL // leaves.leaves
    N = leaves.inv.shape[-1]
    S = leaves.leaves * g
    sample = torch.arange(B, device=out.device).view(B, 1, 1)
    head = torch.arange(h, device=out.device).view(1, h, 1)
    # rows laid out (sample, token, head) so heads concatenate; backward: slot
    # (b, head, s) reads the gradient of token perm[s] (none if padding)
    index = ((sample * h + head) * S + leaves.inv).transpose(1, 2)  # (B, N, h)
    real = leaves.perm[..., :S]
    inverse = torch.where(real < N, (sample * N + real.clamp(max=N - 1)) * h + head,
                          B * N * h)
    return permute_rows(out.reshape(B * h * S, d), 0, index.flatten(), inverse.flatten(),
                        zero_row=S > N).view(B, N, h * d)
