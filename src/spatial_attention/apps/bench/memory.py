"""Peak tensor memory of one step, on CPU as well as on CUDA.

CUDA has an allocator that keeps score (``torch.cuda.max_memory_allocated``); the CPU
has none. :class:`TensorMemoryTracker` fills the gap: a ``TorchDispatchMode`` that sees
every tensor an aten op returns, adds the bytes of each storage it has not seen before
and takes them off again when that storage is freed (a weak reference's callback).
Views, in-place ops and ``detach`` return a storage the op was given, so they cost
nothing, exactly as on the device.

What it counts is live *tensor storage*: the activations autograd saves, outputs,
gradients, autocast's casted weights. It does not see scratch memory a kernel allocates
inside itself (below the dispatcher), allocator overhead or fragmentation, nor anything
outside PyTorch; it is not the process's resident set size (RSS).

>>> with TensorMemoryTracker() as mem:
...     loss = model(x).sum()
...     loss.backward()
>>> mem.peak_bytes
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["TensorMemoryTracker", "storage_bytes", "peak_memory_bytes"]


def _storage(t: Tensor) -> torch.UntypedStorage | None:
    """The storage behind a dense tensor with real memory; None for meta, sparse, etc."""
    if t.is_meta or t.layout != torch.strided:
        return None
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
        return None


def storage_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (aliases counted once)."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        st = _storage(t) if isinstance(t, Tensor) else None
        if st is not None:
            seen.setdefault((str(st.device), st.data_ptr() or id(st)), st.nbytes())
    return sum(seen.values())


class TensorMemoryTracker(TorchDispatchMode):
    """Live and peak bytes of the tensor storages created while the mode is active.

    ``current_bytes`` goes up by a storage's ``nbytes`` when an op first returns it and
    down when the storage is freed; ``peak_bytes`` is the highest ``current_bytes``
    seen. Storages that existed before (parameters, inputs) cost nothing unless passed
    to :meth:`add_existing`, which counts them from then on. The callbacks that count
    frees are detached on exit, so the numbers stay as they were at the end of the block.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current_bytes = 0
        self.peak_bytes = 0
        self._known: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._finalizers: list[weakref.finalize] = []

    # -- bookkeeping -----------------------------------------------------------------
    def _free(self, nbytes: int) -> None:
        self.current_bytes -= nbytes

    def _count(self, st: torch.UntypedStorage) -> None:
        nbytes = st.nbytes()
        self._known[st] = nbytes
        self._finalizers.append(weakref.finalize(st, self._free, nbytes))
        self.current_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)

    def add_existing(self, tensors: Iterable[Tensor]) -> None:
        """Count the storages of ``tensors`` as live (each distinct storage once)."""
        for t in tensors:
            st = _storage(t) if isinstance(t, Tensor) else None
            if st is not None and st not in self._known:
                self._count(st)

    # -- the mode ----------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # An output that shares a storage with an input (a view, an in-place or out=
        # op, detach) allocated nothing, whether or not that storage is known.
        given = {
            id(st)
            for t in tree_leaves((args, kwargs))
            if isinstance(t, Tensor) and (st := _storage(t)) is not None
        }
        for t in tree_leaves(out):
            if not isinstance(t, Tensor):
                continue
            st = _storage(t)
            if st is None or id(st) in given or st in self._known:
                continue
            self._count(st)
        return out

    def __exit__(self, *exc: Any) -> Any:
        try:
            return super().__exit__(*exc)
        finally:
            for fin in self._finalizers:
                fin.detach()
            self._finalizers.clear()


def peak_memory_bytes(
    step: Callable[[], Any], device: torch.device | str, existing: Iterable[Tensor] = ()
) -> int:
    """Peak bytes of one call of ``step``, the storages of ``existing`` included.

    ``existing`` is what lives before and during the step (parameters, buffers,
    inputs): counted once each, whatever the device. On CUDA the rest is
    ``max_memory_allocated`` above what was allocated just before the step (caching
    allocator blocks, rounded to 512 bytes); elsewhere it is the
    :class:`TensorMemoryTracker` peak of the storages the step creates.
    """
    device = torch.device(device)
    existing = list(existing)
    static = storage_bytes(existing)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = step()
        torch.cuda.synchronize(device)
        del result
        return static + torch.cuda.max_memory_allocated(device) - before
    with TensorMemoryTracker() as tracker:
        result = step()
        del result
    return static + tracker.peak_bytes
