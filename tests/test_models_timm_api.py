"""Models as timm users expect: checkpointing, intermediates, features-only, factory args."""

import copy
import inspect
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from spatial_attention.models import create_model, list_models
from spatial_attention.models import features as features_mod

try:  # the memory tracker may have moved with the bench application
    from spatial_attention.apps.bench.memory import TensorMemoryTracker
except ImportError:
    from spatial_attention.memory import TensorMemoryTracker

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL_CSWIN = dict(embed_dim=16, depth=(1, 2, 2, 1), num_heads=(2, 2, 4, 4), num_classes=10,
                   drop_path_rate=0.1)
# name: (constructor arguments, input shape); small enough for a CPU training step each,
# with stochastic depth on where the model has it, so checkpointing must replay the RNG
CASES = {
    "swin_micro_cifar": (dict(), (2, 3, 32, 32)),
    "twins_svt_micro_cifar": (dict(), (2, 3, 32, 32)),
    "boat_swin_micro_cifar": (dict(), (2, 3, 32, 32)),
    "cswin_tiny": (SMALL_CSWIN, (2, 3, 64, 64)),
    "boat_cswin_tiny": (SMALL_CSWIN, (2, 3, 64, 64)),
    "mvswin_micro_cifar": (dict(), (2, 2, 3, 32, 32)),
    "resnet18_cifar": (dict(width=16), (4, 3, 32, 32)),
    "resnet18_cifar_ga": (dict(width=16), (4, 3, 32, 32)),
    "sknet50": (dict(layers=(1, 1, 1, 1), num_classes=10), (2, 3, 64, 64)),
    "vit_micro_cifar": (dict(drop_path=0.1), (4, 3, 32, 32)),
}


def build(name, **extra):
    kwargs, shape = CASES[name]
    return create_model(name, **{**kwargs, **extra}), torch.randn(shape)


def train_step(model, x):
    torch.manual_seed(1)  # the same drop-path draws in both runs
    with TensorMemoryTracker() as mem:
        loss = F.cross_entropy(model(x), torch.arange(x.shape[0]) % 10)
        loss.backward()
    return loss.detach(), mem.peak_bytes


# -- 1. activation checkpointing -------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CASES))
def test_grad_checkpointing_same_loss_gradients_and_stats_with_lower_peak(name):
    plain, x = build(name)
    plain.train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing()
    loss, peak = train_step(plain, x)
    loss_ckpt, peak_ckpt = train_step(ckpt, x)
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
    for (key, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        assert p.grad is not None, key
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7, msg=key)
    # BatchNorm's running statistics move once per step, as without checkpointing
    for (key, b), c in zip(plain.named_buffers(), ckpt.buffers(), strict=True):
        torch.testing.assert_close(c, b, rtol=0, atol=0, msg=key)
    assert peak_ckpt < peak, f"{name}: peak {peak_ckpt} with checkpointing, {peak} without"


def test_checkpointing_runs_only_in_a_training_step_that_records_a_graph(monkeypatch):
    calls = []
    real = features_mod.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(features_mod, "checkpoint", counting)
    model, x = build("swin_micro_cifar")
    model.set_grad_checkpointing()
    model.eval()
    model(x)
    assert not calls  # inference: nothing to save
    model.train()
    with torch.no_grad():
        model(x)
    assert not calls
    model(x)
    assert len(calls) == sum(len(stage.blocks) for stage in model.layers)
    calls.clear()
    model.set_grad_checkpointing(False)
    model(x)
    assert not calls


def test_features_only_network_passes_checkpointing_on():
    net = create_model("swin_micro_cifar", features_only=True)
    net.set_grad_checkpointing()
    assert all(stage.grad_checkpointing for stage in net.model.layers)


# -- 2. forward_intermediates and features_only ----------------------------------------
TIMM_NAMES = [
    ("swin_tiny", "swin_tiny_patch4_window7_224"),
    ("twins_svt_small", "twins_svt_small"),
    ("twins_pcpvt_small", "twins_pcpvt_small"),
    ("sknet50", "skresnet50"),
    ("sknet50", "skresnext50_32x4d"),  # the network whose weights sknet50 loads
]


@pytest.fixture(scope="module")
def timm():
    sys.path.insert(0, str(Path(__file__).parent))
    import _torchvision_shim  # noqa: F401  (before timm imports torchvision)

    return pytest.importorskip("timm", reason="timm is not installed")


@pytest.mark.parametrize(("ours", "theirs"), TIMM_NAMES)
def test_feature_info_matches_timm(timm, ours, theirs):
    with torch.device("meta"):
        ref = timm.create_model(theirs, pretrained=False, features_only=True)
        full = timm.create_model(theirs, pretrained=False)
    net = create_model(ours, features_only=True, device="meta")
    model = create_model(ours, device="meta")
    assert net.feature_info.channels() == ref.feature_info.channels()
    assert net.feature_info.reduction() == ref.feature_info.reduction()
    keys = ("num_chs", "reduction")
    assert [{k: f[k] for k in keys} for f in model.feature_info] == [
        {k: f[k] for k in keys} for f in full.feature_info
    ]
    if not ours.startswith("twins"):  # timm names Twins' levels block.i; its attribute is blocks
        assert model.feature_info.module_name() == [f["module"] for f in full.feature_info]
    modules = dict(model.named_modules())
    assert all(m in modules for m in model.feature_info.module_name())


@pytest.mark.parametrize("name", sorted(CASES))
def test_feature_info_describes_the_maps(name):
    model, x = build(name)
    model.eval()
    with torch.no_grad():
        maps = model.forward_intermediates(x, intermediates_only=True)
    H, W = x.shape[-2:]
    assert len(maps) == len(model.feature_info)
    for f, m in zip(model.feature_info, maps, strict=True):
        r = f["reduction"]
        assert m.shape == (x.shape[0], f["num_chs"], math.ceil(H / r), math.ceil(W / r)), f


@pytest.mark.parametrize("name", sorted(CASES))
def test_features_only_returns_the_forward_intermediates(name):
    model, x = build(name)
    model.eval()
    n = len(model.feature_info)
    out_indices = (0, n - 2) if n > 2 else (0,)
    net = create_model(name, features_only=True, out_indices=out_indices, **CASES[name][0])
    missing, unexpected = net.model.load_state_dict(model.state_dict(), strict=False)
    assert not missing, missing  # pruning only removes
    net.eval()
    assert net.out_indices == out_indices
    assert [f["index"] for f in net.feature_info] == list(out_indices)
    assert net.feature_info.channels() == [model.feature_info[i]["num_chs"] for i in out_indices]
    with torch.no_grad():
        got = net(x)
        want = model.forward_intermediates(x, indices=list(out_indices), intermediates_only=True)
    assert len(got) == len(want) == len(out_indices)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    # the pruned network uses every parameter it kept (DDP needs no find_unused_parameters)
    net.train()
    sum(m.sum() for m in net(x)).backward()
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("name", ["swin_micro_cifar", "twins_svt_micro_cifar", "cswin_tiny",
                                  "mvswin_micro_cifar", "sknet50", "vit_micro_cifar"])
def test_forward_intermediates_follows_timm(name):
    model, x = build(name)
    model.eval()
    n = len(model.feature_info)
    head = getattr(model, "head", None) or model.fc
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        assert len(maps) == n
        # the final features are what the classifier reads
        if name in ("sknet50",):
            logits = head(final.mean((2, 3)))
        else:
            logits = (head.fc if hasattr(head, "fc") else head)(final.mean((1, 2)))
        torch.testing.assert_close(logits, model(x), rtol=1e-5, atol=1e-5)
        # an int takes the last n levels, negatives count from the end
        last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
        neg = model.forward_intermediates(x, indices=[-2, -1], intermediates_only=True)
        for a, b, c in zip(last2, neg, maps[-2:], strict=True):
            torch.testing.assert_close(a, c)
            torch.testing.assert_close(b, c)
        # stopping early gives the same levels, and the unnormed map it stopped at
        early, first = model.forward_intermediates(x, indices=[0], stop_early=True)
        torch.testing.assert_close(first[0], maps[0])
        assert early.shape != final.shape or name == "vit_micro_cifar"
        # NHWC is the same map, channels last
        nhwc = model.forward_intermediates(x, indices=[0], output_fmt="NHWC",
                                           intermediates_only=True)
        torch.testing.assert_close(nhwc[0], maps[0].permute(0, 2, 3, 1))
        normed = model.forward_intermediates(x, indices=[-1], norm=True, intermediates_only=True)
    if name == "sknet50":  # no final norm: norm changes nothing
        torch.testing.assert_close(normed[0], maps[-1])
    else:  # the final norm on the last level
        torch.testing.assert_close(normed[0].permute(0, 2, 3, 1), final)


def test_forward_features_stages_are_the_intermediates():
    model, x = build("swin_micro_cifar")
    model.eval()
    with torch.no_grad():
        for a, b in zip(model.forward_features(x, stages=True),
                        model.forward_intermediates(x, intermediates_only=True), strict=True):
            torch.testing.assert_close(a, b)


def test_multi_view_levels_put_the_views_side_by_side():
    model, x = build("mvswin_micro_cifar")
    model.eval()
    with torch.no_grad():
        maps = model.forward_intermediates(x, indices=[0], intermediates_only=True)
        tokens = model.pos_drop(model.patch_embed(x))
        stage0 = model.layers[0].forward_blocks(tokens)  # (B, V, h, w, C)
    C = stage0.shape[-1]
    for v in range(2):
        torch.testing.assert_close(maps[0][:, v * C:(v + 1) * C], stage0[:, v].permute(0, 3, 1, 2))
    # views given separately, as to forward
    with torch.no_grad():
        again = model.forward_intermediates(x[:, 0], x[:, 1], indices=[0],
                                            intermediates_only=True)
    torch.testing.assert_close(again[0], maps[0])


@pytest.mark.parametrize("indices", [5, 0, [4], [-5], []])
def test_bad_indices_and_formats_are_named(indices):
    model, x = build("swin_micro_cifar")
    with pytest.raises(ValueError, match="swin: .*(indices|index)"):
        model.forward_intermediates(x, indices=indices)
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NLC")


def test_features_only_is_refused_where_a_model_has_no_levels():
    with pytest.raises(ValueError, match="nbnet_small: features_only"):
        create_model("nbnet_small", features_only=True)
    with pytest.raises(ValueError, match="features_only=True"):
        create_model("swin_micro_cifar", out_indices=(0,))


def test_feature_norm_keeps_the_final_norm_on_the_last_level():
    net = create_model("swin_micro_cifar", features_only=True, feature_norm=True)
    assert isinstance(net.model.norm, torch.nn.LayerNorm)
    net = create_model("swin_micro_cifar", features_only=True, out_indices=(0, 1),
                       feature_norm=True)
    assert isinstance(net.model.norm, torch.nn.Identity)  # sized for the pruned stage


# -- 3. device= and dtype= -------------------------------------------------------------
FAST_TO_BUILD = [n for n in list_models() if not n.endswith(("_base", "_large", "_small"))]


@pytest.mark.parametrize("name", FAST_TO_BUILD)
def test_device_and_dtype_factory_arguments(name):
    model = create_model(name, device="meta", dtype=torch.float64)
    tensors = [*model.parameters(), *model.buffers()]
    assert {t.device.type for t in tensors} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert all(t.dtype == torch.float64 for t in tensors if t.is_floating_point())


def test_dtype_builds_a_working_model_and_keeps_integer_buffers():
    model = create_model("swin_micro_cifar", dtype=torch.float64).eval()
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    out = model(torch.randn(1, 3, 32, 32, dtype=torch.float64))
    assert out.dtype == torch.float64
    net = create_model("resnet18_cifar", width=8, dtype=torch.bfloat16)
    counts = [m.num_batches_tracked for m in net.modules() if hasattr(m, "num_batches_tracked")]
    assert counts and all(c.dtype == torch.long for c in counts)


def test_factory_arguments_are_in_the_signature_and_checked():
    from spatial_attention.models.swin import SwinTransformer

    params = inspect.signature(SwinTransformer).parameters
    assert params["device"].default is None and params["dtype"].default is None
    with pytest.raises(ValueError, match="SwinTransformer: dtype must be a floating"):
        create_model("swin_micro_cifar", dtype=torch.int64)
