"""The training pipeline: learning, exact resume, signals, DDP, the CLI, clear errors."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spatial_attention.apps.training import evaluate_run
from spatial_attention.checkpoint import check_state_dict, load_weights
from spatial_attention.cli import build_parser
from spatial_attention.cli import main as cli_main
from spatial_attention.errors import UsageError
from spatial_attention.models import create_model

# a ResNet-10 of width 8 on 16x16 digits: 44 steps an epoch, milliseconds a step
TINY = ["--model", "resnet10_cifar", "--model-arg", "width=8", "--img-size", "16",
        "--batch", "32", "--workers", "0", "--amp", "off", "--no-progress"]
VIT = ["--model", "vit_micro_cifar", "--model-arg", "dim=24", "--model-arg", "depth=2",
       "--model-arg", "num_heads=2", "--img-size", "16", "--batch", "32", "--workers", "0",
       "--amp", "off", "--no-progress"]


@pytest.fixture(autouse=True)
def _one_thread():
    # These runs are tiny: one intra-op thread is as fast, and it does not stall when
    # the CI machine's cores are shared (an OpenMP barrier waiting on a preempted thread).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def train(*args: str) -> int:
    """``spatial-attention train ARGS`` in this process; the exit status."""
    return cli_main(["train", *args])


def train_raises(*args: str) -> int:
    """Like :func:`train` but errors propagate (to match their message)."""
    args_ns = build_parser().parse_args(["train", *args])
    return args_ns.func(args_ns)


def weights(run: Path, name: str = "model") -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoint" / f"{name}.safetensors")


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0.0:
            assert torch.equal(a[k], b[k]), k
        else:
            diff = (a[k].double() - b[k].double()).abs().max().item()
            assert diff <= atol, f"{k}: max |difference| {diff:.3g} > {atol}"


def metrics(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    return {**os.environ, "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_tiny_digits_run_learns_without_network(tmp_path, monkeypatch, capsys):
    def no_network(*a, **k):
        raise AssertionError("training tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    t0 = time.perf_counter()
    # default precision (bf16 where the CPU supports it) and channels_last
    assert train("--model", "resnet10_cifar", "--model-arg", "width=8", "--img-size", "16",
                 "--batch", "32", "--workers", "0", "--epochs", "2", "--no-progress",
                 "--out", str(tmp_path / "run")) == 0
    elapsed = time.perf_counter() - t0
    rows = metrics(tmp_path / "run")
    assert len(rows) == 2
    assert float(rows[-1]["val_acc"]) > 0.6, rows  # chance is 0.1
    assert elapsed < 60
    out = capsys.readouterr().out
    assert "epoch 2/2" in out and "val_acc" in out
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["settings"]["epochs"] == 2 and cfg["data"]["classes"][0] == "0"
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000


@pytest.mark.parametrize("arch", ["resnet", "vit"])
def test_stop_and_resume_is_exact(tmp_path, arch):
    """Stopped twice mid-epoch and resumed == never stopped (bitwise, on CPU)."""
    if arch == "resnet":  # BatchNorm buffers, EMA, SGD momentum
        args = [*TINY, "--opt", "sgd", "--lr", "0.05", "--ema", "0.9", "--epochs", "2"]
    else:  # stochastic depth draws from the RNG; AdamW moments
        args = [*VIT, "--model-arg", "drop_path=0.2", "--epochs", "2"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert train(*args, "--out", str(a)) == 0
    assert train(*args, "--out", str(b), "--stop-at-step", "20") == 0
    state = torch.load(b / "checkpoint" / "state.pt", weights_only=True)
    assert (state["epoch"], state["batch_in_epoch"], state["global_step"]) == (0, 20, 20)
    assert train("--resume", str(b), "--stop-at-step", "57") == 0  # mid second epoch
    assert train("--out", str(b), "--resume") == 0
    assert_same_weights(weights(a), weights(b))
    if arch == "resnet":
        assert_same_weights(weights(a, "ema"), weights(b, "ema"))
    ra, rb = metrics(a), metrics(b)
    for key in ("epoch", "step", "lr", "train_loss", "train_acc", "val_loss", "val_acc"):
        assert [r[key] for r in ra] == [r[key] for r in rb], key
    # a finished run resumes to nothing
    assert train("--resume", str(b)) == 0


def test_resume_refuses_changed_settings(tmp_path, capsys):
    run = tmp_path / "r"
    assert train(*TINY, "--epochs", "1", "--out", str(run), "--stop-at-step", "3") == 0
    with pytest.raises(UsageError, match=r"--lr 0.5 \(the run has 0.002\)"):
        train_raises("--resume", str(run), "--lr", "0.5")
    with pytest.raises(UsageError, match="already holds a run"):
        train_raises(*TINY, "--epochs", "1", "--out", str(run))
    with pytest.raises(UsageError, match="not a training run"):
        train_raises("--resume", str(tmp_path))


def test_sigterm_saves_then_resumes_exactly(tmp_path):
    run, ref = tmp_path / "run", tmp_path / "ref"
    cmd = [sys.executable, "-m", "spatial_attention.train", *TINY, "--epochs", "40",
           "--out", str(run)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.time() + 60
        while not (run / "metrics.csv").exists() and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # some steps into the run
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM: saved a checkpoint" in out
    state = torch.load(run / "checkpoint" / "state.pt", weights_only=True)
    step = state["global_step"]
    assert step > 0
    assert train("--resume", str(run), "--stop-at-step", str(step + 3)) == 0
    assert train(*TINY, "--epochs", "40", "--out", str(ref), "--stop-at-step", str(step + 3)) == 0
    assert_same_weights(weights(run), weights(ref))


def test_ddp_two_gloo_processes_match_single_process(tmp_path):
    """torchrun with 2 CPU processes and the same global batch == one process."""
    args = [*VIT, "--opt", "sgd", "--lr", "0.05", "--epochs", "1", "--overlays", "0"]
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "-m", "spatial_attention.train", *args, "--out", str(ddp)]
    # A launch can fail for reasons outside the code under test (the rendezvous port of
    # --standalone raced by another process on a loaded machine): one more try, fresh dir.
    for attempt in range(2):
        if attempt:
            shutil.rmtree(ddp, ignore_errors=True)
        res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
        log = f"stdout:\n{res.stdout[-2000:]}\nstderr:\n{res.stderr[-4000:]}"
        if res.returncode == 0:
            break
        print(f"torchrun attempt {attempt + 1} failed:\n{log}")
    assert res.returncode == 0, log
    assert "over 2 processes" in res.stdout, log
    assert res.stdout.count("epoch 1/1") == 1, log  # rank 0 logs alone
    assert train(*args, "--out", str(single)) == 0
    assert_same_weights(weights(ddp), weights(single), atol=1e-5)
    cfg = json.loads((ddp / "config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["local_batch"] == 16
    ra, rb = metrics(ddp)[0], metrics(single)[0]
    assert abs(float(ra["val_acc"]) - float(rb["val_acc"])) < 0.01, (ra, rb)
    assert abs(float(ra["train_loss"]) - float(rb["train_loss"])) < 1e-4, (ra, rb)


def cli(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("spatial-attention")
    cmd = [exe] if exe else [sys.executable, "-m", "spatial_attention"]
    return subprocess.run([*cmd, *args], env=_env(), capture_output=True, text=True,
                          timeout=300)


def test_cli_train_then_evaluate(tmp_path):
    run = tmp_path / "vit"
    res = cli("train", *VIT, "--epochs", "1", "--out", str(run), "--overlays", "2")
    assert res.returncode == 0, res.stderr
    assert "attention overlays" in res.stdout
    assert len(list((run / "attention").glob("*.png"))) == 2
    res = cli("evaluate", str(run), "--workers", "0", "--overlays", "1")
    assert res.returncode == 0, res.stderr
    assert "accuracy" in res.stdout
    ev = json.loads((run / "eval.json").read_text())
    assert ev["images"] == 360 and len(ev["per_class_accuracy"]) == 10
    assert sum(map(sum, ev["confusion"])) == 360
    assert 0.0 <= ev["accuracy"] <= 1.0
    assert (run / "confusion.png").stat().st_size > 1000


def test_missing_data_path_is_one_line(tmp_path, capsys):
    assert train(*TINY, "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not exist" in err and "Traceback" not in err


def test_unreadable_images_are_counted_and_reported(tmp_path, capsys):
    from test_data import make_folder

    make_folder(tmp_path / "train", per_class=20, corrupt=True)
    make_folder(tmp_path / "val", per_class=2, corrupt=True)
    run = tmp_path / "run"
    assert train(*TINY, "--epochs", "1", "--batch", "61", "--data", str(tmp_path / "train"),
                 "--out", str(run)) == 0
    row = metrics(run)[0]
    assert (row["unreadable_train"], row["unreadable_val"]) == ("1", "1")
    out = capsys.readouterr().out
    assert "1 unreadable training images skipped" in out and "9999.jpg" in out


def test_checkpoint_errors_name_what_differs(tmp_path):
    run = tmp_path / "r"
    assert train(*TINY, "--epochs", "1", "--out", str(run), "--stop-at-step", "2") == 0
    # another width: shape mismatches by name
    model = create_model("resnet10_cifar", width=16)
    with pytest.raises(UsageError, match=r"shape mismatches: fc\.weight \(checkpoint \(10, 64\), "
                       r"model \(10, 128\)\), .* and \d+ more"):
        load_weights(model, run / "checkpoint" / "model.safetensors")
    # another architecture: missing / unexpected keys by name
    se = create_model("resnet10_cifar", width=8, attn_layer=lambda c: torch.nn.Conv2d(c, c, 1))
    with pytest.raises(UsageError, match=r"missing keys: layer1\.0\.attn\.bias"):
        load_weights(se, run / "checkpoint" / "model.safetensors")
    with pytest.raises(UsageError, match=r"unexpected keys: extra"):
        check_state_dict({"a": torch.zeros(1)}, {"a": torch.zeros(1), "extra": torch.zeros(1)})
    # a corrupt file
    path = run / "checkpoint" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UsageError, match="corrupt or not a safetensors file"):
        evaluate_run(run, workers=0)
    (run / "checkpoint" / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UsageError, match="state.pt is corrupt"):
        train_raises("--resume", str(run))


def test_threads_option(cli, tmp_path):
    r = cli("train", "--threads", "0", "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and "--threads must be >= 1, got 0" in r.stderr
    assert not (tmp_path / "run").exists()


# -- extending a run, starting from weights -------------------------------------------------
def test_extend_a_finished_run(tmp_path, capsys):
    """--resume RUN --epochs N: exactly the epochs added, rows kept, the schedule recomputed
    for the new total from the run's step, exact under a stop; N <= done is refused."""
    from spatial_attention.apps.training import WarmupCosine

    a = tmp_path / "a"
    assert train(*TINY, "--epochs", "1", "--overlays", "0", "--out", str(a)) == 0
    first = metrics(a)
    b = tmp_path / "b"
    shutil.copytree(a, b)  # the same finished 1-epoch run, extended with a stop below
    with pytest.raises(UsageError, match=r"--epochs 1: .* already trained 1 epoch\(s\) "
                       r"\(finished, configured for 1\).*--epochs 2"):
        train_raises("--resume", str(a), "--epochs", "1")
    capsys.readouterr()
    assert train("--resume", str(a), "--epochs", "2") == 0
    out = capsys.readouterr().out
    assert "extending from 1 to 2 epochs at step 44" in out
    rows = metrics(a)
    assert len(rows) == 2 and rows[0] == first[0]  # one more epoch, the first row kept
    assert rows[1]["epoch"] == "2" and rows[1]["step"] == "88"
    state = torch.load(a / "checkpoint" / "state.pt", weights_only=True)
    assert (state["epoch"], state["global_step"], state["finished"]) == (2, 88, True)
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["settings"]["epochs"] == 2
    (ext,) = cfg["extensions"]
    assert (ext["at_step"], ext["epochs_before"], ext["epochs_after"]) == (44, 1, 2)
    warmup = round(0.5 * 44)  # --warmup-epochs 0.5
    assert ext["lr_after"] == pytest.approx(2e-3 * WarmupCosine(warmup, 88)(44))

    # the same extension stopped one step in: the learning rate of the 2-epoch schedule
    assert train("--resume", str(b), "--epochs", "2", "--stop-at-step", "45") == 0
    state = torch.load(b / "checkpoint" / "state.pt", weights_only=True)
    assert state["scheduler"]["_last_lr"][0] == pytest.approx(
        2e-3 * WarmupCosine(warmup, 88)(45))
    assert train("--resume", str(b)) == 0  # the run now has 2 epochs configured
    assert_same_weights(weights(a), weights(b))
    assert [r["train_loss"] for r in metrics(b)] == [r["train_loss"] for r in rows]
    with pytest.raises(UsageError, match="already trained 2 epoch"):
        train_raises("--resume", str(b), "--epochs", "2")


def test_init_from_a_run_or_a_file(tmp_path, capsys):
    from spatial_attention.apps.training.model import init_weights_from, resolve_init_source

    src = tmp_path / "src"
    assert train(*TINY, "--epochs", "1", "--ema", "0.9", "--out", str(src),
                 "--stop-at-step", "2") == 0
    ckpt = src / "checkpoint"
    assert resolve_init_source(src) == ckpt / "ema.safetensors"  # EMA when kept
    assert resolve_init_source(ckpt / "model.safetensors") == ckpt / "model.safetensors"
    # a fresh model takes every tensor of the file
    model = create_model("resnet10_cifar", width=8)
    lines = init_weights_from(model, src)
    assert lines == [f"--init-from: loaded 74 of 74 tensors from {ckpt / 'ema.safetensors'}"]
    assert_same_weights(model.state_dict(), weights(src, "ema"))
    # a torch file of a DataParallel model inside {"state_dict": ...}
    pt = tmp_path / "w.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in weights(src).items()},
                "epoch": 3}, pt)
    model = create_model("resnet10_cifar", width=8)
    init_weights_from(model, pt)
    assert_same_weights(model.state_dict(), weights(src))
    # keys the file lacks keep their initialisation and are named; shapes are strict
    se = create_model("resnet10_cifar", width=8, attn_layer="se")
    lines = init_weights_from(se, src)
    assert "loaded 74 of 90" in lines[0]
    assert lines[1].startswith("  not in the file, left as initialised: layer1.0.attn.")
    with pytest.raises(UsageError, match=r"does not fit the model: shape mismatches: "
                       r"stem\.0\.weight \(file \(8, 3, 3, 3\), model \(16, 3, 3, 3\)\)"):
        init_weights_from(create_model("resnet10_cifar", width=16), src)

    # the command: a new run starts from the weights, and says so in config.json
    run = tmp_path / "run"
    capsys.readouterr()
    assert train(*TINY, "--epochs", "1", "--init-from", str(src), "--out", str(run),
                 "--stop-at-step", "1") == 0
    assert "--init-from: loaded 74 of 74 tensors" in capsys.readouterr().out
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["settings"]["init_from"] == str(src.resolve())
    with pytest.raises(UsageError, match="--init-from starts a new run"):
        train_raises("--resume", str(run), "--init-from", str(src))
    assert train("--resume", str(run), "--stop-at-step", "2") == 0  # not read again
    # refusals before anything is written
    bad = tmp_path / "bad"
    with pytest.raises(UsageError, match="--init-from .*nope does not exist"):
        train_raises(*TINY, "--init-from", str(tmp_path / "nope"), "--out", str(bad))
    with pytest.raises(UsageError, match="shape mismatches"):
        train_raises(*TINY, "--model-arg", "width=16", "--init-from", str(src),
                     "--out", str(bad))
    assert not bad.exists()


def test_pretrained_timm_weights_from_a_local_file(tmp_path, monkeypatch, capsys):
    import _torchvision_shim  # noqa: F401  (before timm imports torchvision)
    from safetensors.torch import save_file

    timm = pytest.importorskip("timm")
    from spatial_attention.apps.training import build_model

    def no_network(*a, **k):
        raise AssertionError("tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    source = timm.create_model("test_resnet", pretrained=False)  # 1000 classes
    file = tmp_path / "test_resnet.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, file)
    lines: list[str] = []
    model = build_model("timm:test_resnet", 10, pretrained=str(file), log=lines.append)
    mine, theirs = model.state_dict(), source.state_dict()
    assert mine["fc.weight"].shape == (10, mine["fc.weight"].shape[1])
    for k in theirs:
        if not k.startswith("fc."):
            assert torch.equal(mine[k], theirs[k]), k
    assert f"of timm:test_resnet from {file}" in lines[0]
    assert lines[1] == "  not in the file, left as initialised: fc.weight, fc.bias"
    # with a mechanism inside: its keys are named, the rest loads
    lines.clear()
    build_model("timm:test_resnet", 10, attn="se", pretrained=str(file), log=lines.append)
    assert "layer1.0.se." in lines[1]
    # shapes are strict, a missing file is clear, registered models use --init-from
    bad = dict(theirs)
    bad["conv1.0.weight"] = torch.zeros(2, 3, 3, 3)
    save_file({k: v.contiguous() for k, v in bad.items()}, tmp_path / "bad.safetensors")
    with pytest.raises(UsageError, match=r"shape mismatches: conv1\.0\.weight \(file \(2, 3, "):
        build_model("timm:test_resnet", 10, pretrained=str(tmp_path / "bad.safetensors"))
    with pytest.raises(UsageError, match="does not exist .*nothing is ever downloaded"):
        build_model("timm:test_resnet", 10, pretrained=str(tmp_path / "none.safetensors"))
    with pytest.raises(UsageError, match="--pretrained is for timm: models"):
        train_raises(*TINY, "--pretrained", str(file), "--out", str(tmp_path / "x"))
    # the command, resumed without the file (the checkpoint has the weights)
    run = tmp_path / "run"
    capsys.readouterr()
    assert train("--model", "timm:test_resnet", "--pretrained", str(file), "--img-size", "32",
                 "--batch", "32", "--workers", "0", "--amp", "off", "--no-progress",
                 "--overlays", "0", "--epochs", "1", "--out", str(run),
                 "--stop-at-step", "1") == 0
    assert "--pretrained: loaded" in capsys.readouterr().out
    assert json.loads((run / "config.json").read_text())["settings"]["pretrained"] == str(file)
    file.unlink()
    assert train("--resume", str(run), "--stop-at-step", "2") == 0


def test_threads_option_in_the_torchrun_entry(capsys):
    from spatial_attention.apps.training import main

    assert main(["--threads", "0"]) == 2
    assert "--threads must be >= 1, got 0" in capsys.readouterr().err
