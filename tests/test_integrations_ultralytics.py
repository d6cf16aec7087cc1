"""Ultralytics YOLO integration: ``sa.<name>`` layers in model YAMLs; build, train, reload, predict.

Nothing here may reach the network or write into the repository: every test runs in its
own ``tmp_path`` with sockets refused (an attempt fails the test), Ultralytics' settings
live in a temporary directory, and models are built from YAML, never from ``.pt`` files.
The training set is the two images Ultralytics ships, with boxes labelled by hand below.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import _torchvision_shim  # noqa: F401  (before anything imports torchvision)
import numpy as np
import PIL.Image
import pytest
import torch

import spatial_attention as sa
from spatial_attention.capture import capture_attention

# Ultralytics reads these when it is imported: settings in a throwaway directory, no
# online checks (pip update, hub, telemetry), quiet logs.
_SETTINGS_DIR = tempfile.mkdtemp(prefix="sa-yolo-settings-")
atexit.register(shutil.rmtree, _SETTINGS_DIR, ignore_errors=True)
os.environ.setdefault("YOLO_CONFIG_DIR", _SETTINGS_DIR)
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Importing Ultralytics (which pytest does for every test module at collection, before any
# test runs) changes the whole process: numpy's and torch's print options, a few
# environment variables (OMP_NUM_THREADS=1 for later subprocesses), and it monkeypatches
# PIL.Image.open (an unreadable image then triggers a pip install of pi-heif) and
# torch.save (retries with sleeps). Put all of that back so other tests see plain libraries.
_ENV = dict(os.environ)
_PIL_OPEN = PIL.Image.open
_TORCH_SAVE = torch.save
_NP_PRINT = np.get_printoptions()
_TORCH_PRINT = {k: getattr(torch._tensor_str.PRINT_OPTS, k)
                for k in ("precision", "threshold", "edgeitems", "linewidth", "sci_mode")}
ultralytics = pytest.importorskip(
    "ultralytics", reason="ultralytics is not installed (pip install ultralytics-opencv-headless)"
)
from ultralytics import YOLO  # noqa: E402
from ultralytics.data import utils as data_utils  # noqa: E402
from ultralytics.nn import tasks  # noqa: E402
from ultralytics.utils import ASSETS  # noqa: E402
from ultralytics.utils.nms import TorchNMS  # noqa: E402

np.set_printoptions(**_NP_PRINT)
torch.set_printoptions(**_TORCH_PRINT)
PIL.Image.open = _PIL_OPEN
torch.save = _TORCH_SAVE
for _key in set(os.environ) - set(_ENV):
    del os.environ[_key]
os.environ.update(_ENV)

from spatial_attention.integrations import ultralytics as sa_yolo  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ATTENTION_ROWS = 5  # one before SPPF, one after each of the 4 blocks of the neck
IMGSZ_TRAIN = 160

# Hand-labelled boxes, pixels (class, x1, y1, x2, y2); classes 0 person, 1 bus, 2 tie.
LABELS = {
    "bus.jpg": (
        (810, 1080),
        [(1, 12, 228, 802, 735), (0, 50, 398, 245, 905), (0, 222, 405, 345, 860),
         (0, 668, 392, 810, 880), (0, 0, 552, 78, 875)],
    ),
    "zidane.jpg": (
        (1280, 720),
        [(0, 123, 200, 1150, 720), (0, 748, 42, 1140, 720), (2, 435, 437, 520, 720),
         (2, 992, 312, 1045, 425)],
    ),
}
NAMES = {0: "person", 1: "bus", 2: "tie"}


def _needs(mechanism: str) -> None:
    if mechanism not in sa.list_mechanisms(layout="map"):
        pytest.skip(
            f"{mechanism!r} is not registered yet (spatial_attention.list_mechanisms() lacks "
            "it); this YAML's test runs once it is"
        )


@pytest.fixture(autouse=True)
def _offline_and_contained(monkeypatch, tmp_path):
    """Refuse the network, work in tmp_path, and undo Ultralytics' global switches."""
    attempts = []
    real_connect = socket.socket.connect

    def refuse(*args, **kwargs):
        attempts.append(args[:2])
        raise OSError("test: network access refused")

    def connect(self, address):
        if isinstance(address, (str, bytes)):  # local (AF_UNIX) sockets are fine
            return real_connect(self, address)
        return refuse(address)

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", connect)
    # check_det_dataset always looks for Arial.ttf and downloads it when missing; only
    # plots use it, and plots are off
    monkeypatch.setattr(data_utils, "check_font", lambda *a, **k: None)
    monkeypatch.chdir(tmp_path)
    had_runs = (REPO / "runs").exists()
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.set_num_threads(threads)  # Ultralytics sets it to cpu_count - 1 for CPU training
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    assert not attempts, f"something tried the network: {attempts}"
    assert (REPO / "runs").exists() == had_runs, "a run wrote into the repository"


@pytest.fixture(scope="module")
def data_yaml(tmp_path_factory) -> Path:
    """Two shipped images, hand-labelled in YOLO txt format, train = val."""
    root = tmp_path_factory.mktemp("tiny_detect")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    for image, ((w, h), boxes) in LABELS.items():
        shutil.copy(ASSETS / image, root / "images" / image)
        lines = [
            f"{c} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} "
            f"{(y2 - y1) / h:.6f}"
            for c, x1, y1, x2, y2 in boxes
        ]
        (root / "labels" / f"{Path(image).stem}.txt").write_text("\n".join(lines) + "\n")
    names = "".join(f"  {k}: {v}\n" for k, v in NAMES.items())
    (root / "data.yaml").write_text(f"path: {root}\ntrain: images\nval: images\nnames:\n{names}")
    return root / "data.yaml"


def _write_cfg(tmp_path: Path, base: str, mechanism: str) -> Path:
    path = tmp_path / f"{base}-{mechanism}.yaml"
    path.write_text(sa_yolo.yolo_yaml(base, mechanism))
    return path


def _attention_layers(model) -> list:
    return [m for m in model.model if isinstance(m, sa_yolo.YOLOAttention)]


def _expected_channels(cfg: dict, scale: str) -> list[int]:
    """Ultralytics' width rule applied to the block before each attention row."""
    _, width, max_channels = cfg["scales"][scale]
    rows = cfg["backbone"] + cfg["head"]
    out = []
    for i, row in enumerate(rows):
        if row[2].startswith(sa_yolo.PREFIX):
            c = rows[i - 1][3][0]
            out.append(int(np.ceil(min(c, max_channels) * width / 8) * 8))
    return out


def _forward_640(model) -> None:
    net = model.model.eval()
    with torch.no_grad():
        out = net(torch.zeros(1, 3, 640, 640))
    y = out[0] if isinstance(out, (list, tuple)) else out
    assert y.shape == (1, 4 + net.yaml["nc"], 80 * 80 + 40 * 40 + 20 * 20)
    assert torch.isfinite(y).all()


def _check_scales(path: Path, mechanism: str, scales=("n", "s")) -> None:
    cfg = sa_yolo.yolo_config(*path.stem.split("-", 1)[:1], mechanism)
    widths = []
    for scale in scales:
        model = sa_yolo.build_yolo(path, scale)
        layers = _attention_layers(model.model)
        assert len(layers) == ATTENTION_ROWS
        assert all(type(m).__name__ == f"SA_{mechanism}" for m in layers)
        assert [m.c1 for m in layers] == _expected_channels(cfg, scale)
        assert model.model.yaml["scale"] == scale
        _forward_640(model)
        widths.append([m.c1 for m in layers])
    assert widths[0] != widths[1]  # one YAML, channels follow the scale


# -- registration and channel plumbing ----------------------------------------------------


def test_register_is_idempotent_and_undone_by_unregister():
    names = sa_yolo.register()
    first = tasks.parse_model
    assert sa_yolo.register() == names and tasks.parse_model is first
    assert {"sa.se", "sa.eca"} <= set(names)
    assert all(vars(tasks)[n] is sa_yolo.layer_class(n[3:]) for n in names)
    sa_yolo.unregister()
    assert not sa_yolo.registered()
    assert not any(k.startswith("sa.") for k in vars(tasks))
    assert tasks.parse_model is first.__wrapped__
    sa_yolo.register()
    assert sa_yolo.registered()


def test_channels_from_any_earlier_layer_and_arguments():
    sa_yolo.register()
    d = {
        "nc": 2,
        "scale": "n",
        "scales": {"n": [0.5, 0.25, 1024]},
        "backbone": [
            [-1, 1, "Conv", [64, 3, 2]],  # 0: 16 channels at width 0.25
            [-1, 1, "Conv", [128, 3, 2]],  # 1: 32
            [0, 1, "sa.se", [4]],  # 2: reads layer 0, positional reduction
            [-2, 1, "sa.eca", [{"kernel_size": 5}]],  # 3: reads layer 1, keyword argument
            [-1, 1, "sa.se", []],  # 4: reads layer 3
        ],
        "head": [],
    }
    rows_before = repr(d)
    net, _ = tasks.parse_model(d, ch=3, verbose=False)
    assert repr(d) == rows_before  # the config itself is left as written
    se, eca, se2 = net[2], net[3], net[4]
    assert (se.c1, se.attn.fc[0].out_features) == (16, 4)
    assert (eca.c1, eca.attn.kernel_size) == (32, 5)
    assert se2.c1 == 32
    assert [type(m).__name__ for m in net[2:]] == ["SA_se", "SA_eca", "SA_se"]


def test_clear_errors_for_bad_rows():
    sa_yolo.register()

    def parse(row):
        d = {"nc": 1, "scale": "n", "scales": {"n": [1, 1, 64]},
             "backbone": [[-1, 1, "Conv", [8, 3, 2]], [-1, 1, "Conv", [8, 3, 2]], row],
             "head": []}
        return tasks.parse_model(d, ch=3, verbose=False)

    with pytest.raises(ValueError, match="unknown mechanism 'sse'; did you mean se"):
        parse([-1, 1, "sa.sse", []])
    with pytest.raises(ValueError, match="'multi_head' is a 'sequence' mechanism"):
        parse([-1, 1, "sa.multi_head", []])
    with pytest.raises(ValueError, match="reads one input, got from=\\[-1, 0\\]"):
        parse([[-1, 0], 1, "sa.se", []])
    with pytest.raises(TypeError, match="expected the input channel count"):
        sa_yolo.layer_class("se")("64")


def test_layer_class_directly_pickles_and_captures():
    import pickle

    layer = sa_yolo.layer_class("eca")(32)
    again = pickle.loads(pickle.dumps(layer))
    assert type(again) is type(layer) and again.c1 == 32
    x = torch.randn(2, 32, 8, 8)
    torch.testing.assert_close(again(x), layer(x))
    with capture_attention(layer) as maps:
        layer(x)
    assert maps["attn"].shape == (2, 32, 1, 1)


# -- configs ------------------------------------------------------------------------------


SHIPPED = [f"{base}-{m}" for base in ("yolo11", "yolov8")
           for m in ("cbam", "gam", "cpms", "coord", "simam", "ema", "triplet")]
# a short training of each costs ~10 s: the YOLOv8 files of the issue #18 mechanisms
# share their layers with the YOLO11 ones trained here, and are built and run forward
TRAINED = [n for n in SHIPPED if n.startswith("yolo11") or n.split("-")[1] in
           ("cbam", "gam", "cpms")]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_yaml_is_what_the_generator_writes(name):
    base, mechanism = name.split("-")
    assert name in sa_yolo.list_configs()
    text = sa_yolo.config_path(name).read_text()
    # written for the mechanism itself; "se" stands in until it is registered
    made = sa_yolo.yolo_yaml(base, "se").replace("sa.se", f"sa.{mechanism}")
    made = made.replace("'se'", repr(mechanism)).replace("yolo11-se", name)
    made = made.replace("yolov8-se", name)
    assert text == made
    assert sa_yolo.config_path(f"{base}s-{mechanism}") == sa_yolo.config_path(name)


@pytest.mark.parametrize("base,mechanism", [("yolo11", "se"), ("yolov8", "eca")])
def test_generic_yaml_two_scales_forward_640(tmp_path, base, mechanism):
    _check_scales(_write_cfg(tmp_path, base, mechanism), mechanism)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_yaml_two_scales_forward_640(name):
    mechanism = name.split("-")[1]
    _needs(mechanism)
    _check_scales(sa_yolo.config_path(name), mechanism)


def test_build_yolo_accepts_names_dicts_and_nc(tmp_path):
    model = sa_yolo.build_yolo(sa_yolo.yolo_config("yolov8", "se", nc=3), "s")
    assert model.model.yaml["scale"] == "s" and model.model.yaml["nc"] == 3
    assert [m.c1 for m in _attention_layers(model.model)] == [512, 256, 128, 256, 512]
    path = _write_cfg(tmp_path, "yolo11", "eca")
    model = sa_yolo.build_yolo(path, nc=2)  # scale n by default
    assert model.model.model[-1].nc == 2 and model.model.yaml["scale"] == "n"
    scaled = tmp_path / "yolo11m-eca.yaml"
    scaled.write_text(path.read_text())
    assert sa_yolo.build_yolo(scaled).model.yaml["scale"] == "m"  # from the file name
    with pytest.raises(ValueError, match="names scale 'm' but scale='s'"):
        sa_yolo.build_yolo(scaled, "s")
    with pytest.raises(ValueError, match="scale must be one of"):
        sa_yolo.build_yolo(path, "q")
    with pytest.raises(ValueError, match="unknown YOLO config 'yolo11-cbma'"):
        sa_yolo.build_yolo("yolo11-cbma")
    with capture_attention(model.model) as maps, torch.no_grad():
        model.model.eval()(torch.zeros(1, 3, 64, 64))
    assert sorted(maps) == sorted(f"model.{i}.attn" for i in (9, 15, 19, 23, 27))


# -- train, reload, predict ---------------------------------------------------------------


def _train(model, data: Path, project: Path, epochs: int = 2) -> Path:
    model.train(
        data=str(data), epochs=epochs, imgsz=IMGSZ_TRAIN, batch=2, workers=0, device="cpu",
        plots=False, amp=False, deterministic=False, project=str(project), name="train",
        exist_ok=True, verbose=False, seed=0,
    )
    best = Path(model.trainer.best)
    assert best.is_file() and best.is_relative_to(project)
    return best


def _predict(model) -> None:
    results = model.predict(str(ASSETS / "bus.jpg"), imgsz=IMGSZ_TRAIN, conf=0.001,
                            device="cpu", save=False, verbose=False)
    assert len(results) == 1 and results[0].names == NAMES
    boxes = results[0].boxes
    assert boxes.xyxy.shape[1] == 4 and torch.isfinite(boxes.xyxy).all()


def _train_reload_predict(cfg, mechanism: str, data: Path, tmp_path: Path):
    model = sa_yolo.build_yolo(cfg, "n")
    ours = tuple(f"model.{m.i}.attn." for m in _attention_layers(model.model))
    before = {k: v.clone() for k, v in model.model.state_dict().items() if k.startswith(ours)}
    best = _train(model, data, tmp_path / "runs")
    reloaded = YOLO(str(best))
    layers = _attention_layers(reloaded.model)
    assert len(layers) == ATTENTION_ROWS
    assert all(type(m).__name__ == f"SA_{mechanism}" for m in layers)
    after = {k: v for k, v in reloaded.model.state_dict().items() if k.startswith(ours)}
    assert after.keys() == before.keys()
    if before:  # parameter-free mechanisms have nothing to learn
        assert any(not torch.equal(before[k], after[k].float()) for k in before)
    _predict(reloaded)
    return best


@pytest.mark.slow
def test_generic_train_reload_retrain_predict(tmp_path, data_yaml):
    best = _train_reload_predict(_write_cfg(tmp_path, "yolo11", "se"), "se", data_yaml, tmp_path)
    # Ultralytics' opt-in restricted (weights_only) loading accepts the layers too
    ckpt, _ = tasks.torch_safe_load(str(best), safe_only=True)
    assert type(ckpt["model"].model[9]).__name__ == "SA_se"
    # training a reloaded checkpoint rebuilds it from its YAML (sa.se rows)
    again = YOLO(str(best))
    _train(again, data_yaml, tmp_path / "again", epochs=1)
    _predict(again)


@pytest.mark.slow
def test_generic_yolov8_train_reload_predict(tmp_path, data_yaml):
    _train_reload_predict(_write_cfg(tmp_path, "yolov8", "eca"), "eca", data_yaml, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", TRAINED)
def test_shipped_yaml_train_reload_predict(tmp_path, data_yaml, name):
    mechanism = name.split("-")[1]
    _needs(mechanism)
    _train_reload_predict(name, mechanism, data_yaml, tmp_path)


@pytest.mark.slow
def test_checkpoint_reloads_in_a_fresh_process(tmp_path, data_yaml):
    """Nothing registered, nothing of ours imported: unpickling finds the SA_ classes."""
    best = _train(sa_yolo.build_yolo(_write_cfg(tmp_path, "yolov8", "se"), "n"), data_yaml,
                  tmp_path / "runs", epochs=1)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import _torchvision_shim\n"
        "from ultralytics import YOLO\n"
        "m = YOLO(sys.argv[2])\n"
        "import spatial_attention.integrations.ultralytics as u\n"
        "assert u.registered(), 'unpickling should register the sa.* names'\n"
        "layers = [x for x in m.model.model if isinstance(x, u.YOLOAttention)]\n"
        "kinds = sorted({type(x).__name__ for x in layers})\n"
        "r = m.predict(sys.argv[3], imgsz=160, conf=0.001, device='cpu', save=False)\n"
        "print(kinds, len(r[0].boxes))\n"
    )
    env = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": _SETTINGS_DIR,
           "OMP_NUM_THREADS": "2"}
    done = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent), str(best),
         str(ASSETS / "bus.jpg")],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "['SA_se']" in done.stdout


# -- the test-only torchvision shim ---------------------------------------------------------


def test_shim_nms_matches_ultralytics_reference():
    torch.manual_seed(0)
    xy = torch.rand(300, 2) * 100
    boxes = torch.cat([xy, xy + torch.rand(300, 2) * 40 + 1], 1)
    scores = torch.rand(300)
    for iou in (0.3, 0.5, 0.7):
        ours = _torchvision_shim.nms_reference(boxes, scores, iou)
        torch.testing.assert_close(ours, TorchNMS.nms(boxes, scores, iou))
    assert _torchvision_shim.nms_reference(boxes[:0], scores[:0], 0.5).shape == (0,)
    import torchvision

    torch.testing.assert_close(torchvision.ops.nms(boxes, scores, 0.5),
                               TorchNMS.nms(boxes, scores, 0.5))
