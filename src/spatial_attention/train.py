"""Moved: training is :mod:`spatial_attention.apps.training`.

Importing names from here still works and warns (DeprecationWarning). Running it is
the torchrun entry the docs give, and stays supported without a warning::

    torchrun --nproc-per-node 4 -m spatial_attention.train --data ... --batch 512

(``python -m spatial_attention.apps.training`` is the same entry at its new path.)
"""

from ._moved import forward_to

__getattr__, __dir__ = forward_to(__name__, (
    "spatial_attention.apps.training",
    "spatial_attention.apps.training.loop",
    "spatial_attention.apps.training.config",
    "spatial_attention.apps.training.model",
    "spatial_attention.apps.training.reporting",
    "spatial_attention.apps.training.distributed",
    "spatial_attention.apps.training.cli",
))

if __name__ == "__main__":
    import sys

    from .apps.training.cli import main

    sys.exit(main())
