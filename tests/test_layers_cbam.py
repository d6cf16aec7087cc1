import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spatial_attention as sa
from spatial_attention import capture_attention, explicit_path
from spatial_attention.functional.gates import cbam_gates
from spatial_attention.functional.kernels.cbam_gates import _first_max
from spatial_attention.layers.cbam import CBAM, convert_official_cbam_keys

NAMES = ["channel_gate", "spatial_gate", "cbam"]


# --- the paper's equations, restated with nothing from the library -----------------------
def _bn_eval(t, bn_state, eps=1e-5):
    w, b, mean, var = bn_state
    return (t - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + eps) * w.view(
        1, -1, 1, 1
    ) + b.view(1, -1, 1, 1)


def _channel_eq(x, w1, b1, w2, b2):
    """Eq. 2: Mc = sigmoid(W1 W0 F_avg + W1 W0 F_max), the MLP with ReLU and biases."""
    def mlp(d):
        return torch.relu(d @ w1.T + b1) @ w2.T + b2

    f_avg = x.sum((2, 3)) / (x.shape[2] * x.shape[3])
    f_max = x.flatten(2).max(2).values
    return torch.sigmoid(mlp(f_avg) + mlp(f_max))[:, :, None, None]


def _spatial_eq(x, conv_w, bn_state):
    """Eq. 3: Ms = sigmoid(BN(f7x7([F_max; F_avg]))) (max first, as the official code)."""
    f = torch.stack([x.max(1).values, x.sum(1) / x.shape[1]], 1)
    k = conv_w.shape[-1]
    padded = F.pad(f, (k // 2,) * 4)
    H, W = x.shape[2:]
    t = sum(
        conv_w[0, c, i, j] * padded[:, c, i : i + H, j : j + W]
        for c in range(2)
        for i in range(k)
        for j in range(k)
    )
    return torch.sigmoid(_bn_eval(t[:, None], bn_state))


def _bn_state(bn):
    return bn.weight, bn.bias, bn.running_mean, bn.running_var


def _randomise(module):
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(-0.5, 0.5)
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return module


@pytest.mark.parametrize("fused", [True, False])
def test_cbam_matches_equations(fused):
    m = _randomise(sa.create("cbam", 32)).eval()
    m.attn_impl = m.channel_gate.attn_impl = m.spatial_gate.attn_impl = (
        None if fused else "explicit")
    x = torch.randn(2, 32, 9, 7)
    cg, sg = m.channel_gate, m.spatial_gate
    fc1, fc2 = cg.mlp[0], cg.mlp[2]
    mc = _channel_eq(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias)
    x1 = mc * x  # Eq. 1
    ref = _spatial_eq(x1, sg.conv.weight, _bn_state(sg.bn)) * x1
    torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cg(x), x1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sg(x), _spatial_eq(x, sg.conv.weight, _bn_state(sg.bn)) * x,
                               atol=1e-5, rtol=1e-5)
    assert fc1.out_features == 2  # 32 // 16


def test_official_defaults():
    m = sa.create("cbam", 64)
    bn, conv = m.spatial_gate.bn, m.spatial_gate.conv
    assert (bn.eps, bn.momentum, bn.affine) == (1e-5, 0.01, True)
    assert conv.bias is None and conv.kernel_size == (7, 7) and conv.padding == (3, 3)
    assert m.channel_gate.mlp[0].bias is not None and m.channel_gate.mlp[0].out_features == 4


# --- official checkpoint layout ----------------------------------------------------------
def _official_cbam_state(C, r=16, seed=0):
    """A state dict with the official release's names and shapes (MODELS/cbam.py)."""
    g = torch.Generator().manual_seed(seed)
    hid = C // r
    return {
        "ChannelGate.mlp.1.weight": torch.randn(hid, C, generator=g) * 0.2,
        "ChannelGate.mlp.1.bias": torch.randn(hid, generator=g) * 0.2,
        "ChannelGate.mlp.3.weight": torch.randn(C, hid, generator=g) * 0.2,
        "ChannelGate.mlp.3.bias": torch.randn(C, generator=g) * 0.2,
        "SpatialGate.spatial.conv.weight": torch.randn(1, 2, 7, 7, generator=g) * 0.2,
        "SpatialGate.spatial.bn.weight": torch.rand(1, generator=g) + 0.5,
        "SpatialGate.spatial.bn.bias": torch.randn(1, generator=g) * 0.1,
        "SpatialGate.spatial.bn.running_mean": torch.randn(1, generator=g) * 0.1,
        "SpatialGate.spatial.bn.running_var": torch.rand(1, generator=g) + 0.5,
        "SpatialGate.spatial.bn.num_batches_tracked": torch.tensor(1000),
    }


def test_load_official_state_dict_and_outputs():
    C = 32
    sd = _official_cbam_state(C)
    m = CBAM(C).eval()
    m.load_official_state_dict(sd)  # strict: every key maps, every parameter is set
    x = torch.randn(2, C, 7, 5)
    mc = _channel_eq(x, sd["ChannelGate.mlp.1.weight"], sd["ChannelGate.mlp.1.bias"],
                     sd["ChannelGate.mlp.3.weight"], sd["ChannelGate.mlp.3.bias"])
    bn = tuple(sd[f"SpatialGate.spatial.bn.{k}"]
               for k in ("weight", "bias", "running_mean", "running_var"))
    x1 = mc * x
    ref = _spatial_eq(x1, sd["SpatialGate.spatial.conv.weight"], bn) * x1
    torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)
    with explicit_path(m):
        torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)


def test_convert_official_resnet_checkpoint_keys():
    inner = {f"module.layer1.0.cbam.{k}": v for k, v in _official_cbam_state(64).items()}
    inner["module.layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    out = convert_official_cbam_keys({"state_dict": inner, "epoch": 100})
    assert "layer1.0.cbam.channel_gate.mlp.0.weight" in out
    assert "layer1.0.cbam.channel_gate.mlp.2.bias" in out
    assert "layer1.0.cbam.spatial_gate.conv.weight" in out
    assert "layer1.0.cbam.spatial_gate.bn.running_var" in out
    assert "layer1.0.conv1.weight" in out and len(out) == len(inner)
    block = CBAM(64)
    block.load_state_dict({k[len("layer1.0.cbam."):]: v for k, v in out.items() if ".cbam." in k})


def test_official_checkpoint_without_batch_counter_loads():
    sd = _official_cbam_state(16)
    del sd["SpatialGate.spatial.bn.num_batches_tracked"]  # older PyTorch checkpoints
    CBAM(16).load_official_state_dict(sd)


# --- fused path == explicit path, values and every gradient --------------------------------
def _grads(m, x, g):
    y = m(x)
    params = [p for p in m.parameters()]
    return [y, *torch.autograd.grad(y, [x, *params], g)]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_equals_explicit_with_gradients(name, train, channels_last):
    torch.manual_seed(0)
    m = _randomise(sa.create(name, 32)).double().train(train)
    x = torch.randn(3, 32, 9, 6, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    g = torch.randn(x.shape, dtype=torch.float64)
    fused = _grads(m, x, g)
    with explicit_path(m):
        explicit = _grads(m, x, g)
    for a, b in zip(fused, explicit, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    if channels_last:
        assert fused[0].is_contiguous(memory_format=torch.channels_last)


def test_fused_max_ties_follow_max_pool():
    m = sa.create("cbam", 16).double()
    x = torch.relu(torch.randn(2, 16, 5, 5, dtype=torch.float64))
    x[:, 3] = 0.0  # a dead channel: every pixel ties for its max
    x[0, :, 2, 2] = 0.0  # a dead pixel: every channel ties for its max
    x.requires_grad_()
    g = torch.randn(x.shape, dtype=torch.float64)
    fused = _grads(m, x, g)
    with explicit_path(m):
        explicit = _grads(m, x, g)
    for a, b in zip(fused, explicit, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_parameter_gradients_when_input_needs_none():
    m = sa.create("cbam", 16)
    x = torch.randn(2, 16, 6, 5)
    m(x).square().sum().backward()
    fused = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    with explicit_path(m):
        m(x).square().sum().backward()
    for a, p in zip(fused, m.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, atol=1e-5, rtol=1e-4)


def test_batchnorm_statistics_update_once_per_call():
    m = sa.create("cbam", 16).train()
    m2 = copy.deepcopy(m)
    x = torch.randn(4, 16, 6, 6)
    m(x)
    fused = (m.spatial_gate.bn.running_mean.clone(), m.spatial_gate.bn.running_var.clone())
    with explicit_path(m2):
        m2(x)
    torch.testing.assert_close(fused, (m2.spatial_gate.bn.running_mean,
                                       m2.spatial_gate.bn.running_var))
    assert int(m.spatial_gate.bn.num_batches_tracked) == 1


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("shape", [(2, 12, 6, 8), (1, 5, 7, 3), (2, 64, 3, 1)])
def test_first_max_matches_first_index_with_ties(channels_last, dim, shape):
    x = torch.randint(0, 3, shape).float()  # many ties
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    v = x.flatten(2)
    values, index = _first_max(v, dim)
    ref = v.amax(dim)
    first = (v == ref.unsqueeze(dim)).int().argmax(dim)  # argmax returns the first maximum
    torch.testing.assert_close(values, ref)
    assert torch.equal(index, first)


def test_functional_gates_alone():
    x = torch.randn(2, 8, 4, 3)
    ones = cbam_gates(x)
    torch.testing.assert_close(ones, x)


# --- shapes, float64, capture, errors, compile ------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(1, 16, 7, 5), (2, 16, 1, 1), (3, 16, 13, 2)])
def test_shape_preserved_odd_sizes_and_batch_one(name, shape):
    m = sa.create(name, 16).eval()
    x = torch.randn(shape, requires_grad=True)
    assert m(x).shape == shape
    assert m(x.detach().contiguous(memory_format=torch.channels_last)).shape == shape
    with torch.no_grad():
        assert m(x).shape == shape


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_float64_training_mode(name):  # eval mode: tests/test_conformance.py
    m = _randomise(sa.create(name, 8)).double().train()
    x = torch.randn(1, 8, 3, 3, dtype=torch.float64, requires_grad=True)
    for fused in (True, False):
        for mod in m.modules():
            if hasattr(mod, "fused"):
                mod.attn_impl = None if fused else "explicit"
        torch.autograd.gradcheck(m, (x,))


def test_capture_records_both_gates():
    m = sa.create("cbam", 16)
    x = torch.randn(2, 16, 7, 5)
    out = m(x)
    with capture_attention(m) as maps:
        captured = m(x)
    assert set(maps) == {"channel_gate", "spatial_gate"}
    assert maps["channel_gate"].shape == (2, 16, 1, 1)
    assert maps["spatial_gate"].shape == (2, 1, 7, 5)
    assert ((maps["spatial_gate"] > 0) & (maps["spatial_gate"] < 1)).all()
    torch.testing.assert_close(captured, out)


@pytest.mark.parametrize("name", NAMES)
def test_clear_errors(name):
    m = sa.create(name, 8)
    with pytest.raises(ValueError, match=rf"{name}.*8 channels"):
        m(torch.randn(2, 4, 5, 5))
    with pytest.raises(ValueError, match=r"4-D"):
        m(torch.randn(2, 8, 5))
    with pytest.raises(ValueError, match="channels-last"):
        m(torch.randn(2, 5, 5, 8))
    with pytest.raises(ValueError, match="positive"):
        sa.create(name, 0)


def test_invalid_hyper_parameters():
    with pytest.raises(ValueError, match="odd"):
        sa.create("spatial_gate", 8, kernel_size=4)
    with pytest.raises(ValueError, match="reduction"):
        sa.create("cbam", 8, reduction=0)


def test_compile_fullgraph_training_step_matches_eager():
    m = sa.create("cbam", 16).train()
    x = torch.randn(2, 16, 6, 5, requires_grad=True)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    eager = _grads(m, x, torch.ones(2, 16, 6, 5))
    got = _grads(compiled, x, torch.ones(2, 16, 6, 5))
    for a, b in zip(eager, got, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
