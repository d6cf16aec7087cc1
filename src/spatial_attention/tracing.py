"""Whether the current call is being traced into a graph, and for what.

Two questions the layers ask, answered once here:

* :func:`building_graph`: ``torch.compile`` or ``torch.jit.trace`` is recording the
  call, so Python-side caches (index layouts keyed by map size) must not be read or
  written: the graph has to compute them itself.
* :func:`exporting_graph`: the call is being turned into an inference graph (``torch.jit``
  tracing, ONNX export, ``torch.export``), so custom autograd functions, which those
  exporters cannot represent, give way to the plain ops they stand for.
"""

from __future__ import annotations

import torch

__all__ = ["building_graph", "exporting_graph"]


def building_graph() -> bool:
    """True under ``torch.compile`` (dynamo) or ``torch.jit`` tracing."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def exporting_graph() -> bool:
    """True under ``torch.jit`` tracing, ONNX export or ``torch.export``."""
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)()
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or exporting
