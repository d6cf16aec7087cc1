"""MaxViT-T: paper size, timm's maxvit_tiny_tf weights and logits, any input size,
features."""

import pytest
import torch

from spatial_attention import capture_attention
from spatial_attention.apps.bench.flops import count_flops
from spatial_attention.errors import UsageError
from spatial_attention.models import create_model
from spatial_attention.models.maxvit import convert_timm_maxvit, load_pretrained

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(embed_dims=(16, 32, 32, 64), depths=(1, 1, 2, 1), stem_width=8, head_hidden=32,
             num_classes=10, partition=2, head_dim=8)


def test_params_and_flops_match_the_paper_within_one_percent():
    """Paper: MaxViT-T 31M parameters, 5.6G FLOPs (multiply-adds) at 224."""
    with torch.device("meta"):
        model = create_model("maxvit_tiny").eval()
        x = torch.empty(1, 3, 224, 224)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    macs, out = count_flops(model, x)
    macs /= 2e9
    assert out.shape == (1, 1000)
    assert abs(n - 31) / 31 < 0.01, f"{n:.3f}M"
    assert abs(macs - 5.6) / 5.6 < 0.01, f"{macs:.3f} GMACs"


@pytest.mark.parametrize("size", [(50, 70), (33, 33), (8, 8)])
def test_any_input_size(size):
    model = create_model("maxvit_tiny", **SMALL).eval()
    out = model(torch.randn(1, 3, *size))
    assert out.shape == (1, 10) and torch.isfinite(out).all()


def test_features_capture_and_a_training_step():
    model = create_model("maxvit_tiny", **SMALL)
    x = torch.randn(2, 3, 32, 48)
    feats = model.forward_intermediates(x.clone(), intermediates_only=True)
    assert [tuple(f.shape[1:]) for f in feats] == [
        (8, 16, 24), (16, 8, 12), (32, 4, 6), (32, 2, 3), (64, 1, 2)]
    assert [i["reduction"] for i in model.feature_info] == [2, 4, 8, 16, 32]
    net = create_model("maxvit_tiny", features_only=True, out_indices=(1, 2), **SMALL)
    assert [f.shape[1] for f in net(x)] == [16, 32]
    with capture_attention(model) as maps:
        loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([1, 2]))
    assert len(maps) == 2 * 5  # a block and a grid attention in each of the 5 blocks
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="maxvit: expected images"):
        model(torch.randn(3, 32, 32))


def _timm():
    import _torchvision_shim  # noqa: F401

    return pytest.importorskip("timm")


def _randomised(model):
    """Non-trivial BatchNorm statistics and bias tables, so a misplaced one shows."""
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0, 0.1)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.normal_()
    return model.eval()


def test_loads_timm_maxvit_tiny_tf_224_state_dict():
    """Every key of timm's model (built without pretrained weights), names and shapes."""
    timm = _timm()
    theirs = timm.create_model("maxvit_tiny_tf_224", pretrained=False)
    ours = create_model("maxvit_tiny")
    state = theirs.state_dict()
    load_pretrained(ours, state)  # strict: every key, every shape
    key = "stages.2.blocks.4.attn_grid.attn.relative_position_bias_table"
    assert torch.equal(ours.state_dict()[key], state[key.replace("attn.rel", "attn.rel_pos.rel")])
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    del state["head.fc.bias"]
    with pytest.raises(UsageError, match="missing keys: head.fc.bias"):
        load_pretrained(ours, state)


@pytest.mark.parametrize("img", [64])
def test_same_weights_give_timm_logits(img):
    """timm's maxvit_tiny_tf at a small image size (partition img // 32) and ours with that
    partition: the same random weights and statistics give the same logits."""
    timm = _timm()
    theirs = _randomised(timm.create_model("maxvit_tiny_tf_224", pretrained=False,
                                           img_size=img))
    ours = create_model("maxvit_tiny", partition=img // 32).eval()
    ours.load_state_dict(convert_timm_maxvit(theirs.state_dict()))
    x = torch.randn(2, 3, img, img)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
