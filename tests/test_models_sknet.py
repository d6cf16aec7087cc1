"""SKNet-50: SK replaces the 3x3 conv of every bottleneck; paper size; timm's weights."""

import sys
from pathlib import Path

import pytest
import torch

from spatial_attention.apps.bench.flops import count_flops
from spatial_attention.layers.branch import SelectiveKernel
from spatial_attention.models import create_model
from spatial_attention.models.sknet import load_pretrained


def test_paper_size_and_sk_in_place_of_every_3x3():
    with torch.device("meta"):
        model = create_model("sknet50").eval()
        x = torch.empty(1, 3, 224, 224)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    macs = count_flops(model, x)[0] / 2e9
    assert abs(params - 27.5) / 27.5 < 0.01 and abs(macs - 4.47) / 4.47 < 0.01, (params, macs)
    blocks = [m for m in model.modules() if type(m).__name__ == "SKBottleneck"]
    assert len(blocks) == 16 and all(isinstance(b.conv2, SelectiveKernel) for b in blocks)
    convs3x3 = [m for m in model.modules()
                if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert all(c.groups == 32 for c in convs3x3)  # every 3x3 is an SK branch


def test_runs_on_odd_sizes_and_reports_bad_rank():
    model = create_model("sknet50", num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 45, 37)).shape == (1, 5)
    with pytest.raises(ValueError, match="images"):
        model(torch.randn(3, 45, 37))


def test_same_random_weights_give_timm_skresnext50_logits():
    sys.path.insert(0, str(Path(__file__).parent))
    import _torchvision_shim  # noqa: F401

    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    reference = timm.create_model("skresnext50_32x4d").eval()
    model = load_pretrained(create_model("sknet50").eval(), reference.state_dict())
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-4, rtol=1e-4)
