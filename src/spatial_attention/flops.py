"""Moved: FLOP counting is :mod:`spatial_attention.apps.bench.flops`.

This path still works and warns (DeprecationWarning) on each name it hands out.
"""

from ._moved import forward_to

__getattr__, __dir__ = forward_to(__name__, (
    "spatial_attention.apps.bench.flops",
))
