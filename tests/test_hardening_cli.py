"""Issue #15, items 10 and 11: the command line as a new user meets it, and a training
loop that does not wait on the device every step."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import spatial_attention as sa
from spatial_attention.cli import main as cli_main
from spatial_attention.images import builtin_images
from spatial_attention.models import create_model

# the tiny classifier of test_train.py: 44 steps an epoch on 16x16 digits
TINY = ["--model", "resnet10_cifar", "--model-arg", "width=8", "--img-size", "16",
        "--batch", "32", "--workers", "0", "--amp", "off", "--no-progress"]
# a train-denoiser run of a few steps on one small built-in image
DENOISER = ["--model", "nbnet_small", "--model-arg", "width=4", "--model-arg", "skip_mid=8",
            "--steps", "1", "--eval-every", "1", "--patch", "32", "--batch", "2",
            "--eval-size", "32", "--max-images", "1", "--threads", "1", "--no-progress"]

needs_builtin = pytest.mark.skipif(
    not {"camera", "astronaut"} <= set(builtin_images()), reason="scikit-image images"
)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = cli_main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(code: int, err: str) -> str:
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("cls") / "run"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli_main(["train", *TINY, "--epochs", "1", "--overlays", "0",
                         "--val-split", "0.05", "--out", str(run_dir)]) == 0
    finally:
        torch.set_num_threads(n)
    return run_dir


@pytest.fixture(scope="module")
def denoiser_run(tmp_path_factory) -> Path:
    if not {"camera", "astronaut"} <= set(builtin_images()):
        pytest.skip("scikit-image images")
    run_dir = tmp_path_factory.mktemp("dn") / "run"
    assert cli_main(["train-denoiser", *DENOISER, "--out", str(run_dir)]) == 0
    return run_dir


# -- item 10: runs of the other kind, finished runs ----------------------------------------


@needs_builtin
def test_train_denoiser_refuses_an_existing_run(capsys, denoiser_run):
    before = (denoiser_run / "metrics.csv").read_text()
    code, _, err = run(capsys, "train-denoiser", *DENOISER, "--out", str(denoiser_run))
    line = one_line_error(code, err)
    assert "already holds a run" in line and "--resume" in line and "--out" in line
    assert (denoiser_run / "metrics.csv").read_text() == before


def test_denoise_with_a_classifier_run_says_so(capsys, tmp_path, classifier_run):
    image = tmp_path / "img.png"
    from PIL import Image

    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(image)
    code, _, err = run(capsys, "denoise", str(image), "--out", str(tmp_path / "o.png"),
                       "--weights", str(classifier_run))
    line = one_line_error(code, err)
    assert "classifier" in line and "resnet10_cifar" in line


@needs_builtin
def test_evaluate_and_resume_a_denoiser_run_say_so(capsys, denoiser_run):
    code, _, err = run(capsys, "evaluate", str(denoiser_run))
    line = one_line_error(code, err)
    assert "denoiser run" in line and "spatial-attention denoise" in line
    code, _, err = run(capsys, "train", "--resume", str(denoiser_run))
    assert "denoiser run" in one_line_error(code, err)


def test_train_denoiser_resume_of_a_classifier_run_says_so(capsys, classifier_run):
    code, _, err = run(capsys, "train-denoiser", "--resume", str(classifier_run))
    assert "classifier" in one_line_error(code, err)


# -- item 10: which model a weights file holds ----------------------------------------------


@needs_builtin
def test_denoise_infers_the_model_of_a_checkpoint_file(capsys, tmp_path, denoiser_run):
    # the file inside a run: the run's config.json beside checkpoint/ names it
    code, out, err = run(capsys, "denoise", "builtin:camera", "--out", str(tmp_path / "a.png"),
                         "--weights", str(denoiser_run / "checkpoint" / "model.safetensors"),
                         "--tile", "64", "--overlap", "8")
    assert code == 0, err
    assert "wrote" in out


def test_denoise_infers_the_model_from_the_keys(capsys, tmp_path):
    from PIL import Image
    from safetensors.torch import save_file

    Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(tmp_path / "img.png")
    bare = tmp_path / "small.safetensors"  # no metadata, no run around it
    save_file(create_model("nbnet_small").state_dict(), str(bare))
    code, out, err = run(capsys, "denoise", str(tmp_path / "img.png"), "--out",
                         str(tmp_path / "o.png"), "--weights", str(bare))
    assert code == 0, err
    # a wrong --model is not obeyed silently: the message names the one that fits
    code, _, err = run(capsys, "denoise", str(tmp_path / "img.png"), "--out",
                       str(tmp_path / "o.png"), "--weights", str(bare), "--model", "nbnet")
    assert "--model nbnet_small" in one_line_error(code, err)


def test_denoise_reads_the_model_from_safetensors_metadata(capsys, tmp_path, monkeypatch):
    from PIL import Image
    from safetensors.torch import save_file

    from spatial_attention.apps.denoise import cli as denoise

    Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(tmp_path / "img.png")
    path = tmp_path / "w.safetensors"
    save_file(create_model("nbnet_medium").state_dict(), str(path),
              metadata={"format": "pt", "model": "nbnet_medium"})
    tried = []
    real = denoise._fits

    def spy(name, state):
        tried.append(name)
        return real(name, state)

    monkeypatch.setattr(denoise, "_fits", spy)
    code, _, err = run(capsys, "denoise", str(tmp_path / "img.png"), "--out",
                       str(tmp_path / "o.png"), "--weights", str(path))
    assert code == 0, err
    assert tried == []  # the metadata named it: no trial builds


# -- item 10: validation before side effects; unreadable images ------------------------------


def test_train_denoiser_bad_model_leaves_no_directory(capsys, tmp_path):
    out = tmp_path / "never"
    code, _, err = run(capsys, "train-denoiser", "--model", "nbnet_smal", "--out", str(out))
    assert "nbnet_small" in one_line_error(code, err)
    code, _, err = run(capsys, "train-denoiser", "--model", "nbnet_small", "--model-arg",
                       "nope=1", "--out", str(out))
    one_line_error(code, err)
    assert not out.exists()


@needs_builtin
def test_train_denoiser_skips_and_counts_unreadable_images(capsys, tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.full((40, 40, 3), 90 * i, np.uint8)).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    i = DENOISER.index("--max-images")
    args = DENOISER[:i] + DENOISER[i + 2:]
    code, out, err = run(capsys, "train-denoiser", *args, "--images", str(folder),
                         "--out", str(tmp_path / "run"))
    assert code == 0, err
    assert "1 unreadable training image skipped" in out and "broken.png" in out


# -- item 10: messages that name the wrong value --------------------------------------------


@pytest.mark.parametrize("flag,value,expected", [
    ("--lr", "-1", "--lr must be > 0, got -1.0"),
    ("--workers", "-1", "--workers must be >= 0, got -1"),
    ("--pad", "-2", "--pad must be >= 0, got -2"),
    ("--warmup-epochs", "-0.5", "--warmup-epochs must be >= 0, got -0.5"),
    ("--val-split", "-0.2", "--val-split must be in [0, 1), got -0.2"),
    ("--val-split", "1", "--val-split must be in [0, 1), got 1.0"),
])
def test_train_names_the_wrong_value(capsys, tmp_path, flag, value, expected):
    code, _, err = run(capsys, "train", *TINY, flag, value, "--out", str(tmp_path / "r"))
    line = one_line_error(code, err)
    assert line.endswith(expected), line
    assert not (tmp_path / "r").exists()


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"spatial-attention {sa.__version__}"


# -- item 10: names in any case; models through sa.info ------------------------------------


def test_info_accepts_any_case(capsys):
    code, out, err = run(capsys, "info", "SE")
    assert code == 0, err
    assert out.startswith("se: ")
    code, out, _ = run(capsys, "info", "Swin_Tiny")
    assert code == 0 and out.startswith("swin_tiny: ")
    assert sa.info("CBAM").name == "cbam"
    assert sa.create("SE", 16).registered_name == "se"
    assert type(sa.create("Multi_Head", 16, 2)).__name__ == type(sa.create("multi_head", 16,
                                                                           2)).__name__


def test_sa_info_knows_models_like_the_command_line():
    # one namespace: a name that were both a mechanism and a model would be ambiguous
    assert not set(sa.list_mechanisms()) & set(sa.list_models())
    mi = sa.info("swin_tiny")
    assert mi.name == "swin_tiny" and mi.family == "classification"
    with pytest.raises(ValueError, match="did you mean"):
        sa.info("swin_tiy")


def test_viz_temporal_message_does_not_contradict_itself(capsys, tmp_path):
    code, _, err = run(capsys, "viz", "temporal", "--out", str(tmp_path / "t.png"))
    if code == 0:
        return  # it draws a map: better still
    line = one_line_error(code, err)
    assert "clip" in line and "none of its example inputs" not in line


# -- item 11: metric sums stay on the device ------------------------------------------------


def _count_host_reads(monkeypatch) -> list[str]:
    """Tensor -> Python reads made by the training loop itself (on CUDA each one waits
    for the device). Reads inside torch and the data pipeline are not counted, nor those
    of ``_drop_unreadable``, which reads the loader's CPU labels before the copy."""
    import spatial_attention.apps.training.loop as tr

    calls: list[str] = []
    loop = {"_step", "_train_epoch", "_should_stop"}

    def counting(method, name):
        def wrapper(self, *a, **k):
            caller = sys._getframe(1).f_code
            if caller.co_filename == tr.__file__ and caller.co_name in loop:
                calls.append(f"{caller.co_name}: {name}")
            return method(self, *a, **k)
        return wrapper

    for name in ("item", "tolist", "__int__", "__float__", "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, counting(getattr(torch.Tensor, name), name))
    return calls


def test_training_steps_do_not_read_back_every_step(monkeypatch, tmp_path):
    calls = _count_host_reads(monkeypatch)
    # progress on: the bar's numbers are the one read-back the loop still makes
    args = [a for a in TINY if a != "--no-progress"]
    assert cli_main(["train", *args, "--progress", "--epochs", "1", "--overlays", "0",
                     "--out", str(tmp_path / "r")]) == 0
    steps = 44
    assert len(calls) <= steps // 8, calls


def test_logged_metrics_equal_the_per_step_accumulation(monkeypatch, tmp_path):
    # the accumulation as it was done before, one float64 add per step, from the loss
    # the criterion returned and the predictions it saw
    seen: list[tuple[float, int, int]] = []
    forward = torch.nn.CrossEntropyLoss.forward

    def recording(self, logits, target):
        loss = forward(self, logits, target)
        seen.append((loss.detach().double().item(),
                     int((logits.argmax(1) == target).sum()), len(target)))
        return loss

    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", recording)
    from test_data import make_folder

    make_folder(tmp_path / "train", per_class=20, corrupt=True)
    run_dir = tmp_path / "r"
    assert cli_main(["train", *TINY, "--epochs", "2", "--batch", "16", "--overlays", "0",
                     "--data", str(tmp_path / "train"), "--val-split", "0.2",
                     "--out", str(run_dir)]) == 0
    logged = rows(run_dir / "metrics.csv")
    per_epoch = len(seen) // 2
    for epoch, row in enumerate(logged):
        loss_sum, correct, n = 0.0, 0.0, 0.0
        for loss, ok, nb in seen[epoch * per_epoch:(epoch + 1) * per_epoch]:
            loss_sum += loss * nb
            correct += ok
            n += nb
        assert row["train_loss"] == f"{loss_sum / max(n, 1):.6f}"
        assert row["train_acc"] == f"{correct / max(n, 1):.6f}"
    assert sum(int(r["unreadable_train"]) for r in logged) in (0, 1, 2)
