"""BOAT's bilateral local attention on ``(B, H, W, C)``: feature-space plus image-space.

BOAT (Yu, Zhao, Li, Yu, "BOAT: Bilateral Local Attention Vision Transformer", BMVC
2022, arXiv 2201.13027) pairs the image-space local attention of Swin / CSWin (tokens
attend inside a window of the *image*) with feature-space local attention, FSLA (tokens
attend inside a group of tokens with *similar features*, wherever they lie), so distant
but similar patches interact at window cost.

* ``fsla`` (:class:`FeatureSpaceLocalAttention`): Sec. 3.2 of the paper, written from
  the reference implementation (mahaoyuHKU/pytorch-boat, ``ContentAttention``).
* ``bilateral_local_attention`` (:class:`BilateralLocalAttention`): one image-space
  branch and one FSLA branch, each pre-normed and residual, in that order, as the BOAT
  blocks run them (Sec. 3.3): ``x = x + ISLA(LN(x)); x = x + FSLA(LN(x))``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..checks import check_divisible, check_positive, check_probability
from ..functional.clustering import balanced_binary_clustering, inverse_permutation
from ..functional.dispatch import attention, deprecated_switch
from ..functional.permute import permute_rows
from ..registry import register
from ..tracing import exporting_graph
from .base import AttentionModule
from .window import WindowAttention

__all__ = ["FeatureSpaceLocalAttention", "BilateralLocalAttention", "fsla_key_positions"]


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


class _LeafGather(torch.autograd.Function):
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


@register(
    "fsla",
    family="token_feature_space",
    layout="tokens",
    paper="Yu et al., BOAT: Bilateral Local Attention Vision Transformer (BMVC, Sec. 3.2, "
    "feature-space local attention)",
    year=2022,
    cost="8·B·N·C² (qkv, proj) + 4·B·N·(g+o)·C (grouped attention) + 18·B·N·C (dwconv) "
    "+ O(B·N·C·log(N/g)) clustering",
    captures="(B, heads, nG, g, g+o) weights, then the (B, heads, H, W) leaf of each token",
)
class FeatureSpaceLocalAttention(AttentionModule):
    """FSLA (Yu et al. BMVC 2022, Sec. 3.2): attention inside clusters of similar tokens.

    Per head, the queries are grouped by :func:`~spatial_attention.functional.clustering.
    balanced_binary_clustering` into leaves of exactly ``group_size`` tokens (``g = 49``,
    the 7x7 window area, so FSLA costs what window attention costs); no gradient flows
    through the grouping. Each leaf attends ``softmax(q k^T * scale) v`` over its own
    ``g`` keys and the ``overlap`` (20) keys of its sibling leaf nearest the cut, ``g +
    overlap`` keys in all. A depthwise 3x3 convolution of the values, in image layout, is
    added to the attention output before the output projection, as in the reference.

    Parameter names (``qkv``, ``get_v``, ``proj``) and layout (``qkv`` output laid out
    ``(3, heads, head_dim)``) are the reference's ``ContentAttention``, so its weights
    load as they are.

    Any size: ``N = H*W`` need not be ``49 * 2^L`` (the reference's only case, at 224
    input). The clustering pads to ``g * 2^L`` slots that always sort last, so only the
    last real leaf is partial; leaves of padding alone are never computed, and padding
    keys are masked out of every softmax. Any batch size; samples never mix.

    Deviations from the reference, each kept behind a flag where a checkpoint needs it:

    * ``scale``: ``head_dim ** -0.5`` by default. The reference's BOAT-CSWin passes
      ``qk_scale=qkv_bias`` (True), i.e. a scale of 1.0; ``scale=1.0`` reproduces that.
    * ``pair_batch``: with one leaf per image (``N <= g``, e.g. CSWin's 7x7 last stage)
      the reference pairs image ``2i`` with image ``2i+1`` of the batch as "siblings",
      mixing samples (and failing for odd batches). By default a lone leaf has no
      sibling; ``pair_batch=True`` reproduces the reference (even batches only).

    Fast path: the clustering as sorts and gathers batched over every (batch, head,
    cluster); one gather of every leaf's queries and its keys and values, the sibling
    overlap included, with a backward that gathers back instead of scattering
    (``_LeafGather``; :func:`~spatial_attention.functional.permute.permute_rows` for the
    return to token order); one attention call over all leaves; memory linear in ``N``.
    On CPU that call keeps the ``g x (g + o)`` probabilities of every leaf for backward
    (``save_probs``, on by default: forward + backward of the grouped attention 51 -> 33
    ms on (8, 56, 56, 96), ``benchmarks/kept_probs.py``; for ``4 (g + o)`` bytes per
    token and head; ``fsla.save_probs
    = False`` gives SDPA's flash kernel and its memory). Explicit path: the same leaves,
    softmax written out and recorded.

    Shapes: ``(B, H, W, C) -> (B, H, W, C)``. Cost: ``8 B N C^2`` (qkv, proj) ``+ 4 B N
    (g + o) C`` (attention) ``+ 18 B N C`` (convolution) plus the clustering,
    ``O(B N C log2(N / g))``: linear in ``N`` where global attention is quadratic.
    """

    attn_impls = ("auto", "explicit", "sdpa", "kept_probs")
    auto_impl = "kept_probs"  # its 49 x 69 leaves: see benchmarks/kept_probs.md

    layout = "tokens"

    def __init__(
        self,
        dim: int,
        num_heads: int,
        group_size: int = 49,
        overlap: int = 20,
        qkv_bias: bool = True,
        scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        pair_batch: bool = False,
        iters: int = 2,
        temperature: float = 100.0,
        attn_impl: str | None = None,
    ) -> None:
        super().__init__(attn_impl=attn_impl)
        name = "fsla"
        check_divisible(name, dim, num_heads)
        check_positive(name, group_size=group_size, temperature=temperature)
        check_probability(name, attn_drop=attn_drop, proj_drop=proj_drop)
        if not 0 <= overlap <= group_size:
            raise ValueError(
                f"{name}: overlap must be in [0, group_size={group_size}], got {overlap}"
            )
        if iters < 0:
            raise ValueError(f"{name}: iters must be >= 0, got {iters}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.group_size, self.overlap = group_size, overlap
        self.scale = self.head_dim**-0.5 if scale is None else float(scale)
        self.pair_batch, self.iters, self.temperature = pair_batch, iters, temperature
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.get_v = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, group_size={self.group_size}, "
                f"overlap={self.overlap}, scale={self.scale:.4g}, " + super().extra_repr())

    @property
    def save_probs(self) -> bool:
        """Deprecated: ``attn_impl="kept_probs"`` (this mechanism's ``"auto"``)."""
        return self.impl == "kept_probs"

    @save_probs.setter
    def save_probs(self, value: bool) -> None:
        deprecated_switch("FeatureSpaceLocalAttention.save_probs", 'attn_impl="kept_probs"')
        self.attn_impl = None if value else "sdpa"

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x, self.dim)
        B, H, W, C = x.shape
        N, h, g, o = H * W, self.num_heads, self.group_size, self.overlap
        lone = N <= g
        if self.pair_batch and lone and B % 2:
            raise ValueError(
                f"fsla: pair_batch=True pairs the images of a batch when a map has one group "
                f"(N={N} <= group_size={g}); it needs an even batch, got shape {tuple(x.shape)}"
            )
        dh = self.head_dim
        qkv = self.qkv(x.reshape(B, N, C))  # (B, N, 3C), channels laid out (3, h, dh)
        rows = qkv.view(B * N * 3 * h, dh)  # one row per (sample, token, q|k|v, head)
        q = qkv.view(B, N, 3, h, dh)[:, :, 0].transpose(1, 2)  # (B, h, N, dh)
        perm = balanced_binary_clustering(self._grouping_queries(x, q), g, iters=self.iters,
                                          temperature=self.temperature)

        nG = max(1, (N + g - 1) // g)  # leaves holding real tokens
        # leaves computed: an unpaired last leaf brings its (padding) sibling along, so
        # leaves come in sibling pairs (the gather's backward adds overlaps pair by pair)
        L = nG + nG % 2 if (o > 0 and nG > 1) else nG
        positions, valid = fsla_key_positions(N, g, o, device=x.device, leaves=L)  # (L, g+o)
        tok = perm[..., : L * g].clamp(max=N - 1)  # padding slots read token N-1 (unused)
        inv = inverse_permutation(perm)[..., :N]  # (B, h, N): each token's slot
        sample = torch.arange(B, device=x.device).view(B, 1, 1)
        head = torch.arange(h, device=x.device).view(1, h, 1)
        index = _leaf_rows(tok, positions, N, h)
        if lone or not (torch.is_grad_enabled() and rows.requires_grad) or exporting_graph():
            qg, kg, vg = _split_leaves(rows.index_select(0, index), B, h, L, g, o)
            v_tokens = qkv.view(B, N, 3, C)[:, :, 2]
        else:
            # row (b, n, w, head) sits in exactly one real slot of the q|k|v slot grid
            which = torch.arange(3, device=x.device).view(1, 1, 3, 1)
            inverse = ((which * B + sample.view(B, 1, 1, 1)) * h + head.view(1, 1, 1, h)) \
                * (L * g) + inv.transpose(1, 2)[:, :, None, :]
            qg, kg, vg, v_tokens = _LeafGather.apply(rows, index, inverse.flatten(),
                                                     (B, h, L, g, o))
        mask = None
        if self.pair_batch and lone and o > 0:
            kg, vg = self._pair_images(kg, vg)
        elif L * g > N or (o > 0 and L == 1):  # padding slots or a missing sibling
            mask = valid.repeat(h, 1)[None, :, None, :]  # (1, h*L, 1, g+o)

        p = self.attn_drop if self.training else 0.0
        if self.use_fused:
            out = attention(qg, kg, vg, mask, scale=self.scale, dropout_p=p, impl=self.impl)
        else:
            out, weights = attention(qg, kg, vg, mask, scale=self.scale, dropout_p=p,
                                     impl="explicit", return_weights=True)
            self.record(weights.view(B, h, L, g, g + o)[:, :, :nG])
            self.record((inv // g).view(B, h, H, W))

        # back to token order, rows laid out (sample, token, head) so heads concatenate;
        # backward: slot (b, head, s) reads the gradient of token perm[s] (none if padding)
        index = ((sample * h + head) * (L * g) + inv).transpose(1, 2)  # (B, N, h)
        real = perm[..., : L * g]
        inverse = torch.where(real < N, (sample * N + real.clamp(max=N - 1)) * h + head,
                              B * N * h)
        out = permute_rows(out.reshape(B * h * L * g, dh), 0, index.flatten(),
                           inverse.flatten(), zero_row=L * g > N).view(B, N, C)
        # the reference adds a depthwise 3x3 conv of the values, in image layout
        v_img = v_tokens.reshape(B, H, W, C).contiguous().permute(0, 3, 1, 2)
        local = self.get_v(v_img).permute(0, 2, 3, 1).reshape(B, N, C)
        out = self.proj_drop(self.proj(out + local))
        return out.view(B, H, W, C)

    def _grouping_queries(self, x: Tensor, q: Tensor) -> Tensor:
        """The queries the clustering sorts: ``q`` itself, except under autocast, where
        they are projected again in float32 (one ``C x C`` product, a third of ``qkv``).
        Rounded to bf16/fp16, the queries alone move tokens across cuts, so the groups,
        and with them every output, would differ from float32's by far more than the
        autocast rounding."""
        low = q.dtype in (torch.float16, torch.bfloat16)
        if not (low and torch.is_autocast_enabled(x.device.type)):
            return q
        B, H, W, C = x.shape
        bias = None if self.qkv.bias is None else self.qkv.bias[:C].float()
        with torch.autocast(x.device.type, enabled=False):
            q32 = F.linear(x.reshape(B, H * W, C).float(), self.qkv.weight[:C].float(), bias)
        return q32.view(B, H * W, self.num_heads, self.head_dim).transpose(1, 2)

    def _pair_images(self, kg: Tensor, vg: Tensor) -> tuple[Tensor, Tensor]:
        # reference quirk: image 2i reads the first `o` keys of image 2i+1, image 2i+1 the
        # last `o` of image 2i (their single leaves treated as siblings)
        g, o = self.group_size, self.overlap

        def pair(t: Tensor) -> Tensor:
            own = t[:, :, :g]  # (B, h, g, dh)
            partner = own.unflatten(0, (-1, 2)).flip(1).flatten(0, 1)
            even = torch.arange(t.shape[0], device=t.device) % 2 == 0
            extra = torch.where(even[:, None, None, None], partner[:, :, :o], partner[:, :, g - o:])
            return torch.cat([own, extra], dim=2)

        return pair(kg), pair(vg)

    @classmethod
    def example(cls, name: str, batch: int, channels: int, size: tuple[int, int], **kwargs: Any):
        """Maps of fewer than ``4 * 49`` tokens get groups of ``max(2, N // 4)`` tokens
        (overlap half a group), so even a small example is split into several leaves."""
        N = size[0] * size[1]
        if N < 4 * 49:
            kwargs.setdefault("group_size", max(2, N // 4))
            kwargs.setdefault("overlap", kwargs["group_size"] // 2)
        return super().example(name, batch, channels, size, **kwargs)

    @classmethod
    def spatial_map(cls, weights: Tensor, size: tuple[int, int]) -> Tensor:
        """The ``(B, heads, H, W)`` leaf record -> head 0's leaf index per token (a
        segmentation of the map into feature-space groups)."""
        H, W = size
        if weights.dim() == 4 and tuple(weights.shape[-2:]) == (H, W):
            return weights[:, 0].float()
        raise ValueError(
            f"{cls.__name__}: expected a (B, heads, {H}, {W}) leaf record, got "
            f"{tuple(weights.shape)}"
        )


@register(
    "bilateral_local_attention",
    family="token_feature_space",
    layout="tokens",
    paper="Yu et al., BOAT: Bilateral Local Attention Vision Transformer (BMVC, Sec. 3.3, "
    "image-space window attention followed by feature-space local attention)",
    year=2022,
    cost="16·B·N·C² (two qkv, two proj) + 4·B·N·(M² + g + o)·C (window and grouped "
    "attention) + FSLA's convolution and clustering",
    captures="the window attention's (B, nW, heads, M², M²) weights; FSLA's weights and "
    "the (B, heads, H, W) leaves",
)
class BilateralLocalAttention(AttentionModule):
    """BOAT's bilateral local attention (Yu et al. BMVC 2022, Sec. 3.3): ISLA then FSLA.

    ``x = x + ISLA(norm1(x))``, then ``x = x + FSLA(norm4(x))``: Swin's (shifted) window
    attention in image space (:class:`~spatial_attention.layers.window.WindowAttention`,
    ``attn``) and feature-space local attention (:class:`FeatureSpaceLocalAttention`,
    ``attnC``), each pre-normed and residual, as in the attention half of a BOAT-Swin
    shifted block. Submodule names follow the reference (``norm1``, ``attn``, ``norm4``,
    ``attnC``), so a BOAT-Swin block's weights load after dropping its MLP keys.
    The MLP half of the block is the model's (``models.boat``).

    Shapes: ``(B, H, W, C) -> (B, H, W, C)``, any ``H, W``. Cost: the sum of the two
    branches, linear in ``N = H·W``. Records whatever its two branches record.
    """

    attn_impls = ("auto", "explicit", "sdpa", "kept_probs")

    layout = "tokens"

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int = 7,
        shift_size: int = 0,
        group_size: int = 49,
        overlap: int = 20,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        attn_impl: str | None = None,
    ) -> None:
        super().__init__(attn_impl=attn_impl)
        check_divisible("bilateral_local_attention", dim, num_heads)
        self.dim = dim
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size=window_size,
                                    shift_size=shift_size, qkv_bias=qkv_bias,
                                    attn_drop=attn_drop, proj_drop=proj_drop,
                                    attn_impl=attn_impl)
        self.norm4 = nn.LayerNorm(dim)
        self.attnC = FeatureSpaceLocalAttention(dim, num_heads, group_size=group_size,
                                                overlap=overlap, qkv_bias=qkv_bias,
                                                attn_drop=attn_drop, proj_drop=proj_drop,
                                                attn_impl=attn_impl)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x, self.dim)
        x = x + self.attn(self.norm1(x))
        return x + self.attnC(self.norm4(x))

    @classmethod
    def example(cls, name: str, batch: int, channels: int, size: tuple[int, int], **kwargs: Any):
        """Small maps get windows of 2 and groups of ``max(2, N // 4)`` (see ``fsla``)."""
        N = size[0] * size[1]
        if N < 4 * 49:
            kwargs.setdefault("window_size", 2)
            kwargs.setdefault("group_size", max(2, N // 4))
            kwargs.setdefault("overlap", kwargs["group_size"] // 2)
        return super().example(name, batch, channels, size, **kwargs)
