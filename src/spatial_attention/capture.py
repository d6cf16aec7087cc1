"""Recording what attention mechanisms attend with, from any model.

>>> with capture_attention(model) as maps:
...     model(x)
>>> maps["blocks.0.attn"].shape     # the weights of that module's last call

Every :class:`~spatial_attention.layers.base.AttentionModule` inside ``model`` (the
model itself included) is switched to its explicit path for the duration of the block
and hands its weights to the recorder: attention matrices ``(B, heads, Q, K)``, spatial
maps ``(B, 1, H, W)``, channel weights ``(B, C, 1, 1)``, cluster assignments; each
mechanism's docstring says which. Nothing is recorded outside the block, and no hook or
recorder remains on any module after it, even if the block raises.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from .layers.base import AttentionModule

__all__ = ["AttentionMaps", "capture_attention", "explicit_path", "attention_modules"]


class AttentionMaps(dict):
    """``module name -> tensor`` of the latest call; :meth:`calls` keeps every call.

    The model itself, when it is a mechanism, is recorded under the name ``""``.
    """

    def __init__(self) -> None:
        super().__init__()
        self._history: dict[str, list[Tensor]] = {}

    def _add(self, name: str, weights: Tensor) -> None:
        self._history.setdefault(name, []).append(weights)
        self[name] = weights

    def calls(self, name: str) -> list[Tensor]:
        """Every tensor ``name`` recorded, in call order (a module may run twice)."""
        return list(self._history.get(name, []))


def attention_modules(model: nn.Module) -> list[tuple[str, AttentionModule]]:
    """``(name, module)`` of every mechanism inside ``model``, in registration order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AttentionModule)]


@contextmanager
def capture_attention(model: nn.Module) -> Iterator[AttentionMaps]:
    """Record every mechanism's attention weights while the block runs (see module doc)."""
    maps = AttentionMaps()
    modules = attention_modules(model)
    if not modules:
        raise ValueError(
            f"capture_attention: {type(model).__name__} contains no spatial_attention "
            "mechanism to record"
        )
    names = {id(m): n for n, m in modules}

    def recorder(module: nn.Module, weights: Tensor) -> None:
        maps._add(names[id(module)], weights)

    previous = [(m, m._recorder) for _, m in modules]
    try:
        for _, m in modules:
            m._recorder = recorder
        yield maps
    finally:
        for m, rec in previous:
            m._recorder = rec


@contextmanager
def explicit_path(model: nn.Module, explicit: bool = True) -> Iterator[nn.Module]:
    """Run every mechanism in ``model`` on its explicit (``explicit=True``) or fused path."""
    modules = attention_modules(model)
    previous = [(m, m.attn_impl) for _, m in modules]
    try:
        for _, m in modules:
            own = m.attn_impl
            m.attn_impl = "explicit" if explicit else (own if own not in (None, "explicit")
                                                       else "auto")
        yield model
    finally:
        for m, impl in previous:
            m.attn_impl = impl
