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

from ..checks import check_divisible, check_positive, check_probability
from ..functional.clustering import balanced_binary_clustering, inverse_permutation
from ..functional.dispatch import attention, deprecated_switch
from ..functional.kernels.leaf_gather import fsla_key_positions, gather_leaves, scatter_leaves
from ..registry import register
from .base import AttentionModule
from .window import WindowAttention

__all__ = ["FeatureSpaceLocalAttention", "BilateralLocalAttention", "fsla_key_positions"]


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
    """FSLA (Yu et al., BOAT, BMVC 2022, Sec. 3.2): attention inside clusters of similar tokens.

    Per head, queries are grouped by balanced binary clustering into leaves of exactly
    ``group_size`` tokens (49, the 7x7 window area, so FSLA costs what window attention
    costs; no gradient through the grouping). Each leaf attends ``softmax(q k^T s) v``
    over its own ``g`` keys and the ``overlap`` (20) keys of its sibling nearest the cut.
    A depthwise 3x3 conv of the values is added before the output projection, as in the
    reference; parameter names and the ``qkv`` layout are the reference's
    ``ContentAttention``, so its weights load as they are.

    Shapes: ``(B, H, W, C) -> (B, H, W, C)``, any ``N = H*W`` (the reference needs
    ``49 * 2^L``): padding slots sort last, are never computed alone, and are masked.
    Cost: ``8 B N C^2 + 4 B N (g + o) C + 18 B N C`` plus the clustering
    ``O(B N C log2(N / g))``: linear in ``N``.

    Deviations, each behind a flag where a checkpoint needs it: ``scale`` defaults to
    ``head_dim ** -0.5`` (the reference BOAT-CSWin passes ``qk_scale=True``, i.e. 1.0:
    ``scale=1.0``); a lone leaf (``N <= g``) has no sibling, where the reference pairs
    images ``2i`` and ``2i+1`` of the batch (``pair_batch=True``, even batches only).

    ``attn_impl``: auto (= ``kept_probs``: the leaves' probabilities kept for backward,
    linear memory; measured in benchmarks/boat.md), explicit, sdpa.
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
        qkv = self.qkv(x.reshape(B, N, C))  # (B, N, 3C), channels laid out (3, h, dh)
        q = qkv.view(B, N, 3, h, self.head_dim)[:, :, 0].transpose(1, 2)  # (B, h, N, dh)
        perm = balanced_binary_clustering(self._grouping_queries(x, q), g, iters=self.iters,
                                          temperature=self.temperature)

        inv = inverse_permutation(perm)[..., :N]  # (B, h, N): each token's slot
        # one gather builds every leaf's queries, keys and values (overlap included)
        qg, kg, vg, v_tokens, leaves = gather_leaves(qkv, perm, inv, h, g, o)
        L, nG = leaves.leaves, leaves.real_leaves
        mask = None
        if self.pair_batch and lone and o > 0:
            kg, vg = self._pair_images(kg, vg)
        elif leaves.padded:  # padding slots or a missing sibling
            mask = leaves.valid.repeat(h, 1)[None, :, None, :]  # (1, h*L, 1, g+o)

        p = self.attn_drop if self.training else 0.0
        if self.use_fused:
            out = attention(qg, kg, vg, mask, scale=self.scale, dropout_p=p, impl=self.impl)
        else:
            out, weights = attention(qg, kg, vg, mask, scale=self.scale, dropout_p=p,
                                     impl="explicit", return_weights=True)
            self.record(weights.view(B, h, L, g, g + o)[:, :, :nG])
            self.record((inv // g).view(B, h, H, W))

        out = scatter_leaves(out, leaves, g)  # (B, N, C) in token order
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
    ``attn_impl``: auto, explicit, sdpa, kept_probs; handed to both branches.
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
