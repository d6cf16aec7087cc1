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
from .models import ModelInfo, create_model, list_models
from .registry import FAMILIES, LAYOUTS, MechanismInfo, create, list_mechanisms

__version__ = "0.1.0"


def info(name: str) -> MechanismInfo | ModelInfo:
    """What is known about ``name`` (any case): a mechanism's :class:`MechanismInfo`, or
    for a model name its :class:`ModelInfo`, as ``spatial-attention info`` shows.

    Unknown names raise a ValueError listing the closest mechanism and model names.
    """
    from . import registry
    from .models import model_info

    # mechanisms first: the model modules are imported only when a name needs them
    # (the two sets of names are disjoint)
    try:
        return registry.info(name)
    except ValueError:
        pass
    try:
        return model_info(name)
    except ValueError:
        known = sorted(set(list_mechanisms()) | set(list_models()))
        raise registry.unknown_name_error("mechanism or model", str(name), known) from None

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
