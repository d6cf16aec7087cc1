"""What timm users expect of a backbone: intermediates, features-only, checkpointing, factory args.

The backbones (Swin, BOAT-Swin, Twins, CSWin, BOAT-CSWin, MV-Swin-T, the ResNets, SKNet,
ViT) speak timm's dialect (timm 1.0, ``timm/models/_features.py`` and ``_manipulate.py``);
NBNet and the workspace transformers take the factory arguments only:

* ``feature_info``: one dict per feature level, ``num_chs``, ``reduction`` (stride from the
  input) and ``module`` (the module whose output it is), as timm's models carry; a
  :class:`FeatureInfo` also answers ``channels()``, ``reduction()``, ``module_name()``.
* ``forward_intermediates(x, indices, norm, stop_early, output_fmt, intermediates_only)``:
  the feature levels as ``(B, C, H, W)`` maps (``indices``: None all, an int the last n,
  a sequence those levels, negatives from the end) and, unless ``intermediates_only``, the
  final features too.
* ``prune_intermediate_layers(indices, prune_norm, prune_head)``: drop what lies after
  the last level wanted, so a features-only network has no unused parameters (DDP).
* ``set_grad_checkpointing(enable)``: activation checkpointing per block
  (``use_reentrant=False``). Unlike timm it acts only in a training step that records a
  graph (``model.training`` and grad enabled), and a recomputed block leaves BatchNorm's
  running statistics as the first pass left them, so loss, gradients and buffers equal
  the run without it. A block is run twice per step, so a ``capture_attention`` block
  left open across ``backward()`` records the recomputed maps as well.
* ``device=`` / ``dtype=`` on the constructors (:func:`factory_kwargs`).

:class:`FeatureNet` is what ``create_model(name, features_only=True, out_indices=...)``
returns: its forward gives the list of maps, as timm's ``FeatureGetterNet``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..tracing import building_graph, exporting_graph

__all__ = [
    "FeatureInfo",
    "FeatureNet",
    "GradCheckpointing",
    "Indices",
    "ResNetStages",
    "check_output_fmt",
    "checkpointing_now",
    "factory_kwargs",
    "feature_info",
    "feature_take_indices",
    "run_blocks",
    "stage_intermediates",
    "to_fmt",
]

Indices = int | Sequence[int] | None


class FeatureInfo(list):
    """timm's ``feature_info``: a list of ``{'num_chs', 'reduction', 'module'}`` dicts,
    with the accessors of timm's ``FeatureInfo`` object so either spelling works."""

    def channels(self) -> list[int]:
        return [f["num_chs"] for f in self]

    def reduction(self) -> list[int]:
        return [f["reduction"] for f in self]

    def module_name(self) -> list[str]:
        return [f["module"] for f in self]


def feature_info(chs: Iterable[int], reductions: Iterable[int], modules: Iterable[str]
                 ) -> FeatureInfo:
    return FeatureInfo(
        dict(num_chs=c, reduction=r, module=m)
        for c, r, m in zip(chs, reductions, modules, strict=True)
    )


def feature_take_indices(num: int, indices: Indices, name: str = "model") -> tuple[list[int], int]:
    """timm's rule: None -> every level, int n -> the last n, a sequence -> those levels
    (negative from the end). Returns the absolute indices and the largest."""
    if indices is None:
        indices = num
    if isinstance(indices, int):
        if not 0 < indices <= num:
            raise ValueError(
                f"{name}: indices={indices} asks for the last {indices} of {num} feature "
                f"levels; expected 1 to {num}"
            )
        take = list(range(num - indices, num))
    else:
        take = []
        for i in indices:
            j = num + i if i < 0 else i
            if not 0 <= j < num:
                raise ValueError(
                    f"{name}: feature index {i} is out of range for {num} levels "
                    f"(0 to {num - 1}, or -{num} to -1)"
                )
            take.append(j)
        if not take:
            raise ValueError(f"{name}: indices is an empty sequence; name at least one level")
    return take, max(take)


_FORMATS = ("NCHW", "NHWC")


def check_output_fmt(output_fmt: str, name: str) -> None:
    if output_fmt not in _FORMATS:
        raise ValueError(f"{name}: output_fmt must be one of {_FORMATS}, got {output_fmt!r}")


def to_fmt(x: Tensor, output_fmt: str, channels_last: bool) -> Tensor:
    """A map in the layout asked for; ``channels_last`` says what ``x`` is now.
    ``contiguous`` so a dense head's convolution does not get a permuted view."""
    if channels_last == (output_fmt == "NHWC"):
        return x
    return (x.permute(0, 3, 1, 2) if channels_last else x.permute(0, 2, 3, 1)).contiguous()


def stage_intermediates(model: nn.Module, x: Tensor, indices: Indices, norm: bool,
                        stop_early: bool, output_fmt: str, intermediates_only: bool,
                        name: str, channels_last: bool, num_stages: int | None = None):
    """timm's ``forward_intermediates`` for a model with ``_stage(i, x)`` and a final
    ``norm`` applied to the last stage only; ``channels_last`` is the stages' layout,
    ``num_stages`` defaults to ``model.num_stages``."""
    check_output_fmt(output_fmt, name)
    n = model.num_stages if num_stages is None else num_stages
    take, last = feature_take_indices(n, indices, name)
    run = last + 1 if stop_early else n
    out = []
    for i in range(run):
        x = model._stage(i, x)
        if i in take:
            y = model.norm(x) if norm and i == n - 1 else x
            out.append(to_fmt(y, output_fmt, channels_last=channels_last))
    if intermediates_only:
        return out
    return (model.norm(x) if run == n else x), out


def checkpointing_now(module: nn.Module) -> bool:
    """Checkpoint only where it saves something: a training step that records a graph.
    Exporters and ``jit.trace`` want the plain ops; ``torch.compile`` traces checkpoint."""
    return (
        getattr(module, "grad_checkpointing", False) and module.training
        and torch.is_grad_enabled() and not exporting_graph()
    )


@contextmanager
def _running_stats_kept(block: nn.Module) -> Iterator[None]:
    # A recomputed block must not move BatchNorm's running statistics a second time (timm's
    # checkpoint_seq does: the momentum is applied twice a step). Switching the tracking off
    # would save fewer tensors than the first pass, which checkpoint refuses; the buffers
    # are small, so they are put back as they were instead.
    stats = [(b, b.clone()) for m in block.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
             for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, old in stats:
                buf.copy_(old)


def _has_batch_norm(block: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in block.modules())


def run_blocks(blocks: Iterable[nn.Module], x: Tensor, checkpointing: bool) -> Tensor:
    """``x`` through ``blocks`` in order, each one checkpointed when ``checkpointing``: only
    block inputs stay alive between forward and backward, every block is run again in
    backward (with the same random state, so dropout and drop-path repeat exactly)."""
    for block in blocks:
        if not checkpointing:
            x = block(x)
        elif _has_batch_norm(block) and not building_graph():
            x = checkpoint(block, x, use_reentrant=False,
                           context_fn=lambda b=block: (nullcontext(), _running_stats_kept(b)))
        else:
            x = checkpoint(block, x, use_reentrant=False)
    return x


class GradCheckpointing:
    """Mixin: ``set_grad_checkpointing`` flags the model and every submodule that runs
    blocks (those with a ``grad_checkpointing`` attribute); they ask :func:`checkpointing_now`."""

    grad_checkpointing: bool = False

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for m in self.modules():  # type: ignore[attr-defined]
            if hasattr(m, "grad_checkpointing"):
                m.grad_checkpointing = bool(enable)


class FeatureNet(nn.Module):
    """A model's feature levels as a list of maps, as timm's ``features_only`` networks.

    The model is pruned after its last level wanted (later stages, final norm unless
    ``norm``, head), so every parameter left is used. ``feature_info`` lists the levels
    returned, each with its ``index`` in the full model, as timm's.
    """

    def __init__(self, model: nn.Module, out_indices: Indices = None, norm: bool = False) -> None:
        super().__init__()
        full = model.feature_info
        take = model.prune_intermediate_layers(out_indices, prune_norm=not norm, prune_head=True)
        self.model = model
        self.out_indices = tuple(take)
        self.norm = norm
        self.feature_info = FeatureInfo(dict(full[i], index=i) for i in take)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def forward(self, *x: Tensor) -> list[Tensor]:
        return self.model.forward_intermediates(
            *x, indices=list(self.out_indices), norm=self.norm, intermediates_only=True
        )


def factory_kwargs(init: Callable[..., None]) -> Callable[..., None]:
    """Give a model constructor timm's ``device=`` and ``dtype=`` factory arguments.

    The layers take no factory arguments, so the model is built inside
    ``torch.device(device)`` (every parameter and buffer is created there; ``"meta"``
    allocates nothing) and its floating tensors are then cast to ``dtype`` (integer
    buffers such as position indices keep theirs). The default dtype is not switched
    for the build: it is process-wide state another thread may be using.
    """

    @functools.wraps(init)
    def wrapper(self: nn.Module, *args: Any, device: Any = None,
                dtype: torch.dtype | None = None, **kwargs: Any) -> None:
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(
                f"{type(self).__name__}: dtype must be a floating torch.dtype, got {dtype!r}"
            )
        with torch.device(device) if device is not None else nullcontext():
            init(self, *args, **kwargs)
        if dtype is not None:
            self.to(dtype)

    sig = inspect.signature(init)
    params = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
    extra = [inspect.Parameter("device", inspect.Parameter.KEYWORD_ONLY, default=None),
             inspect.Parameter("dtype", inspect.Parameter.KEYWORD_ONLY, default=None)]
    var_kw = [p for p in sig.parameters.values() if p.kind is p.VAR_KEYWORD]
    # keyword-only parameters go after *args but before **kwargs
    wrapper.__signature__ = sig.replace(  # type: ignore[attr-defined]
        parameters=params + extra + var_kw
    )
    return wrapper


class ResNetStages(GradCheckpointing):
    """Mixin for ResNet-shaped networks: a stem (feature level 0, as timm's ``act1``) and
    four stages ``layer1..layer4`` (levels 1-4), each an ``nn.Sequential`` of blocks.

    The network defines ``stem(x)`` (level 0) and ``stem_pool`` (what runs between level 0
    and ``layer1``: timm's max-pool, or identity for CIFAR stems), ``model_name`` for
    errors and ``feature_info``. Semantics are timm's ``ResNet.forward_intermediates``.
    """

    model_name = "resnet"
    _LAYERS = ("layer1", "layer2", "layer3", "layer4")

    def _check(self, x: Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(
                f"{self.model_name}: expected images (B, C, H, W), got shape {tuple(x.shape)}"
            )

    def _layers(self, x: Tensor, names: Sequence[str] = _LAYERS) -> Iterator[Tensor]:
        ckpt = checkpointing_now(self)  # type: ignore[arg-type]
        for name in names:
            x = run_blocks(getattr(self, name), x, ckpt)
            yield x

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` -> the last stage's map ``(B, num_features, H/r, W/r)``."""
        self._check(x)
        *_, x = self._layers(self.stem_pool(self.stem(x)))
        return x

    def forward_intermediates(
        self,
        x: Tensor,
        indices: Indices = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Level 0 (the stem) and the four stage outputs, as timm's ResNet: ``indices``
        picks levels, ``stop_early`` skips stages after the last one taken, ``norm`` is
        accepted and does nothing (no final norm). Returns the list, or
        ``(last map computed, list)``."""
        self._check(x)
        check_output_fmt(output_fmt, self.model_name)
        take, last = feature_take_indices(5, indices, self.model_name)
        out = []
        x = self.stem(x)
        if 0 in take:
            out.append(to_fmt(x, output_fmt, channels_last=False))
        x = self.stem_pool(x)
        names = self._LAYERS[:last] if stop_early else self._LAYERS
        for i, x in enumerate(self._layers(x, names), start=1):  # noqa: B020
            if i in take:
                out.append(to_fmt(x, output_fmt, channels_last=False))
        return out if intermediates_only else (x, out)

    def prune_intermediate_layers(
        self, indices: Indices = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Replace the stages after the last level in ``indices`` (and the classifier)
        by identities, as timm does; returns the absolute indices."""
        take, last = feature_take_indices(5, indices, self.model_name)
        for name in self._LAYERS[last:]:
            setattr(self, name, nn.Sequential())
        if prune_head:
            self.fc = nn.Identity()
        return take
