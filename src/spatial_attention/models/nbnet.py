"""NBNet: a 5-level UNet with subspace attention on its skips, for image denoising.

Cheng et al., "NBNet: Noise Basis Learning for Image Denoising with Subspace
Projection" (CVPR 2021, Sec. 3 and Fig. 3); official code megvii-research/NBNet
(MegEngine), ``model.py``, read for the layers, defaults and parameter names.

Architecture (official ``UNetD(3)``: ``wf = 32``, ``depth = 5``, LeakyReLU 0.2, K = 16):

* encoder: 5 :class:`~spatial_attention.layers.subspace.ResidualConvBlock` at 32, 64,
  128, 256, 512 channels; the first four also return a 4x4 stride-2 convolution of their
  output, which feeds the next level, and keep the full-resolution output as the skip.
* decoder, level by level from the bottom: a 2x2 stride-2 transposed convolution
  (``up``); the skip goes through ``skip_m`` (residual blocks of width 128 and a 1x1
  shortcut; 2, 2, 3, 4 blocks from the deepest skip to the shallowest); subspace
  attention projects it onto K = 16 bases estimated from ``cat([up, skip])``; then a
  residual conv block of ``cat([up, projected skip])``.
* a final 3x3 convolution predicts the noise; the denoised image is ``x - noise``
  (the official training loss is L1 between ``image - model(image)`` and the clean one).

Deviation: :meth:`NBNet.forward` returns the denoised image (``x - noise``), and
:meth:`NBNet.predict_noise` the official network output. Inputs of any size are padded
(reflect, or replicate for maps smaller than the pad) to a multiple of ``2**(depth-1)``
and the result cropped back; the official code requires multiples of 16.

Cost: 13,309,251 parameters (the official configuration); 174 GFLOPs (87 GMACs) for one
256 x 256 RGB image by ``torch.utils.flop_counter``, linear in H * W (the SSA
projections add ``O(N K (K + C))`` each). ``nbnet_small``: 0.27M parameters, 8.1
GFLOPs at 256 x 256.

:func:`convert_megengine_state_dict` maps the official checkpoint's names and shapes to
this module's (conv biases are ``(1, C, 1, 1)`` in MegEngine; the SSA basis network sits
at ``up_path.i.subnet`` there and at ``up_path.i.ssa.subnet`` here), and
:func:`load_pretrained` reads safetensors, a weights-only torch file, an ``.npz`` or the
official pickle (through a loader that only rebuilds numpy arrays, never runs code).
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_layout, check_positive
from ..errors import UsageError
from ..layers.subspace import ResidualConvBlock, SubspaceAttention
from . import register_model
from .features import factory_kwargs

__all__ = [
    "NBNet",
    "SkipBlocks",
    "UpBlock",
    "convert_megengine_state_dict",
    "load_pretrained",
    "nbnet",
    "nbnet_small",
    "read_megengine_pickle",
]

_PAPER = ("Cheng et al., NBNet: Noise Basis Learning for Image Denoising with Subspace "
          "Projection")


class SkipBlocks(nn.Module):
    """The official ``skip_blocks``: ``max(2, repeat)`` residual blocks via ``mid``, + 1x1."""

    def __init__(self, channels: int, repeat: int, mid: int = 128, relu_slope: float = 0.2):
        super().__init__()
        widths = [channels] + [mid] * (max(2, repeat) - 1) + [channels]
        self.blocks = nn.ModuleList(
            ResidualConvBlock(a, b, relu_slope=relu_slope)
            for a, b in zip(widths[:-1], widths[1:], strict=True)
        )
        self.shortcut = nn.Conv2d(channels, channels, 1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        out = x
        for block in self.blocks:
            out = block(out)
        return out + self.shortcut(x)


class UpBlock(nn.Module):
    """The official ``UNetUpBlock``: upsample, refine the skip, SSA-project it, fuse."""

    def __init__(self, in_channels: int, out_channels: int, skip_repeat: int,
                 num_bases: int = 16, relu_slope: float = 0.2, ssa: bool = True,
                 skip_mid: int = 128) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2, bias=True)
        self.conv_block = ResidualConvBlock(2 * out_channels, out_channels,
                                            relu_slope=relu_slope)
        self.skip_m = SkipBlocks(out_channels, skip_repeat, skip_mid, relu_slope)
        self.ssa = (
            SubspaceAttention(out_channels, num_bases, guide_channels=out_channels,
                              relu_slope=relu_slope)
            if ssa else None
        )

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        up = self.up(x)
        skip = self.skip_m(skip)
        if self.ssa is not None:
            skip = self.ssa(skip, up)
        return self.conv_block(torch.cat([up, skip], 1))


class NBNet(nn.Module):
    """NBNet (Cheng et al. CVPR 2021): UNet + subspace attention; ``forward`` denoises.

    Args:
        in_channels: image channels (3).
        width: channels of the first level (``wf``, 32); level i has ``width * 2**i``.
        depth: levels (5).
        num_bases: K of every SSA (16).
        relu_slope: LeakyReLU slope (0.2).
        ssa: False builds the same UNet with plain skips (for ablations).
        skip_mid: width of the skip blocks (128 officially).

    Shapes: ``(B, in_channels, H, W) -> (B, in_channels, H, W)``, any H, W.
    """

    @factory_kwargs
    def __init__(self, in_channels: int = 3, width: int = 32, depth: int = 5,
                 num_bases: int = 16, relu_slope: float = 0.2, ssa: bool = True,
                 skip_mid: int = 128) -> None:
        super().__init__()
        check_positive("nbnet", in_channels=in_channels, width=width, depth=depth,
                       num_bases=num_bases, skip_mid=skip_mid)
        self.in_channels, self.depth = in_channels, depth
        self.multiple = 2 ** (depth - 1)
        self.down_path = nn.ModuleList()
        prev = in_channels
        for i in range(depth):
            self.down_path.append(
                ResidualConvBlock(prev, width * 2**i, downsample=i + 1 < depth,
                                  relu_slope=relu_slope)
            )
            prev = width * 2**i
        self.up_path = nn.ModuleList()
        for n, i in enumerate(reversed(range(depth - 1))):
            self.up_path.append(
                UpBlock(prev, width * 2**i, n + 1, num_bases, relu_slope, ssa, skip_mid)
            )
            prev = width * 2**i
        self.last = nn.Conv2d(prev, in_channels, 3, padding=1, bias=True)

    def _pad(self, x: Tensor) -> tuple[Tensor, int, int]:
        H, W = x.shape[-2:]
        ph, pw = -H % self.multiple, -W % self.multiple
        if ph or pw:
            mode = "reflect" if ph < H and pw < W else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
        return x, H, W

    def predict_noise(self, x: Tensor) -> Tensor:
        """The official network output: the estimated noise, ``(B, C, H, W)``."""
        check_layout("nbnet", x, "map", self.in_channels)
        x, H, W = self._pad(x)
        skips = []
        for block in self.down_path[:-1]:
            x, skip = block(x)
            skips.append(skip)
        x = self.down_path[-1](x)
        for up, skip in zip(self.up_path, reversed(skips), strict=True):
            x = up(x, skip)
        return self.last(x)[..., :H, :W]

    def forward(self, x: Tensor) -> Tensor:
        return x - self.predict_noise(x)


@register_model("nbnet", paper=_PAPER, year=2021, family="restoration")
def nbnet(**kwargs: Any) -> NBNet:
    """NBNet, official configuration (width 32, depth 5, K = 16): 13.3M parameters."""
    return NBNet(**kwargs)


@register_model("nbnet_small", paper=_PAPER, year=2021, family="restoration")
def nbnet_small(**kwargs: Any) -> NBNet:
    """NBNet at width 8, depth 4, skip width 32 (CPU studies); ``ssa=False`` for the UNet."""
    kwargs.setdefault("width", 8)
    kwargs.setdefault("depth", 4)
    kwargs.setdefault("skip_mid", 32)
    return NBNet(**kwargs)


@register_model("nbnet_medium", paper=_PAPER, year=2021, family="restoration")
def nbnet_medium(**kwargs: Any) -> NBNet:
    """NBNet at width 16, depth 4, skip width 64 (1.0M parameters): the shipped denoisers'
    size, chosen for a CPU training budget of a few hours."""
    kwargs.setdefault("width", 16)
    kwargs.setdefault("depth", 4)
    kwargs.setdefault("skip_mid", 64)
    return NBNet(**kwargs)


# -- official checkpoints -------------------------------------------------------------------

_SUBNET = re.compile(r"^up_path\.(\d+)\.subnet\.")


def convert_megengine_state_dict(state: Mapping[str, Any]) -> dict[str, Tensor]:
    """The official MegEngine ``UNetD`` state dict -> :class:`NBNet`'s names and shapes.

    Accepts the checkpoint dict itself or ``{"state_dict": ...}``; values may be numpy
    arrays or tensors. Renames ``up_path.i.subnet.*`` to ``up_path.i.ssa.subnet.*`` and
    flattens ``(1, C, 1, 1)`` biases to ``(C,)``; every other name and shape is shared.
    """
    if "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        t = torch.as_tensor(np.asarray(value)) if not isinstance(value, Tensor) else value
        if key.endswith(".bias") and t.dim() == 4 and t.shape[0] == 1:
            t = t.reshape(-1)
        out[_SUBNET.sub(r"up_path.\1.ssa.subnet.", key)] = t.detach().clone()
    return out


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts of numpy arrays and plain values; refuses every other global."""

    _ALLOWED = {
        ("collections", "OrderedDict"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED or (module == "numpy" and name.startswith("dtype")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_megengine_pickle(path: str | os.PathLike) -> dict[str, Any]:
    """The official ``checkpoint.pkl`` (``{"epoch", "state_dict"}`` of numpy arrays).

    Only numpy arrays, dtypes and ordered dicts are rebuilt, so a tampered file cannot
    run code (the weights-only rule of this project, for a pickle that torch cannot read).
    """
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError,
            TypeError, ValueError) as exc:
        raise UsageError(f"checkpoint {path} is not a MegEngine NBNet pickle ({exc})") from None
    if not isinstance(obj, Mapping):
        raise UsageError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    return dict(obj)


def _read_any(path: Path) -> Mapping[str, Any]:
    from ..checkpoint import read_weights

    if path.suffix == ".safetensors":
        return read_weights(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    if path.suffix in (".pt", ".pth"):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for bad files
            raise UsageError(f"checkpoint {path} cannot be read weights-only ({exc})") from None
    return read_megengine_pickle(path)


def load_pretrained(model: NBNet, path: str | os.PathLike) -> NBNet:
    """Load weights into ``model``: ours, or the official MegEngine checkpoint.

    ``path`` may be ``.safetensors`` (this library's names, or converted official ones),
    ``.pt``/``.pth`` (read with ``weights_only=True``), ``.npz`` (numpy, no pickle) or
    the official ``.pkl``. Names in MegEngine form are converted
    (:func:`convert_megengine_state_dict`); missing / unexpected keys and shape
    mismatches raise a UsageError naming them.
    """
    from ..checkpoint import check_state_dict

    path = Path(path)
    state = convert_megengine_state_dict(_read_any(path))
    check_state_dict(model.state_dict(), state, f"checkpoint {path}")
    model.load_state_dict(state)
    return model
