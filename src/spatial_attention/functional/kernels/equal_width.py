"""SDPA for queries and keys whose width differs from the values': padded to one width.

The CPU flash kernel of ``F.scaled_dot_product_attention`` needs one head width for q, k
and v; otherwise SDPA takes its math path. Zero columns change nothing: appended to q and
k they add ``0`` to every score, appended to v they add output columns that are cut off.
Contract: equal to ``functional.attention(q, k, v, mask, scale=scale, impl="explicit")``
(its reference twin), held equal by generalized attention's tests (``attn_impl="sdpa"``).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["equal_width_sdpa"]


def equal_width_sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None,
                     scale: float | None = None) -> Tensor:
    """``softmax(q k^T * scale + mask) v`` for ``q, k`` ``(..., N, dq)`` and ``v``
    ``(..., K, dv)``, with any ``dq`` and ``dv``."""
    dq, dv = q.shape[-1], v.shape[-1]
    if dq < dv:
        q, k = F.pad(q, (0, dv - dq)), F.pad(k, (0, dv - dq))
    elif dv < dq:
        v = F.pad(v, (0, dq - dv))
    out = F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous(),
                                         attn_mask=mask, scale=scale)
    return out[..., :dv]
