"""Synthetic noise for denoising (images in [0, 1]; the noise is not clipped, as in the
synthetic benchmarks).

* ``gaussian``: ``y = x + (sigma / 255) n``, ``n ~ N(0, 1)`` (AWGN at sigma 15, 25, 50).
* ``poisson_gaussian``: ``y = a * Poisson(x / a) + b n`` (the heteroscedastic raw-sensor
  model of Foi et al. 2008, shot noise ``a``, read noise ``b``), a stand-in for real
  camera noise when no real noisy/clean pairs are at hand.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...errors import UsageError

__all__ = ["NOISE_MODELS", "add_noise"]

NOISE_MODELS = ("gaussian", "poisson_gaussian")


def _per_image(v: float | Tensor, x: Tensor) -> Tensor:
    """A scalar or ``(B,)`` level as a tensor that broadcasts over ``x``'s images."""
    t = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    return t.view(-1, *([1] * (x.dim() - 1))) if t.dim() == 1 else t


def add_noise(x: Tensor, model: str = "gaussian", sigma: float | Tensor = 25.0,
              shot: float | Tensor = 0.01, read: float | Tensor = 0.02,
              generator: torch.Generator | None = None) -> Tensor:
    """``x`` (values in [0, 1]) plus noise of ``model`` (see the module docstring).

    ``sigma`` is on the 0..255 scale; ``sigma``, ``shot`` and ``read`` may each be a
    ``(B,)`` tensor (one level per image).
    """
    if model == "gaussian":
        n = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        return x + _per_image(sigma, x) / 255.0 * n
    if model == "poisson_gaussian":
        a, b = _per_image(shot, x), _per_image(read, x)
        if not bool((a > 0).all()) or not bool((b >= 0).all()):
            raise UsageError(f"poisson_gaussian: shot must be > 0 and read >= 0, got "
                             f"{shot}, {read}")
        counts = torch.poisson((x.clamp_min(0) / a).float(), generator=generator)
        n = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        return counts.to(x.dtype) * a + b * n
    raise UsageError(f"unknown noise model {model!r}; expected one of {NOISE_MODELS}")
