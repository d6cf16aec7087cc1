"""DAT-T/S/B: sizes, cost, official checkpoint names, any input size, timm's interface."""

import pytest
import torch

from spatial_attention import capture_attention
from spatial_attention.apps.bench.flops import count_flops
from spatial_attention.models import create_model
from spatial_attention.models.dat import DAT, convert_official_dat, load_pretrained
from spatial_attention.models.features import FeatureNet


def _micro(**kw):
    torch.manual_seed(0)
    cfg = dict(img_size=56, dims=(16, 32, 64, 128), heads=(1, 2, 4, 8), depths=(2, 2, 2, 2),
               stage_spec=("LS", "LS", "LD", "LD"), groups=(1, 1, 2, 4), num_classes=10)
    return DAT(**{**cfg, **kw})


def test_sizes_and_cost():
    tiny = create_model("dat_tiny", device="meta")
    # the official code's DAT-T, counted the same way (the paper's table says 29M)
    assert sum(p.numel() for p in tiny.parameters()) == 28_319_138
    for name, paper in (("dat_small", 50e6), ("dat_base", 88e6)):
        n = sum(p.numel() for p in create_model(name, device="meta").parameters())
        assert abs(n / paper - 1) < 0.01, (name, n)
    flops, _ = count_flops(lambda: tiny(torch.randn(1, 3, 224, 224, device="meta")))
    assert abs(flops / 2 / 4.6e9 - 1) < 0.01  # multiply-adds, the paper's 4.6G


def _as_official(state):
    """Our DAT-T state dict under the names and shapes of the official ``DAT`` (CVPR 2022
    release): LayerNormProxy's ``.norm``, two norms per block in ``layer_norms``, MLPs in
    ``chunk``, window blocks' ``proj_qkv`` / ``proj_out``, deformable blocks' 1x1 convs,
    and the buffers the official modules save (index and shift mask)."""
    deformable = {k.split(".attn.")[0] for k in state if ".attn.offset_dw." in k}
    names = {"qkv": "proj_qkv", "proj": "proj_out", "q": "proj_q", "k": "proj_k",
             "v": "proj_v", "offset_dw": "conv_offset.0", "offset_norm": "conv_offset.1.norm",
             "offset_proj": "conv_offset.3"}
    out = {}
    for key, v in state.items():
        parts = key.split(".")
        if parts[0] == "patch_embed":
            key = {"proj": "patch_proj.0.", "norm": "patch_proj.1.norm."}[parts[1]] + parts[2]
        elif parts[0] == "downsamples":
            key = f"down_projs.{parts[1]}." + ("0." if parts[2] == "proj" else "1.norm.") + \
                parts[3]
        elif parts[0] == "norm":
            key = "cls_norm.norm." + parts[1]
        elif parts[0] == "head":
            key = "cls_head." + parts[1]
        else:  # stages.i.d.<part>...
            i, d, part, rest = parts[1], int(parts[2]), parts[3], parts[4:]
            if part in ("norm1", "norm2"):
                key = f"stages.{i}.layer_norms.{2 * d + (part == 'norm2')}.norm.{rest[0]}"
            elif part == "mlp":
                linear = {"fc1": "linear1", "fc2": "linear2"}[rest[0]]
                key = f"stages.{i}.mlps.{d}.chunk.{linear}.{rest[1]}"
            else:
                key = f"stages.{i}.attns.{d}." + ".".join([names.get(rest[0], rest[0]),
                                                           *rest[1:]])
                if f"stages.{i}.{d}" in deformable and rest[0] in (
                        "q", "k", "v", "proj", "offset_proj") and rest[-1] == "weight":
                    v = v[:, :, None, None]  # the deformable block's 1x1 convs
        out[key] = v
    for i, d in ((0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 2), (2, 4), (3, 0)):
        out[f"stages.{i}.attns.{d}.relative_position_index"] = torch.zeros(49, 49).long()
    out["stages.0.attns.1.attn_mask"] = torch.zeros(64, 49, 49)
    out["stages.1.attns.1.attn_mask"] = torch.zeros(16, 49, 49)
    return out


def test_official_checkpoint_names_load():
    torch.manual_seed(0)
    src = create_model("dat_tiny")
    official = _as_official(src.state_dict())
    # a few names as the official code writes them
    for key in ("patch_proj.1.norm.weight", "stages.0.layer_norms.3.norm.bias",
                "stages.1.mlps.0.chunk.linear2.weight", "stages.0.attns.1.proj_qkv.weight",
                "stages.2.attns.1.conv_offset.1.norm.weight", "stages.3.attns.1.rpe_table",
                "down_projs.2.0.weight", "cls_norm.norm.weight", "cls_head.bias"):
        assert key in official, key
    assert official["stages.2.attns.1.proj_k.weight"].shape == (384, 384, 1, 1)
    assert official["stages.3.attns.1.conv_offset.3.weight"].shape == (2, 128, 1, 1)
    dst = load_pretrained(create_model("dat_tiny"), {"model": official})  # strict
    for key, value in src.state_dict().items():
        torch.testing.assert_close(dst.state_dict()[key], value, rtol=0, atol=0)
    assert set(convert_official_dat(official)) == set(src.state_dict())


def test_any_size_and_interface():
    m = _micro().eval()
    for shape in ((2, 3, 56, 56), (1, 3, 50, 38), (1, 3, 33, 65)):
        y = m(torch.randn(shape))
        assert y.shape == (shape[0], 10) and torch.isfinite(y).all()
    x = torch.randn(1, 3, 50, 38)
    feats = m.forward_intermediates(x, intermediates_only=True)
    assert [f.shape[1] for f in feats] == [16, 32, 64, 128]
    assert [f.shape[-2:] for f in feats] == [(13, 10), (7, 5), (4, 3), (2, 2)]
    net = FeatureNet(_micro().eval(), out_indices=(1, 3))
    assert [f.shape[1] for f in net(x)] == [32, 128]
    with capture_attention(m) as maps:
        m(x)
    deform = [n for n in maps if n.endswith("1.attn") and n.startswith(("stages.2", "stages.3"))]
    assert len(deform) == 2 and maps.calls(deform[0])[0].shape[-1] == 2  # positions first


def test_training_step_and_checkpointing():
    m = _micro(drop_path_rate=0.1).train()
    x = torch.randn(2, 3, 56, 56)
    m(x).sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert grads["stages.2.1.attn.rpe_table"].abs().sum() > 0


def test_clear_errors():
    with pytest.raises(ValueError, match="dat: stage_spec"):
        DAT(depths=(2, 2, 6, 2), stage_spec=("LS", "LS", "LD", "LD"))
    with pytest.raises(ValueError, match="dat: block kind"):
        DAT(stage_spec=("LS", "LX", "LDLDLD", "LD"))
    with pytest.raises(ValueError, match="dat: dims"):
        DAT(dims=(96, 192, 384))
    with pytest.raises(ValueError, match="dat: expected images"):
        _micro()(torch.randn(3, 56, 56))
