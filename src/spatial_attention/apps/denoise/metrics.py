"""Image quality: :func:`psnr` and :func:`ssim`.

PSNR is ``10 log10(range^2 / MSE)``. SSIM follows Wang et al. 2004: 11x11 Gaussian
window, sigma 1.5, K1 0.01, K2 0.03, population statistics, averaged over the valid
region and the channels, which is what scikit-image's ``structural_similarity``
computes with ``gaussian_weights=True, use_sample_covariance=False``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["psnr", "ssim"]


def psnr(x: Tensor, ref: Tensor, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio per image, ``(B,)``, of ``(B, C, H, W)`` tensors."""
    mse = (x.double() - ref.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse.clamp_min(1e-20))


def _gauss_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(x: Tensor, ref: Tensor, data_range: float = 1.0, win: int = 11,
         sigma: float = 1.5) -> Tensor:
    """Structural similarity (Wang et al. 2004, Eq. 13) per image, ``(B,)``.

    Gaussian-weighted local statistics over the valid region (no padding), averaged
    over positions and channels. Images smaller than the window use a window of their
    smaller side (made odd).
    """
    x, ref = x.double(), ref.double()
    C = x.shape[1]
    win = min(win, *x.shape[-2:])
    win = win if win % 2 else win - 1
    g = _gauss_window(win, sigma).to(x.device)
    gh = g.view(1, 1, 1, -1).expand(C, 1, 1, win)
    gv = g.view(1, 1, -1, 1).expand(C, 1, win, 1)

    def filt(t: Tensor) -> Tensor:
        return F.conv2d(F.conv2d(t, gh, groups=C), gv, groups=C)

    mx, my = filt(x), filt(ref)
    vx = filt(x * x) - mx * mx
    vy = filt(ref * ref) - my * my
    cxy = filt(x * ref) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)
