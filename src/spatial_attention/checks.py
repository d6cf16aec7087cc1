"""Input validation shared by every mechanism: a clear ValueError before any compute.

Messages name the mechanism, what it expected and what it got, so users never meet a
bare shape error from deep inside ``view``.
"""

from __future__ import annotations

from torch import Tensor

_LAYOUT_AXES = {
    "map": "(B, C, H, W)",
    "tokens": "(B, H, W, C)",
    "sequence": "(B, N, C)",
    "clip": "(B, T, C, H, W)",
}
_RANK = {"map": 4, "tokens": 4, "sequence": 3, "clip": 5}


def check_rank(name: str, x: Tensor, rank: int, axes: str) -> None:
    if not hasattr(x, "dim"):
        raise ValueError(f"{name}: expected a tensor {axes}, got {type(x).__name__}")
    if x.dim() != rank:
        raise ValueError(
            f"{name}: expected a {rank}-D tensor {axes}, got shape {tuple(x.shape)}"
        )


def check_layout(name: str, x: Tensor, layout: str, channels: int | None = None) -> None:
    """Rank and channel count of ``x`` for one of the registry's layouts."""
    axes = _LAYOUT_AXES[layout]
    rank = _RANK[layout]
    check_rank(name, x, rank, axes)
    if channels is not None:
        axis = {"map": 1, "clip": 2}.get(layout, -1)
        got = x.shape[axis]
        if got != channels:
            where = f"dim {axis}" if axis > 0 else "the last dim"
            raise ValueError(
                f"{name}: expected {channels} channels in {where} of {axes}, got shape "
                f"{tuple(x.shape)}"
                + (" (is the input channels-last (B, H, W, C)?)" if layout == "map" else "")
                + (" (is the input (B, C, H, W)? token mixers take (B, H, W, C))"
                   if layout == "tokens" and x.shape[1] == channels else "")
            )
    if any(s == 0 for s in x.shape):
        raise ValueError(f"{name}: got an empty tensor of shape {tuple(x.shape)}")


def check_positive(name: str, **values: float) -> None:
    for key, value in values.items():
        if not value > 0:
            raise ValueError(f"{name}: {key} must be positive, got {value!r}")


def check_divisible(name: str, dim: int, num_heads: int) -> None:
    check_positive(name, dim=dim, num_heads=num_heads)
    if dim % num_heads:
        raise ValueError(f"{name}: dim {dim} is not divisible by num_heads {num_heads}")


def check_probability(name: str, **values: float) -> None:
    for key, value in values.items():
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name}: {key} must be in [0, 1), got {value!r}")
