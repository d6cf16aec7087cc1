"""The base class of every registered mechanism: fast/explicit switch and capture.

A mechanism subclasses :class:`AttentionModule` and

* sets ``layout`` (``"map"``, ``"tokens"``, ``"sequence"`` or ``"clip"``),
* takes ``attn_impl`` in its constructor and lists what it offers in ``attn_impls``
  (``"auto"`` and ``"explicit"`` always; ``"sdpa"``, ``"kept_probs"``, ``"flex"`` where
  its attention runs through :func:`~spatial_attention.functional.attention`); its
  forward reads ``self.impl`` (``"explicit"`` runs the paper's math plainly) and hands
  it to the functional it calls,
* calls ``self.record(weights)`` with what it attends with (attention matrix, spatial
  map, channel weights, cluster assignment). ``record`` is free when nothing captures,
  and capturing switches the module to its explicit path (see ``capture.py``),
* may override :meth:`example` (the input the benchmarks feed it) and
  :meth:`spatial_map` (how a record becomes an ``(B, H, W)`` map for overlays).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..checks import check_dtype_matches, check_layout
from ..functional.dispatch import ATTN_IMPLS, deprecated_switch, get_attn_impl

Recorder = Callable[[nn.Module, Tensor], None]


class AttentionModule(nn.Module):
    """Base class of all mechanisms. Not registered itself."""

    layout: ClassVar[str] = "map"
    registered_names: ClassVar[tuple[str, ...]] = ()
    #: the implementations this mechanism offers under ``attn_impl``
    attn_impls: ClassVar[tuple[str, ...]] = ("auto", "explicit")
    #: what ``"auto"`` means for this mechanism (``"auto"``: the dispatcher decides per call)
    auto_impl: ClassVar[str] = "auto"

    def __init__(self, attn_impl: str | None = None) -> None:
        super().__init__()
        self._recorder: Recorder | None = None
        self.attn_impl = attn_impl

    # -- the kernel switch ---------------------------------------------------------
    @property
    def attn_impl(self) -> str | None:
        """This module's choice; None follows the process default
        (:func:`~spatial_attention.functional.set_attn_impl`, ``SA_ATTN_IMPL``)."""
        return self.__dict__["_attn_impl"]

    @attn_impl.setter
    def attn_impl(self, impl: str | None) -> None:
        if impl is not None and impl not in type(self).attn_impls:
            known = "" if impl in ATTN_IMPLS else " (unknown)"
            raise ValueError(f"{self.mechanism_name}: attn_impl {impl!r}{known} is not offered; "
                             f"expected one of {', '.join(type(self).attn_impls)} or None")
        self.__dict__["_attn_impl"] = impl

    @property
    def impl(self) -> str:
        """The implementation the next call runs: ``"explicit"`` while capturing (the
        weights are needed), else the module's or the process's choice, where offered."""
        if self._recorder is not None:
            return "explicit"
        impl = self.__dict__["_attn_impl"] or get_attn_impl()
        if impl not in type(self).attn_impls:
            impl = "auto"  # a process default this mechanism does not offer
        return type(self).auto_impl if impl == "auto" else impl

    @property
    def capturing(self) -> bool:
        return self._recorder is not None

    @property
    def use_fused(self) -> bool:
        """Any path but the explicit one."""
        return self.impl != "explicit"

    @property
    def fused(self) -> bool:
        """Deprecated: ``attn_impl="explicit"`` is ``fused=False``."""
        return (self.__dict__["_attn_impl"] or get_attn_impl()) != "explicit"

    @fused.setter
    def fused(self, value: bool) -> None:
        deprecated_switch("the fused attribute", 'attn_impl ("auto" or "explicit")')
        self.attn_impl = None if value else "explicit"

    def extra_repr(self) -> str:
        return f"attn_impl={self.__dict__['_attn_impl'] or get_attn_impl()}"

    def record(self, weights: Tensor) -> None:
        """Hand ``weights`` to an active :func:`capture_attention`; no-op otherwise."""
        if self._recorder is not None:
            self._recorder(self, weights)  # the recorder detaches unless asked not to

    # -- validation ----------------------------------------------------------------
    @property
    def mechanism_name(self) -> str:
        chosen = self.__dict__.get("registered_name")
        if chosen:
            return chosen
        names = type(self).registered_names
        # decorators run bottom-up: the first name registered is the class's primary one
        return names[0] if names else type(self).__name__

    def check_input(self, x: Tensor, channels: int | None = None) -> None:
        """Rank, channels and dtype of ``x`` for this module's layout, as a clear ValueError."""
        check_layout(self.mechanism_name, x, self.layout, channels)
        check_dtype_matches(self.mechanism_name, x, self)

    # -- benchmarks and visualisation ------------------------------------------------
    @classmethod
    def example(
        cls, name: str, batch: int, channels: int, size: tuple[int, int], **kwargs: Any
    ) -> tuple[nn.Module, tuple[Tensor, ...]]:
        """A module built from registry ``name`` and an input typical for it.

        Map mechanisms get ``(B, C, H, W)``; token mixers ``(B, H, W, C)`` with
        ``num_heads = max(1, C // 32)``; sequence mechanisms ``(B, H*W, C)``.
        """
        from ..registry import create

        H, W = size
        if cls.layout == "map":
            return create(name, channels, **kwargs), (torch.randn(batch, channels, H, W),)
        if cls.layout == "tokens":
            kwargs.setdefault("num_heads", max(1, channels // 32))
            return create(name, channels, **kwargs), (torch.randn(batch, H, W, channels),)
        return create(name, channels, **kwargs), (torch.randn(batch, H * W, channels),)

    @classmethod
    def spatial_map(cls, weights: Tensor, size: tuple[int, int]) -> Tensor:
        """Turn one recorded tensor into a ``(B, H, W)`` map of where attention goes.

        Default: a map attention record ``(B, 1|C, H, W)`` is averaged over channels; an
        attention matrix ``(B, *, Q, K)`` with ``K == H * W`` becomes the attention each
        key receives, averaged over heads and queries.
        """
        H, W = size
        if weights.dim() == 4 and weights.shape[-2:] == (H, W):
            return weights.float().mean(1)
        if weights.shape[-1] == H * W:
            received = weights.float().reshape(weights.shape[0], -1, H * W).mean(1)
            return received.reshape(-1, H, W)
        raise ValueError(
            f"{cls.__name__}: cannot turn a record of shape {tuple(weights.shape)} into a "
            f"{H}x{W} map"
        )
