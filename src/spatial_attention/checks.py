"""Input validation shared by every mechanism: a clear ValueError before any compute.

Messages name the mechanism, what it expected and what it got, so users never meet a
bare shape error from deep inside ``view``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

#: the tensor layouts a mechanism may take, by registry name: axes as written in messages
LAYOUTS = {
    "map": "(B, C, H, W)",
    "tokens": "(B, H, W, C)",
    "sequence": "(B, N, C)",
    "clip": "(B, T, C, H, W)",
}
_RANK = {name: axes.count(",") + 1 for name, axes in LAYOUTS.items()}


def check_rank(name: str, x: Tensor, rank: int, axes: str) -> None:
    if not hasattr(x, "dim"):
        raise ValueError(f"{name}: expected a tensor {axes}, got {type(x).__name__}")
    if x.dim() != rank:
        raise ValueError(
            f"{name}: expected a {rank}-D tensor {axes}, got shape {tuple(x.shape)}"
        )


def check_layout(name: str, x: Tensor, layout: str, channels: int | None = None) -> None:
    """Rank and channel count of ``x`` for one of the registry's layouts."""
    axes = LAYOUTS[layout]
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
    check_floating(name, x)
    if any(s == 0 for s in x.shape):
        raise ValueError(f"{name}: got an empty tensor of shape {tuple(x.shape)}")


def check_floating(name: str, x: Tensor, what: str = "input") -> None:
    """Attention is real arithmetic: integer, bool and complex tensors are refused."""
    if not x.is_floating_point():
        raise ValueError(
            f"{name}: expected a floating-point {what} (float32, float64, bfloat16 or "
            f"float16), got dtype {x.dtype}"
        )


def check_dtype_matches(name: str, x: Tensor, module: nn.Module) -> None:
    """An input whose float dtype differs from the parameters' outside autocast.

    Torch would fail later with "mat1 and mat2 must have the same dtype" (or silently
    promote); the message here says what to do instead. Under autocast the mix is
    intended, and parameter-free modules take any float dtype.
    """
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return
    for p in module.parameters():
        if p.is_floating_point():
            if p.dtype != x.dtype:
                raise ValueError(
                    f"{name}: input dtype {x.dtype} differs from the parameters' {p.dtype}; "
                    f"convert the module (.to({x.dtype})) or the input (.to({p.dtype})), "
                    "or run under torch.autocast"
                )
            return


def check_valid_lens(
    name: str,
    valid_lens: Tensor | Sequence[int] | None,
    batch: int,
    num_keys: int,
    num_queries: int | None = None,
    device: torch.device | None = None,
) -> Tensor | None:
    """Validate ``valid_lens`` and return it as an integer tensor (or None).

    Accepts a tensor, list or tuple of shape ``(batch,)`` (or ``(batch, num_queries)``
    when ``num_queries`` is given). Lengths must be integers in ``[0, num_keys]``.
    The value check reads the tensor back to the host, so it is skipped while a graph
    is being traced (compile, export), where it would break the graph.
    """
    if valid_lens is None:
        return None
    if isinstance(valid_lens, (list, tuple)):
        try:
            valid_lens = torch.tensor(valid_lens, device=device)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"{name}: valid_lens {valid_lens!r} is not a list of integers "
                             f"({exc})") from None
    if not isinstance(valid_lens, Tensor):
        raise ValueError(f"{name}: valid_lens must be a tensor, list or tuple of integers, "
                         f"got {type(valid_lens).__name__}")
    if valid_lens.is_floating_point() or valid_lens.is_complex() or \
            valid_lens.dtype == torch.bool:
        raise ValueError(f"{name}: valid_lens must be integers, got dtype {valid_lens.dtype}")
    shapes = [(batch,)] + ([] if num_queries is None else [(batch, num_queries)])
    if tuple(valid_lens.shape) not in shapes:
        expected = " or ".join(str(s) for s in shapes)
        wrong_batch = valid_lens.dim() == 0 or valid_lens.shape[0] != batch
        raise ValueError(
            f"{name}: valid_lens must have shape {expected}, got {tuple(valid_lens.shape)}"
            + (f" (one length per sample of the batch of {batch})" if wrong_batch else "")
        )
    from .tracing import building_graph, exporting_graph

    if not (building_graph() or exporting_graph()):
        bad = (valid_lens < 0) | (valid_lens > num_keys)
        if bool(bad.any()):
            first = valid_lens[bad].flatten()[0].item()
            raise ValueError(f"{name}: valid_lens must be in [0, {num_keys}] (the key count), "
                             f"got {first}")
    return valid_lens


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


def check_window_shift(name: str, window_size: int | Sequence[int],
                       shift: int | Sequence[int] | None, what: str = "shift_size"
                       ) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(window, shift)`` as pairs; ``shift=None`` is half the window (Swin's SW-MSA).

    A window must be positive and a shift in ``[0, window)`` along each axis."""
    def pair(v: int | Sequence[int]) -> tuple[int, int]:
        return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))

    window = pair(window_size)
    check_positive(name, window_size=min(window))
    shifts = (window[0] // 2, window[1] // 2) if shift is None else pair(shift)
    if not all(0 <= s < m for s, m in zip(shifts, window, strict=True)):
        raise ValueError(f"{name}: {what} must satisfy 0 <= shift < window ({window}), "
                         f"got {shifts}")
    return window, shifts

