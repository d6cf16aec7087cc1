"""Ultralytics YOLO integration: ``sa.<name>`` layers in model YAMLs; build, train, reload, predict.

Nothing here may reach the network or write into the repository: every test runs in its
own ``tmp_path`` with sockets refused (an attempt fails the test), Ultralytics' settings
live in a temporary directory, and models are built from YAML, never from ``.pt`` files.
The training set is the two images Ultralytics ships, with boxes labelled by hand below.
"""

from __future__ import annotations

import atexit
import os
import shlex
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
from spatial_attention import cli
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


def _forward_640(model, task: str = "detect", size: int = 640) -> None:
    net = model.model.eval()
    with torch.no_grad():
        out = net(torch.zeros(1, 3, size, size))
    y = out[0] if isinstance(out, (list, tuple)) else out
    extra = {"detect": 0, "segment": 32, "pose": 17 * 3}[task]  # mask coefficients, keypoints
    if task == "segment":  # (boxes + classes + mask coefficients, prototypes)
        y, protos = y
        assert protos.shape == (1, 32, size // 4, size // 4) and torch.isfinite(protos).all()
    cells = sum((size // stride) ** 2 for stride in (8, 16, 32))  # P3, P4, P5
    assert y.shape == (1, 4 + net.yaml["nc"] + extra, cells)
    assert torch.isfinite(y).all()


def _check_scales(path: Path, mechanism: str, scales=("n", "s"), task: str = "detect",
                  size: int = 640) -> None:
    cfg = sa_yolo.yolo_config(path.stem.split("-", 1)[0], mechanism, task=task)
    widths = []
    for scale in scales:
        model = sa_yolo.build_yolo(path, scale)
        assert model.task == task
        layers = _attention_layers(model.model)
        assert len(layers) == ATTENTION_ROWS
        assert all(type(m).__name__ == f"SA_{mechanism}" for m in layers)
        assert [m.c1 for m in layers] == _expected_channels(cfg, scale)
        assert model.model.yaml["scale"] == scale
        _forward_640(model, task, size)
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

    with pytest.raises(ValueError, match=r"YOLO layer 'sa.sse' \(row 2 of the model YAML\): "
                       r"unknown mechanism 'sse' \(did you mean sa.se"):
        parse([-1, 1, "sa.sse", []])
    with pytest.raises(ValueError, match="'sa.multi_head' .*'multi_head' is a 'sequence' "
                       "mechanism; the sa.<name> layers available: .*sa.cbam"):
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


# segmentation and pose: Ultralytics' -seg / -pose heads on the same layout
TASK_SHIPPED = [(f"{base}-{suffix}-{m}", task) for base in ("yolo11", "yolov8")
                for task, suffix in (("segment", "seg"), ("pose", "pose"))
                for m in ("cbam", "coord")]


@pytest.mark.parametrize("name,task", TASK_SHIPPED)
def test_shipped_task_yaml_is_what_the_generator_writes(name, task):
    base, _, mechanism = name.split("-")
    assert name in sa_yolo.list_configs() and name in sa_yolo.list_configs(task)
    assert sa_yolo.config_task(name) == task == sa_yolo.config_task(name.replace(base, base + "m"))
    text = sa_yolo.config_path(name).read_text()
    made = sa_yolo.yolo_yaml(base, "se", task=task).replace("sa.se", f"sa.{mechanism}")
    made = made.replace("'se'", repr(mechanism)).replace(f"{name[:-len(mechanism)]}se", name)
    assert text == made
    cfg = sa_yolo.yolo_config(base, mechanism, task=task)
    head = {"segment": ["Segment", ["nc", 32, 256]], "pose": ["Pose", ["nc", "kpt_shape"]]}[task]
    assert cfg["head"][-1][2:] == head
    assert cfg.get("kpt_shape") == ([17, 3] if task == "pose" else None)
    # Ultralytics' own files: YOLOv8 pose has one class, the others 80
    assert cfg["nc"] == (1 if (base, task) == ("yolov8", "pose") else 80)
    assert sa_yolo.config_path(f"{base}s-{task[:3] if task == 'segment' else task}-{mechanism}") \
        == sa_yolo.config_path(name)


def test_generator_layouts_match_ultralytics_own_yamls():
    """Every row that is not ours equals Ultralytics' YAML (module, repeats, arguments)."""
    import yaml
    from ultralytics.utils import ROOT

    for base, folder in (("yolo11", "11"), ("yolov8", "v8")):
        for task, suffix in (("detect", ""), ("segment", "-seg"), ("pose", "-pose")):
            ref = yaml.safe_load((ROOT / "cfg" / "models" / folder / f"{base}{suffix}.yaml")
                                 .read_text())
            ours = sa_yolo.yolo_config(base, "se", task=task)

            def rows(cfg):
                return [(n, m, [None if a == "None" else a for a in args])
                        for _, n, m, args in cfg["backbone"] + cfg["head"]
                        if not m.startswith("sa.")]

            assert rows(ours) == rows(ref), (base, task)
            assert (ours["nc"], ours.get("kpt_shape"), ours["scales"]) == (
                ref["nc"], ref.get("kpt_shape"), ref["scales"])


@pytest.mark.parametrize("name,task", TASK_SHIPPED)
def test_shipped_task_yaml_two_scales_forward_640(name, task):
    mechanism = name.split("-")[2]
    _needs(mechanism)
    # 320 x 320 keeps the suite short; the detection files run at 640 with the same layers
    _check_scales(sa_yolo.config_path(name), mechanism, task=task, size=320)


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


def _task_data_yaml(root: Path, task: str) -> Path:
    """The hand-labelled boxes as a segmentation set (each box a 4-corner polygon) or a
    pose set (4 keypoints per box: its corners, all visible)."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for image, ((w, h), boxes) in LABELS.items():
        shutil.copy(ASSETS / image, root / "images" / image)
        lines = []
        for c, x1, y1, x2, y2 in boxes:
            corners = [(x1 / w, y1 / h), (x2 / w, y1 / h), (x1 / w, y2 / h), (x2 / w, y2 / h)]
            if task == "segment":  # polygon: x y per point, around the box
                ring = [corners[i] for i in (0, 1, 3, 2)]
                values = [f"{v:.6f}" for xy in ring for v in xy]
            else:  # box, then x y visibility per keypoint
                box = [(x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h]
                values = [f"{v:.6f}" for v in box]
                values += [f"{v:.6f}" if i < 2 else "2" for xy in corners
                           for i, v in enumerate((*xy, 2))]
            lines.append(" ".join([str(c), *values]))
        (root / "labels" / f"{Path(image).stem}.txt").write_text("\n".join(lines) + "\n")
    extra = "kpt_shape: [4, 3]\nflip_idx: [1, 0, 3, 2]\n" if task == "pose" else ""
    names = "".join(f"  {k}: {v}\n" for k, v in NAMES.items())
    (root / "data.yaml").write_text(
        f"path: {root}\ntrain: images\nval: images\n{extra}names:\n{names}"
    )
    return root / "data.yaml"


@pytest.mark.slow
@pytest.mark.parametrize("name,task", [("yolo11-seg-cbam", "segment"),
                                       ("yolov8-pose-coord", "pose")])
def test_shipped_task_yaml_train_reload_predict(tmp_path, name, task):
    mechanism = name.split("-")[2]
    _needs(mechanism)
    data = _task_data_yaml(tmp_path / "data", task)
    model = sa_yolo.build_yolo(name, "n")
    best = _train(model, data, tmp_path / "runs", epochs=1)
    reloaded = YOLO(str(best))
    assert reloaded.task == task
    assert len(_attention_layers(reloaded.model)) == ATTENTION_ROWS
    if task == "pose":  # the data's kpt_shape replaces the YAML's [17, 3]
        assert reloaded.model.yaml["kpt_shape"] == [4, 3]
    result = reloaded.predict(str(ASSETS / "bus.jpg"), imgsz=IMGSZ_TRAIN, conf=0.001,
                              device="cpu", save=False, verbose=False)[0]
    assert result.names == NAMES
    if task == "segment":
        assert result.masks is not None and result.masks.data.shape[0] == len(result.boxes)
    else:
        assert result.keypoints is not None and result.keypoints.data.shape[1:] == (4, 3)


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


# -- a mistyped layer, with and without register() ------------------------------------------


def _typo_yaml(tmp_path: Path) -> Path:
    """The shipped YOLO11 + SE layout with its first attention row written ``sa.cbma``."""
    text = sa_yolo.yolo_yaml("yolo11", "se")
    path = tmp_path / "yolo11-typo.yaml"
    path.write_text(text.replace("sa.se, []", "sa.cbma, []", 1))
    return path


def test_unknown_layer_names_itself_and_the_available_ones(tmp_path, capsys):
    path = _typo_yaml(tmp_path)
    sa_yolo.register()
    # plain Ultralytics, after register(): our message, not KeyError: 'sa.cbma'
    with pytest.raises(ValueError, match=r"YOLO layer 'sa.cbma' \(row 9 of the model YAML\): "
                       r"unknown mechanism 'cbma' \(did you mean sa.cbam.*\); the sa.<name> "
                       r"layers available: .*sa.cbam, .*sa.se"):
        YOLO(str(path))
    with pytest.raises(ValueError, match="YOLO layer 'sa.cbma'"):
        sa_yolo.build_yolo(path)
    # the command line: one line on stderr, exit 2, before any training
    assert cli.main(["yolo", "train", f"model={path}", "data=missing.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("spatial-attention yolo: error: YOLO layer 'sa.cbma' (row 9")
    assert "sa.cbam" in err and len(err.splitlines()) == 1
    # a shipped name with a typo is caught before Ultralytics looks for it
    assert cli.main(["yolo", "train", "model=yolo11s-cbma.yaml"]) == 2
    assert "unknown YOLO config 'yolo11s-cbma'; did you mean yolo11-cbam" in capsys.readouterr().err


def test_without_register_ultralytics_raises_its_own_key_error(tmp_path):
    """What the docs tell users: nothing of ours runs before register(), so Ultralytics'
    bare KeyError is all there is (a valid name fails the same way)."""
    path = tmp_path / "yolo11-se.yaml"
    path.write_text(sa_yolo.yolo_yaml("yolo11", "se"))
    sa_yolo.unregister()
    try:
        with pytest.raises(KeyError, match="sa.se"):
            YOLO(str(path))
    finally:
        sa_yolo.register()
    assert len(_attention_layers(YOLO(str(path)).model)) == ATTENTION_ROWS


# -- spatial-attention yolo, and the docs page ----------------------------------------------

DOCS = REPO / "docs" / "integrations.md"


def _docs_block(language: str, containing: str) -> str:
    """The one fenced block of docs/integrations.md in ``language`` that has ``containing``."""
    blocks, current, lang = [], None, ""
    for line in DOCS.read_text().splitlines():
        if line.strip().startswith("```"):
            if current is None:
                current, lang = [], line.strip()[3:]
            else:
                blocks.append((lang, "\n".join(current) + "\n"))
                current = None
        elif current is not None:
            current.append(line)
    found = [b for lang, b in blocks if lang == language and containing in b]
    assert len(found) == 1, f"docs: {len(found)} {language!r} blocks with {containing!r}"
    return found[0]


@pytest.fixture
def _runs_here(monkeypatch, tmp_path):
    """A relative or missing project= would put runs under Ultralytics' runs_dir (under
    tests/tmp next to its package while pytest runs): the documented calls give an
    absolute project=; this checks that nothing went the other way."""
    from ultralytics import cfg

    stray = tmp_path / "stray-runs"
    monkeypatch.setattr(cfg, "TESTS_RUNNING", False)
    monkeypatch.setattr(cfg, "SETTINGS", {**cfg.SETTINGS, "runs_dir": str(stray)})
    yield
    assert not stray.exists(), f"a run went to the runs_dir setting: {list(stray.rglob('*'))}"


def test_model_argument_resolves_shipped_names_only(tmp_path):
    shipped = sa_yolo.config_path("yolov8-seg-cbam")
    assert Path(sa_yolo.model_argument("yolov8s-seg-cbam.yaml")).name == "yolov8s-seg-cbam.yaml"
    assert Path(sa_yolo.model_argument("yolov8-seg-cbam")).name == "yolov8n-seg-cbam.yaml"
    for value in ("yolo11n.pt", "yolo11n.yaml", "runs/x/best.pt", str(shipped)):
        assert sa_yolo.model_argument(value) == value  # Ultralytics' own, or paths
    local = tmp_path / "yolo11-cbam.yaml"
    local.write_text("nc: 1\n")
    assert sa_yolo.model_argument("yolo11-cbam.yaml") == "yolo11-cbam.yaml"  # a local file wins
    with pytest.raises(ValueError, match="unknown YOLO config 'yolo11-cbma'"):
        sa_yolo.model_argument("yolo11-cbma.yaml")


def test_list_and_path(capsys):
    assert cli.main(["yolo", "--list"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in out[1:]}
    assert set(rows) == set(sa_yolo.list_configs())
    assert rows["yolo11-pose-cbam"][0] == "pose" and rows["yolov8-seg-coord"][0] == "segment"
    assert Path(rows["yolo11-cbam"][1]) == sa_yolo.config_path("yolo11-cbam")
    assert cli.main(["yolo", "--path", "yolo11s-seg-cbam"]) == 0
    assert capsys.readouterr().out.strip() == str(sa_yolo.config_path("yolo11-seg-cbam"))


def test_docs_python_snippet_runs(tmp_path, _runs_here):
    code = _docs_block("python", "build_yolo(")
    scope: dict = {}
    exec(compile(code, "docs/integrations.md (Ultralytics)", "exec"), scope)
    assert Path(scope["model"].trainer.best).is_relative_to(tmp_path / "runs" / "tiny")
    assert len(_attention_layers(scope["best"].model)) == ATTENTION_ROWS
    assert scope["results"][0].names == {0: "person", 1: "bus"}


@pytest.mark.slow
def test_yolo_command_passes_through_train_val_predict_export(tmp_path, _runs_here, capsys):
    """The documented commands, run as written (one tiny epoch), after the snippet's
    dataset part."""
    snippet = _docs_block("python", "build_yolo(")
    exec(compile(snippet.split("model = build_yolo")[0], "docs dataset", "exec"), {})
    commands = [line.split("  #")[0].replace("$PWD", str(tmp_path))
                for line in _docs_block("", "spatial-attention yolo train").splitlines()
                if line.startswith("spatial-attention yolo")]
    modes = [shlex.split(c)[2] for c in commands]
    assert modes == ["--list", "--path", "train", "val", "predict", "export"]
    for command in commands:
        if "format=onnx" in command:
            pytest.importorskip("onnx")
        argv = shlex.split(command)[1:]
        assert cli.main(argv) == 0, (command, capsys.readouterr().err[-2000:])
    best = tmp_path / "runs" / "cli" / "weights" / "best.pt"
    model = YOLO(str(best))
    assert model.model.yaml["scale"] == "n" and model.ckpt["train_args"]["epochs"] == 1
    assert [type(m).__name__ for m in _attention_layers(model.model)] == ["SA_cbam"] * 5
    assert (tmp_path / "runs" / "val").is_dir()
    # the exported graph keeps height and width free (dynamic=True)
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(best.with_suffix(".onnx")),
                                   providers=["CPUExecutionProvider"])
    net = model.model.float().eval()
    for h, w in ((160, 160), (96, 224)):
        x = torch.rand(1, 3, h, w)
        (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            ref = net(x)[0]
        torch.testing.assert_close(torch.from_numpy(y), ref, atol=1e-3, rtol=1e-3)


def test_yolo_command_refuses_a_torchvision_without_operators(monkeypatch, capsys):
    """Where torchvision's operators do not load (a fresh process here: no test shim), the
    command says so in one line instead of failing inside Ultralytics' validator."""
    code = ("from spatial_attention.integrations.ultralytics import torchvision_problem\n"
            "print(torchvision_problem())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    problem = done.stdout.strip().splitlines()[-1]
    if problem == "None":
        pytest.skip("torchvision imports here: nothing to refuse")
    assert problem.startswith("torchvision ") and "cannot load its compiled operators" in problem
    assert sa_yolo.torchvision_problem() is None  # this process has the shim
    monkeypatch.setattr(sa_yolo, "torchvision_problem", lambda: problem)
    assert cli.main(["yolo", "val", "model=yolo11-cbam.yaml", "data=data.yaml"]) == 2
    assert capsys.readouterr().err == f"spatial-attention yolo: error: {problem}\n"
    assert cli.main(["yolo", "--list"]) == 0  # what needs no torchvision still works


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
