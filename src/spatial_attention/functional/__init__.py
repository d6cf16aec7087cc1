"""Stateless attention math shared by every mechanism: one concept a file.

* ``dispatch``: ``attention()`` (Eq. 1 by ``impl``), ``materialized_attention()``, the
  process-wide ``attn_impl`` default.
* ``scoring``: scores (dot, scaled, additive), masks and the masked softmax.
* ``windows``: padding, partition, cyclic shift, Swin's masks, the one-gather layouts;
  MaxViT's grid partition.
* ``neighborhood``: NATTEN's neighbourhood windows (indices, bias index, query tiles).
* ``position``: relative position index and bias.
* ``permute``: token reorderings whose backward is a gather.
* ``clustering``: BOAT's balanced binary clustering.
* ``sampling``: bilinear sampling and deformable convolution.
* ``gates``: CBAM's gate product and GAM's channel shuffle.
* ``kernels``: the hand-written kernels behind these (each with its reference twin).
"""

from .clustering import balanced_binary_clustering, inverse_permutation, num_levels
from .dispatch import (
    ATTN_IMPLS,
    attention,
    get_attn_impl,
    materialized_attention,
    set_attn_impl,
    use_attn_impl,
)
from .gates import ChannelMLP, SpatialConvBN, cbam_gates, cbam_gates_reference, channel_shuffle
from .neighborhood import (
    NeighborhoodTiles,
    axis_window_start,
    halo_attention,
    neighborhood_bias_index,
    neighborhood_index,
    neighborhood_padding,
    neighborhood_tiles,
)
from .permute import inverse_index, permute_rows
from .position import relative_position_bias, relative_position_index
from .sampling import (
    bilinear_corners,
    deform_conv2d,
    deform_conv2d_explicit,
    deform_sampling_positions,
)
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
    WindowLayout,
    cyclic_shift,
    effective_shift,
    grid_attention_mask,
    grid_layout,
    grid_partition,
    grid_reverse,
    grid_token_index,
    pad_to_multiple,
    padding_mask,
    region_labels,
    shifted_window_mask,
    to_2tuple,
    window_attention_mask,
    window_layout,
    window_partition,
    window_reverse,
    window_token_index,
)

__all__ = [
    "NeighborhoodTiles",
    "axis_window_start",
    "halo_attention",
    "neighborhood_bias_index",
    "neighborhood_index",
    "neighborhood_padding",
    "neighborhood_tiles",
    "grid_attention_mask",
    "grid_layout",
    "grid_partition",
    "grid_reverse",
    "grid_token_index",
    "ATTN_IMPLS",
    "ChannelMLP",
    "SpatialConvBN",
    "WindowLayout",
    "additive_mask",
    "additive_scores",
    "attention",
    "balanced_binary_clustering",
    "bilinear_corners",
    "cbam_gates",
    "cbam_gates_reference",
    "channel_shuffle",
    "cyclic_shift",
    "deform_conv2d",
    "deform_conv2d_explicit",
    "deform_sampling_positions",
    "dot_product_scores",
    "effective_shift",
    "get_attn_impl",
    "inverse_index",
    "inverse_permutation",
    "masked_softmax",
    "materialized_attention",
    "num_levels",
    "pad_to_multiple",
    "padding_mask",
    "permute_rows",
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
    "window_layout",
    "window_partition",
    "window_reverse",
    "window_token_index",
]
