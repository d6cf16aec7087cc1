"""Global token attention on ``(B, H, W, C)``: plain ViT self-attention and Twins GSA.

* ``global_attention``: multi-head self-attention over all ``N = H·W`` tokens (Dosovitskiy
  et al. ICLR 2021, Eq. 2-3; Vaswani et al. 2017, Sec. 3.2.2), the baseline every local
  mechanism is measured against. Cost quadratic in ``N``.
* ``twins_gsa``: global sub-sampled attention (Chu et al. NeurIPS 2021, Sec. 3.2, Eq. 5;
  the spatial-reduction attention of PVT, Wang et al. ICCV 2021): queries from every
  token, keys and values from the map reduced by a ``sr x sr`` convolution with stride
  ``sr`` and a LayerNorm, so the cost is ``N · N / sr²``. Twins uses sr = 8, 4, 2, 1 in
  its four stages.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..checks import check_divisible, check_positive, check_probability
from ..functional.dispatch import attention
from ..registry import register
from .base import AttentionModule

__all__ = ["GlobalAttention", "GlobalSubsampledAttention"]


class _TokenAttention(AttentionModule):
    """Shared tail of the global mechanisms: heads in, projection out."""

    attn_impls = ("auto", "explicit", "sdpa", "kept_probs")

    layout = "tokens"

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """``(B, heads, Nq, d)`` x ``(B, heads, Nk, d)`` -> ``(B, Nq, C)``."""
        p = self.attn_drop if self.training else 0.0
        if self.use_fused:
            out = attention(q, k, v, scale=self.scale, dropout_p=p, impl=self.impl)
        else:
            out, weights = attention(
                q, k, v, scale=self.scale, dropout_p=p, impl="explicit", return_weights=True
            )
            self.record(weights)  # (B, heads, Nq, Nk)
        B, _, Nq, _ = q.shape
        return out.transpose(1, 2).reshape(B, Nq, self.dim)


@register(
    "global_attention",
    family="token_global",
    layout="tokens",
    paper="Dosovitskiy et al., An Image is Worth 16x16 Words (multi-head self-attention, "
    "Eq. 2-3)",
    year=2021,
    cost="8·B·N·C² (projections) + 4·B·N²·C (scores and weighting), N = H·W",
    captures="(B, heads, N, N) attention weights",
)
class GlobalAttention(_TokenAttention):
    """Multi-head self-attention over every token of a ``(B, H, W, C)`` map.

    Dosovitskiy et al., *An Image is Worth 16x16 Words*, ICLR 2021, Eq. 2-3 (Vaswani et al.
    2017, Sec. 3.2.2): ``softmax(Q K^T / sqrt(d)) V`` per head, then an output projection.
    Shapes: ``(B, H, W, C) -> (B, H, W, C)``, ``N = H·W`` tokens. Args: ``dim``,
    ``num_heads`` 8; ``qkv_bias`` True; ``attn_drop``, ``proj_drop`` dropout.
    Cost: ``8·B·N·C²`` (projections) ``+ 4·B·N²·C`` (scores, weighting): quadratic in ``N``.
    Parameter names ``qkv`` and ``proj`` as timm's ``Attention`` (and Twins', ViT's weights).
    attn_impl: ``auto``, ``sdpa`` (one fused call; flash kernels never build the ``N x N``
    matrix), ``kept_probs``, ``explicit`` (the same math written out, weights recorded);
    measured in benchmarks/token_attention.md.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        attn_impl: str | None = None,
    ) -> None:
        super().__init__(attn_impl=attn_impl)
        check_divisible("global_attention", dim, num_heads)
        check_probability("global_attention", attn_drop=attn_drop, proj_drop=proj_drop)
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x, self.dim)
        B, H, W, C = x.shape
        qkv = self.qkv(x.reshape(B, H * W, C)).view(B, H * W, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, d)
        return self.proj_drop(self.proj(self._attend(q, k, v))).view(B, H, W, C)


@register(
    "twins_gsa",
    family="token_global",
    layout="tokens",
    paper="Chu et al., Twins: Revisiting the Design of Spatial Attention in Vision "
    "Transformers (GSA, Sec. 3.2, Eq. 5)",
    year=2021,
    cost="4·B·N·C² (q, proj) + 4·B·(N/sr²)·C² (kv) + 2·B·N·C² (sr conv) "
    "+ 4·B·N·(N/sr²)·C (scores and weighting)",
    captures="(B, heads, N, N/sr²) attention weights (keys on the reduced grid)",
)
class GlobalSubsampledAttention(_TokenAttention):
    """Twins GSA / PVT spatial-reduction attention on ``(B, H, W, C)``.

    Chu et al., *Twins: Revisiting the Design of Spatial Attention in Vision Transformers*,
    NeurIPS 2021, Sec. 3.2, Eq. 5 (PVT's spatial-reduction attention, Wang et al. ICCV 2021):
    ``q = x W_q``; ``k, v`` from the map reduced by ``Conv2d(C, C, sr, stride=sr)`` and a
    LayerNorm (``sr = 1``: no conv, no norm, keys from every token, as Twins' last stage).
    Shapes: ``(B, H, W, C) -> (B, H, W, C)``, any ``H, W``. Args: ``dim``, ``num_heads`` 8;
    ``sr_ratio`` ``sr`` (Twins: 8, 4, 2, 1 by stage); ``qkv_bias``; ``attn_drop``,
    ``proj_drop``. Cost: ``4·B·N·C²`` (q, proj) ``+ 4·B·(N/sr²)·C²`` (kv) ``+ 2·B·N·C²`` (sr
    conv) ``+ 4·B·N·(N/sr²)·C`` (scores, weighting): ``N·N/sr²`` scores per head, not ``N²``.
    Names ``q``, ``kv``, ``sr``, ``norm``, ``proj`` are Twins' and timm's. Sides that are not
    multiples of ``sr`` lose their last rows and columns to the strided conv, exactly as the
    official code (every key a full ``sr x sr`` patch). Deviation: a map smaller than ``sr``
    is reduced with a kernel clipped to the map (one key), where the official code fails.
    attn_impl: ``auto``, ``sdpa``, ``kept_probs`` (that kernel), ``explicit`` (recorded);
    measured in benchmarks/token_attention.md.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        sr_ratio: int = 1,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        attn_impl: str | None = None,
    ) -> None:
        super().__init__(attn_impl=attn_impl)
        check_divisible("twins_gsa", dim, num_heads)
        check_positive("twins_gsa", sr_ratio=sr_ratio)
        check_probability("twins_gsa", attn_drop=attn_drop, proj_drop=proj_drop)
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)
        else:
            self.sr = None
            self.norm = None

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, sr_ratio={self.sr_ratio}, "
                + super().extra_repr())

    @classmethod
    def example(cls, name, batch, channels, size, **kwargs):
        # Twins' schedule at 224: 56x56 maps reduce by 8, 28 by 4, 14 by 2, 7 by 1
        side = min(size)
        sr = 8 if side >= 56 else 4 if side >= 28 else 2 if side >= 14 else 1
        kwargs.setdefault("sr_ratio", sr)
        return super().example(name, batch, channels, size, **kwargs)

    def _reduce(self, x: Tensor) -> Tensor:
        """``(B, H, W, C)`` -> ``(B, N/sr², C)`` key/value tokens."""
        B, H, W, C = x.shape
        if self.sr is None:
            return x.reshape(B, H * W, C)
        r = self.sr_ratio
        fmap = x.permute(0, 3, 1, 2)
        if H < r or W < r:
            # a map smaller than the reduction: clip the kernel to it (one key per axis)
            w = self.sr.weight[:, :, : min(H, r), : min(W, r)]
            reduced = nn.functional.conv2d(fmap, w, self.sr.bias, stride=r)
        else:
            reduced = self.sr(fmap)
        return self.norm(reduced.flatten(2).transpose(1, 2))

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x, self.dim)
        B, H, W, C = x.shape
        q = self.q(x.reshape(B, H * W, C)).view(B, H * W, self.num_heads, self.head_dim)
        kv = self.kv(self._reduce(x))
        kv = kv.view(B, -1, 2, self.num_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N/sr², d)
        out = self._attend(q.transpose(1, 2), k, v)
        return self.proj_drop(self.proj(out)).view(B, H, W, C)
