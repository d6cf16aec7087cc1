"""Issue #15: NaN and autocast hardening of the map layers, mmcv's E2 branch, norm eps."""

import math
import sys
from pathlib import Path

import pytest
import torch

import spatial_attention as sa
from spatial_attention import capture_attention, create_model, explicit_path
from spatial_attention.functional.sampling import (
    deform_conv2d,
    deform_conv2d_explicit,
    deform_sampling_positions,
)

NAN = float("nan")
DEFORMABLE = ["deformable_conv", "modulated_deformable_conv"]


# -- deformable convolution: NaN and infinite sampling positions ---------------------------


@pytest.mark.parametrize("name", DEFORMABLE)
@pytest.mark.parametrize("size", [(6, 6), (5, 8)])
def test_all_nan_input_gives_nan_not_an_index_error(name, size):
    m = sa.create(name, 8)
    x = torch.full((1, 8, *size), NAN)
    for explicit in (False, True):
        with explicit_path(m, explicit):
            assert m(x).isnan().all()


@pytest.mark.parametrize("name", DEFORMABLE)
def test_partly_nan_input_stays_local_as_in_a_convolution(name):
    torch.manual_seed(0)
    m = sa.create(name, 8)  # offsets start at zero: a plain 3x3 convolution
    x = torch.randn(2, 8, 9, 10)
    x[1, :, 4, 6] = NAN
    out = m(x)
    with explicit_path(m):
        ref = m(x)
    assert not out[0].isnan().any()
    nan = out[1].isnan().all(0)
    assert nan[3:6, 5:8].all()  # every output whose window holds the NaN pixel
    # taps on the grid read their zero-weight far corners too (NaN * 0, as torchvision),
    # so the NaN reaches one pixel further up and left, and no further
    far = torch.ones(9, 10, dtype=torch.bool)
    far[2:6, 4:8] = False
    assert not nan[far].any()
    torch.testing.assert_close(out, ref, equal_nan=True)


@pytest.mark.parametrize("name", DEFORMABLE)
def test_nan_offsets_give_nan_outputs_where_they_are_nan(name):
    # an even width: with an odd one the INT64_MIN index of a NaN position wrapped to
    # pixel 0 (no error, but the NaN was lost); with an even one it stayed out of bounds
    m, _ = type(sa.create(name, 8)).example(name, 1, 8, (7, 8))
    x = torch.randn(1, 8, 7, 8)
    x[0, 3, 2, 5] = NAN
    with capture_attention(m) as maps:
        out_explicit = m(x)
    offsets = maps.calls("")[0]  # (B, G, K, 2, Ho, Wo)
    nan_offsets = offsets.isnan().flatten(1, 3).any(1)  # (B, Ho, Wo)
    assert nan_offsets.any() and not nan_offsets.all()
    out = m(x)
    assert out.isnan().all(1)[nan_offsets].all()
    torch.testing.assert_close(out, out_explicit, equal_nan=True)


def test_infinite_offsets_sample_outside_the_map_and_read_zero():
    torch.manual_seed(0)
    x = torch.randn(1, 4, 5, 6, dtype=torch.float64)
    weight = torch.randn(3, 4, 3, 3, dtype=torch.float64)
    offset = torch.randn(1, 18, 5, 6, dtype=torch.float64)
    far = offset.clone()
    inf = offset.clone()
    far[0, 0, 1, 2], inf[0, 0, 1, 2] = 1e6, math.inf  # dy of tap 0
    far[0, 5, 3, 3], inf[0, 5, 3, 3] = -1e6, -math.inf  # dx of tap 2
    for fn in (deform_conv2d, deform_conv2d_explicit):
        expected = fn(x, far, weight, padding=1)
        got = fn(x, inf, weight, padding=1)
        assert got.isfinite().all()
        torch.testing.assert_close(got, expected)


# -- deformable convolution: positions in float32 under autocast ---------------------------


def test_sampling_positions_are_float32_for_bfloat16_offsets():
    torch.manual_seed(0)
    offset = (torch.randn(1, 18, 4, 150) * 3).bfloat16()
    y, x = deform_sampling_positions(offset, (3, 3), 1, 1, 1)
    y32, x32 = deform_sampling_positions(offset.float(), (3, 3), 1, 1, 1)
    assert y.dtype == x.dtype == torch.float32
    assert torch.equal(y, y32) and torch.equal(x, x32)
    y64, _ = deform_sampling_positions(offset.double(), (3, 3), 1, 1, 1)
    assert y64.dtype == torch.float64


@pytest.mark.parametrize("name", DEFORMABLE)
def test_autocast_bfloat16_samples_at_float32_positions_on_wide_maps(name):
    m, _ = type(sa.create(name, 8)).example(name, 1, 8, (12, 150))
    x = torch.randn(1, 8, 12, 150)
    with torch.no_grad():
        ref = m(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            offset = m.conv_offset(x)
            assert offset.dtype == torch.bfloat16
            y, _ = deform_sampling_positions(offset[:, :18], (3, 3), 1, 1, 1)
            assert y.dtype == torch.float32
            assert torch.equal(y, deform_sampling_positions(offset[:, :18].float(),
                                                            (3, 3), 1, 1, 1)[0])
            outs = [m(x)]
            with explicit_path(m):
                outs.append(m(x))
    # half-pixel position rounding past x = 64 gave errors of half the output's range
    for out in outs:
        assert (out.float() - ref).abs().max() < 0.04 * ref.abs().max()


# -- generalized attention: sinusoids in float32 under autocast ----------------------------


@pytest.mark.parametrize("attention_type", ["0100", "0110", "1111"])
def test_generalized_attention_position_embedding_is_float32_under_autocast(attention_type):
    torch.manual_seed(0)
    m = sa.create("generalized_attention", 16, num_heads=2, attention_type=attention_type,
                  position_magnitude=16)
    with torch.no_grad():
        m.gamma.fill_(1.0)
    seen = []
    m.appr_geom_fc_x.register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
    m.appr_geom_fc_y.register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
    x = torch.randn(1, 16, 48, 48)
    with torch.no_grad():
        ref = m(x) - x
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs = [m(x) - x]
            with explicit_path(m):
                outs.append(m(x) - x)
    assert seen and all(dt == torch.float32 for dt in seen)
    # phases up to 16 * 47 rad: formed in bfloat16 their sines were off by up to ~1
    for out in outs:
        assert (out.float() - ref).abs().max() < 0.06 * ref.abs().max()


def test_generalized_attention_bfloat16_module_still_runs():
    m = sa.create("generalized_attention", 8, num_heads=2, attention_type="0100").bfloat16()
    out = m(torch.randn(1, 8, 5, 6, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


# -- generalized attention: mmcv_compat ----------------------------------------------------

E2_WITHOUT_E4 = ["0100", "0110", "1100", "1110"]


def _mmcv_energy(m, x):
    """mmcv's energy (n, heads, Nq, Nk) for E2 without E4, transcribed op by op.

    The shapes and batched matmuls follow mmcv's ``forward``: the row term multiplies
    the query laid out (n, heads, w, h, d) by P_y laid out (n, heads, h, d, h_kv), so
    the batch index of the query is its column where P_y's is its row.
    """
    bits = [c == "1" for c in m.attention_type]
    n, z, d = x.shape[0], m.num_heads, m.qk_embed_dim
    xq = x[:, :, ::m.q_stride, ::m.q_stride]
    xkv = x[:, :, ::m.kv_stride, ::m.kv_stride]
    h, w = xq.shape[-2:]
    h_kv, w_kv = xkv.shape[-2:]
    q = m.query_conv(xq).view(n, z, d, h * w).permute(0, 1, 3, 2)  # (n, z, hw, d)

    def sinusoid(length, length_kv):  # mmcv's get_position_embedding, one axis
        qi = torch.linspace(0, length - 1, length, dtype=x.dtype).view(length, 1) * m.q_stride
        ki = torch.linspace(0, length_kv - 1, length_kv, dtype=x.dtype).view(length_kv, 1)
        diff = (qi.unsqueeze(1) - (ki * m.kv_stride).unsqueeze(0)) * m.position_magnitude
        feat = m.position_embedding_dim
        dim_mat = torch.tensor([1000.0], dtype=x.dtype) ** (
            (4.0 / feat) * torch.arange(0, feat / 4, dtype=x.dtype))
        dim_mat = dim_mat.view(1, 1, -1)
        return torch.cat(((diff / dim_mat).sin(), (diff / dim_mat).cos()), dim=2)

    px = m.appr_geom_fc_x(sinusoid(w, w_kv)).view(1, w, w_kv, z, d).permute(0, 3, 1, 2, 4)
    py = m.appr_geom_fc_y(sinusoid(h, h_kv)).view(1, h, h_kv, z, d).permute(0, 3, 1, 2, 4)
    px, py = px / math.sqrt(2), py / math.sqrt(2)
    if bits[0]:
        k = m.key_conv(xkv).view(n, z, d, h_kv * w_kv)
        base = (q + m.appr_bias.view(1, z, 1, d)) if bits[2] else q
        energy = torch.matmul(base, k).view(n, z, h, w, h_kv, w_kv)
    else:
        energy = torch.zeros(n, z, h, w, h_kv, w_kv, dtype=x.dtype)
        if bits[2]:
            k = m.key_conv(xkv).view(n, z, d, h_kv * w_kv)
            e3 = torch.matmul(m.appr_bias.view(1, z, 1, d), k)
            energy = energy + e3.view(n, z, 1, 1, h_kv, w_kv)
    q_cols = q.reshape(n, z, h, w, d).permute(0, 1, 3, 2, 4)  # (n, z, w, h, d)
    energy_x = torch.matmul(q_cols, px.permute(0, 1, 2, 4, 3))  # (n, z, w, h, w_kv)
    energy_x = energy_x.permute(0, 1, 3, 2, 4).unsqueeze(4)
    energy_y = torch.matmul(q_cols, py.permute(0, 1, 2, 4, 3)).unsqueeze(5)
    energy = energy + energy_x + energy_y
    return energy.view(n, z, h * w, h_kv * w_kv)


def _mmcv_forward(m, x):
    energy = _mmcv_energy(m, x)
    n, z = x.shape[0], m.num_heads
    xq = x[:, :, ::m.q_stride, ::m.q_stride]
    xkv = x[:, :, ::m.kv_stride, ::m.kv_stride]
    h, w = xq.shape[-2:]
    v = m.value_conv(xkv).view(n, z, m.v_dim, -1).permute(0, 1, 3, 2)
    out = torch.matmul(energy.softmax(3), v).permute(0, 1, 3, 2).reshape(n, -1, h, w)
    out = m.proj_conv(out)
    if m.q_stride > 1:
        out = torch.nn.functional.interpolate(out, size=x.shape[2:], mode="bilinear",
                                              align_corners=False)
    return m.gamma * out + x


def _ga(attention_type, **kw):
    torch.manual_seed(0)
    m = sa.create("generalized_attention", 8, num_heads=2, attention_type=attention_type,
                  **kw).double()
    with torch.no_grad():
        m.gamma.fill_(0.7)
    return m


@pytest.mark.parametrize("attention_type", E2_WITHOUT_E4)
@pytest.mark.parametrize("kw,size", [
    (dict(kv_stride=1), (5, 5)),
    (dict(kv_stride=2, position_magnitude=2), (6, 6)),
    (dict(kv_stride=2, q_stride=2), (7, 8)),  # the query grid (4, 4) is square
])
def test_mmcv_compat_reproduces_mmcv_s_e2_branch(attention_type, kw, size):
    m = _ga(attention_type, mmcv_compat=True, **kw)
    x = torch.randn(2, 8, *size, dtype=torch.float64)
    expected = _mmcv_forward(m, x)
    torch.testing.assert_close(m(x), expected)
    with capture_attention(m) as maps:
        got = m(x)
    torch.testing.assert_close(got, expected)
    terms, _ = maps.calls("")
    torch.testing.assert_close(terms.sum(2), _mmcv_energy(m, x))
    m.attn_impl = "sdpa"  # memory-efficient
    torch.testing.assert_close(m(x), expected)
    # the default is the paper's formula, which differs from mmcv's on a random map
    paper = _ga(attention_type, **kw)
    assert not torch.allclose(paper(x), expected)


def test_mmcv_compat_gradients_match_between_paths():
    m = _ga("1100", mmcv_compat=True, kv_stride=1)
    x = torch.randn(1, 8, 4, 4, dtype=torch.float64, requires_grad=True)
    for fused in (True, False):
        m.attn_impl = None if fused else "explicit"
        assert torch.autograd.gradcheck(m, (x,), fast_mode=True)


@pytest.mark.parametrize("attention_type", ["1111", "0101", "1000", "0011", "0001"])
def test_mmcv_compat_changes_nothing_for_the_other_types(attention_type):
    x = torch.randn(1, 8, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(_ga(attention_type, mmcv_compat=True)(x),
                               _ga(attention_type)(x))


@pytest.mark.parametrize("attention_type", E2_WITHOUT_E4)
def test_mmcv_compat_on_a_non_square_map_is_a_clear_value_error(attention_type):
    m = _ga(attention_type, mmcv_compat=True)
    with pytest.raises(ValueError, match=r"generalized_attention: mmcv_compat.*square"):
        m(torch.randn(1, 8, 5, 6, dtype=torch.float64))
    assert _ga(attention_type)(torch.randn(1, 8, 5, 6, dtype=torch.float64)).shape[-1] == 6


# -- model norms against timm ----------------------------------------------------------------


def _timm():
    sys.path.insert(0, str(Path(__file__).parent))
    import _torchvision_shim  # noqa: F401

    return pytest.importorskip("timm")


def _norm_eps(model):
    kinds = (torch.nn.LayerNorm, torch.nn.BatchNorm2d, torch.nn.GroupNorm)
    return {name: m.eps for name, m in model.named_modules() if isinstance(m, kinds)}


@pytest.mark.parametrize("ours,theirs", [
    ("twins_svt_small", "twins_svt_small"),
    ("twins_pcpvt_small", "twins_pcpvt_small"),
    ("swin_tiny", "swin_tiny_patch4_window7_224"),
    ("sknet50", "skresnext50_32x4d"),
])
def test_every_norm_has_timm_s_epsilon(ours, theirs):
    timm = _timm()
    with torch.device("meta"):
        mine, reference = _norm_eps(create_model(ours)), _norm_eps(timm.create_model(theirs))
    assert mine and mine == reference


@pytest.mark.parametrize("name", ["twins_svt_small", "twins_pcpvt_small"])
def test_twins_logits_match_timm_where_the_norm_epsilon_matters(name):
    """Patch-embedding norms scaled by 1e-3 leave tokens of variance ~1e-6 at the first
    block norms, where eps 1e-5 against 1e-6 changes the logits by order one."""
    timm = _timm()
    from spatial_attention.models import twins as twins_mod

    torch.manual_seed(0)
    reference = timm.create_model(name).eval()
    with torch.no_grad():
        for key, p in reference.named_parameters():
            if key.startswith("patch_embeds.") and ".norm." in key:
                p.mul_(1e-3)
    model = twins_mod.load_pretrained(create_model(name).eval(), reference.state_dict())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-4, rtol=1e-4)
