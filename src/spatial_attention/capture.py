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

Foreign attention modules are recorded too: any module with a boolean ``fused_attn``
switch and an ``attn_drop`` child (timm's ``Attention``, Swin's ``WindowAttention`` and
their relatives) runs its explicit path in the block, and the matrix leaving its
``attn_drop`` is recorded, ``(B, heads, N, N)`` (``(B * windows, heads, N, N)`` for
windowed ones). ``keep_grad=True`` records the tensors still attached to the graph, so
a backward pass can reach them (see :mod:`spatial_attention.explain`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from .layers.base import AttentionModule

__all__ = ["AttentionMaps", "capture_attention", "explicit_path", "attention_modules",
           "foreign_attention_modules"]


class AttentionMaps(dict):
    """``module name -> tensor`` of the latest call; :meth:`calls` keeps every call.

    The model itself, when it is a mechanism, is recorded under the name ``""``.
    """

    def __init__(self) -> None:
        super().__init__()
        self._history: dict[str, list[Tensor]] = {}
        self._order: list[tuple[str, Tensor]] = []

    def _add(self, name: str, weights: Tensor) -> None:
        self._history.setdefault(name, []).append(weights)
        self._order.append((name, weights))
        self[name] = weights

    def in_order(self) -> list[tuple[str, Tensor]]:
        """Every ``(name, tensor)`` recorded, in the order the calls happened."""
        return list(self._order)

    def calls(self, name: str) -> list[Tensor]:
        """Every tensor ``name`` recorded, in call order (a module may run twice)."""
        return list(self._history.get(name, []))


def attention_modules(model: nn.Module) -> list[tuple[str, AttentionModule]]:
    """``(name, module)`` of every mechanism inside ``model``, in registration order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AttentionModule)]


def foreign_attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every timm-style attention module inside ``model``: one with a
    boolean ``fused_attn`` attribute and an ``attn_drop`` child module."""
    return [(n, m) for n, m in model.named_modules()
            if not isinstance(m, AttentionModule)
            and isinstance(getattr(m, "fused_attn", None), bool)
            and isinstance(getattr(m, "attn_drop", None), nn.Module)]


@contextmanager
def capture_attention(model: nn.Module, *, keep_grad: bool = False) -> Iterator[AttentionMaps]:
    """Record every mechanism's attention weights while the block runs (see module doc)."""
    maps = AttentionMaps()
    modules = attention_modules(model)
    foreign = foreign_attention_modules(model)
    if not modules and not foreign:
        raise ValueError(
            f"capture_attention: {type(model).__name__} contains no spatial_attention "
            "mechanism and no timm-style attention module (fused_attn + attn_drop) to record"
        )
    names = {id(m): n for n, m in modules}

    def keep(weights: Tensor) -> Tensor:
        return weights if keep_grad else weights.detach()

    def recorder(module: nn.Module, weights: Tensor) -> None:
        maps._add(names[id(module)], keep(weights))

    def foreign_hook(name: str):
        def hook(_module: nn.Module, _inputs, output) -> None:
            if isinstance(output, Tensor):
                maps._add(name, keep(output))
        return hook

    previous = [(m, m._recorder) for _, m in modules]
    switches = [(m, m.fused_attn) for _, m in foreign]
    handles = []
    try:
        for _, m in modules:
            m._recorder = recorder
        for name, m in foreign:
            m.fused_attn = False  # the explicit path is the one that forms the matrix
            handles.append(m.attn_drop.register_forward_hook(foreign_hook(name)))
        yield maps
    finally:
        for m, rec in previous:
            m._recorder = rec
        for m, fused in switches:
            m.fused_attn = fused
        for h in handles:
            h.remove()


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
