import math

import _torchvision_shim  # noqa: F401  (before anything imports torchvision)
import pytest
import torch

import spatial_attention as sa
from spatial_attention import capture_attention
from spatial_attention.layers.non_local import convert_mmcv_non_local_keys

MODES = ["embedded_gaussian", "gaussian", "dot_product", "concatenation"]


def _randomise(m):
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return m


def _conv1x1(conv, t):
    out = torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], t)
    return out if conv.bias is None else out + conv.bias[None, :, None, None]


def _pool2(t):
    """2x2 max pool, a partial last window kept (pad with -inf)."""
    H, W = t.shape[-2:]
    t = torch.nn.functional.pad(t, (0, W % 2, 0, H % 2), value=-math.inf)
    B, C, H, W = t.shape
    return t.reshape(B, C, H // 2, 2, W // 2, 2).amax((3, 5))


def _nl_by_hand(m, x):
    """Wang et al. Eq. 1-6, each pairwise function written out on its own."""
    B, C, H, W = x.shape
    keys = _pool2 if m.sub_sample else (lambda t: t)
    gx = keys(_conv1x1(m.g, x)).flatten(2)  # (B, Ci, M)
    if m.mode == "gaussian":
        th, ph = x.flatten(2), keys(x).flatten(2)
    else:
        th, ph = _conv1x1(m.theta, x).flatten(2), keys(_conv1x1(m.phi, x)).flatten(2)
    M = ph.shape[-1]
    if m.mode == "concatenation":
        ci = th.shape[1]
        w = m.concat_project.weight.reshape(-1)
        f = torch.clamp(torch.einsum("c,bcn->bn", w[:ci], th)[:, :, None]
                        + torch.einsum("c,bcm->bm", w[ci:], ph)[:, None, :], min=0)
        f = f / M
    else:
        s = torch.einsum("bcn,bcm->bnm", th, ph)
        if m.mode == "dot_product":
            f = s / M
        else:
            if m.mode == "embedded_gaussian" and m.use_scale:
                s = s / math.sqrt(th.shape[1])
            e = torch.exp(s - s.amax(-1, keepdim=True))
            f = e / e.sum(-1, keepdim=True)
    y = torch.einsum("bnm,bcm->bcn", f, gx).reshape(B, -1, H, W)
    z = _conv1x1(m.conv_out, y)
    if m.norm is not None:  # eval mode: running statistics
        n = m.norm
        z = ((z - n.running_mean[None, :, None, None])
             / torch.sqrt(n.running_var[None, :, None, None] + n.eps)
             * n.weight[None, :, None, None] + n.bias[None, :, None, None])
    return x + z, f


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sub_sample", [False, True])
@pytest.mark.parametrize("impl", ["auto", "explicit", "sdpa", "kept_probs"])
def test_matches_equations_float64(mode, sub_sample, impl):
    torch.manual_seed(0)
    m = _randomise(sa.create("non_local", 16, mode=mode, sub_sample=sub_sample,
                             with_norm=mode == "gaussian", attn_impl=impl)).double().eval()
    if m.norm is not None:
        m.norm.running_var.uniform_(0.5, 2.0)
        m.norm.running_mean.normal_()
    x = torch.randn(2, 16, 5, 7, dtype=torch.float64)
    ref, _ = _nl_by_hand(m, x)
    torch.testing.assert_close(m(x), ref, rtol=1e-10, atol=1e-10)


def test_defaults_and_identity_init():
    m = sa.create("non_local", 64)
    assert (m.inter_channels, m.mode, m.use_scale, m.sub_sample) == (32, "embedded_gaussian",
                                                                    True, False)
    assert m.norm is None and m.conv_out.bias is not None
    x = torch.randn(2, 64, 5, 6)
    torch.testing.assert_close(m(x), x)
    bn = sa.create("non_local", 64, with_norm=True)
    assert bn.conv_out.bias is None and bn.norm.weight.abs().sum() == 0
    assert sa.create("non_local", 1).inter_channels == 1


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sub_sample", [False, True])
@pytest.mark.parametrize("shape", [(1, 8, 7, 5), (3, 8, 1, 1), (2, 8, 13, 2), (1, 8, 1, 9)])
def test_odd_sizes_fast_equals_explicit(mode, sub_sample, shape):
    fast = _randomise(sa.create("non_local", 8, mode=mode, sub_sample=sub_sample))
    slow = sa.create("non_local", 8, mode=mode, sub_sample=sub_sample, attn_impl="explicit")
    slow.load_state_dict(fast.state_dict())
    x = torch.randn(shape)
    torch.testing.assert_close(fast(x), slow(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sub_sample", [False, True])
def test_capture_pairwise_weights(sub_sample):
    torch.manual_seed(0)
    m = _randomise(sa.create("non_local", 8, sub_sample=sub_sample)).double()
    x = torch.randn(2, 8, 5, 3, dtype=torch.float64)
    with capture_attention(m) as maps:
        m(x)
    _, f = _nl_by_hand(m, x)
    M = 6 if sub_sample else 15
    assert maps[""].shape == (2, 15, M)
    torch.testing.assert_close(maps[""], f)
    assert m.spatial_map(maps[""], (5, 3)).shape == (2, 5, 3)


def test_clear_errors():
    m = sa.create("non_local", 8)
    with pytest.raises(ValueError, match=r"non_local.*8 channels"):
        m(torch.randn(2, 4, 5, 5))
    with pytest.raises(ValueError, match="4-D"):
        m(torch.randn(2, 8, 5))
    with pytest.raises(ValueError, match="non_local: mode"):
        sa.create("non_local", 8, mode="softmax")
    with pytest.raises(ValueError, match="non_local: reduction must be positive"):
        sa.create("non_local", 8, reduction=0)
    with pytest.raises(ValueError, match="non_local: channels must be positive"):
        sa.create("non_local", 0)


def test_mmcv_key_conversion():
    mmcv_keys = {"g.0.conv.weight", "g.0.conv.bias", "theta.conv.weight", "theta.conv.bias",
                 "phi.0.conv.weight", "phi.0.conv.bias", "conv_out.conv.weight",
                 "conv_out.norm.weight", "conv_out.norm.bias", "conv_out.norm.running_mean",
                 "conv_out.norm.running_var", "conv_out.norm.num_batches_tracked"}
    m = sa.create("non_local", 8, sub_sample=True, with_norm=True)
    converted = convert_mmcv_non_local_keys({k: None for k in mmcv_keys})
    assert set(converted) == set(m.state_dict())


@pytest.mark.parametrize("train", [False, True])
def test_matches_timm_non_local_attn(train):
    """timm's NonLocalAttn is the embedded Gaussian with BN after W_z; it scales by 1/sqrt(C)
    (not 1/sqrt(Ci)) and biases W_z, so compare unscaled, with W_z's bias at zero."""
    timm_layers = pytest.importorskip("timm.layers", reason="timm is not installed")
    C = 64
    theirs = timm_layers.NonLocalAttn(C, use_scale=False)  # Ci = 8 (rd_ratio 1/8)
    ours = _randomise(sa.create("non_local", C, reduction=8, use_scale=False, with_norm=True))
    with torch.no_grad():
        for a, b in (("t", "theta"), ("p", "phi"), ("g", "g")):
            getattr(theirs, a).weight.copy_(getattr(ours, b).weight)
            getattr(theirs, a).bias.copy_(getattr(ours, b).bias)
        theirs.z.weight.copy_(ours.conv_out.weight)
        theirs.z.bias.zero_()
        ours.norm.running_var.uniform_(0.5, 2.0)
        ours.norm.running_mean.normal_()
    theirs.norm.load_state_dict(ours.norm.state_dict())
    ours, theirs = ours.double().train(train), theirs.double().train(train)
    for shape in [(2, C, 7, 9), (3, C, 1, 5)]:
        x = torch.randn(shape, dtype=torch.float64)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", MODES)
def test_onnx_every_mode_sub_sampled(mode, tmp_path):
    """The registry-wide export test builds the default mode only."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    import warnings

    torch.manual_seed(0)
    m = _randomise(sa.create("non_local", 8, mode=mode, sub_sample=True)).eval()
    x = torch.randn(2, 8, 7, 5)
    path = tmp_path / "nl.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (x,), str(path), dynamo=False, input_names=["x"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"x": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), m(x).detach(), atol=1e-4, rtol=1e-4)
