"""spatial-attention: the attention mechanisms vision models use, faithful, fast, tested.

>>> import spatial_attention as sa
>>> attn = sa.create("multi_head", 64, 4)
>>> sa.list_mechanisms(family="sequence")
['additive', 'dot_product', 'multi_head', 'scaled_dot_product']
"""

from . import functional
from .capture import AttentionMaps, capture_attention, explicit_path
from .layers import *  # noqa: F403  (the mechanism classes, see layers.__all__)
from .layers import __all__ as _layer_names
from .models import create_model, list_models
from .registry import FAMILIES, LAYOUTS, create, info, list_mechanisms

__version__ = "0.1.0"

__all__ = [
    *_layer_names,
    "FAMILIES",
    "LAYOUTS",
    "AttentionMaps",
    "capture_attention",
    "create",
    "create_model",
    "explicit_path",
    "functional",
    "info",
    "list_mechanisms",
    "list_models",
]
