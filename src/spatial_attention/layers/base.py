"""The base class of every registered mechanism: fast/explicit switch and capture.

A mechanism subclasses :class:`AttentionModule` and

* sets ``layout`` (``"map"``, ``"tokens"``, ``"sequence"`` or ``"clip"``),
* reads ``self.use_fused`` to choose its fused or explicit path,
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

Recorder = Callable[[nn.Module, Tensor], None]


class AttentionModule(nn.Module):
    """Base class of all mechanisms. Not registered itself."""

    layout: ClassVar[str] = "map"
    registered_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        super().__init__()
        #: run the fused kernels (True) or the explicit paper math (False)
        self.fused: bool = True
        self._recorder: Recorder | None = None

    # -- fast / explicit ---------------------------------------------------------
    @property
    def capturing(self) -> bool:
        return self._recorder is not None

    @property
    def use_fused(self) -> bool:
        """Fused unless switched off or capturing (capture needs the weights)."""
        return self.fused and self._recorder is None

    def record(self, weights: Tensor) -> None:
        """Hand ``weights`` to an active :func:`capture_attention`; no-op otherwise."""
        if self._recorder is not None:
            self._recorder(self, weights.detach())

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
