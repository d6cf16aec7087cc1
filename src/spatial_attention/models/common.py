"""Pieces the paper models share: MLP, stochastic depth, patch embedding, weight loading.

None of these is an attention mechanism, so they live with the models, not in
``layers/``. Parameter names follow timm (``fc1``/``fc2``, ``proj``/``norm``), which the
official Swin and Twins checkpoints share.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoint import check_state_dict, read_state_dict
from ..checks import check_positive

__all__ = [
    "drop_path",
    "drop_path_rates",
    "DropPath",
    "Mlp",
    "PreNormBlock",
    "PatchEmbed",
    "init_transformer_weights",
    "load_pretrained",
]


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth (Huang et al. 2016): drop whole residual branches per sample."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    # scale the (B, 1, ...) mask, not the activation: one pass over x instead of two
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep).div_(keep)
    return x * mask


class DropPath(nn.Module):
    """:func:`drop_path` as a module (no parameters, so no state-dict keys)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    """``fc2(drop(GELU(fc1(x))))``: the transformer feed-forward block."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class PreNormBlock(nn.Module):
    """``x + DropPath(attn(LN(x)))``, then ``x + DropPath(MLP(LN(x)))``: the transformer
    block of Swin and Twins (and ViT), whatever the token mixer ``attn``. Names
    ``norm1``, ``attn``, ``norm2``, ``mlp`` as in the official code and timm.
    ``norm_eps``: the LayerNorms' epsilon (PyTorch's 1e-5 for Swin; Twins uses 1e-6)."""

    def __init__(
        self, dim: int, attn: nn.Module, mlp_ratio: float = 4.0, drop: float = 0.0,
        drop_path: float = 0.0, norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = attn
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """``(B, C, H, W)`` image (or ``(B, H, W, C)`` map) -> ``(B, H/p, W/p, D)`` tokens.

    A ``p x p`` convolution with stride ``p`` and a LayerNorm (Swin, Twins). Sides that
    are not multiples of ``p`` are zero-padded at the bottom/right, as the official Swin
    detection code does, so any size works.
    """

    def __init__(
        self, in_chans: int, embed_dim: int, patch_size: int, norm: bool = True,
        channels_last_input: bool = False,
    ) -> None:
        super().__init__()
        check_positive("patch_embed", patch_size=patch_size, embed_dim=embed_dim)
        self.patch_size = patch_size
        self.channels_last_input = channels_last_input
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if norm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last_input:
            x = x.permute(0, 3, 1, 2)
        p = self.patch_size
        H, W = x.shape[-2:]
        if H % p or W % p:
            x = F.pad(x, (0, (-W) % p, 0, (-H) % p))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


def drop_path_rates(rate: float, total: int) -> list[float]:
    """Stochastic depth growing linearly from 0 to ``rate`` over ``total`` blocks
    (pure Python, so models can be built on the meta device)."""
    return [rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]


def init_transformer_weights(module: nn.Module) -> None:
    """Truncated normal (std 0.02) linear weights, zero biases: Swin's and Twins' init."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def load_pretrained(
    model: nn.Module,
    source: str | os.PathLike | Mapping[str, Tensor],
    convert: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
    strict: bool = True,
) -> nn.Module:
    """Load a checkpoint into ``model`` after mapping its keys; name every mismatch.

    ``source`` is a path (safetensors, or a torch file read with ``weights_only=True``)
    or a state dict; containers ``{'model': ...}``, ``{'state_dict': ...}`` and a
    ``module.`` prefix are unwrapped. ``convert`` maps foreign key names to the model's
    (each model passes its own). With ``strict``, missing or unexpected keys and shape
    mismatches raise a ``UsageError`` (a ``ValueError``) listing them by name; without
    it, only the matching keys load. Returns ``model``.
    """
    state = read_state_dict(source) if not isinstance(source, Mapping) else dict(source)
    state = _unwrap(state)
    if convert is not None:
        state = convert(state)
    expected = model.state_dict()
    name = f"checkpoint {source}" if not isinstance(source, Mapping) else "state dict"
    if strict:
        check_state_dict(expected, state, name)
        model.load_state_dict(state)
    else:
        usable = {
            k: v for k, v in state.items() if k in expected and v.shape == expected[k].shape
        }
        model.load_state_dict(usable, strict=False)
    return model


def _unwrap(state: dict) -> dict[str, Tensor]:
    for key in ("model", "state_dict", "model_state"):
        if key in state and isinstance(state[key], Mapping):
            state = dict(state[key])
            break
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}
