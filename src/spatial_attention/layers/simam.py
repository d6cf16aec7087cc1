"""SimAM on ``(B, C, H, W)``: parameter-free 3-D attention from a neuron energy (ICML 2021).

Every neuron ``t`` of a channel gets an energy that is low where ``t`` stands out from the
other neurons of its channel (the linear separability of spatial suppression in
neuroscience); the inverse energy, through a sigmoid, weighs the neuron. No parameters:
the weights are a closed-form function of each channel's mean and variance.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..checks import check_positive
from ..registry import register
from .base import AttentionModule

__all__ = ["SimAM"]


@register(
    "simam",
    family="channel_spatial",
    layout="map",
    paper="Yang et al., SimAM: A Simple, Parameter-Free Attention Module for CNNs (Eq. 16-17)",
    year=2021,
    cost="~8·B·C·H·W (mean, variance, energy, sigmoid, scale); no parameters",
    captures="(B, C, H, W) neuron weights sigmoid(1 / e_t*)",
)
class SimAM(AttentionModule):
    """SimAM (Yang, Zhang, Li, Xie, ICML 2021): per-neuron weights from a minimal energy.

    Yang et al., *SimAM: A Simple, Parameter-Free Attention Module for Convolutional Neural
    Networks*, ICML 2021. Eq. 16: ``e_t* = 4 (s² + lambda) / ((t - mu)² + 2 s² + 2 lambda)``
    with ``mu``, ``s²`` the mean and variance of the neuron's channel over ``H x W``;
    Eq. 17: ``y = sigmoid(1 / E) * x``. Shapes: ``(B, C, H, W) -> (B, C, H, W)``, weights
    ``(B, C, H, W)``. Args: ``channels`` (checked only: no parameters); ``e_lambda`` the
    regulariser ``lambda = 1e-4`` (paper and official code).
    Cost: about ``8·B·C·H·W`` element operations (two reductions, energy, sigmoid, scale).
    The variance divides by ``n = H·W - 1`` as the official code does (the paper's Eq. 5
    writes ``1/M``). Deviation: where ``H·W = 1`` the official code divides 0 by 0 (NaN);
    here ``n`` is at least 1, so a lone neuron gets ``1/E = 1/2``, its value at the mean.
    attn_impl: ``auto`` (the inverse energy as ``(t - mu)² / (4 (s² + lambda)) + 1/2``, in
    place when no gradient is needed) and ``explicit`` (Eq. 16 formed, then inverted);
    both record the ``(B, C, H, W)`` weights.
    """

    layout = "map"

    def __init__(self, channels: int, e_lambda: float = 1e-4, attn_impl: str | None = None) -> None:
        super().__init__(attn_impl=attn_impl)
        check_positive("simam", channels=channels, e_lambda=e_lambda)
        self.channels, self.e_lambda = channels, float(e_lambda)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x, self.channels)
        n = max(x.shape[2] * x.shape[3] - 1, 1)  # the official n = H*W - 1, kept off zero
        if self.impl == "explicit":
            mu = x.mean((2, 3), keepdim=True)  # (B, C, 1, 1)
            d2 = (x - mu).pow(2)  # (B, C, H, W): (t - mu)²
            var = d2.sum((2, 3), keepdim=True) / n  # (B, C, 1, 1): s²
            lam = self.e_lambda
            energy = 4 * (var + lam) / (d2 + 2 * var + 2 * lam)  # Eq. 16, (B, C, H, W)
            weights = torch.sigmoid(1 / energy)  # Eq. 17
            self.record(weights)
            return x * weights
        # 1/E simplifies to (t - mu)² / (4 (s² + lambda)) + 1/2: no per-neuron division.
        # Two plain reductions, not var_mean: its Welford pass is several times slower on CPU
        mu = x.mean((2, 3), keepdim=True)  # (B, C, 1, 1)
        d2 = (x - mu).square()  # (B, C, H, W)
        scale = 0.25 / (d2.sum((2, 3), keepdim=True) / n + self.e_lambda)  # (B, C, 1, 1)
        # autograd keeps d2 for the gradient of scale; without it d2's buffer is reused
        keep = torch.is_grad_enabled() and x.requires_grad
        weights = (d2 * scale if keep else d2.mul_(scale)).add_(0.5).sigmoid_()
        self.record(weights)
        return x * weights
