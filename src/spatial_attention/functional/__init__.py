"""Stateless attention math shared by every mechanism: one concept a file."""

from .position import relative_position_bias, relative_position_index
from .scoring import (
    additive_scores,
    attention,
    dot_product_scores,
    masked_softmax,
    materialized_attention,
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
    "additive_scores",
    "attention",
    "cyclic_shift",
    "dot_product_scores",
    "masked_softmax",
    "materialized_attention",
    "pad_to_multiple",
    "padding_mask",
    "region_labels",
    "relative_position_bias",
    "relative_position_index",
    "scaled_dot_product_scores",
    "sequence_mask",
    "shifted_window_mask",
    "to_2tuple",
    "valid_lens_to_mask",
    "window_attention_mask",
    "window_partition",
    "window_reverse",
]
