"""The scripts in examples/ run end to end, at a tiny size."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_date_translation_tiny_run(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    example = _load("date_translation")
    out = tmp_path / "alignment.png"
    start = time.perf_counter()
    result = example.main([
        "--steps", "40", "--batch", "32", "--hidden", "16", "--test-size", "64",
        "--log-every", "0", "--out", str(out),
    ])
    # About 3 s on 2 idle CPU cores; the bound is loose because test machines are shared,
    # and still catches a run at the full default size (a minute or more).
    assert time.perf_counter() - start < 45
    losses = result["losses"]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5  # it learns something
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 0.0 <= result["accuracy"] <= 1.0
    assert "held-out accuracy" in capsys.readouterr().out


def test_date_data_are_consistent():
    example = _load("date_translation")
    train, test = example.split_days(seed=0, held_out=100)
    assert not set(train) & set(test) and len(test) == 100
    import random

    pairs = example.make_pairs(test[:50], random.Random(0))
    x, lens, y = example.to_batch(pairs)
    assert x.shape == (50, int(lens.max())) and y.shape == (50, example.TGT_LEN)
    for (src, _), row, n in zip(pairs, x, lens, strict=True):
        assert example.SRC.decode(row[:n].tolist()) == src
    assert example.TGT.decode(y[0].tolist()) == pairs[0][1]
