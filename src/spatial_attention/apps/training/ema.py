"""Exponential moving average of a model's weights (Polyak averaging).

``ema = decay * ema + (1 - decay) * weights`` after every optimizer step, with the
warm-up ``decay_t = min(decay, (1 + t) / (10 + t))`` (as in TensorFlow's
``ExponentialMovingAverage`` with ``num_updates``) so early averages are not dominated
by the random initialisation. Floating-point buffers (BatchNorm running statistics) are
averaged too; integer buffers (``num_batches_tracked``) are copied.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, nn

__all__ = ["ModelEma"]


class ModelEma:
    """An averaged copy of ``model`` in float32, on the model's device, never trained."""

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ModelEma: decay must be in (0, 1), got {decay!r}")
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        src = model.state_dict()
        for name, ema_t in self.module.state_dict().items():
            t = src[name].detach()
            if ema_t.dtype.is_floating_point:
                ema_t.lerp_(t.to(ema_t.dtype), 1.0 - d)
            else:
                ema_t.copy_(t)

    def state_dict(self) -> dict[str, Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: Mapping[str, Tensor], updates: int) -> None:
        self.module.load_state_dict(state)
        self.updates = updates
