"""The equal-budget benchmark (``spatial-attention compare``) on a tiny fake CIFAR."""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import tarfile

import numpy as np
import pytest
import torch

from spatial_attention.apps.compare import cli, runner
from spatial_attention.apps.compare.data import Cifar, load_cifar
from spatial_attention.apps.compare.runner import Protocol, train_run
from spatial_attention.apps.compare.stats import summarise, t_quantile, welch_interval
from spatial_attention.checkpoint import read_weights
from spatial_attention.errors import UsageError

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["airplane", "automobile", "bird", "cat"]
TINY = ["--epochs", "2", "--width", "0.125", "--batch-size", "32", "--threads", "1"]


def _write_tar(path, split: str, per_class: int, seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    with tarfile.open(path, "w") as tf:
        for c, name in enumerate(CLASSES):
            for i in range(per_class):
                # a class colour plus noise: learnable, so accuracy is not constant
                base = np.zeros((32, 32, 3)) + 60 * c
                img = np.clip(base + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="JPEG")
                info = tarfile.TarInfo(f"{split}/{name}/{i:04d}.jpg")
                info.size = buf.tell()
                buf.seek(0)
                tf.addfile(info, buf)


@pytest.fixture(scope="module")
def fake_cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    _write_tar(root / "train.tar", "train", 24, 0)
    _write_tar(root / "test.tar", "test", 10, 1)
    return root


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cache_decodes_once(fake_cifar, tmp_path):
    data = load_cifar(fake_cifar, tmp_path)
    assert data.train_x.shape == (96, 3, 32, 32) and data.train_x.dtype == torch.uint8
    assert data.classes == sorted(CLASSES)
    assert data.test_y.bincount().tolist() == [10] * 4
    cache = tmp_path / "cifar10_uint8.pt"
    assert cache.is_file()
    again = load_cifar(fake_cifar, tmp_path)
    assert torch.equal(again.train_x, data.train_x)
    small = data.subset(8, 4)
    assert small.train_y.bincount().tolist() == [2] * 4  # class-balanced


def test_end_to_end_and_skip(fake_cifar, tmp_path, monkeypatch):
    out = tmp_path / "out"
    args = _args("se", "--seeds", "2", "--data", str(fake_cifar), "--out", str(out), *TINY)
    assert cli.run(args) == 0
    rows = _rows(out / "results.csv")
    assert sorted((r["mechanism"], r["seed"]) for r in rows) == [
        ("none", "0"), ("none", "1"), ("se", "0"), ("se", "1")]
    for r in rows:
        assert 0 <= float(r["accuracy"]) <= 1 and int(r["epochs"]) == 2
        assert int(r["macs"]) > 0 and float(r["train_img_s"]) > 0
        assert float(r["peak_mem_mb"]) > 0
    summary = _rows(out / "summary.csv")
    assert [s["mechanism"] for s in summary] == ["none", "se"]
    assert int(summary[1]["params"]) > int(summary[0]["params"])
    assert (out / "summary.png").stat().st_size > 0
    md = (out / "summary.md").read_text()
    assert "40 CIFAR-10 test images with flip + translate test-time augmentation" in md
    assert "| accuracy % (flip + translate TTA) |" in md
    claims = (out / "claims.md").read_text()  # the map protocol's claims, from these runs
    assert "| cbam beats se |" in claims and "not measured yet" in claims
    assert "boat rivals global" not in claims

    # a second invocation finds every run finished: nothing is built or trained
    def no_build(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(runner, "build_model", no_build)
    assert cli.run(args) == 0
    assert _rows(out / "results.csv") == rows

    # another protocol in the same folder is refused before anything starts
    other = _args("se", "--data", str(fake_cifar), "--out", str(out), *TINY[:-2],
                  "--epochs", "3")
    with pytest.raises(UsageError, match="another protocol"):
        cli.run(other)

    # so is a folder written by the first recipe (no "recipe" in its protocol.json)
    saved = json.loads((out / "protocol.json").read_text())
    del saved["recipe"]
    (out / "protocol.json").write_text(json.dumps(saved))
    with pytest.raises(UsageError, match="recipe 1 -> 2"):
        cli.run(args)


def _tiny_data(fake_cifar, tmp_path) -> Cifar:
    return load_cifar(fake_cifar, tmp_path / "cache")


def test_resume_is_bit_exact(fake_cifar, tmp_path):
    data = _tiny_data(fake_cifar, tmp_path)
    p = Protocol(epochs=3, width=0.125, batch_size=32, whiten_bias_epochs=2)
    full = train_run(tmp_path / "full", "cbam", 0, p, data)

    # stopped at an epoch end, then resumed
    assert train_run(tmp_path / "cut", "cbam", 0, p, data, stop_after_epochs=1) is None
    # killed in the middle of the next epoch: its partial work is lost, the epoch redone
    seen = []

    def crash(n):
        seen.append(n)
        if sum(seen) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_run(tmp_path / "cut", "cbam", 0, p, data, progress=crash)
    resumed = train_run(tmp_path / "cut", "cbam", 0, p, data)

    a = read_weights(tmp_path / "full" / "checkpoint" / "model.safetensors")
    b = read_weights(tmp_path / "cut" / "checkpoint" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa_, sb = (read_weights(tmp_path / d / "checkpoint" / "ema.safetensors")
               for d in ("full", "cut"))
    assert all(torch.equal(sa_[k], sb[k]) for k in sa_)
    assert resumed.accuracy == full.accuracy


def test_t_quantile_matches_tables():
    for df, q in ((1, 12.7062), (2, 4.3027), (4, 2.7764), (10, 2.2281), (30, 2.0423)):
        assert t_quantile(0.975, df) == pytest.approx(q, abs=2e-4)
    assert t_quantile(0.95, 5) == pytest.approx(2.0150, abs=2e-4)
    assert t_quantile(0.975, math.inf) == pytest.approx(1.95996, abs=1e-4)
    assert t_quantile(0.025, 4) == pytest.approx(-2.7764, abs=2e-4)


def test_summary_on_hand_made_rows():
    def row(m, seed, acc):
        return {"mechanism": m, "seed": seed, "accuracy": acc, "params": 10, "macs": 100,
                "train_img_s": 50.0, "infer_img_s": 200.0, "peak_mem_mb": 1.0,
                "train_seconds": 9.0}

    rows = ([row("se", s, a) for s, a in enumerate((0.92, 0.93, 0.94))]
            + [row("none", s, a) for s, a in enumerate((0.90, 0.91, 0.92))]
            + [row("eca", s, a) for s, a in enumerate((0.950, 0.951, 0.952))]
            + [row("gam", 0, 0.5)])
    s = {r["mechanism"]: r for r in summarise(rows)}
    assert list(s)[0] == "none"
    assert s["none"]["mean"] == pytest.approx(91.0) and s["none"]["std"] == pytest.approx(1.0)
    # se - none: diff 2, se^2 = 1/3 + 1/3, Welch df = (2/3)^2 / (2 * (1/3)^2 / 2) = 4
    half = 2.776445 * math.sqrt(2 / 3)
    assert s["se"]["diff"] == pytest.approx(2.0)
    assert s["se"]["ci_low"] == pytest.approx(2 - half, abs=1e-4)
    assert s["se"]["ci_high"] == pytest.approx(2 + half, abs=1e-4)
    assert s["se"]["significant"] == ""
    # eca: + 4.1 points with a tiny spread of its own: significant
    assert s["eca"]["significant"] == "*" and s["eca"]["ci_low"] > 0
    # one seed: a difference but no interval
    assert s["gam"]["diff"] == pytest.approx(-41.0) and s["gam"]["ci_low"] == ""
    assert math.isnan(s["gam"]["std"])
    assert welch_interval([1.0], [1.0, 2.0]) is None
    assert welch_interval([1.0, 1.0], [2.0, 2.0]) == (-1.0, -1.0, -1.0)


@pytest.mark.parametrize("argv, match", [
    (["not_a_mechanism"], "not_a_mechanism"),
    (["window_attention"], "map"),
    (["temporal"], "map"),
    (["--family", "token_local"], "no map"),
    (["se", "--family", "channel_spatial"], "family"),
    (["--seeds", "0"], "seeds"),
])
def test_bad_input_starts_nothing(argv, match, fake_cifar, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UsageError, match=match):
        cli.run(_args(*argv, "--data", str(fake_cifar), "--out", str(out)))
    assert not out.exists()


def test_missing_data_starts_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UsageError, match="does not exist"):
        cli.run(_args("se", "--data", str(tmp_path / "nowhere"), "--out", str(out)))
    assert not out.exists()


def test_backbone_init_does_not_depend_on_the_mechanism():
    from spatial_attention.apps.compare.net import CompareNet

    torch.manual_seed(3)
    base = CompareNet("none", 0.25).state_dict()
    torch.manual_seed(3)
    other = CompareNet("gam", 0.25).state_dict()
    shared = [k for k in base if not k.startswith("stages.") or ".attn." not in k]
    assert shared and all(torch.equal(base[k], other[k]) for k in shared)
    assert any(".attn." in k for k in other)


def test_variants_are_entries_built_with_their_arguments(fake_cifar, tmp_path):
    from spatial_attention import registry
    from spatial_attention.apps.compare.cli import select_mechanisms
    from spatial_attention.apps.compare.net import VARIANTS, CompareNet, resolve_entry

    assert resolve_entry("se") == ("se", {})
    assert resolve_entry("generalized_attention_0111") == (
        "generalized_attention", {"attention_type": "0111"})
    # the default queue: every map mechanism, each variant right after its mechanism
    everything = select_mechanisms([], None)
    maps = registry.list_mechanisms(layout="map")
    assert everything[0] == "none" and len(everything) == 1 + len(maps) + len(VARIANTS)
    i = everything.index("generalized_attention")
    assert everything[i + 1] == "generalized_attention_0111"
    family = registry.info("generalized_attention").family
    assert "generalized_attention_0111" in select_mechanisms([], family)
    assert select_mechanisms(["generalized_attention_0111", "se"], None) == [
        "none", "generalized_attention_0111", "se"]
    with pytest.raises(UsageError, match="family"):
        select_mechanisms(["generalized_attention_0111"], "channel")
    net = CompareNet("generalized_attention_0111", 0.25)  # 9 heads need >= 9 channels
    types = {m.attention_type for m in net.modules() if hasattr(m, "attention_type")}
    assert types == {"0111"}
    # and one trains end to end under its own name
    out = tmp_path / "out"
    assert cli.run(_args("generalized_attention_0111", "--seeds", "1", "--baseline-seeds",
                         "1", "--data", str(fake_cifar), "--out", str(out), *TINY,
                         "--width", "0.25")) == 0
    assert [r["mechanism"] for r in _rows(out / "summary.csv")] == [
        "none", "generalized_attention_0111"]


def test_command_line_refuses_bad_input_in_one_line(cli, tmp_path):
    r = cli("compare", "bogus", "--out", str(tmp_path / "runs"))
    assert r.returncode == 2
    assert "unknown mechanism 'bogus'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists()  # nothing started
    r = cli("compare", "se", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r"))
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_whitening_is_fitted_to_a_sample_of_every_class(fake_cifar, tmp_path):
    from spatial_attention.apps.compare.net import whitening_sample

    data = _tiny_data(fake_cifar, tmp_path)
    # the cache is in class order, so the first images are all one class
    assert data.train_y[:24].unique().tolist() == [0]
    pick = whitening_sample(len(data.train_y), 40)
    assert len(pick.unique()) == 40 and torch.equal(pick, whitening_sample(96, 40))
    assert data.train_y[pick].unique().tolist() == [0, 1, 2, 3]
    assert len(whitening_sample(10)) == 10  # fewer images than the sample: all of them

    p = Protocol(epochs=1, width=0.125, batch_size=32)
    mean, std = runner._stats(data)
    model = runner.build_model("none", p, data, mean, std, 0, torch.device("cpu"))
    assert torch.equal(model.whiten.bias, torch.zeros(24))  # airbench's zero start
    assert not model.whiten.weight.requires_grad


def test_tta_modes_weigh_views_like_airbench():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(),
                                torch.nn.LazyLinear(10))
    x = torch.randn(5, 3, 8, 8)
    model(x)
    with torch.no_grad():
        def pair(v):
            return (model(v) + model(v.flip(-1))) / 2

        padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
        expect = (pair(x) / 2 + pair(padded[..., :8, :8]) / 4
                  + pair(padded[..., 2:, 2:]) / 4)
        assert torch.allclose(runner.tta_logits(model, x, "flip_translate"), expect,
                              atol=1e-6)
        assert torch.allclose(runner.tta_logits(model, x, "flip"), pair(x))
        assert torch.equal(runner.tta_logits(model, x, "none"), model(x))
    assert Protocol().tta == "flip_translate"
    assert "flip + 1-px translate TTA" in Protocol().describe()
    with pytest.raises(ValueError, match="tta"):
        Protocol(tta="mirror")


# --- the token-mixer protocol (compare --tokens) ---------------------------------------

TINY_TOKENS = ["--epochs", "1", "--batch-size", "32", "--threads", "1"]


@pytest.fixture
def tiny_token_preset(monkeypatch):
    from spatial_attention.apps.compare.token_runner import TokenProtocol

    tiny = TokenProtocol(dims=(16, 32, 32), heads=(1, 2, 2), depths=(2, 1, 1), mlp_ratio=1.0)
    monkeypatch.setitem(cli.TOKEN_PRESETS, "cpu", tiny)
    return tiny


def test_token_entries_by_registration():
    from spatial_attention import registry
    from spatial_attention.apps.compare.token_net import ENTRIES

    entries = cli.select_token_entries([], None)
    assert entries[:5] == ["global", "swin", "twins", "boat", "cswin"]
    assert len(entries) == len(set(entries))
    used = {m for pattern in ENTRIES.values() for m in pattern}
    for name in registry.list_mechanisms(layout="tokens"):
        info = registry.info(name)
        if info.family.startswith("token_"):
            assert name in used or name in entries, name
        else:
            assert name not in entries  # multi_view mixers are not token mixers here
    # a composite's only member is that composite; a composite's part stays itself
    assert cli.select_token_entries(["global_attention", "cswin_attention",
                                     "window_attention"], None) == [
        "global", "cswin", "window_attention"]
    assert "swin" not in cli.select_token_entries([], "token_feature_space")


def test_tokens_end_to_end_skip_and_resume(fake_cifar, tmp_path, monkeypatch,
                                           tiny_token_preset):
    from spatial_attention.apps.compare import token_net, token_runner

    # a mixer whose construction fails is skipped with a note, the queue goes on
    monkeypatch.setitem(token_net.MIXER_SIZES, "cswin_attention", {"no_such_arg": 1})
    out = tmp_path / "tok"
    args = _args("--tokens", "swin", "cswin", "--seeds", "1", "--data", str(fake_cifar),
                 "--out", str(out), *TINY_TOKENS)
    assert cli.run(args) == 0
    rows = _rows(out / "results.csv")
    assert [(r["mechanism"], r["seed"]) for r in rows] == [("global", "0"), ("swin", "0")]
    assert all(0 <= float(r["accuracy"]) <= 1 and int(r["macs"]) > 0 for r in rows)
    summary = {s["mechanism"]: s for s in _rows(out / "summary.csv")}
    for s in summary.values():
        assert 0 < int(s["attn_flops_32px"]) < int(s["attn_flops_224px"])
    # global attention is quadratic in the tokens, windows linear: (56/16)^4 vs (56/16)^2
    g, w = summary["global"], summary["swin"]
    assert int(g["attn_flops_224px"]) / int(g["attn_flops_32px"]) > 30
    assert int(w["attn_flops_224px"]) / int(w["attn_flops_32px"]) < 15
    md = (out / "summary.md").read_text()
    assert "| vs global |" in md and "mixer FLOPs 224px" in md
    assert "- skipped: cswin: TypeError" in md
    claims = (out / "claims.md").read_text()  # only the token protocol's claims
    assert "| boat rivals global | " in claims and "cbam beats se" not in claims
    assert json.loads((out / "protocol.json").read_text())["net"] == "tokens"

    # run again: every run is finished, nothing is built
    def no_build(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(token_runner, "build_token_model", no_build)
    assert cli.run(args) == 0
    assert _rows(out / "results.csv") == rows

    # the CNN protocol in the token folder (and another token protocol) is refused
    with pytest.raises(UsageError, match="tokens protocol"):
        cli.run(_args("se", "--data", str(fake_cifar), "--out", str(out), *TINY))
    with pytest.raises(UsageError, match="another protocol"):
        cli.run(_args("--tokens", "--data", str(fake_cifar), "--out", str(out),
                      *TINY_TOKENS[:-2], "--epochs", "2"))


def test_token_resume_is_bit_exact(fake_cifar, tmp_path, tiny_token_preset):
    from spatial_attention.apps.compare.token_runner import train_token_run

    data = _tiny_data(fake_cifar, tmp_path).subset(64, 8)
    p = replace_protocol(tiny_token_preset, epochs=2, batch_size=32)
    full = train_token_run(tmp_path / "full", "global", 0, p, data)
    assert train_token_run(tmp_path / "cut", "global", 0, p, data, stop_after_epochs=1) is None
    resumed = train_token_run(tmp_path / "cut", "global", 0, p, data)
    a = read_weights(tmp_path / "full" / "checkpoint" / "model.safetensors")
    b = read_weights(tmp_path / "cut" / "checkpoint" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.accuracy == full.accuracy


def replace_protocol(p, **changes):
    from dataclasses import replace

    return replace(p, **changes)


@pytest.mark.parametrize("argv, match", [
    (["--tokens", "not_a_mixer"], "not_a_mixer"),
    (["--tokens", "se"], "without --tokens"),
    (["se", "--tokens", "swin"], "token mixers only"),
    (["--tokens", "multi_view_window_attention"], "token mixers only"),
    (["--tokens", "none"], "baseline"),
    (["--tokens", "--family", "channel"], "no token mixers"),
    (["--tokens", "swin", "--width", "0.5"], "width"),
    (["window_attention"], "--tokens"),
])
def test_token_bad_input_starts_nothing(argv, match, fake_cifar, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UsageError, match=match):
        cli.run(_args(*argv, "--data", str(fake_cifar), "--out", str(out)))
    assert not out.exists()


def test_token_command_line_refuses_bad_names_in_one_line(cli, tmp_path):
    # (the unknown-name case is test_command_line_refuses_bad_input_in_one_line's)
    for argv in (["--tokens", "cbam"], ["window_attention"]):
        r = cli("compare", *argv, "--out", str(tmp_path / "runs"))
        assert r.returncode == 2, argv
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
        assert not (tmp_path / "runs").exists()


def test_token_backbone_init_does_not_depend_on_the_mixer():
    from spatial_attention.apps.compare.token_net import TokenNet

    kw = {"dims": (16, 32, 32), "heads": (1, 2, 2), "depths": (2, 1, 1)}
    torch.manual_seed(5)
    base = TokenNet("global", **kw).state_dict()
    torch.manual_seed(5)
    other = TokenNet("swin", **kw)
    from spatial_attention import registry

    assert [type(b.mixer) for b in other.stages[0]] == [
        registry.info(n).cls for n in ("window_attention", "shifted_window_attention")]
    assert tuple(other.stages[0][1].mixer.shift_size) == (2, 2)  # the shifted half
    other = other.state_dict()
    shared = [k for k in base if ".mixer." not in k]
    assert shared and all(torch.equal(base[k], other[k]) for k in shared)
    assert TokenNet("global", **kw)(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_timing_pass_is_interleaved_and_feeds_the_summary(fake_cifar, tmp_path, monkeypatch):
    from spatial_attention.apps.compare import timing

    out = tmp_path / "out"
    base = ["se", "--seeds", "1", "--data", str(fake_cifar), "--out", str(out), *TINY]
    assert cli.run(_args(*base)) == 0
    order = []
    real = timing.evaluate

    def spy(model, *a, **k):  # which entry each evaluation of the pass belonged to
        order.append(id(model))
        return real(model, *a, **k)

    monkeypatch.setattr(timing, "evaluate", spy)
    assert cli.run(_args(*base, "--timing", "--timing-rounds", "2")) == 0
    assert len(order) == 4 and order[0] != order[1] and order[:2] == order[2:]  # A B A B
    rows = {r["mechanism"]: r for r in _rows(out / "timing.csv")}
    assert sorted(rows) == ["none", "se"]
    assert float(rows["none"]["train_vs_baseline"]) == 1.0
    for r in rows.values():
        assert float(r["train_img_s"]) > 0 and float(r["infer_img_s"]) > 0
        assert r["rounds"] == "2" and r["threads"] == "1"
    # the summary's img/s are the pass's, and the table says where they come from
    summary = {r["mechanism"]: r for r in _rows(out / "summary.csv")}
    for name in rows:
        assert float(summary[name]["train_img_s"]) == pytest.approx(
            float(rows[name]["train_img_s"]))
    assert "separate timing pass" in (out / "summary.md").read_text()
    assert _rows(out / "results.csv")[0]["seed"] == "0"  # the runs themselves untouched
    with pytest.raises(UsageError, match="--timing-rounds must be positive"):
        cli.run(_args(*base, "--timing", "--timing-rounds", "0"))


def test_timing_note_tells_one_pass_from_several():
    from spatial_attention.apps.compare.timing import timing_note

    row = {"rounds": "3", "steps": "3", "threads": "2", "device": "cpu"}
    one = timing_note({"none": {**row, "load_before": "1.80"},
                       "se": {**row, "load_before": "1.80"}})
    assert "load average 1.80 at its start" in one and "passes" not in one
    two = timing_note({"none": {**row, "load_before": "1.47"},
                       "se": {**row, "load_before": "1.80"},
                       "gam": {**row, "load_before": "1.80"}})
    assert "rows from 2 passes (load averages 1.47, 1.80" in two
    assert "compare ratios rather than img/s" in two


def test_token_timing_pass(fake_cifar, tmp_path, tiny_token_preset):
    out = tmp_path / "tok"
    assert cli.run(_args("--tokens", "swin", "--data", str(fake_cifar), "--out", str(out),
                         *TINY_TOKENS, "--timing", "--timing-rounds", "1")) == 0
    rows = {r["mechanism"]: r for r in _rows(out / "timing.csv")}
    assert sorted(rows) == ["global", "swin"]  # the token baseline is timed with them
    assert float(rows["global"]["infer_vs_baseline"]) == 1.0
    assert not (out / "results.csv").exists()  # no run was trained


def test_baseline_gets_its_own_seed_count(fake_cifar, tmp_path, monkeypatch):
    order = []

    def fake_train(run_dir, name, seed, *a, **k):
        order.append((name, seed))
        return None if len(order) > 99 else runner.RunResult(
            mechanism=name, seed=seed, accuracy=0.5, train_seconds=1.0, epochs=2, params=1,
            macs=1, train_img_s=1.0, infer_img_s=1.0, peak_mem_mb=1.0, device="cpu",
            threads=1)

    monkeypatch.setattr(cli, "train_run", fake_train)
    monkeypatch.setattr(cli, "write_reports",
                        lambda out, *a, **k: (out / "summary.md").write_text("table"))
    args = _args("se", "--seeds", "2", "--baseline-seeds", "4", "--data", str(fake_cifar),
                 "--out", str(tmp_path / "o"), *TINY)
    assert cli.run(args) == 0
    # seed-major, the baseline's extra seeds last
    assert order == [("none", 0), ("se", 0), ("none", 1), ("se", 1), ("none", 2),
                     ("none", 3)]
    with pytest.raises(UsageError, match="--baseline-seeds must be positive"):
        cli.run(_args("se", "--baseline-seeds", "0", "--data", str(fake_cifar), *TINY))


def test_plan_reads_the_queue_and_trains_nothing(fake_cifar, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["se", "--seeds", "2", "--data", str(fake_cifar), "--out", str(out), *TINY]
    # 96 images / batch 32 = 3 steps per epoch, 2 epochs
    assert cli.run(_args(*base, "--plan")) == 0
    text = capsys.readouterr().out
    assert "plan: 4 runs in the queue: 0 finished, 0 to resume, 4 to start (6 steps each)" \
        in text
    assert "none: 2 to start; time unknown" in text and "plus 2 without one" in text
    assert not (out / "runs").exists() and not (out / "protocol.json").exists()

    # one epoch of the first run, then a stop: the plan sees it resume at step 3
    assert cli.run(_args(*base, "--stop-after-epochs", "1")) == 0
    capsys.readouterr()
    assert cli.run(_args(*base, "--plan")) == 0
    assert "none: seed 0 resumes at step 3, 1 to start" in capsys.readouterr().out

    # finished runs give their entry a rate; a timing pass overrides it
    assert cli.run(_args(*base)) == 0
    capsys.readouterr()
    assert cli.run(_args(*base, "--plan")) == 0
    assert "4 finished" in (text := capsys.readouterr().out) and "nothing left" in text
    more = ["se", "--seeds", "3", *base[3:]]  # one more run each
    assert cli.run(_args(*more, "--plan")) == 0
    text = capsys.readouterr().out
    assert "none: 2 finished, 1 to start; about" in text and "its 2 finished run(s)" in text
    (out / "timing.csv").write_text(
        "mechanism,train_img_s,infer_img_s,train_vs_baseline,infer_vs_baseline,rounds,steps,"
        "threads,device,load_before\n"
        "none,19.2,100,1,1,3,3,2,cpu,0\nse,9.6,100,0.5,1,3,3,2,cpu,0\n")
    assert cli.run(_args(*more, "--plan")) == 0
    text = capsys.readouterr().out
    # 6 steps of 32 images: 10 s at 19.2 img/s, 20 s at 9.6
    assert "none: 2 finished, 1 to start; about 10 s at 19 img/s (timing pass, 2 threads)" \
        in text
    assert "se: 2 finished, 1 to start; about 20 s at 10 img/s" in text
    assert "total: about 30 s of training steps; a lower bound" in text
    assert "--timing` gives" not in text  # every entry has a rate


def test_plan_queue_seconds_from_the_rates(tmp_path):
    from spatial_attention.apps.compare.plan import plan_queue

    (tmp_path / "timing.csv").write_text(
        "mechanism,train_img_s,threads\nnone,100,2\n")
    garbled = tmp_path / "runs" / "se" / "seed0" / "checkpoint"
    garbled.mkdir(parents=True)
    (garbled / "state.pt").write_bytes(b"not a checkpoint")  # unreadable: counted as unstarted
    plans = plan_queue(tmp_path, [("none", 0), ("se", 0), ("none", 1)], steps_per_run=50,
                       batch_size=4)
    assert [p.name for p in plans] == ["none", "se"]
    none, se = plans
    assert (none.seeds, none.to_start, none.steps_left) == (2, 2, 100)
    assert none.seconds == pytest.approx(100 * 4 / 100)
    assert (se.to_start, se.resuming, se.steps_left) == (1, [], 50)
    assert se.seconds is None and se.rate_from == ""


def test_token_plan(fake_cifar, tmp_path, tiny_token_preset, capsys):
    out = tmp_path / "tok"
    assert cli.run(_args("--tokens", "swin", "--seeds", "2", "--data", str(fake_cifar),
                         "--out", str(out), *TINY_TOKENS, "--plan")) == 0
    text = capsys.readouterr().out
    assert "plan: 4 runs in the queue: 0 finished, 0 to resume, 4 to start (3 steps each)" \
        in text
    assert "global: 2 to start" in text and "swin: 2 to start" in text
    assert not (out / "runs").exists()
