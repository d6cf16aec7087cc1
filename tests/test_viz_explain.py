"""Panels with captions and shared scales, per-head grids, groups, clip GIFs, and
``spatial-attention viz --run`` / ``--weights`` on trained models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")

from spatial_attention import viz  # noqa: E402
from spatial_attention.cli import main  # noqa: E402
from spatial_attention.errors import UsageError  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def _png_pixels(path):
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)


def test_map_panels_share_one_scale_and_carry_a_caption(tmp_path):
    img = np.random.default_rng(0).random((30, 40, 3))
    a, b = np.zeros((3, 4)), np.full((6, 8), 2.0)
    a[0, 0] = 1.0
    fig = viz.map_panels(img, [("a", a), ("b", b)], title="t", caption="what it shows",
                         out=tmp_path / "p.svg")
    assert fig._supxlabel.get_text() == "what it shows"
    bar = fig.axes[-1]
    assert bar.get_ylim() == pytest.approx((0.0, 2.0))  # the range of both maps
    assert (tmp_path / "p.svg").read_text().lstrip().startswith("<?xml")
    fig = viz.map_panels(img, [("a", a)], shared_scale=False, out=tmp_path / "q.png")
    assert "each panel" in fig.axes[-1].get_ylabel()
    px = _png_pixels(tmp_path / "q.png")
    assert px.shape[0] > 100 and px.std() > 5
    with pytest.raises(UsageError, match=".png or .svg"):
        viz.map_panels(img, [("a", a)], out=tmp_path / "p.jpg")
    with pytest.raises(ValueError, match="not an"):
        viz.map_panels(img, [("a", np.zeros((2, 2, 2)))])
    with pytest.raises(ValueError, match="no maps"):
        viz.map_panels(img, [])


def test_head_maps_mean_over_queries_or_one_query():
    w = torch.softmax(torch.randn(1, 2, 6, 6), -1)
    maps = viz.head_maps(w, (2, 3))
    assert maps.shape == (2, 2, 3)
    np.testing.assert_allclose(maps[1].ravel(), w[0, 1].mean(0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(viz.head_maps(w[0], (2, 3), query=4)[0].ravel(),
                               w[0, 0, 4].numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="grid"):
        viz.head_maps(w, (2, 2))
    with pytest.raises(ValueError, match="query 6"):
        viz.head_maps(w, (2, 3), query=6)
    fig = viz.head_grid(w, (2, 3))
    assert [ax.get_title() for ax in fig.axes[1:3]] == ["head 0", "head 1"]
    assert "per head" in fig._supxlabel.get_text()


def test_cluster_view_and_clip_animation(tmp_path):
    from PIL import Image

    img = np.random.default_rng(1).random((20, 24, 3))
    fig = viz.cluster_view(img, np.arange(12).reshape(3, 4) % 5, out=tmp_path / "g.png")
    assert fig.axes[1].get_title() == "5 groups"
    frames = np.random.default_rng(2).random((5, 16, 16, 3))
    maps = np.random.default_rng(3).random((5, 4, 4))
    path = viz.animate_clip(frames, maps, tmp_path / "a.gif", caption="c")
    with Image.open(path) as gif:
        assert gif.n_frames == 5
    with pytest.raises(UsageError, match=".gif"):
        viz.animate_clip(frames, maps, tmp_path / "a.png")
    with pytest.raises(ValueError, match="same T"):
        viz.animate_clip(frames, maps[:3], tmp_path / "b.gif")


def test_cli_heads_groups_and_clip(tmp_path, capsys):
    assert main(["viz", "window_attention", "--heads", "--grid", "8", "--channels", "64",
                 "--size", "64", "--out", str(tmp_path / "h.png")]) == 0
    assert "heads over a 8x8 grid" in capsys.readouterr().out
    assert _png_pixels(tmp_path / "h.png").std() > 5
    assert main(["viz", "bilateral_local_attention", "--groups", "--grid", "8", "--channels",
                 "16", "--size", "64", "--out", str(tmp_path / "g.svg")]) == 0
    assert main(["viz", "temporal", "--frames", "3", "--grid", "4", "--channels", "8",
                 "--size", "32", "--out", str(tmp_path / "t.gif")]) == 0
    from PIL import Image

    with Image.open(tmp_path / "t.gif") as gif:
        assert gif.n_frames == 3
    assert main(["viz", "cbam", "--heads", "--out", str(tmp_path / "x.png")]) == 2
    assert "splits by head" in capsys.readouterr().err
    assert main(["viz", "cbam", "--out", str(tmp_path / "x.jpg")]) == 2
    assert main(["viz"]) == 2
    assert "name a mechanism" in capsys.readouterr().err


@pytest.fixture
def benchmark_run(tmp_path):
    """A run folder of the equal-budget benchmark, with untrained weights."""
    from spatial_attention.apps.compare.net import CompareNet
    from spatial_attention.apps.compare.runner import PRESETS
    from spatial_attention.apps.training.checkpoints import save_checkpoint

    out = tmp_path / "bench"
    (out / "runs" / "cbam" / "seed0").mkdir(parents=True)
    (out / "protocol.json").write_text(json.dumps(PRESETS["cpu"].to_json()))
    torch.manual_seed(0)
    net = CompareNet("cbam", PRESETS["cpu"].width)
    save_checkpoint(out / "runs" / "cbam" / "seed0" / "checkpoint", net.state_dict(),
                    {"epoch": 1}, ema_state=net.state_dict())
    return out / "runs" / "cbam" / "seed0"


def test_viz_run_on_a_benchmark_run(benchmark_run, tmp_path, capsys):
    from spatial_attention.apps.explain.cli import figure_for
    from spatial_attention.apps.explain.runs import load_run
    from spatial_attention.images import load_image

    out = tmp_path / "maps"
    assert main(["viz", "--run", str(benchmark_run), "builtin:chelsea", "builtin:coffee",
                 "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["chelsea_attention.png",
                                                     "coffee_attention.png"]
    assert _png_pixels(out / "chelsea_attention.png").std() > 5
    assert main(["viz", "--run", str(benchmark_run), "builtin:chelsea", "--mode", "gradient",
                 "--target", "cat", "--out", str(tmp_path / "g.svg")]) == 0
    trained = load_run(benchmark_run)
    assert trained.classes[3] == "cat" and "cbam seed 0" in trained.label
    fig = figure_for(trained, load_image("builtin:chelsea"), "gradient", target=3)
    assert "maps for class cat" in fig._suptitle.get_text()
    assert "gradient" in fig._supxlabel.get_text()
    assert len(fig.axes) == 1 + 3 + 1  # input, one spatial gate per stage, colour bar
    capsys.readouterr()
    assert main(["viz", "--run", str(benchmark_run), "builtin:chelsea", "--target", "unicorn"]
                ) == 2
    assert "not a class" in capsys.readouterr().err
    assert main(["viz", "--run", str(tmp_path), "builtin:chelsea"]) == 2
    assert main(["viz", "--run", str(benchmark_run)]) == 2


def test_viz_weights_and_model(tmp_path):
    from safetensors.torch import save_file

    from spatial_attention.models import create_model

    torch.manual_seed(0)
    model = create_model("vit_micro_cifar", num_classes=3)
    save_file(model.state_dict(), tmp_path / "vit.safetensors")
    out = tmp_path / "r.png"
    assert main(["viz", "--weights", str(tmp_path / "vit.safetensors"), "--model",
                 "vit_micro_cifar", "--num-classes", "3", "--input-size", "32", "--mode",
                 "rollout", "builtin:coffee", "--out", str(out)]) == 0
    assert _png_pixels(out).std() > 5
    assert main(["viz", "--weights", str(tmp_path / "vit.safetensors"), "builtin:coffee"]) == 2


def test_gallery_from_benchmark_runs(benchmark_run, tmp_path):
    bench = benchmark_run.parent.parent.parent
    (bench / "runs" / "none" / "seed0").mkdir(parents=True)  # the baseline is left out
    out = tmp_path / "gallery"
    assert main(["viz", "--gallery", str(bench), "--count", "2", "--out", str(out)]) == 0
    page = (out / "README.md").read_text()
    assert "spatial-attention viz --gallery" in page and "cbam seed 0" in page
    assert "none" not in page.split("Runs shown:")[1]
    assert _png_pixels(out / "gallery.png").std() > 5
    empty = tmp_path / "empty"
    (empty / "runs").mkdir(parents=True)
    assert main(["viz", "--gallery", str(empty), "--out", str(out)]) == 2
