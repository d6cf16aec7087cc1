"""Moved: the classifier's datasets are :mod:`spatial_attention.apps.training.data`.

This path still works and warns (DeprecationWarning) on each name it hands out.
"""

from ._moved import forward_to

__getattr__, __dir__ = forward_to(__name__, (
    "spatial_attention.apps.training.data",
))
