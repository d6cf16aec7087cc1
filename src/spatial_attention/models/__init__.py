"""Whole networks from the papers, built only from ``layers/``, behind a factory.

>>> from spatial_attention.models import create_model, list_models
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..registry import canonical, unknown_name_error

__all__ = ["register_model", "create_model", "list_models", "model_info", "ModelInfo"]


@dataclass(frozen=True)
class ModelInfo:
    name: str
    builder: Callable[..., nn.Module]
    paper: str
    year: int | None
    family: str
    summary: str


_MODELS: dict[str, ModelInfo] = {}


def register_model(
    name: str, *, paper: str, year: int | None = None, family: str = "classification"
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a builder function ``(**kwargs) -> nn.Module`` under ``name``."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS and _MODELS[name].builder is not fn:
            raise ValueError(f"model {name!r} is already registered")
        doc = (fn.__doc__ or "").strip().splitlines()
        _MODELS[name] = ModelInfo(name, fn, paper, year, family, doc[0] if doc else "")
        return fn

    return deco


def _ensure_loaded() -> None:
    import importlib
    import pkgutil

    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")


def model_info(name: str) -> ModelInfo:
    _ensure_loaded()
    try:
        return _MODELS[name if name in _MODELS else canonical(name)]
    except (KeyError, TypeError):
        raise unknown_name_error("model", str(name), sorted(_MODELS)) from None


def create_model(
    name: str,
    *,
    features_only: bool = False,
    out_indices: int | Sequence[int] | None = None,
    feature_norm: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Build registered model ``name``; unknown names list the closest ones.

    ``features_only=True`` returns a :class:`~.features.FeatureNet`, as timm does: its
    forward gives the list of feature maps ``(B, C, H, W)`` at ``out_indices`` (None: every
    level; an int n: the last n; negatives from the end) and its ``feature_info`` says
    their channels and strides; ``feature_norm`` applies the model's final norm where
    timm's ``forward_intermediates(norm=True)`` would. Everything else goes to the model,
    ``device=`` and ``dtype=`` included.
    """
    entry = model_info(name)
    if not features_only and (out_indices is not None or feature_norm):
        raise ValueError(f"{entry.name}: out_indices and feature_norm need features_only=True")
    model = entry.builder(**kwargs)
    if not features_only:
        return model
    if not hasattr(model, "forward_intermediates"):
        raise ValueError(
            f"{entry.name}: features_only needs a backbone with feature levels "
            f"(forward_intermediates); {type(model).__name__} has none"
        )
    from .features import FeatureNet

    return FeatureNet(model, out_indices, norm=feature_norm)


def list_models() -> list[str]:
    _ensure_loaded()
    return sorted(_MODELS)
