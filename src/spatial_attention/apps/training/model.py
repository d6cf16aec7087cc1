"""The network a classifier run trains: a registered model or timm's, a mechanism inside."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from ...errors import UsageError


def build_model(
    name: str,
    num_classes: int,
    attn: str | None = None,
    img_size: int = 32,
    model_args: dict[str, Any] | None = None,
) -> nn.Module:
    """A registered model (or ``timm:NAME``) for ``num_classes`` classes, ``attn`` inside."""
    kwargs = dict(model_args or {})
    if name.startswith("timm:"):
        try:
            import timm
        except ImportError:
            raise UsageError(
                f"--model {name}: timm is not installed; pip install spatial-attention[timm]"
            ) from None
        except Exception as exc:  # a broken install (e.g. a mismatched torchvision)
            raise UsageError(
                f"--model {name}: timm failed to import ({type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); "
                "reinstall it with pip install spatial-attention[timm]"
            ) from None
        if attn is not None:
            # timm's ResNet family takes attn_layer through block_args (see
            # integrations/timm.py); other timm models refuse it with a TypeError.
            from ...integrations.timm import attn_layer

            block_args = dict(kwargs.pop("block_args", {}) or {})
            block_args["attn_layer"] = attn_layer(attn)
            kwargs["block_args"] = block_args
        try:
            # pretrained=False: nothing is downloaded
            return timm.create_model(
                name[5:], pretrained=False, num_classes=num_classes, **kwargs
            )
        except TypeError as exc:
            raise UsageError(
                f"--model {name}: timm could not build it with {sorted(kwargs)} ({exc}); "
                "--attn works with timm's ResNet family (block_args=dict(attn_layer=...))"
            ) from None
    from ...models import model_info

    try:
        builder = model_info(name).builder
    except ValueError as exc:
        raise UsageError(f"--model: {exc}") from None
    params = inspect.signature(builder).parameters
    if "img_size" in params:
        kwargs.setdefault("img_size", img_size)
    kwargs["num_classes"] = num_classes
    if attn is not None:
        kwargs["attn_layer"] = attn
    try:
        return builder(**kwargs)
    except TypeError as exc:
        raise UsageError(f"--model {name}: {exc} (check --attn / --model-arg)") from None
    except ValueError as exc:
        raise UsageError(f"--model {name}: {exc}") from None
