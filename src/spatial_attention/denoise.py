"""Moved: denoising is :mod:`spatial_attention.apps.denoise`.

This path still works and warns (DeprecationWarning) on each name it hands out.
"""

from ._moved import forward_to

__getattr__, __dir__ = forward_to(__name__, (
    "spatial_attention.apps.denoise",
    "spatial_attention.apps.denoise.noise",
    "spatial_attention.apps.denoise.metrics",
    "spatial_attention.apps.denoise.tiling",
    "spatial_attention.apps.denoise.train",
    "spatial_attention.apps.denoise.cli",
))
