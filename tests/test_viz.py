"""Heatmaps, overlays, image loading and the ``spatial-attention viz`` command."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")

from spatial_attention import viz  # noqa: E402
from spatial_attention.errors import UsageError  # noqa: E402
from spatial_attention.images import builtin_images, load_image  # noqa: E402


# -- show_heatmaps -----------------------------------------------------------------------
def test_show_heatmaps_grid_shares_one_colour_bar(tmp_path):
    weights = torch.softmax(torch.randn(2, 3, 5, 7), dim=-1)
    out = tmp_path / "sub" / "heat.png"
    fig = viz.show_heatmaps(weights, "keys", "queries", titles=["a", "b", "c"], out=out)
    assert len(fig.axes) == 2 * 3 + 1  # six heatmaps and one colour bar
    assert [ax.get_title() for ax in fig.axes[:6]] == ["a", "b", "c"] * 2
    assert fig.axes[3].get_ylabel() == "queries" and fig.axes[5].get_xlabel() == "keys"
    # every panel draws on the same colour scale, the range of all matrices
    clims = {ax.images[0].get_clim() for ax in fig.axes[:6]}
    assert len(clims) == 1
    lo, hi = clims.pop()
    assert lo == pytest.approx(weights.min().item()) and hi == pytest.approx(weights.max().item())
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_show_heatmaps_per_panel_titles_ticks_and_2d_input():
    fig = viz.show_heatmaps(np.eye(3), "k", "q", titles=["only"],
                            xticklabels=list("abc"), yticklabels=list("xyz"))
    assert len(fig.axes) == 2 and fig.axes[0].get_title() == "only"
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["a", "b", "c"]
    fig = viz.show_heatmaps(np.zeros((2, 2, 3, 3)), "k", "q", titles=list("abcd"))
    assert [ax.get_title() for ax in fig.axes[:4]] == list("abcd")


def test_show_heatmaps_rejects_bad_shapes():
    with pytest.raises(ValueError, match="rows, cols, Q, K"):
        viz.show_heatmaps(np.zeros((1, 1, 1, 2, 2)), "k", "q")
    with pytest.raises(ValueError, match="titles"):
        viz.show_heatmaps(np.zeros((1, 3, 2, 2)), "k", "q", titles=["a", "b"])


# -- overlay -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "image",
    [
        np.full((40, 60, 3), 128, np.uint8),
        np.full((40, 60, 3), 0.5, np.float32),
        torch.full((3, 40, 60), 0.5),
    ],
    ids=["uint8", "float", "chw-tensor"],
)
def test_overlay_shape_and_range(image):
    blended = viz.overlay(image, torch.rand(7, 7), alpha=0.4)
    assert blended.shape == (40, 60, 3) and blended.dtype == np.float32
    assert 0.0 <= blended.min() and blended.max() <= 1.0


@pytest.mark.parametrize("corner", [(0, 0), (0, 3), (3, 0), (3, 3)])
def test_overlay_upsamples_the_map_to_the_right_quadrant(corner, tmp_path):
    spatial = np.zeros((4, 4))
    spatial[corner] = 1.0
    out = tmp_path / "overlay.png"
    blended = viz.overlay(np.zeros((80, 120, 3), np.uint8), spatial, alpha=1.0, cmap="gray",
                          out=out)
    assert blended.shape == (80, 120, 3)
    y, x = np.unravel_index(blended[..., 0].argmax(), blended.shape[:2])
    assert (y >= 40) == (corner[0] == 3) and (x >= 60) == (corner[1] == 3)
    assert blended.max() == pytest.approx(1.0)  # the map is normalised to [0, 1]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_upsample_map_is_bilinear_and_normalised():
    up = viz.upsample_map(torch.tensor([[0.0, 2.0]]), (1, 4))
    assert np.allclose(up, [[0.0, 0.25, 0.75, 1.0]])
    assert np.all(viz.upsample_map(np.ones((3, 3)), (5, 5)) == 0)  # constant: no peak


def test_overlay_rejects_bad_alpha_and_colormap():
    with pytest.raises(ValueError, match="alpha"):
        viz.overlay(np.zeros((4, 4, 3)), np.zeros((2, 2)), alpha=1.5)
    with pytest.raises(UsageError, match="colormap"):
        viz.overlay(np.zeros((4, 4, 3)), np.zeros((2, 2)), cmap="no_such_map")


# -- images ------------------------------------------------------------------------------
def test_load_builtin_image_and_resize():
    names = builtin_images()
    assert "astronaut" in names  # scikit-image ships it inside the package
    image = load_image("builtin:astronaut")
    assert image.dtype == np.uint8 and image.shape == (512, 512, 3)
    small = load_image("builtin:chelsea", size=32)  # 300 x 451: short side to 32
    assert small.shape == (32, 48, 3)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_load_image_from_a_file(tmp_path, mode):
    Image = pytest.importorskip("PIL.Image")
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[:, 15:] = 255
    path = tmp_path / f"img_{mode}.png"
    Image.fromarray(rgb).convert(mode).save(path)
    image = load_image(path)
    assert image.shape == (20, 30, 3) and image.dtype == np.uint8
    assert image[:, :15].max() == 0 and image[:, 15:].min() == 255


def test_load_image_errors(tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    with pytest.raises(UsageError, match="cannot read"):
        load_image(corrupt)
    with pytest.raises(UsageError, match="not found"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(UsageError, match="astronaut") as err:
        load_image("builtin:no_such_image")
    assert "unknown built-in image" in str(err.value)
    with pytest.raises(UsageError, match="size"):
        load_image("builtin:astronaut", size=0)


# -- running mechanisms on images --------------------------------------------------------
@pytest.mark.parametrize("name", ["multi_head", "dot_product", "additive"])
def test_attention_map_of_sequence_mechanisms(name):
    image = load_image("builtin:astronaut", size=48)
    m = viz.attention_map(name, image, channels=16, grid=12)
    assert m.shape == (12, 12) and m.min() == 0.0 and m.max() == 1.0
    again = viz.attention_map(name, image, channels=16, grid=12)
    assert np.array_equal(m, again)  # seeded: the same map every time


def test_attention_map_keeps_the_callers_random_state():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    viz.attention_map("multi_head", np.zeros((16, 16, 3), np.uint8), channels=8, grid=4)
    assert torch.equal(torch.rand(3), expected)


def test_image_features_follow_the_token_grid():
    feats = viz.image_features(np.zeros((64, 96, 3), np.uint8), channels=8, grid=16)
    assert feats.shape == (1, 8, 16, 24)


# -- the command -------------------------------------------------------------------------
def _cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "spatial_attention", "viz", *args],
        cwd=cwd, capture_output=True, text=True, timeout=120,
    )


@pytest.mark.parametrize("name", ["multi_head", "dot_product"])
def test_cli_viz_writes_a_png(tmp_path, name):
    proc = _cli(name, "--image", "builtin:astronaut", "--out", "x.png", "--size", "64",
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "x.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in proc.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (("multi_head", "--image", "missing.png"), "image file not found"),
        (("multi_head", "--image", "builtin:nope"), "unknown built-in image"),
        (("multi_head", "--size", "0"), "--size"),
        (("no_such_mechanism",), "unknown mechanism"),
    ],
)
def test_cli_viz_bad_arguments_exit_2_with_one_line(tmp_path, args, message):
    proc = _cli(*args, "--out", "x.png", cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "x.png").exists()


def test_cli_viz_corrupt_image_exits_2(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    proc = _cli("multi_head", "--image", "bad.jpg", "--out", "x.png", cwd=tmp_path)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "bad.jpg" in proc.stderr


# -- map-layout mechanisms, with stand-ins so the test does not depend on other layers ----
def _register_stand_in(monkeypatch, name, family, cls):
    from spatial_attention import registry

    registry._ensure_loaded()
    entry = registry.MechanismInfo(name=name, cls=cls, family=family, layout="map",
                                   paper="test stand-in", year=None)
    monkeypatch.setitem(registry._REGISTRY, name, entry)


def _stand_in_classes():
    from spatial_attention.layers.base import AttentionModule

    class SpatialGate(AttentionModule):
        """Records a (B, 1, H, W) map: the brightness of the input features."""

        layout = "map"

        def __init__(self, channels: int) -> None:
            super().__init__()

        def forward(self, x):
            gate = x.mean(1, keepdim=True).sigmoid()
            self.record(gate)
            return x * gate

    class ChannelGate(SpatialGate):
        """Records (B, C, 1, 1) channel weights only."""

        def forward(self, x):
            gate = x.mean((2, 3), keepdim=True).sigmoid()
            self.record(gate)
            return x * gate

    return SpatialGate, ChannelGate


def test_map_layout_mechanism_gives_its_spatial_map(monkeypatch):
    spatial, _ = _stand_in_classes()
    _register_stand_in(monkeypatch, "test_spatial_gate", "spatial", spatial)
    m = viz.attention_map("test_spatial_gate", np.zeros((32, 48, 3), np.uint8), channels=4,
                          grid=8)
    assert m.shape == (8, 12)


def test_mechanism_without_spatial_map_is_a_usage_error(monkeypatch):
    _, channel = _stand_in_classes()
    _register_stand_in(monkeypatch, "test_channel_gate", "channel", channel)
    with pytest.raises(UsageError, match="has no spatial map.*channel attention"):
        viz.attention_map("test_channel_gate", np.zeros((16, 16, 3), np.uint8), channels=4,
                          grid=4)


@pytest.mark.parametrize("name", ["multi_view_window_attention", "multi_view_concat_attention"])
def test_multi_view_maps_cover_every_view_pair(name):
    """Two views (the image and its mirror): a map for every (query view, key view)."""
    image = load_image("builtin:astronaut", size=48)
    views, maps = viz.multi_view_maps(name, image, channels=32, grid=12)
    assert [label for label, _ in views] == ["image", "mirrored"]
    assert np.array_equal(views[1][1], viz.to_float_image(image)[:, ::-1])
    assert sorted(maps) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for m in maps.values():
        assert m.shape == (12, 12) and m.min() >= 0.0 and m.max() <= 1.0
    # single-view mechanisms are not multi-view
    with pytest.raises(UsageError, match="single view"):
        viz.multi_view_maps("window_attention", image, channels=32, grid=12)


def test_cli_viz_multi_view_writes_a_png(tmp_path):
    proc = _cli("multi_view_window_attention", "--out", "mv.png", "--size", "64",
                "--grid", "8", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "mv.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "2 views" in proc.stdout
