"""Test-only: make a CUDA build of torchvision importable on a CPU-only torch.

The only torchvision wheel for torch 2.13.0 on the package index is a CUDA build. On a
machine with the CPU build of torch its compiled extension (``torchvision/_C``) does not
load, and ``import torchvision`` then dies in ``_meta_registrations`` with "operator
torchvision::nms does not exist". timm and Ultralytics both import torchvision, and
Ultralytics runs ``torchvision.ops.nms`` in every prediction once torchvision is imported.

:func:`install` checks whether the extension loads; if it does not, it defines the two
operators torchvision registers fake kernels for at import (``nms`` and ``qnms``) with
plain-PyTorch CPU kernels, imports torchvision, and lets ``torchvision.ops.nms`` through its
"has compiled ops" check. Everything else in ``torchvision.ops`` that needs the extension
(``roi_align`` and friends) still fails with torchvision's own message.

This lives under tests/ on purpose: the library never imports it. Import it before
anything imports torchvision (timm, ultralytics).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

import torch

__all__ = ["install", "nms_reference", "SHIMMED"]

#: True once :func:`install` had to provide the fallback operators
SHIMMED = False
_LIB = None  # keeps the torch.library registration alive


def nms_reference(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression with torchvision's semantics, in plain PyTorch.

    ``boxes`` is ``(N, 4)`` as ``(x1, y1, x2, y2)``, ``scores`` is ``(N,)``. Returns the int64
    indices of the kept boxes in decreasing score order; a box is dropped when its IoU with
    an already kept box is strictly greater than ``iou_threshold``. Cost: O(N * K) for K kept
    boxes, never an N x N matrix (Ultralytics may pass tens of thousands of candidates).
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    boxes = boxes.float()
    order = torch.argsort(scores.float(), descending=True, stable=True)
    x1, y1, x2, y2 = boxes[order].unbind(1)
    areas = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    alive = torch.arange(order.numel(), device=boxes.device)
    keep = []
    while alive.numel():
        i, rest = alive[0], alive[1:]
        keep.append(i)
        w = (torch.minimum(x2[i], x2[rest]) - torch.maximum(x1[i], x1[rest])).clamp(min=0)
        h = (torch.minimum(y2[i], y2[rest]) - torch.maximum(y1[i], y1[rest])).clamp(min=0)
        inter = w * h
        iou = inter / (areas[i] + areas[rest] - inter)
        # NaN (two empty boxes) compares False: both are kept, as torchvision does
        alive = rest[~(iou > iou_threshold)]
    return order[torch.stack(keep)]


def _extension_loads(package_dir: Path) -> bool:
    finder = importlib.machinery.FileFinder(
        str(package_dir),
        (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES),
    )
    spec = finder.find_spec("_C")
    if spec is None or spec.origin is None:
        return False
    try:
        torch.ops.load_library(spec.origin)
    except (OSError, RuntimeError):
        return False
    return True


def _define_fallbacks() -> None:
    global _LIB
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")

    def qnms(dets, scores, iou_threshold):
        return nms_reference(dets.dequantize(), scores.dequantize(), iou_threshold)

    for key in ("CPU", "CUDA"):  # CUDA: a GPU torch with a broken torchvision, same story
        lib.impl("nms", nms_reference, key)
    lib.impl("qnms", qnms, "QuantizedCPU")
    _LIB = lib


def install() -> bool:
    """Make ``import torchvision`` work; True if the fallbacks were needed.

    A no-op when torchvision is not installed, is already imported, or its compiled
    extension loads (a matching CPU build): then the real operators are used.
    """
    global SHIMMED
    if SHIMMED or "torchvision" in sys.modules:
        return SHIMMED
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    if _extension_loads(Path(next(iter(spec.submodule_search_locations)))):
        return False
    if not hasattr(torch.ops.torchvision, "nms"):
        _define_fallbacks()
    import torchvision.ops.boxes

    # nms / batched_nms refuse to run without the compiled extension; ours is registered
    torchvision.ops.boxes._assert_has_ops = lambda: None
    SHIMMED = True
    return True


install()
