"""``spatial-attention viz``: a mechanism on an image (random weights: the core's
:func:`spatial_attention.viz.run`), or a trained model's maps on the user's images.

    spatial-attention viz cbam --image photo.jpg                 # structure, random weights
    spatial-attention viz --run runs/compare/runs/cbam/seed0 a.jpg b.png
    spatial-attention viz --run RUN --mode gradient --target cat a.jpg
    spatial-attention viz --weights vit.safetensors --model timm:vit_tiny_patch16_224 \\
        --mode rollout a.jpg

Modes: ``attention`` (what each mechanism records, read as a spatial map), ``gradient``
(attention times its gradient for the target class, per mechanism), ``rollout`` and
``gradient-rollout`` (through every self-attention layer; ViT-style stacks).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from ... import viz
from ...capture import attention_modules, capture_attention
from ...errors import UsageError
from ...explain import HEAD_FUSIONS, _input_grids, _layer_grid, gradient_maps, rollout_map
from ...images import load_image
from .runs import Trained, load_trained

MODES = ("attention", "gradient", "rollout", "gradient-rollout")
CAPTIONS = {
    "attention": "each mechanism's recorded attention read as a map (per-position weight, "
                 "or the attention each key receives: mean over heads and queries)",
    "gradient": "attention x its gradient for the target class, positive part, mean over "
                "heads and queries (Chefer et al. 2021)",
    "rollout": "attention rollout through every layer (Abnar & Zuidema 2020), {fusion} over "
               "heads, discard {discard:g}",
    "gradient-rollout": "gradient-weighted rollout for the target class (Chefer et al. 2021)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    viz.add_arguments(parser)
    parser.add_argument("images", nargs="*", metavar="IMAGE",
                        help="with --run or --weights: the images to explain (any size)")
    g = parser.add_argument_group("trained models")
    g.add_argument("--run", metavar="RUN_DIR",
                   help="a `train` run or an equal-budget benchmark run (runs/NAME/seedK)")
    g.add_argument("--weights", metavar="FILE", help="weights (.safetensors or .pt) for --model")
    g.add_argument("--model", metavar="NAME", help="registered model or timm:NAME for --weights")
    g.add_argument("--attn", metavar="MECHANISM", help="the mechanism inside --model (as train's "
                   "--attn)")
    g.add_argument("--num-classes", type=int, default=1000,
                   help="classes of --model's head (default: %(default)s)")
    g.add_argument("--input-size", type=int, default=224,
                   help="--model's input size (default: %(default)s)")
    g.add_argument("--mode", choices=MODES, default="attention",
                   help="which map (default: %(default)s)")
    g.add_argument("--target", help="class (name or index) for gradient modes "
                   "(default: the predicted class)")
    g.add_argument("--head-fusion", choices=HEAD_FUSIONS, default="mean")
    g.add_argument("--discard-ratio", type=float, default=0.0)
    g.add_argument("--gallery", metavar="BENCH_DIR",
                   help="write the gallery of every mechanism of an equal-budget benchmark "
                   "folder into --out (a folder; default docs/gallery)")
    g.add_argument("--count", type=int, default=4, help="gallery: test images (default 4)")
    g.add_argument("--separate-scales", action="store_true",
                   help="stretch each panel to its own range (default: one shared scale)")


def run(args: argparse.Namespace) -> int:
    if args.gallery is not None:
        from .gallery import write_gallery

        if args.mode not in ("attention", "gradient"):
            raise UsageError("--gallery draws --mode attention or gradient")
        page = write_gallery(args.gallery, args.out or "docs/gallery", mode=args.mode,
                             count=args.count, cmap=args.cmap)
        print(f"wrote {page} and {page.with_name('gallery.png')}")
        return 0
    if args.run is None and args.weights is None and args.model is None:
        if args.images:
            raise UsageError("extra images are for --run / --weights; a mechanism takes "
                             "--image")
        return viz.run(args)
    images = ([args.name] if args.name else []) + list(args.images)
    if not images:
        raise UsageError("name at least one IMAGE to explain")
    trained = load_trained(args.run, args.weights, args.model,
                           num_classes=args.num_classes, size=args.input_size, attn=args.attn)
    target = _target(args.target, trained.classes)
    viz._matplotlib()
    viz._colormap(args.cmap)
    out = Path(args.out) if args.out else Path("attention_maps")
    single = len(images) == 1 and out.suffix.lower() in viz.FIGURE_FORMATS
    for spec in images:
        image = load_image(spec)
        name = viz._image_label(spec)
        path = out if single else out / f"{Path(name).stem}_{args.mode}.png"
        figure_for(trained, image, args.mode, target=target, head_fusion=args.head_fusion,
                   discard_ratio=args.discard_ratio, cmap=args.cmap, alpha=args.alpha,
                   shared_scale=not args.separate_scales, out=path, image_name=name)
        print(f"wrote {path}")
    return 0


def _target(spec: str | None, classes: list[str]) -> int | None:
    if spec is None:
        return None
    if spec in classes:
        return classes.index(spec)
    try:
        t = int(spec)
    except ValueError:
        raise UsageError(f"--target {spec!r}: not a class of this model "
                         f"({', '.join(classes[:12])}{', ...' if len(classes) > 12 else ''})"
                         ) from None
    if not 0 <= t < len(classes):
        raise UsageError(f"--target {t}: outside the model's {len(classes)} classes")
    return t


def trained_maps(trained: Trained, image: np.ndarray, mode: str, *, target: int | None = None,
                 head_fusion: str = "mean", discard_ratio: float = 0.0
                 ) -> tuple[torch.Tensor, list[tuple[str, np.ndarray]]]:
    """``(probabilities (classes,), [(panel title, (h, w) map), ...])`` for one image."""
    model = trained.model
    x = trained.prepare(image)
    if not attention_modules(model) and mode != "rollout" and mode != "gradient-rollout":
        from ...capture import foreign_attention_modules

        if not foreign_attention_modules(model):
            raise UsageError(f"{trained.label}: the model has no attention mechanism")
    if mode == "attention":
        mods = attention_modules(model)
        shapes, hooks = _input_grids(model)
        try:
            with torch.no_grad(), capture_attention(model) as maps:
                logits = model(x)
        finally:
            for h in hooks:
                h.remove()
        owners = dict(model.named_modules())
        panels = []
        for name, _ in mods:
            if name not in maps:
                continue
            owner = owners[name]
            size = _layer_grid(owner, shapes.get(name), tuple(x.shape[-2:]))
            try:
                m = type(owner).spatial_map(maps[name], size) if size else None
            except (ValueError, RuntimeError):
                m = None
            if m is not None and m.dim() == 3 and size != (1, 1):
                panels.append((name, m[0].numpy()))
        if not panels:
            raise UsageError(f"{trained.label}: its mechanisms record no spatial map (channel "
                             "attention weighs channels, not places); try --mode gradient")
    elif mode == "gradient":
        logits, found = gradient_maps(model, x, target)
        panels = [(k, v[0].numpy()) for k, v in found.items()]
        if not panels:
            raise UsageError(f"{trained.label}: no attention with a spatial reading is on the "
                             "path to its logits")
    else:
        method = "rollout" if mode == "rollout" else "gradient"
        logits, m = rollout_map(model, x, method=method, target=target,
                                head_fusion=head_fusion, discard_ratio=discard_ratio)
        panels = [(mode, m[0].numpy())]
    return logits.float().softmax(-1)[0], panels


def figure_for(trained: Trained, image: np.ndarray, mode: str, *, target: int | None = None,
               head_fusion: str = "mean", discard_ratio: float = 0.0,
               cmap: str = viz.DEFAULT_CMAP, alpha: float = 0.5, shared_scale: bool = True,
               out: str | Path | None = None, image_name: str = "image"):
    probs, panels = trained_maps(trained, image, mode, target=target, head_fusion=head_fusion,
                                 discard_ratio=discard_ratio)
    top = int(probs.argmax())
    explained = top if target is None else target
    title = (f"{trained.label} on {image_name}: predicts {trained.classes[top]} "
             f"(p={float(probs[top]):.2f})")
    if mode != "attention":
        title += f"; maps for class {trained.classes[explained]}"
    caption = CAPTIONS[mode].format(fusion=head_fusion, discard=discard_ratio)
    return viz.map_panels(image, panels, title=title, caption=caption, cmap=cmap, alpha=alpha,
                          shared_scale=shared_scale, out=out)
