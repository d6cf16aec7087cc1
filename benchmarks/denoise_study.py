"""NBNet study: subspace attention vs the same UNet without it vs classical denoisers.

Three steps, each resumable, results written as they come:

    # 1. train NBNet-small and the same UNet without SSA (Gaussian, blind sigma 15/25/50;
    #    and Poisson-Gaussian), through the library's train-denoiser pipeline
    python benchmarks/denoise_study.py train --steps 1500 --noise gaussian
    python benchmarks/denoise_study.py train --steps 1500 --noise poisson_gaussian
    # 2. PSNR / SSIM / seconds per megapixel on the held-out built-in images
    python benchmarks/denoise_study.py eval --crop 256
    # 2b. the same for the denoiser shipped in the package (``load_default``)
    python benchmarks/denoise_study.py eval --nets default --noises gaussian15 gaussian25 \
        gaussian50 --crop 256 --out benchmarks/denoise_default --fresh
    # 3. megapixels per second of tiled inference (full NBNet and NBNet-small)
    python benchmarks/denoise_study.py throughput --threads 1 2
    # 3b. seconds per megapixel of every method in one pass (less exposed to load changes)
    python benchmarks/denoise_study.py timing
    # 4. SSA alone: fused solve vs the explicit N x N projection
    python benchmarks/denoise_study.py ssa
    # 5. any train-denoiser runs (e.g. the SSA ablation at nbnet_medium size), by label
    python benchmarks/denoise_study.py eval --run ssa0=runs/ablation/ssa-seed0 \
        --run plain0=runs/ablation/plain-seed0 --nets --classical --noises gaussian25
    # 6. data or capacity? the shipped model and BM3D on crops of the *training* images
    python benchmarks/denoise_study.py eval --split train --nets default --classical bm3d \
        --noises gaussian25 gaussian50 --out benchmarks/denoise_default_train --fresh
    # 6b. its PSNR gap to BM3D per noise: all images, grey ones, colour ones
    python benchmarks/denoise_study.py gap --out benchmarks/denoise_default_train

Held-out images: ``camera``, ``grace_hopper``, ``gravel`` and ``ihc`` (never trained
on; ``spatial_attention.apps.denoise.TEST_IMAGES``; the first study had only the first
two), centre-cropped to ``--crop`` (0: whole image); ``--images`` picks some of them.
``--nets default`` is the shipped denoiser for each noise that has one. Classical
denoisers get the true Gaussian sigma (an oracle the networks do not have: they are
blind) and, for Poisson-Gaussian noise, scikit-image's ``estimate_sigma``.
The full run (official patch 128, batch 32, more steps, a GPU) is the same command with
``--patch 128 --batch 32 --steps 100000 --device cuda``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import itertools
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from spatial_attention.apps.denoise import (
    TEST_IMAGES,
    TRAIN_IMAGES,
    add_noise,
    available_defaults,
    build_denoiser,
    denoise_tiled,
    load_clean_images,
    load_default,
    psnr,
    ssim,
    train_denoiser,
)
from spatial_attention.apps.denoise.train import _run_config, share_grey_noise
from spatial_attention.models.nbnet import load_pretrained

VARIANTS = {"nbnet_small": {"ssa": True}, "unet_small": {"ssa": False}}
NOISES = {
    "gaussian15": ("gaussian", 15.0),
    "gaussian25": ("gaussian", 25.0),
    "gaussian50": ("gaussian", 50.0),
    "poisson_gaussian": ("poisson_gaussian", None),
}
SHOT, READ = 0.01, 0.02
CLASSICAL = ("nl_means", "wavelet", "tv_chambolle", "bm3d")
#: --nets choices: the study's own runs, and the denoiser shipped in the package
NETS = (*VARIANTS, "default")


def _label_dir(text: str) -> tuple[str, Path]:
    label, sep, path = text.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"expected LABEL=RUN_DIR, got {text!r}")
    if not (Path(path) / "checkpoint" / "model.safetensors").is_file():
        raise argparse.ArgumentTypeError(f"{path}: no checkpoint/model.safetensors")
    return label, Path(path)


def run_dir(root: Path, variant: str, noise: str) -> Path:
    return root / f"{variant}-{noise}"


def cmd_train(args: argparse.Namespace) -> None:
    for variant in args.variants:
        cfg = {
            "model": "nbnet_small", "model_args": VARIANTS[variant], "noise": args.noise,
            "steps": args.steps, "batch": args.batch, "patch": args.patch,
            "eval_every": args.eval_every, "threads": args.threads, "device": args.device,
            "seed": args.seed, "progress": False, "shot": SHOT, "read": READ,
            "out": str(run_dir(args.runs, variant, args.noise)),
        }
        out = Path(cfg["out"])
        resume = out if (out / "checkpoint").is_dir() else None
        train_denoiser(cfg, resume=resume)


# -- evaluation -------------------------------------------------------------------------


def classical(method: str, noisy: np.ndarray, sigma: float) -> np.ndarray:
    """One classical denoiser on ``(H, W, 3)`` float in [0, 1] with noise std ``sigma``.

    A grey image (three equal channels, one shared noise field) is denoised as one
    channel, as a user would, and returned as three equal channels."""
    from skimage import restoration as R

    if np.array_equal(noisy[..., 0], noisy[..., 1]) and np.array_equal(noisy[..., 0],
                                                                        noisy[..., 2]):
        grey = noisy[..., 0]
        if method == "nl_means":
            out = R.denoise_nl_means(grey, h=0.8 * sigma, sigma=sigma, patch_size=5,
                                     patch_distance=6, fast_mode=True)
        elif method == "wavelet":
            out = R.denoise_wavelet(grey, sigma=sigma, method="BayesShrink", mode="soft",
                                    rescale_sigma=True)
        elif method == "tv_chambolle":
            out = R.denoise_tv_chambolle(grey, weight=sigma)
        elif method == "bm3d":
            import bm3d

            out = bm3d.bm3d(grey, sigma_psd=sigma)
        else:
            raise ValueError(method)
        return np.repeat(np.asarray(out)[..., None], 3, axis=-1)

    if method == "nl_means":  # scikit-image's recommended h = 0.8 sigma in fast mode
        return R.denoise_nl_means(noisy, h=0.8 * sigma, sigma=sigma, patch_size=5,
                                  patch_distance=6, fast_mode=True, channel_axis=-1)
    if method == "wavelet":
        return R.denoise_wavelet(noisy, sigma=sigma, method="BayesShrink", mode="soft",
                                 convert2ycbcr=True, rescale_sigma=True, channel_axis=-1)
    if method == "tv_chambolle":  # weight = sigma: 0.1 (the default) at sigma 25
        return R.denoise_tv_chambolle(noisy, weight=sigma, channel_axis=-1)
    if method == "bm3d":
        import bm3d

        return bm3d.bm3d_rgb(noisy, sigma_psd=sigma)
    raise ValueError(method)


def _crop(img: torch.Tensor, size: int) -> torch.Tensor:
    if not size:
        return img
    H, W = img.shape[-2:]
    s = min(size, H, W)
    y, x = (H - s) // 2, (W - s) // 2
    return img[:, y:y + s, x:x + s]


def cmd_eval(args: argparse.Namespace) -> None:
    from skimage.restoration import estimate_sigma

    from spatial_attention.images import builtin_images

    torch.set_num_threads(args.threads)
    # load_clean_images drops images this machine lacks; the names must follow
    split_names = TEST_IMAGES if args.split == "test" else TRAIN_IMAGES
    stray = sorted(set(args.images or ()) - set(split_names))
    if stray:
        sys.exit(f"--images {' '.join(stray)}: not in the {args.split} split")
    names = [n for n in split_names if n in builtin_images()]
    images = [_crop(im, args.crop) for im in load_clean_images("builtin", args.split)]
    keep = [i for i, n in enumerate(names) if not args.images or n in args.images]
    names, images = [names[i] for i in keep], [images[i] for i in keep]
    out_csv = args.out / "results.csv"
    args.out.mkdir(parents=True, exist_ok=True)
    fields = ["noise", "image", "method", "psnr", "ssim", "seconds", "megapixels"]
    done = set()
    if out_csv.is_file() and not args.fresh:
        with out_csv.open(newline="") as f:
            done = {(r["noise"], r["image"], r["method"]) for r in csv.DictReader(f)}
    else:
        with out_csv.open("w", newline="") as f:
            csv.DictWriter(f, fieldnames=fields).writeheader()

    def write(row: dict) -> None:
        with out_csv.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=fields).writerow(row)
        print(",".join(str(row[k]) for k in fields), flush=True)

    for noise_name, (model, sigma) in NOISES.items():
        if args.noises and noise_name not in args.noises:
            continue
        train_noise = "gaussian" if model == "gaussian" else "poisson_gaussian"
        nets = {}
        for variant in args.nets:
            if variant == "default":
                if train_noise in available_defaults():
                    nets[variant] = load_default(train_noise)
                else:
                    print(f"skipping default on {noise_name}: none shipped",
                          file=sys.stderr)
                continue
            rd = run_dir(args.runs, variant, train_noise)
            if (rd / "checkpoint" / "model.safetensors").is_file():
                net = build_denoiser("nbnet_small", VARIANTS[variant])
                nets[variant] = load_pretrained(net, rd / "checkpoint" / "model.safetensors")
                nets[variant].eval()
        for label, rd in args.run:
            cfg = _run_config(rd, "--run")
            if cfg.get("noise", "gaussian") != train_noise:
                continue
            net = build_denoiser(cfg.get("model", "nbnet"), cfg.get("model_args", {}))
            nets[label] = load_pretrained(net, rd / "checkpoint" / "model.safetensors").eval()
        for name, clean in zip(names, images, strict=True):
            g = torch.Generator().manual_seed(2021)
            noisy = add_noise(clean[None], model, sigma or 0.0, shot=SHOT, read=READ,
                              generator=g)
            # a grey photograph has one noise field in all three channels
            noisy = share_grey_noise(clean[None], noisy)[0]
            grey = bool((clean == clean[:1]).all())
            mp = clean.shape[-1] * clean.shape[-2] / 1e6
            ref = clean[None]

            def score(method: str, result: torch.Tensor, seconds: float,
                      noise_name=noise_name, name=name, ref=ref, mp=mp) -> None:
                result = result.clamp(0, 1)[None].float()
                write({"noise": noise_name, "image": name, "method": method,
                       "psnr": f"{float(psnr(result, ref)):.3f}",
                       "ssim": f"{float(ssim(result, ref)):.4f}",
                       "seconds": f"{seconds:.3f}", "megapixels": f"{mp:.4f}"})

            if (noise_name, name, "noisy") not in done:
                score("noisy", noisy, 0.0)
            for variant, net in nets.items():
                if (noise_name, name, variant) in done:
                    continue
                t0 = time.perf_counter()
                result = denoise_tiled(net, noisy, tile=args.tile, overlap=32)
                if grey:  # as the denoise command does: a grey output, the channels' mean
                    result = result.mean(0, keepdim=True).expand(3, -1, -1)
                score(variant, result, time.perf_counter() - t0)
            arr = noisy.permute(1, 2, 0).double().numpy()
            # Gaussian: the true sigma. Poisson-Gaussian has no single sigma: scikit-image's
            # estimate from the noisy image (a user's setting) and/or an oracle, the
            # image's true mean noise std sqrt(mean(a x) + b^2), as "<method> (oracle)"
            levels = [("", sigma / 255.0)] if sigma else []
            if not sigma and args.pg_sigma in ("estimate", "both"):
                levels.append(("", float(estimate_sigma(arr, channel_axis=-1,
                                                        average_sigmas=True))))
            if not sigma and args.pg_sigma in ("oracle", "both"):
                levels.append((" (oracle)", float((SHOT * clean.mean() + READ ** 2).sqrt())))
            for method, (suffix, est) in itertools.product(args.classical, levels):
                if (noise_name, name, method + suffix) in done:
                    continue
                try:
                    t0 = time.perf_counter()
                    den = classical(method, arr, est)
                    dt = time.perf_counter() - t0
                except ImportError as exc:
                    print(f"skipping {method}: {exc}", file=sys.stderr)
                    continue
                score(method + suffix, torch.from_numpy(np.asarray(den)).permute(2, 0, 1), dt)
    summarise(out_csv)


def summarise(path: Path) -> None:
    """Markdown: mean PSNR / SSIM per method and noise, and median seconds per megapixel."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    noises = [n for n in NOISES if any(r["noise"] == n for r in rows)]
    methods = []
    for r in rows:
        if r["method"] not in methods:
            methods.append(r["method"])
    head = "| method | " + " | ".join(f"{n} PSNR / SSIM" for n in noises) + " | s / MP |"
    print(head)
    print("|---" * (len(noises) + 2) + "|")
    for m in methods:
        cells = []
        for n in noises:
            sel = [r for r in rows if r["method"] == m and r["noise"] == n]
            if sel:
                p = statistics.mean(float(r["psnr"]) for r in sel)
                s = statistics.mean(float(r["ssim"]) for r in sel)
                cells.append(f"{p:.2f} / {s:.3f}")
            else:
                cells.append("")
        spm = [float(r["seconds"]) / float(r["megapixels"]) for r in rows if r["method"] == m]
        cost = f"{statistics.median(spm):.2f}" if m != "noisy" else ""
        print(f"| {m} | " + " | ".join(cells) + f" | {cost} |")


def cmd_gap(args: argparse.Namespace) -> None:
    """Mean PSNR of ``--method`` minus ``--ref`` per noise, over all images of a results.csv
    and over its grey and its colour images (grey: scikit-image's single-channel ones)."""
    from spatial_attention.images import load_image

    with (args.out / "results.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    psnr_of = {(r["noise"], r["image"], r["method"]): float(r["psnr"]) for r in rows}
    grey = {}
    print(f"| noise | images | {args.method} - {args.ref}, all | grey | colour |")
    print("|---|---|---|---|---|")
    for noise in NOISES:
        gaps = {im: psnr_of[(n, im, args.method)] - psnr_of[(n, im, args.ref)]
                for (n, im, m) in psnr_of if n == noise and m == args.method
                and (n, im, args.ref) in psnr_of}
        if not gaps:
            continue
        for im in gaps:
            if im not in grey:
                x = load_image(f"builtin:{im}")
                grey[im] = bool((x == x[..., :1]).all())  # (H, W, 3), equal channels

        def mean(names: list[str], gaps: dict[str, float] = gaps) -> str:
            return f"{statistics.mean(gaps[n] for n in names):+.2f} ({len(names)})" if names \
                else "-"

        g = [n for n in gaps if grey[n]]
        c = [n for n in gaps if not grey[n]]
        print(f"| {noise} | {len(gaps)} | {mean(list(gaps))} | {mean(g)} | {mean(c)} |")


# -- throughput ---------------------------------------------------------------------------


def cmd_throughput(args: argparse.Namespace) -> None:
    """MP/s of tiled inference, NCHW and channels_last interleaved round by round."""
    image = load_clean_images("builtin", "test")[0][:, :args.size, :args.size]
    mp = image.shape[-1] * image.shape[-2] / 1e6
    print(f"| model | threads | tile | channels_last | dtype | MP/s (median of {args.repeat}, "
          "layouts interleaved) |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        torch.manual_seed(0)
        net = build_denoiser(name).eval().to(args.device)
        x = image.to(args.device)
        # weights and tiles in one layout each, from the same weights
        models = {cl: copy.deepcopy(net).to(memory_format=torch.channels_last if cl
                                            else torch.contiguous_format)
                  for cl in (False, True)}
        for threads in args.threads:
            torch.set_num_threads(threads)
            for dtype in args.dtypes:
                dt = {"float32": None, "bfloat16": torch.bfloat16}[dtype]

                def once(cl: bool, dt=dt, x=x, models=models) -> float:
                    if args.device.startswith("cuda"):
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    denoise_tiled(models[cl], x, tile=args.tile, overlap=32, batch=1,
                                  dtype=dt, channels_last=cl)
                    if args.device.startswith("cuda"):
                        torch.cuda.synchronize()
                    return time.perf_counter() - t0

                times: dict[bool, list[float]] = {False: [], True: []}
                for cl in times:  # warm-up
                    once(cl)
                for _ in range(args.repeat):
                    for cl in times:
                        times[cl].append(once(cl))
                for cl, t in times.items():
                    print(f"| {name} | {threads} | {args.tile} | {cl} | {dtype} | "
                          f"{mp / statistics.median(t):.4f} |", flush=True)


def cmd_timing(args: argparse.Namespace) -> None:
    """Seconds per megapixel of every method in one pass (sigma 25, one held-out crop)."""
    import os

    torch.set_num_threads(args.threads)
    clean = _crop(load_clean_images("builtin", "test")[0], args.crop)
    noisy = add_noise(clean[None], "gaussian", 25.0, generator=torch.Generator().manual_seed(0))
    noisy = noisy[0]
    mp = clean.shape[-1] * clean.shape[-2] / 1e6
    arr = noisy.permute(1, 2, 0).double().numpy()
    print(f"load average before: {os.getloadavg()[0]:.1f}; {args.threads} torch thread(s); "
          f"{clean.shape[-2]}x{clean.shape[-1]} crop")
    print(f"| method | s / MP (median of {args.repeat}; bm3d: 1 run) |")
    print("|---|---|")
    runs = {m: (lambda m=m: classical(m, arr, 25 / 255)) for m in CLASSICAL}
    for variant in args.nets:
        net = load_default() if variant == "default" else \
            build_denoiser("nbnet_small", VARIANTS[variant]).eval()
        runs[variant] = lambda net=net: denoise_tiled(net, noisy, tile=256, overlap=32)
    for name, fn in runs.items():
        reps = 1 if name == "bm3d" else args.repeat
        if name != "bm3d":
            fn()  # warm-up
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        print(f"| {name} | {statistics.median(times) / mp:.2f} |", flush=True)


def cmd_ssa(args: argparse.Namespace) -> None:
    """SSA alone: fused (solve) vs explicit (N x N projection) forward time and memory."""
    import spatial_attention as sa
    from spatial_attention.apps.bench.memory import TensorMemoryTracker
    from spatial_attention.capture import explicit_path

    torch.set_num_threads(args.threads)
    print(f"| C | H x W | path | ms (median of {args.repeat}) | peak tensor MiB |")
    print("|---|---|---|---|---|")
    for side in args.sizes:
        torch.manual_seed(0)
        m = sa.create("ssa", args.channels, guide_channels=args.channels).eval()
        x = torch.randn(1, args.channels, side, side)
        g = torch.randn(1, args.channels, side, side)
        for explicit in (False, True):
            with torch.no_grad(), explicit_path(m, explicit=explicit):
                m(x, g)
                times = []
                for _ in range(args.repeat):
                    t0 = time.perf_counter()
                    m(x, g)
                    times.append(time.perf_counter() - t0)
                with TensorMemoryTracker() as mem:
                    m(x, g)
            path = "explicit" if explicit else "fused"
            print(f"| {args.channels} | {side} x {side} | {path} | "
                  f"{1e3 * statistics.median(times):.1f} | {mem.peak_bytes / 2**20:.1f} |",
                  flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    t.add_argument("--noise", default="gaussian", choices=["gaussian", "poisson_gaussian"])
    t.add_argument("--steps", type=int, default=1500)
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--patch", type=int, default=64)
    t.add_argument("--eval-every", type=int, default=250)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--device", default="cpu")
    t.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("eval")
    e.add_argument("--crop", type=int, default=256, help="centre crop side (0: whole)")
    e.add_argument("--tile", type=int, default=256)
    e.add_argument("--threads", type=int, default=1)
    e.add_argument("--classical", nargs="*", default=list(CLASSICAL), choices=CLASSICAL)
    e.add_argument("--nets", nargs="*", default=list(VARIANTS), choices=NETS)
    e.add_argument("--split", choices=["test", "train"], default="test",
                   help="the held-out images (default) or the training images")
    e.add_argument("--images", nargs="*", choices=(*TEST_IMAGES, *TRAIN_IMAGES),
                   help="some of the split's images (default: all)")
    e.add_argument("--run", type=_label_dir, action="append", default=[],
                   metavar="LABEL=RUN_DIR", help="also evaluate this train-denoiser run")
    e.add_argument("--noises", nargs="*", choices=list(NOISES))
    e.add_argument("--out", type=Path, default=Path("benchmarks/denoise_study"))
    e.add_argument("--fresh", action="store_true", help="start results.csv anew")
    e.add_argument("--pg-sigma", choices=["estimate", "oracle", "both"], default="estimate",
                   help="the level the classical denoisers get on Poisson-Gaussian noise")
    s = sub.add_parser("summary")
    s.add_argument("--out", type=Path, default=Path("benchmarks/denoise_study"))
    h = sub.add_parser("throughput")
    h.add_argument("--models", nargs="+", default=["nbnet", "nbnet_small"])
    h.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    h.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    h.add_argument("--size", type=int, default=512)
    h.add_argument("--tile", type=int, default=256)
    h.add_argument("--repeat", type=int, default=3)
    h.add_argument("--device", default="cpu")
    tm = sub.add_parser("timing")
    tm.add_argument("--crop", type=int, default=256)
    tm.add_argument("--threads", type=int, default=1)
    tm.add_argument("--repeat", type=int, default=5)
    tm.add_argument("--nets", nargs="*", default=list(VARIANTS), choices=NETS)
    gp = sub.add_parser("gap")
    gp.add_argument("--out", type=Path, default=Path("benchmarks/denoise_study"))
    gp.add_argument("--method", default="default")
    gp.add_argument("--ref", default="bm3d")
    a = sub.add_parser("ssa")
    a.add_argument("--channels", type=int, default=64)
    a.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64])
    a.add_argument("--threads", type=int, default=1)
    a.add_argument("--repeat", type=int, default=5)
    for q in (t, e):
        q.add_argument("--runs", type=Path, default=Path("runs/denoise_study"))
    args = p.parse_args(argv)
    if args.cmd == "train":
        cmd_train(args)
    elif args.cmd == "eval":
        cmd_eval(args)
    elif args.cmd == "timing":
        cmd_timing(args)
    elif args.cmd == "ssa":
        cmd_ssa(args)
    elif args.cmd == "gap":
        cmd_gap(args)
    elif args.cmd == "summary":
        summarise(args.out / "results.csv")
    else:
        cmd_throughput(args)


if __name__ == "__main__":
    main()
