"""The one attention dispatcher, and the one switch that picks its kernel.

``attention(q, k, v, mask, impl=...)`` is Vaswani et al. 2017, Eq. 1,
``softmax(q k^T * scale + mask) v``, run by one of:

* ``"explicit"``: the equation in plain autograd ops (the reference every kernel is held
  to; capture and ``return_weights`` use it).
* ``"sdpa"``: ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels).
* ``"kept_probs"``: :class:`~.kernels.kept_probs.KeptProbsAttention` on the CPU for at
  most ``SHORT_KEYS`` keys (many small blocks); elsewhere it falls back to ``"auto"``.
* ``"auto"``: the fastest exact path for the call: SDPA, except a learned float bias on
  the CPU in training, where SDPA would take its slow math fallback and the lean
  four-kernel sequence (:mod:`.kernels.lean_bias`) runs instead.

Mechanisms take ``attn_impl=`` in their constructor; ``None`` follows the process-wide
default, set by :func:`set_attn_impl`, the :func:`use_attn_impl` context manager or the
``SA_ATTN_IMPL`` environment variable (as timm's ``TIMM_FUSED_ATTN``). ``"flex"``
(FlexAttention block masks) is offered by the window mechanisms only.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

from .kernels.kept_probs import KeptProbsAttention, kept_probs_applies, short_keys_on_cpu
from .kernels.lean_bias import lean_biased_attention, learned_bias_on_cpu
from .scoring import masked_softmax, scaled_dot_product_scores

__all__ = [
    "ATTN_IMPLS",
    "attention",
    "get_attn_impl",
    "materialized_attention",
    "set_attn_impl",
    "use_attn_impl",
]

#: every implementation name a mechanism may offer; each mechanism lists its own subset
ATTN_IMPLS = ("auto", "explicit", "sdpa", "kept_probs", "flex")
ENV_VAR = "SA_ATTN_IMPL"


def _check_impl(impl: str, allowed: tuple[str, ...] = ATTN_IMPLS, who: str = "attn_impl"
                ) -> str:
    if impl not in allowed:
        raise ValueError(f"{who}: unknown implementation {impl!r}; expected one of "
                         f"{', '.join(allowed)}")
    return impl


# read once at import, as timm reads TIMM_FUSED_ATTN: a compiled graph then sees a plain
# Python value, not an environment lookup
_FROM_ENV = _check_impl(os.environ[ENV_VAR], who=ENV_VAR) if os.environ.get(ENV_VAR) else None
_default: list[str | None] = [_FROM_ENV]


def get_attn_impl() -> str:
    """The process-wide default for mechanisms built with ``attn_impl=None``."""
    return _default[0] or "auto"


def set_attn_impl(impl: str | None) -> None:
    """Set the process-wide default (``None`` returns to ``SA_ATTN_IMPL`` or ``"auto"``)."""
    _default[0] = _FROM_ENV if impl is None else _check_impl(impl, who="set_attn_impl")


@contextmanager
def use_attn_impl(impl: str) -> Iterator[None]:
    """Within the block, mechanisms built with ``attn_impl=None`` run ``impl``."""
    previous = _default[0]
    set_attn_impl(impl)
    try:
        yield
    finally:
        _default[0] = previous


def _check_qkv(query: Tensor, key: Tensor, value: Tensor) -> None:
    if query.dim() < 2 or key.dim() != query.dim() or value.dim() != query.dim():
        raise ValueError(
            "attention expects query, key and value of equal rank >= 2 ((..., N, d)), got "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"attention: query dim {query.shape[-1]} != key dim {key.shape[-1]}")
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(f"attention: {key.shape[-2]} keys but {value.shape[-2]} values")


def _legacy_impl(fused: bool | None, save_probs: bool | None, impl: str) -> str:
    """``fused=`` and ``save_probs=`` from before ``impl=`` existed."""
    if fused is False:
        return "explicit"
    if save_probs:
        return "kept_probs"
    return impl


def attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor | None = None,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
    impl: str = "auto",
    return_weights: bool = False,
    fused: bool | None = None,
    save_probs: bool | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """``softmax(q k^T * scale + mask) v`` (Vaswani et al. 2017, Eq. 1) by ``impl``.

    Args:
        query ``(..., Q, d)``, key ``(..., K, d)``, value ``(..., K, dv)``.
        mask: boolean keep mask (True = attend) or float additive mask, broadcastable
            to ``(..., Q, K)``. A query with no kept key gets zero weights.
        scale: defaults to ``1/sqrt(d)``. dropout_p: on the weights (0 in eval).
        impl: ``"auto"``, ``"explicit"``, ``"sdpa"`` or ``"kept_probs"`` (module docstring).
        return_weights: also return the ``(..., Q, K)`` weights (runs the explicit path).
        fused, save_probs: the switches ``impl`` replaced (``fused=False`` is
            ``"explicit"``, ``save_probs=True`` is ``"kept_probs"``).

    Cost: ``2 * Q * K * (d + dv)`` FLOPs per batch element and head.
    """
    _check_qkv(query, key, value)
    impl = _check_impl(_legacy_impl(fused, save_probs, impl),
                       ("auto", "explicit", "sdpa", "kept_probs"), "attention")
    if mask is not None and mask.dtype != torch.bool and mask.dtype != query.dtype:
        mask = mask.to(query.dtype)
    if impl == "explicit" or return_weights:
        scores = scaled_dot_product_scores(query, key, scale)  # (..., Q, K)
        if mask is not None and mask.dtype == torch.bool:
            weights = masked_softmax(scores, mask=mask)
        else:
            weights = F.softmax(scores if mask is None else scores + mask, dim=-1)
        dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights
        out = dropped @ value  # (..., Q, dv)
        return (out, weights) if return_weights else out
    if impl == "kept_probs" and short_keys_on_cpu(query, key, dropout_p):
        scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
        return KeptProbsAttention.apply(query, key, value, mask, scale, 0)
    if impl != "sdpa" and learned_bias_on_cpu(query, mask):
        return lean_biased_attention(query, key, value, mask, scale, dropout_p)
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout_p, scale=scale
    )


def materialized_attention(
    query: Tensor | None,
    key: Tensor | None,
    value: Tensor,
    mask: Tensor | None = None,
    scale: float = 1.0,
    constant_key_columns: int = 0,
    impl: str = "auto",
) -> Tensor:
    """``softmax(q k^T * scale + mask) v`` for callers that form the ``Q x K`` scores anyway.

    Where the energy is not ``q . k`` alone (generalized attention's position terms), the
    scores exist whatever the kernel, so keeping the probabilities costs nothing extra:
    ``"auto"`` runs :class:`KeptProbsAttention` at any key length where it applies (CPU,
    eager, fp32/fp64) and plain ops elsewhere; ``"explicit"`` always runs plain ops.

    ``mask``: boolean keep mask or float energy, broadcastable to ``(..., Q, K)``.
    ``query`` and ``key`` may both be None: the float ``mask`` is then the whole energy.
    ``constant_key_columns``: trailing key columns that are constants (one-hot
    coordinates); the kernel skips their gradient product and returns zeros there.
    """
    if query is None or key is None:
        if query is not None or key is not None or mask is None or mask.dtype == torch.bool:
            raise ValueError(
                "materialized_attention: without a query and key the energy is a float "
                "mask; pass both query and key, or neither and a float mask"
            )
        if mask.dim() < 2 or mask.shape[-1] != value.shape[-2]:
            raise ValueError(
                f"materialized_attention: an energy of shape {tuple(mask.shape)} does not "
                f"match values of shape {tuple(value.shape)} ((..., Q, K) and (..., K, dv))"
            )
    else:
        _check_qkv(query, key, value)
    if not 0 <= constant_key_columns <= (0 if key is None else key.shape[-1]):
        raise ValueError(
            f"materialized_attention: constant_key_columns must lie in [0, key width], "
            f"got {constant_key_columns}"
        )
    if impl != "explicit" and kept_probs_applies(value):
        return KeptProbsAttention.apply(query, key, value, mask, scale, constant_key_columns)
    if query is None:
        return F.softmax(mask, dim=-1) @ value
    return attention(query, key, value, mask, scale=scale, impl="explicit")


def deprecated_switch(name: str, replacement: str) -> None:
    """One warning text for the switches ``attn_impl`` replaced."""
    warnings.warn(f"{name} is deprecated; use {replacement}", DeprecationWarning, stacklevel=3)
