"""Swin and Twins models: paper sizes, timm equivalence, checkpoint loading, any size."""

import re
import sys
from pathlib import Path

import pytest
import torch

from spatial_attention.apps.bench.flops import count_flops
from spatial_attention.errors import UsageError
from spatial_attention.models import create_model
from spatial_attention.models import swin as swin_mod
from spatial_attention.models import twins as twins_mod

# name: (params in millions, GFLOPs as multiply-adds) from the papers' tables
PAPER = {
    "swin_tiny": (28.3, 4.5),
    "swin_small": (49.6, 8.7),
    "swin_base": (87.8, 15.4),
    "twins_pcpvt_small": (24.1, 3.8),
    "twins_pcpvt_base": (43.8, 6.7),
    "twins_pcpvt_large": (60.9, 9.8),
    "twins_svt_small": (24.0, 2.9),
    "twins_svt_base": (56.0, 8.6),
    "twins_svt_large": (99.2, 15.1),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_params_and_flops_match_the_paper_within_one_percent(name):
    params, gflops = PAPER[name]
    with torch.device("meta"):  # no memory, no compute: shapes only
        model = create_model(name).eval()
        x = torch.empty(1, 3, 224, 224)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    flops, out = count_flops(model, x)
    assert out.shape == (1, 1000)
    assert abs(n - params) / params < 0.01, f"{name}: {n:.2f}M params, paper {params}M"
    macs = flops / 2 / 1e9  # count_flops counts 2 per multiply-add
    assert abs(macs - gflops) / gflops < 0.01, f"{name}: {macs:.3f} GMACs, paper {gflops}G"


@pytest.mark.parametrize("name", ["swin_micro_cifar", "twins_svt_micro_cifar"])
@pytest.mark.parametrize("size", [(37, 45), (7, 9)])
def test_any_input_size(name, size):
    model = create_model(name).eval()
    x = torch.randn(1, 3, *size)
    out = model(x)
    assert out.shape == (1, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["swin_micro_cifar", "twins_svt_micro_cifar"])
def test_multi_scale_features(name):
    model = create_model(name).eval()
    feats = model.forward_features(torch.randn(2, 3, 32, 32), stages=True)
    assert [f.shape for f in feats] == [
        (2, d, 16 // 2**i, 16 // 2**i) for i, d in enumerate(model.stage_dims)
    ]
    with pytest.raises(ValueError, match="images"):
        model(torch.randn(3, 32, 32))


def test_micro_models_are_about_5m_params():
    for name in ("swin_micro_cifar", "twins_svt_micro_cifar"):
        with torch.device("meta"):
            n = sum(p.numel() for p in create_model(name).parameters())
        assert 4.5e6 < n < 6e6, (name, n)


def test_micro_models_train_one_step():
    model = create_model("swin_micro_cifar")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert all(p.grad is not None for p in model.parameters())


# -- checkpoints ---------------------------------------------------------------------------


def _official_swin_state(model) -> dict:
    """Our (timm-layout) state dict rewritten the way the official repository stores it."""
    out = {}
    for k, v in model.state_dict().items():
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)", k)
        if m:
            k = f"layers.{int(m[1]) - 1}.downsample.{m[2]}"
        k = k.replace("head.fc.", "head.")
        out[k] = v.clone()
    for name, module in model.named_modules():  # buffers the official code persists
        if hasattr(module, "relative_position_index"):  # name: layers.i.blocks.j.attn
            out[name + ".relative_position_index"] = module.relative_position_index.clone()
            out[name[: -len(".attn")] + ".attn_mask"] = torch.zeros(4, 16, 16)
    return out


def test_swin_loads_official_layout_and_containers(tmp_path):
    torch.manual_seed(0)
    src = create_model("swin_micro_cifar").eval()
    official = _official_swin_state(src)
    assert "layers.0.downsample.reduction.weight" in official and "head.weight" in official
    x = torch.randn(1, 3, 32, 32)
    dst = create_model("swin_micro_cifar").eval()
    for container in ({"model": official}, {"state_dict": official}):
        torch.save(container, tmp_path / "swin.pth")
        swin_mod.load_pretrained(dst, tmp_path / "swin.pth")
        torch.testing.assert_close(dst(x), src(x))
    from safetensors.torch import save_file

    save_file(src.state_dict(), str(tmp_path / "swin.safetensors"))  # timm layout
    torch.nn.init.zeros_(dst.head.fc.weight)
    swin_mod.load_pretrained(dst, tmp_path / "swin.safetensors")
    torch.testing.assert_close(dst(x), src(x))


def test_wrong_keys_are_reported_by_name(tmp_path):
    state = create_model("twins_svt_micro_cifar").state_dict()
    state["blocks.0.0.attn.extra"] = torch.zeros(1)
    del state["norm.weight"]
    with pytest.raises(UsageError, match=r"missing keys: norm\.weight.*unexpected keys: "
                                         r"blocks\.0\.0\.attn\.extra"):
        twins_mod.load_pretrained(create_model("twins_svt_micro_cifar"), state)
    state = create_model("twins_svt_micro_cifar", num_classes=7).state_dict()
    with pytest.raises(UsageError, match=r"shape mismatches: head\.bias .*head\.weight"):
        twins_mod.load_pretrained(create_model("twins_svt_micro_cifar"), state)
    partial = twins_mod.load_pretrained(create_model("twins_svt_micro_cifar"), state, strict=False)
    assert partial.head.weight.shape == (10, 256)
    with pytest.raises(UsageError, match="does not exist"):
        twins_mod.load_pretrained(create_model("twins_svt_micro_cifar"), tmp_path / "no.pth")
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UsageError, match="could not be read"):
        twins_mod.load_pretrained(create_model("twins_svt_micro_cifar"), tmp_path / "bad.pth")


# -- against timm's models (optional) ----------------------------------------------------


def _timm():
    sys.path.insert(0, str(Path(__file__).parent))
    import _torchvision_shim  # noqa: F401

    return pytest.importorskip("timm")


@pytest.mark.parametrize(
    "ours,theirs,loader",
    [
        ("swin_tiny", "swin_tiny_patch4_window7_224", swin_mod.load_pretrained),
        ("twins_svt_small", "twins_svt_small", twins_mod.load_pretrained),
        ("twins_pcpvt_small", "twins_pcpvt_small", twins_mod.load_pretrained),
    ],
)
def test_same_random_weights_give_timm_logits(ours, theirs, loader):
    timm = _timm()
    torch.manual_seed(0)
    reference = timm.create_model(theirs).eval()
    model = loader(create_model(ours).eval(), reference.state_dict())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-4, rtol=1e-4)
