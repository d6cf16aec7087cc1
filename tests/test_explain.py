"""Rollout, gradient rollout and gradient-weighted maps; capture of timm attention."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import spatial_attention as sa
from spatial_attention import capture_attention
from spatial_attention.explain import (
    attention_rollout,
    class_score,
    fuse_heads,
    gradient_maps,
    gradient_rollout,
    rollout_map,
    token_grid,
)
from spatial_attention.models import create_model


def _softmax(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(*shape, generator=g), -1)


def _rollout_by_hand(layers, fusion):
    """Abnar & Zuidema, one sample at a time, written as loops."""
    B, N = layers[0].shape[0], layers[0].shape[-1]
    out = []
    for b in range(B):
        r = torch.eye(N)
        for a in layers:
            heads = a[b]
            f = {"mean": heads.mean(0), "max": heads.max(0).values,
                 "min": heads.min(0).values}[fusion]
            m = 0.5 * f + 0.5 * torch.eye(N)
            for i in range(N):
                m[i] = m[i] / m[i].sum()
            r = m @ r
        out.append(r)
    return torch.stack(out)


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
def test_rollout_matches_the_paper_rule(fusion):
    layers = [_softmax(2, 3, 5, 5, seed=s) for s in range(3)]
    got = attention_rollout(layers, head_fusion=fusion)
    torch.testing.assert_close(got, _rollout_by_hand(layers, fusion))
    torch.testing.assert_close(got.sum(-1), torch.ones(2, 5))


def test_rollout_discard_keeps_the_diagonal_and_rows_stochastic():
    layers = [_softmax(1, 2, 6, 6, seed=s) for s in range(2)]
    got = attention_rollout(layers, discard_ratio=0.9)
    torch.testing.assert_close(got.sum(-1), torch.ones(1, 6))
    assert not torch.allclose(got, attention_rollout(layers))
    # the one-layer case: dropped entries are exactly the weakest, the diagonal survives
    one = attention_rollout([torch.full((1, 1, 4, 4), 0.25)], discard_ratio=0.5)
    assert (one.diagonal(dim1=-2, dim2=-1) > 0).all()


def test_rollout_errors():
    with pytest.raises(ValueError, match="no attention"):
        attention_rollout([])
    with pytest.raises(ValueError, match="different token sets"):
        attention_rollout([_softmax(1, 2, 4, 4), _softmax(1, 2, 9, 9)])
    with pytest.raises(ValueError, match="head_fusion"):
        attention_rollout([_softmax(1, 2, 4, 4)], head_fusion="median")
    with pytest.raises(ValueError, match="discard_ratio"):
        attention_rollout([_softmax(1, 2, 4, 4)], discard_ratio=1.0)
    with pytest.raises(ValueError, match="square"):
        attention_rollout([_softmax(1, 2, 4, 5)])
    with pytest.raises(ValueError, match="heads"):
        fuse_heads(torch.ones(2, 3))


def test_gradient_rollout_matches_chefer():
    a = [_softmax(2, 3, 4, 4, seed=s) for s in range(2)]
    g = [torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(9 + s))
         for s in range(2)]
    r = torch.eye(4).expand(2, 4, 4)
    for ai, gi in zip(a, g, strict=True):
        r = r + (gi * ai).clamp(min=0).mean(1) @ r
    torch.testing.assert_close(gradient_rollout(a, g), r)
    with pytest.raises(ValueError, match="does not match"):
        gradient_rollout(a, [x[:, :2] for x in g])
    with pytest.raises(ValueError, match="2 attention layers but 1"):
        gradient_rollout(a, g[:1])


def test_class_score_and_target_errors():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0]])
    score, t = class_score(logits, None)
    assert t.tolist() == [1, 0] and score.item() == 5.0
    score, t = class_score(logits, 2)
    assert t.tolist() == [2, 2] and score.item() == 2.0
    with pytest.raises(ValueError, match="target class"):
        class_score(logits, 3)


def test_token_grid_follows_the_image_aspect():
    assert token_grid(12, (30, 40)) == (3, 4)
    assert token_grid(12, (40, 30)) == (4, 3)
    assert token_grid(7, (10, 10)) in ((1, 7), (7, 1))


def test_capture_keep_grad_records_attached_tensors():
    m = sa.create("global_attention", 16, 2)
    x = torch.randn(1, 3, 4, 16, requires_grad=True)
    with capture_attention(m) as maps:
        m(x)
    assert not maps[""].requires_grad
    with capture_attention(m, keep_grad=True) as maps:
        m(x).sum().backward()
    assert maps[""].requires_grad and maps[""].grad_fn is not None


def test_gradient_maps_on_a_cnn_depend_on_the_class():
    torch.manual_seed(0)
    model = create_model("resnet10_cifar", num_classes=4, attn_layer="cbam", width=8)
    x = torch.randn(2, 3, 16, 20)
    logits, maps = gradient_maps(model, x, target=1)
    assert logits.shape == (2, 4) and model.training  # the mode is restored
    spatial = {k: v for k, v in maps.items() if k.endswith("spatial_gate")}
    assert spatial and all(v.shape[0] == 2 and (v >= 0).all() for v in spatial.values())
    assert all(v.shape[-2:] == (16, 20) for k, v in spatial.items() if k.startswith("layer1"))
    _, other = gradient_maps(model, x, target=3)
    assert any(not torch.allclose(maps[k], other[k]) for k in spatial)


def test_rollout_map_on_our_vit_and_a_clear_error_on_a_cnn():
    torch.manual_seed(0)
    vit = create_model("vit_micro_cifar", num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    for method in ("rollout", "gradient"):
        logits, m = rollout_map(vit, x, method=method)
        assert logits.shape == (1, 10) and m.dim() == 3 and m.shape[0] == 1
        assert torch.isfinite(m).all() and m.std() > 0
    cnn = create_model("resnet10_cifar", num_classes=4, attn_layer="cbam", width=8)
    with pytest.raises(ValueError, match="no self-attention matrix"):
        rollout_map(cnn, torch.randn(1, 3, 16, 16), method="rollout")
    with pytest.raises(ValueError, match="method"):
        rollout_map(vit, x, method="cam")


def test_capture_reads_timm_vit_and_swin():
    import _torchvision_shim  # noqa: F401  (before anything imports torchvision)

    timm = pytest.importorskip("timm")

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32,
                            patch_size=8, depth=3)
    x = torch.randn(2, 3, 32, 32)
    plain = vit(x)
    with capture_attention(vit) as maps:
        captured = vit(x)
    torch.testing.assert_close(captured, plain, rtol=1e-4, atol=1e-5)
    assert list(maps) == [f"blocks.{i}.attn" for i in range(3)]
    assert all(t.shape == (2, 3, 17, 17) for t in maps.values())
    torch.testing.assert_close(maps["blocks.0.attn"].sum(-1), torch.ones(2, 3, 17))
    assert all(b.attn.fused_attn for b in vit.blocks)  # switched back
    assert all(not b.attn.attn_drop._forward_hooks for b in vit.blocks)
    _, r = rollout_map(vit, x, method="rollout")
    assert r.shape == (2, 4, 4)  # the class token's row over the 4x4 patch grid
    _, g = rollout_map(vit, x, method="gradient", target=2)
    assert g.shape == (2, 4, 4) and torch.isfinite(g).all()
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=5,
                             depths=(1, 1, 1, 1), embed_dim=24, num_heads=(1, 1, 1, 1),
                             img_size=56)
    with capture_attention(swin) as maps:
        swin(torch.randn(1, 3, 56, 56))
    assert maps["layers.0.blocks.0.attn"].shape == (4, 1, 49, 49)  # (B * windows, heads, N, N)


def test_capture_refuses_a_model_without_attention():
    with pytest.raises(ValueError, match="no spatial_attention mechanism"):
        with capture_attention(nn.Linear(2, 2)):
            pass
