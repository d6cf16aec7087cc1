"""Denoising: noise models, PSNR/SSIM, tiled inference, training, and the two commands."""

import csv

import numpy as np
import pytest
import torch

from spatial_attention.apps.denoise import (
    add_noise,
    denoise_tiled,
    load_clean_images,
    psnr,
    sample_batch,
    ssim,
    tile_starts,
    train_denoiser,
)
from spatial_attention.errors import UsageError
from spatial_attention.images import builtin_images
from spatial_attention.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_psnr_known_value():
    x = torch.zeros(2, 3, 8, 8)
    assert torch.allclose(psnr(x + 0.1, x), torch.full((2,), 20.0, dtype=torch.float64))


def test_ssim_matches_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    torch.manual_seed(0)
    ref = torch.rand(1, 3, 40, 37)
    x = (ref + 0.1 * torch.randn_like(ref)).clamp(0, 1)
    expected = metrics.structural_similarity(
        x[0].numpy(), ref[0].numpy(), channel_axis=0, data_range=1.0,
        gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    )
    assert abs(float(ssim(x, ref)[0]) - expected) < 1e-5
    assert abs(float(ssim(ref, ref)[0]) - 1.0) < 1e-9


def test_noise_statistics():
    g = torch.Generator().manual_seed(0)
    x = torch.full((1, 3, 128, 128), 0.5)
    n = add_noise(x, "gaussian", 25, generator=g) - x
    assert abs(float(n.std()) - 25 / 255) < 0.003 and abs(float(n.mean())) < 0.003
    per_image = add_noise(torch.zeros(2, 1, 64, 64), "gaussian", torch.tensor([10.0, 50.0]),
                          generator=g)
    stds = per_image.flatten(1).std(1) * 255
    assert abs(float(stds[0]) - 10) < 1 and abs(float(stds[1]) - 50) < 3
    a, b = 0.01, 0.02
    y = add_noise(x, "poisson_gaussian", shot=a, read=b, generator=g)
    assert abs(float(y.var()) - (a * 0.5 + b * b)) < 0.1 * (a * 0.5 + b * b)
    assert abs(float(y.mean()) - 0.5) < 0.003
    with pytest.raises(UsageError, match="unknown noise model"):
        add_noise(x, "salt")


@pytest.mark.parametrize("length,tile,overlap", [(100, 32, 8), (32, 32, 8), (20, 32, 8),
                                                 (65, 16, 0)])
def test_tile_starts_cover_with_overlap(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    t = min(tile, length)
    covered = np.zeros(length, bool)
    for s in starts:
        covered[s:s + t] = True
    assert covered.all() and starts[-1] + t == length
    assert all(b - a <= t - overlap for a, b in zip(starts, starts[1:], strict=False))


def test_tiled_inference_blends_exactly():
    img = torch.rand(3, 75, 53)

    def pointwise(t):  # any per-pixel model must come back exactly
        return t * 2 - 0.25

    for tile, overlap in [(32, 8), (24, 0), (128, 16)]:
        out = denoise_tiled(pointwise, img, tile=tile, overlap=overlap, batch=3)
        torch.testing.assert_close(out, pointwise(img))


def test_tiled_inference_close_to_whole_image_for_a_local_model():
    torch.manual_seed(0)
    model = create_model("nbnet_small", depth=2, width=4, skip_mid=4, ssa=False).eval()
    img = torch.rand(3, 48, 40)
    with torch.no_grad():
        whole = model(img[None])[0]
    tiled = denoise_tiled(model, img, tile=32, overlap=16)
    assert (tiled - whole).abs().mean() < 0.1 * (whole - img).abs().mean() + 1e-4


def test_tiled_inference_memory_is_bounded_by_the_tile():
    from spatial_attention.apps.bench.memory import TensorMemoryTracker

    model = create_model("nbnet_small", depth=2, width=4, skip_mid=4).eval()

    def peak(side):
        img = torch.rand(3, side, side)
        with TensorMemoryTracker() as mem:
            denoise_tiled(model, img, tile=32, overlap=8, batch=1)
        return mem.peak_bytes

    small, large = peak(48), peak(96)
    image_buffers = 3 * 4 * (96 * 96 - 48 * 48) * 4  # a few image-sized float32 buffers
    # 4x the pixels: the peak grows by image-sized buffers only, not by activations
    assert large - small < image_buffers
    with TensorMemoryTracker() as mem:
        with torch.no_grad():
            model(torch.rand(1, 3, 96, 96))
    assert large < mem.peak_bytes


@pytest.mark.parametrize("kind", ["folder", "tar"])
def test_training_images_from_a_folder_or_a_tar(tmp_path, kind):
    import tarfile

    from PIL import Image

    root = tmp_path / "imgs"
    (root / "cls").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((32, 40, 3), 60 * i, np.uint8)).save(root / "cls" / f"{i}.png")
    source = root
    if kind == "tar":
        source = tmp_path / "train.tar"
        with tarfile.open(source, "w") as tf:
            tf.add(root / "cls", arcname="cls")
    images = load_clean_images(str(source), max_images=2)
    assert len(images) == 2 and all(im.dim() == 3 and im.shape[0] == 3 for im in images)
    assert images[1].max() > images[0].max() or images[1].max() < images[0].max()
    with pytest.raises(UsageError, match="not found"):
        load_clean_images(str(tmp_path / "nope"))


def test_sample_batch_is_deterministic_and_augmented():
    imgs = [torch.rand(3, 40, 50), torch.rand(3, 33, 33)]
    a = sample_batch(imgs, 6, 32, torch.Generator().manual_seed(3))
    b = sample_batch(imgs, 6, 32, torch.Generator().manual_seed(3))
    assert a.shape == (6, 3, 32, 32) and torch.equal(a, b)


needs_builtin = pytest.mark.skipif(
    not {"camera", "astronaut"} <= set(builtin_images()), reason="scikit-image images"
)


@needs_builtin
def test_resume_continues_where_it_stopped(tmp_path):
    from spatial_attention.checkpoint import read_weights

    cfg = dict(model="nbnet_small", model_args={"width": 4, "skip_mid": 8}, patch=32, batch=2,
               eval_size=32, max_images=2, sigma=[15.0, 50.0], threads=1, steps=4)
    full = train_denoiser({**cfg, "eval_every": 4, "out": str(tmp_path / "full")},
                          log=lambda m: 0)
    # the same run interrupted after step 2: run to 2 with eval_every=2, then resume
    part_dir = tmp_path / "part"
    train_denoiser({**cfg, "eval_every": 2, "out": str(part_dir), "stop_at_step": 2},
                   log=lambda m: 0)
    logs = []
    train_denoiser({**cfg, "eval_every": 2}, resume=part_dir, log=logs.append)
    assert any("resumed" in m and "step 2" in m for m in logs)
    a = read_weights(full / "checkpoint/model.safetensors")
    b = read_weights(part_dir / "checkpoint/model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    rows = list(csv.DictReader(open(part_dir / "metrics.csv")))
    assert [r["step"] for r in rows] == ["2", "4"]
    assert all(float(r["val_psnr"]) > 0 for r in rows)


def _save_random_weights(path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file(create_model("nbnet_small").state_dict(), str(path))


@needs_builtin
def test_denoise_command_on_a_builtin_image(cli, tmp_path):
    import json

    from safetensors.torch import save_file

    # a train-denoiser run directory: config.json names the model and its arguments
    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    args = {"width": 4, "skip_mid": 8}
    (run / "config.json").write_text(json.dumps({"model": "nbnet_small", "model_args": args}))
    save_file(create_model("nbnet_small", **args).state_dict(),
              str(run / "checkpoint" / "model.safetensors"))
    out, noisy = tmp_path / "out.png", tmp_path / "noisy.png"
    r = cli("denoise", "builtin:camera", "--out", str(out), "--weights", str(run),
            "--sigma", "25", "--noisy-out", str(noisy), "--tile", "288", "--overlap", "64",
            "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert "PSNR" in r.stdout and "MP/s" in r.stdout
    from PIL import Image

    with Image.open(out) as im:
        assert im.size == (512, 512)
    with Image.open(noisy) as im:
        assert im.size == (512, 512)


def _main(capsys, *args):
    """The CLI in this process (no interpreter start-up): (exit status, stdout, stderr)."""
    from spatial_attention.cli import main

    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("case", ["missing", "not_an_image", "bad_weights", "no_weights",
                                  "bad_out_dir"])
def test_bad_files_exit_2_with_one_line(capsys, tmp_path, case):
    weights = tmp_path / "w.safetensors"
    image = tmp_path / "img.png"
    from PIL import Image

    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(image)
    args = [str(image), "--out", str(tmp_path / "o.png"), "--model", "nbnet_small"]
    if case == "missing":
        args[0] = str(tmp_path / "nope.png")
    elif case == "not_an_image":
        (tmp_path / "text.png").write_text("hello")
        args[0] = str(tmp_path / "text.png")
    elif case == "bad_out_dir":
        args[2] = str(tmp_path / "no" / "dir" / "o.png")
    if case == "bad_weights":
        weights.write_bytes(b"garbage")
    elif case != "no_weights":
        _save_random_weights(weights)
    if case != "no_weights":
        args += ["--weights", str(weights)]
    code, out, err = _main(capsys, "denoise", *args)
    assert code == 2, out + err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "denoise: error" in lines[0]


@needs_builtin
def test_train_denoiser_command(capsys, tmp_path):
    out = tmp_path / "run"
    code, _, err = _main(
            capsys, "train-denoiser", "--model", "nbnet_small", "--model-arg", "width=4",
            "--model-arg", "ssa=false", "--steps", "2", "--eval-every", "1", "--patch", "32",
            "--batch", "2", "--eval-size", "32", "--max-images", "1", "--out", str(out),
            "--threads", "1")
    assert code == 0, err
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [r["step"] for r in rows] == ["1", "2"]
    assert (out / "checkpoint" / "model.safetensors").is_file()
    code, _, err = _main(capsys, "train-denoiser", "--patch", "4096", "--out",
                         str(tmp_path / "x"), "--steps", "1", "--max-images", "1")
    assert code == 2 and "smaller --patch" in err


@pytest.mark.parametrize("sub", ["denoise", "train-denoiser"])
def test_help(capsys, sub):
    from spatial_attention.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([sub, "--help"])
    assert exit_.value.code == 0 and "usage" in capsys.readouterr().out.lower()


def test_grey_patches_get_one_shared_noise_field():
    from spatial_attention.apps.denoise.train import TRAIN_DEFAULTS, _noisy

    clean = torch.rand(4, 3, 8, 8)
    clean[1] = clean[1, :1]  # a grey patch: three equal channels
    clean[3] = clean[3, :1]
    g = torch.Generator().manual_seed(0)
    for noise in ("gaussian", "poisson_gaussian"):
        noisy = _noisy({**TRAIN_DEFAULTS, "noise": noise}, clean, g)
        for i in (1, 3):
            assert torch.equal(noisy[i], noisy[i, :1].expand(3, 8, 8))
        assert not torch.equal(noisy[0, 0], noisy[0, 1])  # colour keeps its own fields


def test_blind_poisson_gaussian_draws_levels_per_patch():
    from spatial_attention.apps.denoise.train import TRAIN_DEFAULTS, _noisy

    # three slightly different channels: colour patches, each with its own noise field
    clean = torch.tensor([0.49, 0.5, 0.51]).view(1, 3, 1, 1).expand(64, 3, 32, 32)
    cfg = {**TRAIN_DEFAULTS, "noise": "poisson_gaussian"}
    g = torch.Generator().manual_seed(0)
    fixed = (_noisy(cfg, clean, g) - clean).flatten(1).std(1)
    # one level for all: every patch's std is sqrt(a x + b^2) = sqrt(0.005 + 0.0004)
    torch.testing.assert_close(fixed, torch.full_like(fixed, 0.0054 ** 0.5), rtol=0.1, atol=0)
    blind = {**cfg, "shot_range": [1e-3, 3e-2], "read_range": [2e-3, 4e-2]}
    std = (_noisy(blind, clean, g) - clean).flatten(1).std(1)
    lo, hi = (1e-3 * 0.5 + 2e-3 ** 2) ** 0.5, (3e-2 * 0.5 + 4e-2 ** 2) ** 0.5
    assert float(std.min()) > 0.8 * lo and float(std.max()) < 1.2 * hi
    assert float(std.max() / std.min()) > 2  # levels really vary from patch to patch


@pytest.mark.parametrize("bad", [{"shot_range": [0.0, 0.1]}, {"read_range": [0.2, 0.1]},
                                 {"shot": 0.0}, {"init_from": "/no/such/weights"}])
def test_bad_training_noise_settings_are_refused_before_anything_runs(tmp_path, bad):
    with pytest.raises(UsageError, match="shot|read|init-from"):
        train_denoiser({"model": "nbnet_small", "noise": "poisson_gaussian", "steps": 1,
                        "out": str(tmp_path / "r"), **bad}, log=lambda m: 0)
    assert not (tmp_path / "r").exists()


@needs_builtin
def test_init_from_starts_at_the_given_weights_and_names_a_wrong_key_set(tmp_path):
    from safetensors.torch import save_file

    from spatial_attention.checkpoint import read_weights

    args = {"width": 4, "skip_mid": 8}
    cfg = dict(model="nbnet_small", model_args=args, patch=32, batch=2, eval_size=32,
               max_images=1, threads=1, eval_every=1, noise="poisson_gaussian")
    torch.manual_seed(7)
    start = create_model("nbnet_small", **args).state_dict()
    save_file(start, str(tmp_path / "start.safetensors"))
    # lr 0: the run's weights stay exactly what it was initialised from
    run = train_denoiser({**cfg, "steps": 1, "lr": 0.0, "out": str(tmp_path / "a"),
                          "init_from": str(tmp_path / "start.safetensors")}, log=lambda m: 0)
    got = read_weights(run / "checkpoint/model.safetensors")
    for k, v in start.items():
        assert torch.equal(got[k], v), k
    # a run directory works too (its checkpoint is read)
    train_denoiser({**cfg, "steps": 1, "out": str(tmp_path / "b"), "init_from": str(run)},
                   log=lambda m: 0)
    wrong = dict(start)
    wrong["extra.weight"] = wrong.pop(next(iter(wrong)))
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(UsageError, match="extra.weight"):
        train_denoiser({**cfg, "steps": 1, "out": str(tmp_path / "c"),
                        "init_from": str(tmp_path / "wrong.safetensors")}, log=lambda m: 0)


def test_tiled_inference_is_the_same_in_either_layout():
    from spatial_attention.apps.denoise import load_default

    # trained weights: a random NBNet's subspace solve is ill-conditioned enough that
    # float32 rounding (which differs between layouts) is amplified far past 1e-5
    model = load_default("gaussian")
    x = torch.rand(3, 40, 52, generator=torch.Generator().manual_seed(0))
    a = denoise_tiled(model, x, tile=32, overlap=8, channels_last=True)
    b = denoise_tiled(model, x, tile=32, overlap=8, channels_last=False)
    assert a.is_contiguous() and a.shape == x.shape
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
