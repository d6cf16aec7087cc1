"""timm: any map mechanism as the ``attn_layer`` of a timm model.

>>> import timm
>>> from spatial_attention.integrations.timm import attn_layer
>>> model = timm.create_model("resnet50", block_args=dict(attn_layer=attn_layer("eca")))

timm resolves ``attn_layer`` with ``timm.layers.get_attn``: a string is looked up in
timm's *own* table (``"se"``, ``"eca"``, ``"cbam"`` there are timm's modules, not ours, and
an unknown string fails an assert), while any other callable is used as it is and called
as ``attn_layer(channels, **kwargs)``. So this module hands timm a callable object,
:class:`AttnLayer`, that builds a registered map mechanism (layout ``"map"``, first
constructor argument ``channels``) for the channel count timm asks for.

What timm passes besides the channels:

* ``device`` / ``dtype`` (every model, timm >= 1.0.20): the mechanism is built under that
  device and cast to that dtype, as timm's own layers are.
* model-specific hints (``act_layer`` from EfficientNet / CSPNet blocks, ``rd_ratio`` from
  EfficientNet's ``se_ratio``): forwarded when the mechanism's constructor takes an
  argument of that name; otherwise a ``TypeError`` names the mechanism and the argument
  (timm's EfficientNet builder probes with ``rd_ratio`` and catches ``TypeError``). Pass
  ``ignore=("act_layer",)`` to drop hints on purpose.

timm itself is not imported here: the callable is plain Python and pickles.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..registry import create, info, list_mechanisms

__all__ = ["AttnLayer", "attn_layer", "compatible_mechanisms", "frame_map_problem"]


@functools.cache
def _example_shape(name: str, cls: type) -> tuple[int, ...] | None:
    """The shape of the input mechanism ``name`` declares typical (``AttentionModule.example``)."""
    try:
        with torch.random.fork_rng(devices=[]):
            _, inputs = cls.example(name, 1, 64, (8, 8))
    except Exception:  # a mechanism that cannot build its own example is no drop-in
        return None
    return tuple(inputs[0].shape) if len(inputs) == 1 else None


def frame_map_problem(name: str) -> str | None:
    """Why map mechanism ``name`` cannot sit between two convolutions, or None if it can.

    A drop-in needs layout ``"map"`` *and* a single ``(B, C, H, W)`` input: the temporal
    mechanisms are map mechanisms over clips ``(B, T, C, H, W)`` and are refused.
    """
    entry = info(name)
    if entry.layout != "map":
        return f"{name!r} is a {entry.layout!r} mechanism"
    shape = _example_shape(name, entry.cls)
    if shape is None or len(shape) != 4:
        got = f"shape {shape}" if shape else "an input it cannot build"
        return f"{name!r} takes {got} in its example, not one (B, C, H, W) map"
    return None


def compatible_mechanisms() -> list[str]:
    """Registered names usable as a timm ``attn_layer`` (or a YOLO layer): the map
    mechanisms that take and return one ``(B, C, H, W)`` map."""
    return [n for n in list_mechanisms(layout="map") if frame_map_problem(n) is None]


def _parameters(cls: type) -> tuple[set[str], bool]:
    """Keyword names ``cls.__init__`` accepts after ``channels``, and whether it takes ``**kw``."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]  # drop self
    names = {
        p.name
        for p in params[1:]  # drop channels
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


class AttnLayer:
    """A callable ``channels -> nn.Module`` building map mechanism ``name`` for timm.

    ``kwargs`` are the mechanism's constructor arguments after ``channels`` (checked
    here, so a typo fails when the model is configured, not deep inside timm). ``ignore``
    names keyword arguments timm may pass that should be dropped rather than refused.
    """

    def __init__(self, name: str, *, ignore: Iterable[str] = (), **kwargs: Any) -> None:
        entry = info(name)  # unknown names: ValueError with the closest ones
        problem = frame_map_problem(name)
        if problem:
            raise ValueError(
                f"timm attn_layer: {problem}; timm's attn_layer takes and returns "
                f"(B, C, H, W), so it needs a 'map' mechanism, one of {compatible_mechanisms()}"
            )
        accepted, var_kw = _parameters(entry.cls)
        unknown = sorted(set(kwargs) - accepted)
        if unknown and not var_kw:
            raise TypeError(
                f"timm attn_layer: {name!r} takes no argument {', '.join(map(repr, unknown))}; "
                f"its signature is {name}{entry.signature}"
            )
        self.name = name
        self.kwargs = dict(kwargs)
        self.ignore = tuple(ignore)

    def __call__(
        self,
        channels: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **hints: Any,
    ) -> nn.Module:
        entry = info(self.name)
        accepted, var_kw = _parameters(entry.cls)
        kwargs = dict(self.kwargs)
        for key, value in hints.items():
            if key in self.ignore or key in kwargs:  # what the user set wins over timm's hints
                continue
            if key not in accepted and not var_kw:
                raise TypeError(
                    f"timm attn_layer: the model passed {key}={value!r} but {self.name!r} takes "
                    f"no such argument ({self.name}{entry.signature}); use "
                    f"attn_layer({self.name!r}, ignore=({key!r},)) to drop it"
                )
            kwargs[key] = value
        if device is not None:
            with torch.device(device):
                module = create(self.name, channels, **kwargs)
        else:
            module = create(self.name, channels, **kwargs)
        return module.to(dtype=dtype) if dtype is not None else module

    def __repr__(self) -> str:
        args = [repr(self.name)] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        if self.ignore:
            args.append(f"ignore={self.ignore!r}")
        return f"attn_layer({', '.join(args)})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AttnLayer):
            return NotImplemented
        return (self.name, self.kwargs, self.ignore) == (other.name, other.kwargs, other.ignore)

    def __hash__(self) -> int:
        return hash((self.name, tuple(sorted(self.kwargs)), self.ignore))


def attn_layer(name: str, *, ignore: Iterable[str] = (), **kwargs: Any) -> AttnLayer:
    """What timm's ``attn_layer`` / ``se_layer`` accepts, building map mechanism ``name``.

    >>> model = timm.create_model(
    ...     "resnet50", block_args=dict(attn_layer=attn_layer("se", reduction=8)))

    ``kwargs`` go to the mechanism after ``channels``; see the module doc for what timm
    passes itself and for ``ignore``.
    """
    return AttnLayer(name, ignore=ignore, **kwargs)
