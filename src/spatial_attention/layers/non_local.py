"""Non-local block on ``(B, C, H, W)`` (Wang et al. CVPR 2018).

Every position attends to every other: ``y_i = 1/C(x) sum_j f(x_i, x_j) g(x_j)`` with a
learned 1x1 embedding ``g``, then ``z = W_z y + x``. The pairwise function ``f`` is one of
the paper's four (Sec. 3.2); the softmax ones run through the SDPA dispatcher, the
normalised-by-count ones (no softmax) through their own exact shortcuts.

Parameter names are plain convs (``theta``, ``phi``, ``g``, ``conv_out``, ``norm``,
``concat_project``); :func:`convert_mmcv_non_local_keys` maps mmcv's ``NonLocal2d``
(``ConvModule`` wrappers: ``theta.conv.weight``, ``g.0.conv.weight`` when sub-sampled).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_positive
from ..functional import attention
from ..registry import register
from .base import AttentionModule

__all__ = ["NonLocal2d", "convert_mmcv_non_local_keys"]

_MODES = ("embedded_gaussian", "gaussian", "dot_product", "concatenation")


@register(
    "non_local",
    family="spatial",
    layout="map",
    paper="Wang et al., Non-local Neural Networks (Eq. 1-6)",
    year=2018,
    cost="4·B·N·M·Ci (pairwise + aggregation; M = N, or N/4 sub-sampled) + 8·B·N·C·Ci "
         "(1x1 embeddings and output), Ci = C / reduction",
    captures="(B, N, M) pairwise weights, N = H·W queries, M keys",
)
class NonLocal2d(AttentionModule):
    """Non-local block (Wang, Girshick, Gupta, He, *Non-local Neural Networks*, CVPR 2018).

    Eq. 1: ``y_i = 1/C(x) sum_j f(x_i, x_j) g(x_j)``; Eq. 6: ``z = W_z y + x``, with 1x1
    convs ``theta, phi, g: C -> Ci`` and ``W_z = conv_out: Ci -> C``. ``mode``:
    ``"embedded_gaussian"`` (Eq. 3, softmax of ``theta^T phi``, scaled by ``1/sqrt(Ci)``
    when ``use_scale``), ``"gaussian"`` (Eq. 2, softmax of ``x_i^T x_j``, no embedding),
    ``"dot_product"`` (Eq. 4, ``theta^T phi / M``), ``"concatenation"`` (Eq. 5,
    ``ReLU(w^T [theta_i; phi_j]) / M``); ``M`` keys.
    Shapes: ``(B, C, H, W) -> (B, C, H, W)``. Args: ``channels``; ``reduction`` (``Ci =
    C // reduction``, paper 2); ``use_scale``; ``mode``; ``sub_sample`` (2x2 max pool on
    ``phi`` and ``g``, paper Sec. 4); ``with_norm`` (BatchNorm after ``W_z``, gamma zero,
    the paper's choice; default False: a zero-initialised ``conv_out``, mmcv's default).
    Init as mmcv: ``theta, phi, g`` normal(0, 0.01), zero biases.
    Cost: ``4·B·N·M·Ci + 8·B·N·C·Ci`` FLOPs, ``N = H·W``.
    Deviations from mmcv: ``Ci = max(1, C // reduction)``; sub-sampling pools with
    ``ceil_mode`` so odd and single-row maps work (identical on even sizes).
    ``attn_impl``: ``auto``, ``sdpa``, ``kept_probs`` (the dispatcher, softmax modes),
    ``explicit`` (the ``(B, N, M)`` weights formed and recorded). Without a softmax,
    ``dot_product`` reassociates to ``theta (phi^T g) / M`` and ``concatenation`` adds
    the two halves of ``w`` as ``(N, 1) + (1, M)``: SDPA cannot run either (no softmax).
    Converts mmcv keys with :meth:`load_mmcv_state_dict`.
    """

    layout = "map"
    attn_impls = ("auto", "explicit", "sdpa", "kept_probs")

    def __init__(self, channels: int, reduction: int = 2, use_scale: bool = True,
                 mode: str = "embedded_gaussian", sub_sample: bool = False,
                 with_norm: bool = False, attn_impl: str | None = None) -> None:
        super().__init__(attn_impl=attn_impl)
        check_positive("non_local", channels=channels, reduction=reduction)
        if mode not in _MODES:
            raise ValueError(f"non_local: mode must be one of {_MODES}, got {mode!r}")
        self.channels, self.reduction, self.mode = channels, reduction, mode
        self.use_scale, self.sub_sample, self.with_norm = use_scale, sub_sample, with_norm
        self.inter_channels = ci = max(1, channels // reduction)
        self.g = nn.Conv2d(channels, ci, 1)
        if mode != "gaussian":
            self.theta = nn.Conv2d(channels, ci, 1)
            self.phi = nn.Conv2d(channels, ci, 1)
        if mode == "concatenation":
            self.concat_project = nn.Conv2d(2 * ci, 1, 1, bias=False)
        self.conv_out = nn.Conv2d(ci, channels, 1, bias=not with_norm)
        self.norm = nn.BatchNorm2d(channels) if with_norm else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for conv in (self.g, getattr(self, "theta", None), getattr(self, "phi", None)):
            if conv is not None:
                nn.init.normal_(conv.weight, std=0.01)
                nn.init.zeros_(conv.bias)
        if self.mode == "concatenation":
            nn.init.kaiming_normal_(self.concat_project.weight, mode="fan_out",
                                    nonlinearity="relu")
        last = self.norm if self.norm is not None else self.conv_out
        nn.init.zeros_(last.weight)  # the block starts as the identity (paper Sec. 4)
        if last.bias is not None:
            nn.init.zeros_(last.bias)

    def _keys(self, t: Tensor) -> Tensor:
        # ceil_mode: a 1xW or odd map still has a key per (partial) 2x2 window
        return F.max_pool2d(t, 2, ceil_mode=True) if self.sub_sample else t

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x, self.channels)
        B, C, H, W = x.shape
        g = self._keys(self.g(x)).flatten(2).transpose(1, 2)  # (B, M, Ci)
        if self.mode == "gaussian":
            theta = x.flatten(2).transpose(1, 2)  # (B, N, C): f on the raw features
            phi = self._keys(x).flatten(2).transpose(1, 2)  # (B, M, C)
        else:
            theta = self.theta(x).flatten(2).transpose(1, 2)  # (B, N, Ci)
            phi = self._keys(self.phi(x)).flatten(2).transpose(1, 2)  # (B, M, Ci)
        M = phi.shape[1]
        scale = 1.0
        if self.mode == "embedded_gaussian" and self.use_scale:
            scale = 1.0 / math.sqrt(self.inter_channels)
        if self.impl == "explicit":
            if self.mode == "concatenation":
                pair = torch.cat([theta[:, :, None, :].expand(-1, -1, M, -1),
                                  phi[:, None, :, :].expand(-1, H * W, -1, -1)], -1)
                w = self.concat_project.weight.flatten()  # (2 Ci,)
                weights = torch.relu(pair @ w) / M  # Eq. 5, C(x) = M: (B, N, M)
            else:
                scores = theta @ phi.transpose(1, 2)  # (B, N, M): theta_i^T phi_j
                if self.mode == "dot_product":
                    weights = scores / M  # Eq. 4, C(x) = M
                else:
                    weights = torch.softmax(scores * scale, -1)  # Eq. 2-3
            self.record(weights)
            y = weights @ g  # (B, N, Ci), Eq. 1
        elif self.mode == "dot_product":
            y = theta @ (phi.transpose(1, 2) @ g / M)  # (Ci, Ci) first: O(N Ci^2)
        elif self.mode == "concatenation":
            w_theta, w_phi = self.concat_project.weight.view(2, -1, 1)  # (Ci, 1) each
            pair = theta @ w_theta + (phi @ w_phi).transpose(1, 2)  # (B, N, 1) + (B, 1, M)
            y = torch.relu(pair) @ g / M
        else:
            # on the CPU, SDPA runs its flash kernel only on 4-D inputs with unit stride
            # along the features; anything else takes the math fallback, which forms the
            # (N, M) scores: a head axis, and one copy of each (B, N, Ci) operand
            q, k, v = (t.contiguous()[:, None] for t in (theta, phi, g))
            y = attention(q, k, v, scale=scale, impl=self.impl)[:, 0]  # (B, N, Ci)
        y = y.transpose(1, 2).reshape(B, -1, H, W)  # (B, Ci, H, W)
        z = self.conv_out(y)
        if self.norm is not None:
            z = self.norm(z)
        return x + z  # Eq. 6

    @classmethod
    def spatial_map(cls, weights: Tensor, size: tuple[int, int]) -> Tensor:
        """Attention each key receives; sub-sampled keys spread back over their 2x2 cell."""
        H, W = size
        if weights.shape[-1] == H * W:
            return super().spatial_map(weights, size)
        h, w = -(-H // 2), -(-W // 2)
        received = weights.float().mean(1).reshape(-1, 1, h, w)
        return F.interpolate(received, scale_factor=2, mode="nearest")[:, 0, :H, :W]

    def load_mmcv_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True):
        """Load one mmcv ``NonLocal2d``'s state dict (``theta.conv.weight``, ...)."""
        return self.load_state_dict(convert_mmcv_non_local_keys(state_dict), strict=strict)


def convert_mmcv_non_local_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename mmcv ``NonLocal2d`` keys to ours, wherever they sit in a model's state dict.

    mmcv wraps each conv in a ``ConvModule`` (``.conv``, ``.norm``) and, when sub-sampling,
    puts ``g`` and ``phi`` in a ``Sequential`` with the pool (``g.0.conv``).
    """
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        new = key
        for name in ("theta", "phi", "g", "concat_project"):
            for old in (f"{name}.0.conv.", f"{name}.conv."):
                if new.startswith(old) or f".{old}" in new:
                    new = new.replace(old, f"{name}.", 1)
        new = new.replace("conv_out.conv.", "conv_out.").replace("conv_out.norm.", "norm.")
        out[new] = value
    return out
