"""Reading what a model attends to: attention rollout, gradient-weighted maps, heads.

* :func:`attention_rollout` (Abnar & Zuidema 2020, "Quantifying Attention Flow in
  Transformers", Sec. 3): fuse each layer's heads (mean, max or min), optionally zero
  the weakest ``discard_ratio`` of each fused matrix, add the identity for the residual
  path (``0.5 A + 0.5 I``), renormalise rows, and multiply the layers in order.
* :func:`gradient_rollout` (Chefer, Gur & Wolf 2021, "Generic Attention-model
  Explainability", Eqs. 5-6): ``R <- R + E_h[(grad A * A)^+] R`` from ``R = I``, so a
  class's gradient decides which attention counts.
* :func:`gradient_maps`: "attention times its gradient" for any mechanism, map or
  token: ``(grad A * A)^+`` read as a spatial map by the recording class's
  ``spatial_map`` (channel-only records have no spatial reading and are skipped).
* :func:`rollout_map`: a model's rollout (plain or gradient) as an ``(B, h, w)`` map over
  its token grid, the class-token row where the model has prefix tokens, else the mean
  over queries.

Everything here is torch only; drawing lives in :mod:`spatial_attention.viz`. Records
come from :func:`~spatial_attention.capture_attention`, which also reads timm's
attention modules, so these work on a timm ViT as on ours.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .capture import capture_attention
from .layers.base import AttentionModule

__all__ = ["HEAD_FUSIONS", "fuse_heads", "attention_rollout", "gradient_rollout",
           "gradient_maps", "rollout_map", "token_grid", "class_score"]

HEAD_FUSIONS = ("mean", "max", "min")


def fuse_heads(weights: Tensor, head_fusion: str = "mean") -> Tensor:
    """``(B, heads, Q, K)`` -> ``(B, Q, K)`` by the mean, max or min over heads; a
    ``(B, Q, K)`` matrix passes through."""
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {', '.join(HEAD_FUSIONS)}, "
                         f"got {head_fusion!r}")
    if weights.dim() == 3:
        return weights
    if weights.dim() != 4:
        raise ValueError(f"expected attention of shape (B, heads, Q, K) or (B, Q, K), got "
                         f"{tuple(weights.shape)}")
    if head_fusion == "mean":
        return weights.mean(1)
    return weights.amax(1) if head_fusion == "max" else weights.amin(1)


def _check_stack(attentions: Sequence[Tensor], what: str) -> tuple[int, int]:
    if len(attentions) == 0:
        raise ValueError(f"{what}: no attention matrices were given")
    shapes = [tuple(a.shape) for a in attentions]
    for s in shapes:
        if len(s) not in (3, 4) or s[-1] != s[-2]:
            raise ValueError(f"{what}: every layer must be square self-attention (B, heads, N, "
                             f"N) over the same N tokens; got shapes {shapes}")
    if len({(s[0], s[-1]) for s in shapes}) != 1:
        raise ValueError(f"{what}: layers attend over different token sets (shapes {shapes}); "
                         "rollout needs one token set through every layer (a ViT-style stack, "
                         "not windows or a hierarchy)")
    return shapes[0][0], shapes[0][-1]


def attention_rollout(attentions: Sequence[Tensor], head_fusion: str = "mean",
                      discard_ratio: float = 0.0) -> Tensor:
    """Abnar & Zuidema's rollout of layers ``attentions`` (first layer first) -> ``(B, N, N)``.

    ``discard_ratio`` zeroes that fraction of the smallest entries of each fused matrix
    (the diagonal is never dropped, so every row keeps mass), as vit-explain does to
    sharpen the map; 0 keeps the paper's rule exactly.
    """
    if not 0.0 <= float(discard_ratio) < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio!r}")
    B, N = _check_stack(attentions, "attention_rollout")
    eye = torch.eye(N, dtype=torch.float32, device=attentions[0].device)
    result = eye.expand(B, N, N)
    for a in attentions:
        fused = fuse_heads(a.detach().float(), head_fusion)
        if discard_ratio > 0:
            flat = fused.flatten(1).clone()
            k = int(flat.shape[1] * discard_ratio)
            if k:
                drop = flat.topk(k, dim=1, largest=False).indices
                flat.scatter_(1, drop, 0.0)
                fused = torch.where(eye.bool(), fused, flat.view_as(fused))
        a_hat = 0.5 * fused + 0.5 * eye
        a_hat = a_hat / a_hat.sum(-1, keepdim=True).clamp_min(1e-12)
        result = a_hat @ result
    return result


def gradient_rollout(attentions: Sequence[Tensor], gradients: Sequence[Tensor]) -> Tensor:
    """Chefer et al.'s relevance of layers ``attentions`` given each one's gradient of the
    explained score -> ``(B, N, N)``: ``R = I``, then ``R += mean_h((g * A)^+) @ R``."""
    if len(attentions) != len(gradients):
        raise ValueError(f"gradient_rollout: {len(attentions)} attention layers but "
                         f"{len(gradients)} gradients")
    B, N = _check_stack(attentions, "gradient_rollout")
    r = torch.eye(N, dtype=torch.float32, device=attentions[0].device).expand(B, N, N)
    for a, g in zip(attentions, gradients, strict=True):
        if g.shape != a.shape:
            raise ValueError(f"gradient_rollout: gradient {tuple(g.shape)} does not match its "
                             f"attention {tuple(a.shape)}")
        cam = fuse_heads((g.float() * a.detach().float()).clamp_min(0), "mean")
        r = r + cam @ r
    return r


def class_score(logits: Tensor, target: int | Sequence[int] | None) -> tuple[Tensor, Tensor]:
    """``(score, targets)``: the sum over the batch of each sample's logit for its target
    class (default: the predicted one)."""
    if logits.dim() != 2:
        raise ValueError(f"expected (B, classes) logits, got {tuple(logits.shape)}")
    B, n = logits.shape
    if target is None:
        t = logits.argmax(1)
    else:
        t = torch.as_tensor(target, device=logits.device).long().reshape(-1).expand(B)
        if bool(((t < 0) | (t >= n)).any()):
            raise ValueError(f"target class must be in [0, {n}), got {target!r}")
    return logits.gather(1, t[:, None]).sum(), t


def _input_grids(model: nn.Module) -> tuple[dict[str, tuple[int, ...]], list]:
    """Pre-hooks noting the input shape of every mechanism of ``model`` (by name)."""
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, AttentionModule):
            def hook(_mod, inputs, name=name):
                if inputs and isinstance(inputs[0], Tensor):
                    shapes.setdefault(name, tuple(inputs[0].shape))
            hooks.append(m.register_forward_pre_hook(hook))
    return shapes, hooks


def _records_with_grads(model: nn.Module, x: Tensor, target):
    """Forward ``x`` with every attention record attached, backward the class score:
    ``(logits, targets, [(name, weights, grad or None), ...], input shapes)``."""
    was_training = model.training
    model.eval()
    shapes, hooks = _input_grids(model)
    try:
        with torch.enable_grad(), capture_attention(model, keep_grad=True) as maps:
            logits = model(x)
            if not isinstance(logits, Tensor):
                raise ValueError(f"{type(model).__name__} returned {type(logits).__name__}; "
                                 "gradient maps need a (B, classes) logits tensor")
            score, targets = class_score(logits, target)
            records = maps.in_order()
            live = [w for _, w in records if w.requires_grad]
            if not live:
                raise ValueError(f"{type(model).__name__}: no recorded attention is on the "
                                 "path to the logits (were the parameters frozen?)")
            grads = iter(torch.autograd.grad(score, live, allow_unused=True))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    out = [(name, w.detach(), next(grads) if w.requires_grad else None) for name, w in records]
    return logits.detach(), targets, out, shapes


def token_grid(n: int, image_hw: tuple[int, int]) -> tuple[int, int] | None:
    """The ``(h, w)`` with ``h * w == n`` whose aspect is closest to the image's."""
    H, W = image_hw
    best = None
    for h in range(1, math.isqrt(n) + 1):
        if n % h:
            continue
        for gh, gw in ((h, n // h), (n // h, h)):
            err = abs(math.log((gh / gw) / (H / W)))
            if best is None or err < best[0]:
                best = (err, (gh, gw))
    return None if best is None else best[1]


def _prefix_tokens(model: nn.Module) -> int:
    return int(getattr(model, "num_prefix_tokens", 0) or 0)


def _layer_grid(owner: nn.Module, shape: tuple[int, ...] | None, image_hw: tuple[int, int]
                ) -> tuple[int, int] | None:
    """The grid a mechanism ran on, from its input shape and its layout."""
    if shape is None:
        return None
    layout = getattr(owner, "layout", "map")
    if layout in ("map", "clip") and len(shape) >= 4:
        return int(shape[-2]), int(shape[-1])
    if layout == "tokens" and len(shape) == 4:
        return int(shape[1]), int(shape[2])
    if len(shape) == 3:
        return token_grid(int(shape[1]), image_hw)
    return None


def gradient_maps(model: nn.Module, x: Tensor, target: int | Sequence[int] | None = None
                  ) -> tuple[Tensor, dict[str, Tensor]]:
    """``(logits, {module name: (B, h, w)})``: each mechanism's ``(grad A * A)^+`` for the
    target class (default: the predicted one) as a spatial map, the mean of a module's
    calls. Records with no spatial reading or no gradient are left out."""
    logits, _, records, shapes = _records_with_grads(model, x, target)
    owners = dict(model.named_modules())
    image_hw = tuple(x.shape[-2:])
    prefix = _prefix_tokens(model)
    found: dict[str, list[Tensor]] = {}
    for name, w, g in records:
        if g is None:
            continue
        owner = owners.get(name, model)
        cam = (g.float() * w.float()).clamp_min(0)
        if isinstance(owner, AttentionModule):
            reader, size = type(owner), _layer_grid(owner, shapes.get(name), image_hw)
        else:  # a timm-style module: (B, heads, N, N) over prefix + grid tokens
            reader = AttentionModule
            cam = cam[..., prefix:, prefix:]
            size = token_grid(int(cam.shape[-1]), image_hw)
        if size is None or size == (1, 1):
            continue
        try:
            m = reader.spatial_map(cam, size)
        except (ValueError, RuntimeError):
            continue
        if m.dim() == 3 and tuple(m.shape[-2:]) == size:
            found.setdefault(name, []).append(m)
    return logits, {k: torch.stack(v).mean(0) for k, v in found.items()}


def rollout_map(model: nn.Module, x: Tensor, *, method: str = "gradient",
                target: int | Sequence[int] | None = None, head_fusion: str = "mean",
                discard_ratio: float = 0.0) -> tuple[Tensor, Tensor]:
    """``(logits, (B, h, w))``: ``method="rollout"`` (Abnar & Zuidema) or ``"gradient"``
    (Chefer et al., for ``target``, default the predicted class) through every recorded
    self-attention layer of ``model``, read at the class token's row when the model has
    prefix tokens (``num_prefix_tokens``, as timm's ViTs), else averaged over queries
    (for the gradient rule, of ``R - I``: the identity would swamp a pooled model's map)."""
    if method not in ("rollout", "gradient"):
        raise ValueError(f"method must be 'rollout' or 'gradient', got {method!r}")
    if method == "gradient":
        logits, _, records, _ = _records_with_grads(model, x, target)
    else:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), capture_attention(model) as maps:
                logits = model(x)
        finally:
            model.train(was_training)
        records = [(n, w, None) for n, w in maps.in_order()]
    owners = dict(model.named_modules())

    def is_matrix(name: str, w: Tensor) -> bool:
        owner = owners.get(name, model)
        if isinstance(owner, AttentionModule) and owner.layout in ("map", "clip"):
            return False  # a map mechanism's record is a gate over positions, not a matrix
        return w.dim() in (3, 4) and w.shape[-1] == w.shape[-2] > 1

    kept = [(n, w, g) for n, w, g in records if is_matrix(n, w)]
    if not kept:
        shapes = sorted({f"{n or type(model).__name__} {tuple(w.shape)}" for n, w, _ in records})
        raise ValueError(f"rollout: {type(model).__name__} records no self-attention matrix "
                         f"(B, heads, N, N); it records {', '.join(shapes[:6]) or 'nothing'}")
    if method == "gradient":
        pairs = [(w, g) for _, w, g in kept if g is not None]
        rel = gradient_rollout([w for w, _ in pairs], [g for _, g in pairs])
    else:
        rel = attention_rollout([w for _, w, _ in kept], head_fusion, discard_ratio)
    p = _prefix_tokens(model)
    if method == "gradient" and not p:
        # without a class token every row keeps its identity term; the map is what the
        # layers added to it (the class-token row drops its own column instead)
        rel = rel - torch.eye(rel.shape[-1], device=rel.device)
    row = rel[:, 0, p:] if p else rel.mean(1)
    grid = token_grid(row.shape[-1], tuple(x.shape[-2:]))
    return logits.detach(), row.reshape(row.shape[0], *grid)
