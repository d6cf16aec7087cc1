"""The denoiser shipped inside the package: loading, the noise-type choice, clear errors
for absent or foreign weights, and ``spatial-attention denoise`` with no --weights."""

import re

import numpy as np
import pytest
import torch

from spatial_attention.apps.denoise import (
    add_noise,
    available_defaults,
    default_weights_path,
    load_default,
    psnr,
)
from spatial_attention.apps.denoise import default as default_mod
from spatial_attention.errors import UsageError
from spatial_attention.images import builtin_images, load_image
from spatial_attention.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")
needs_camera = pytest.mark.skipif("camera" not in builtin_images(),
                                  reason="needs scikit-image's sample images")

# Margins well under what the step-750 snapshot already gives (10.8 dB through the API on
# this crop, 3.4 dB through the grey CLI path), so the final weights cannot fail them by
# being better, while an unloaded or scrambled model would (it leaves the noise in).
API_GAIN_DB = 6.0
PG_GAIN_DB = 4.0
GREY_CLI_GAIN_DB = 1.5
COLOUR_CLI_GAIN_DB = 5.0


def _camera_crop(size=96):
    return load_image("builtin:camera")[200:200 + size, 200:200 + size]


def test_shipped_file_fits_nbnet_medium_exactly():
    from safetensors import safe_open

    path = default_weights_path("gaussian")
    assert path.is_file(), "the package-data weights are not installed"
    expected = create_model("nbnet_medium").state_dict()
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert meta["model"] == "nbnet_medium" and meta["noise"] == "gaussian"
    assert shapes == {k: tuple(v.shape) for k, v in expected.items()}
    assert dtypes == {"F16"}  # half the size on disk; load_default widens it


def test_load_default_is_an_eval_float32_model_of_any_size():
    model = load_default()
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    x = torch.rand(1, 3, 37, 50)  # not a multiple of 16: the model pads itself
    with torch.no_grad():
        assert model(x).shape == x.shape


@needs_camera
def test_shipped_denoiser_removes_gaussian_noise():
    from spatial_attention.apps.denoise.train import _to_tensor

    clean = _to_tensor(_camera_crop())[None]
    noisy = add_noise(clean, "gaussian", 25, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = load_default("gaussian")(noisy).clamp(0, 1)
    gain = float(psnr(out, clean) - psnr(noisy.clamp(0, 1), clean))
    assert gain > API_GAIN_DB, gain


def test_noise_type_choice(monkeypatch):
    assert available_defaults() == ["gaussian", "poisson_gaussian"]
    assert default_weights_path("poisson_gaussian").name == \
        "nbnet_medium-poisson_gaussian.safetensors"
    with pytest.raises(UsageError, match="unknown noise model 'salt'"):
        load_default("salt")
    # a noise type the package knows but ships no weights for says how to train them
    monkeypatch.delitem(default_mod.SHIPPED, "poisson_gaussian")
    with pytest.raises(UsageError, match=r"no shipped weights for poisson_gaussian noise yet"
                       r".*train-denoiser --model nbnet_medium --noise poisson_gaussian"):
        load_default("poisson_gaussian")


@needs_camera
def test_shipped_poisson_gaussian_denoiser_removes_its_noise():
    from spatial_attention.apps.denoise.train import _to_tensor

    clean = _to_tensor(_camera_crop())[None].expand(1, 3, -1, -1)
    g = torch.Generator().manual_seed(0)
    noisy = add_noise(clean, "poisson_gaussian", shot=0.01, read=0.02, generator=g)
    noisy = noisy[:, :1].expand_as(noisy)  # a grey image: one noise field
    models = {n: load_default(n) for n in ("gaussian", "poisson_gaussian")}
    with torch.no_grad():
        out = {n: m(noisy).clamp(0, 1) for n, m in models.items()}
    gain = float(psnr(out["poisson_gaussian"], clean) - psnr(noisy.clamp(0, 1), clean))
    assert gain > PG_GAIN_DB, gain
    # the two shipped models are different weights, not one file under two names
    assert not torch.equal(out["gaussian"], out["poisson_gaussian"])


def _shipped_dir(monkeypatch, tmp_path):
    monkeypatch.setattr(default_mod, "_weights_dir", lambda: tmp_path)
    return tmp_path / "nbnet_medium-gaussian.safetensors"


def test_missing_shipped_file_is_a_broken_installation(monkeypatch, tmp_path):
    _shipped_dir(monkeypatch, tmp_path)
    assert available_defaults() == []
    with pytest.raises(UsageError, match="missing from this installation.*reinstall"):
        load_default("gaussian")


@pytest.mark.parametrize("case", ["foreign_keys", "other_size", "other_metadata", "garbage"])
def test_foreign_shipped_file_is_named(monkeypatch, tmp_path, case):
    from safetensors.torch import save_file

    path = _shipped_dir(monkeypatch, tmp_path)
    state = create_model("nbnet_medium").state_dict()
    if case == "foreign_keys":  # e.g. a DataParallel checkpoint dropped in by hand
        save_file({f"module.{k}": v for k, v in state.items()}, str(path))
        match = r"missing keys: down_path\..*unexpected keys: module\.down_path"
    elif case == "other_size":
        save_file(create_model("nbnet_small").state_dict(), str(path))
        match = r"shape mismatches: .*\(checkpoint \(8, "
    elif case == "other_metadata":
        save_file(state, str(path), metadata={"model": "nbnet_medium", "noise": "poisson"})
        match = "are for noise 'poisson', expected 'gaussian'"
    else:
        path.write_bytes(b"not a safetensors file")
        match = "corrupt or not a safetensors file"
    with pytest.raises(UsageError, match=match):
        load_default("gaussian")


# -- the command ----------------------------------------------------------------------------


def _main(capsys, *args):
    from spatial_attention.cli import main

    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _gain(stdout):
    before, after = map(float, re.search(r"PSNR ([\d.]+) -> ([\d.]+) dB", stdout).groups())
    return after - before


@needs_camera
def test_denoise_command_uses_the_shipped_weights(cli, tmp_path):
    from PIL import Image

    # builtin:camera itself is 512 x 512 (about 10 s here); a crop of it keeps this short
    src, out = tmp_path / "camera.png", tmp_path / "x.png"
    Image.fromarray(_camera_crop()[..., 0]).save(src)
    r = cli("denoise", str(src), "--sigma", "25", "--out", str(out), "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert "grey" in r.stdout and _gain(r.stdout) > GREY_CLI_GAIN_DB, r.stdout
    with Image.open(out) as im:  # a grey file in, a grey file out
        assert im.mode == "L" and im.size == (96, 96)


@pytest.mark.skipif("grace_hopper" not in builtin_images(), reason="needs matplotlib's data")
def test_denoise_command_on_a_colour_image(capsys, tmp_path):
    from PIL import Image

    src, out = tmp_path / "hopper.png", tmp_path / "x.png"
    Image.fromarray(load_image("builtin:grace_hopper")[100:196, 200:296]).save(src)
    code, stdout, err = _main(capsys, "denoise", str(src), "--sigma", "25", "--noise",
                              "gaussian", "--out", str(out), "--tile", "64", "--overlap", "16",
                              "--no-progress")
    assert code == 0, err
    assert "grey" not in stdout and _gain(stdout) > COLOUR_CLI_GAIN_DB, stdout
    with Image.open(out) as im:
        assert im.mode == "RGB" and im.size == (96, 96)


@pytest.mark.parametrize("extra,message", [
    (["--model", "nbnet_small"], "the shipped gaussian denoiser is nbnet_medium; --model "
                                 "nbnet_small needs --weights"),
    (["--sigma", "25", "--shot", "0.01"], "two synthetic tests: give one"),
    (["--read", "0.02"], "--read needs --shot"),
    (["--shot", "-1"], "--shot must be > 0"),
])
def test_denoise_command_refusals_are_one_line(capsys, tmp_path, extra, message):
    from PIL import Image

    src = tmp_path / "img.png"
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(src)
    code, out, err = _main(capsys, "denoise", str(src), "--out", str(tmp_path / "o.png"),
                           *extra)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and message in lines[0], err


@needs_camera
def test_export_weights_writes_what_load_default_reads(monkeypatch, tmp_path):
    from safetensors import safe_open

    from spatial_attention.apps.denoise import train_denoiser
    from spatial_attention.checkpoint import read_weights

    run = train_denoiser({"model": "nbnet_small", "model_args": {"width": 4, "skip_mid": 8},
                          "noise": "poisson_gaussian", "steps": 1, "eval_every": 1,
                          "patch": 32, "batch": 2, "eval_size": 32, "max_images": 1,
                          "threads": 1, "out": str(tmp_path / "run")}, log=lambda m: 0)
    with pytest.raises(UsageError, match="not 'gaussian'"):
        default_mod.export_weights(run, "gaussian", tmp_path / "x.safetensors")
    path = default_mod.export_weights(run, "poisson_gaussian", tmp_path / "w.safetensors",
                                      note="a test")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta == {"model": "nbnet_small", "noise": "poisson_gaussian", "step": "1",
                    "note": "a test"}
    full = read_weights(run / "checkpoint/model.safetensors")
    half = read_weights(path)
    for k, v in full.items():
        assert half[k].dtype == torch.float16
        torch.testing.assert_close(half[k].float(), v, rtol=1e-3, atol=1e-4)


@needs_camera
def test_denoise_command_with_the_poisson_gaussian_model(capsys, tmp_path):
    from PIL import Image

    src, out = tmp_path / "camera.png", tmp_path / "x.png"
    Image.fromarray(_camera_crop()[..., 0]).save(src)
    code, stdout, err = _main(capsys, "denoise", str(src), "--noise", "poisson_gaussian",
                              "--shot", "0.01", "--out", str(out), "--no-progress")
    assert code == 0, err
    assert "Poisson-Gaussian a=0.01 b=0.02" in stdout
    assert _gain(stdout) > GREY_CLI_GAIN_DB, stdout
