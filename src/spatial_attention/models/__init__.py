"""Whole networks from the papers, built only from ``layers/``, behind a factory.

>>> from spatial_attention.models import create_model, list_models
"""

from __future__ import annotations

from collections.abc import Callable
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


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build registered model ``name``; unknown names list the closest ones."""
    return model_info(name).builder(**kwargs)


def list_models() -> list[str]:
    _ensure_loaded()
    return sorted(_MODELS)
