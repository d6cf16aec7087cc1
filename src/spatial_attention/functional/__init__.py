"""Stateless attention math shared by every mechanism: one concept a file."""

from .dispatch import (
    ATTN_IMPLS,
    attention,
    get_attn_impl,
    materialized_attention,
    set_attn_impl,
    use_attn_impl,
)
from .position import relative_position_bias, relative_position_index
from .scoring import (
    additive_mask,
    additive_scores,
    dot_product_scores,
    masked_softmax,
    scaled_dot_product_scores,
    sequence_mask,
    valid_lens_to_mask,
)
from .windows import (
    cyclic_shift,
    pad_to_multiple,
    padding_mask,
    region_labels,
    shifted_window_mask,
    to_2tuple,
    window_attention_mask,
    window_partition,
    window_reverse,
)

__all__ = [
    "ATTN_IMPLS",
    "additive_mask",
    "additive_scores",
    "attention",
    "cyclic_shift",
    "dot_product_scores",
    "get_attn_impl",
    "masked_softmax",
    "materialized_attention",
    "pad_to_multiple",
    "padding_mask",
    "region_labels",
    "relative_position_bias",
    "relative_position_index",
    "scaled_dot_product_scores",
    "sequence_mask",
    "set_attn_impl",
    "shifted_window_mask",
    "to_2tuple",
    "use_attn_impl",
    "valid_lens_to_mask",
    "window_attention_mask",
    "window_partition",
    "window_reverse",
]
