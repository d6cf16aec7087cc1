"""Swin window attention, Twins LSA/GSA, PEG and global attention on (B, H, W, C)."""

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import spatial_attention as sa
from spatial_attention import capture_attention, explicit_path
from spatial_attention.layers.global_attention import GlobalAttention, GlobalSubsampledAttention
from spatial_attention.layers.position import PositionEncodingGenerator
from spatial_attention.layers.window import WindowAttention


def _brute_force(attn: WindowAttention, x: torch.Tensor) -> torch.Tensor:
    """Token by token: each real query attends the real keys that share its window in
    the shifted, padded partition and came from the same region of the unshifted map."""
    B, H, W, C = x.shape
    mh, mw = attn.window_size
    sh, sw = (0 if H <= mh else attn.shift_size[0]), (0 if W <= mw else attn.shift_size[1])
    Hp, Wp = math.ceil(H / mh) * mh, math.ceil(W / mw) * mw
    h, d = attn.num_heads, attn.head_dim
    qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias).view(B, H, W, 3, h, d)

    def place(r, c):  # position in the shifted padded map, and the region label there
        i, j = (r - sh) % Hp, (c - sw) % Wp
        region_r = 0 if i < Hp - mh else (1 if i < Hp - sh else 2)
        region_c = 0 if j < Wp - mw else (1 if j < Wp - sw else 2)
        return i, j, (region_r if sh else 0, region_c if sw else 0)

    out = torch.zeros(B, H, W, C, dtype=x.dtype)
    tokens = [(r, c) for r in range(H) for c in range(W)]
    for r, c in tokens:
        i, j, reg = place(r, c)
        keys = []
        for r2, c2 in tokens:
            i2, j2, reg2 = place(r2, c2)
            if i2 // mh == i // mh and j2 // mw == j // mw and reg2 == reg:
                keys.append((r2, c2, i2, j2))
        q = qkv[:, r, c, 0]  # (B, h, d)
        k = torch.stack([qkv[:, a, b, 1] for a, b, _, _ in keys], 2)  # (B, h, K, d)
        v = torch.stack([qkv[:, a, b, 2] for a, b, _, _ in keys], 2)
        scores = torch.einsum("bhd,bhkd->bhk", q, k) * d**-0.5
        if attn.relative_position_bias_table is not None:
            rows = [
                (i % mh - i2 % mh + mh - 1) * (2 * mw - 1) + (j % mw - j2 % mw + mw - 1)
                for _, _, i2, j2 in keys
            ]
            scores = scores + attn.relative_position_bias_table[rows].T[None]
        mixed = torch.einsum("bhk,bhkd->bhd", scores.softmax(-1), v).reshape(B, C)
        out[:, r, c] = F.linear(mixed, attn.proj.weight, attn.proj.bias)
    return out


CASES = [  # (H, W, window, shift): padding, shift, both, window larger than the map
    (8, 8, 4, 0),
    (8, 8, 4, 2),
    (9, 10, 4, 2),
    (7, 5, 4, 1),
    (3, 2, 7, 3),
    (6, 11, (3, 4), (1, 2)),
]


@pytest.mark.parametrize("H,W,M,s", CASES)
@pytest.mark.parametrize("fused", [True, False])
def test_window_attention_equals_brute_force(H, W, M, s, fused):
    torch.manual_seed(0)
    attn = WindowAttention(8, 2, window_size=M, shift_size=s).double()
    with torch.no_grad():
        attn.relative_position_bias_table.normal_()
    attn.attn_impl = None if fused else "explicit"
    x = torch.randn(2, H, W, 8, dtype=torch.float64)
    torch.testing.assert_close(attn(x), _brute_force(attn, x), atol=1e-10, rtol=1e-10)


def test_twins_lsa_is_window_attention_without_bias_or_shift():
    lsa = sa.create("twins_lsa", 8, 2, window_size=3)
    assert lsa.relative_position_bias_table is None and lsa.shift_size == (0, 0)
    x = torch.randn(1, 7, 5, 8)
    torch.testing.assert_close(lsa(x), _brute_force(lsa, x), atol=1e-5, rtol=1e-5)


def test_padded_slots_are_masked_keys():
    """The padded slots of a 6 x 6 map (window 4) are masked: filling them with real rows
    changes the outputs of the rows that share their windows, and padding does not."""
    torch.manual_seed(0)
    attn = WindowAttention(8, 2, window_size=4).eval()
    x = torch.randn(1, 6, 6, 8)
    y = attn(x)
    bigger = attn(torch.cat([x, torch.randn(1, 2, 6, 8) * 10], 1))[:, :6]
    torch.testing.assert_close(bigger[:, :4], y[:, :4])  # windows without padding agree
    assert not torch.allclose(bigger[:, 4:], y[:, 4:], atol=1e-3)  # those rows used them
    zero_padded = attn(torch.cat([x, torch.zeros(1, 2, 6, 8)], 1))[:, :6]  # timm's way
    assert not torch.allclose(zero_padded[:, 4:], y[:, 4:], atol=1e-4)


def test_shifted_registration_uses_half_window():
    attn = sa.create("shifted_window_attention", 16, 2, window_size=6)
    assert attn.shift_size == (3, 3)


@pytest.mark.parametrize("H,W,M,s", [(5, 4, 3, 1), (4, 4, 2, 1)])
def test_gradcheck_float64_shift_and_padding(H, W, M, s):
    torch.manual_seed(0)
    attn = WindowAttention(4, 2, window_size=M, shift_size=s).double()
    x = torch.randn(1, H, W, 4, dtype=torch.float64, requires_grad=True)
    for fused in (True, False):
        attn.attn_impl = None if fused else "explicit"
        torch.autograd.gradcheck(attn, (x,))


@pytest.mark.parametrize("save_probs", [False, True])
def test_fused_equals_explicit_with_shift_padding_and_grads(save_probs):
    torch.manual_seed(0)
    attn = WindowAttention(16, 4, window_size=4, shift_size=2).double()
    attn.attn_impl = "kept_probs" if save_probs else None  # the hand-written CPU kernel
    x = torch.randn(2, 9, 11, 16, dtype=torch.float64)
    grads = []
    for explicit in (False, True):
        attn.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        with explicit_path(attn, explicit=explicit):
            out = attn(xi)
        out.pow(2).sum().backward()
        grads.append((out.detach(), xi.grad, attn.relative_position_bias_table.grad))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_compile_fullgraph_with_shift_and_padding():
    attn = WindowAttention(16, 2, window_size=4, shift_size=2).eval()
    x = torch.randn(2, 9, 11, 16)
    compiled = torch.compile(attn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), attn(x), atol=1e-5, rtol=1e-5)


def test_capture_gives_per_window_maps():
    attn = WindowAttention(16, 2, window_size=4, shift_size=2)
    x = torch.randn(2, 9, 11, 16)
    with capture_attention(attn) as maps:
        attn(x)
    (w,) = maps.values()
    assert w.shape == (2, 3 * 3, 2, 16, 16)  # (B, nW, heads, N, N) on the padded 12 x 12
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 9, 2, 16))
    plain = WindowAttention(16, 2, window_size=4)
    with capture_attention(plain) as maps:
        plain(x)
    (w,) = maps.values()
    heat = WindowAttention.spatial_map(w, (9, 11))
    assert heat.shape == (2, 9, 11) and torch.isfinite(heat).all()
    # in a window without padding the received attention averages to 1/N per token
    full = heat[:, :8, :8].reshape(2, 2, 4, 2, 4).mean((2, 4))
    torch.testing.assert_close(full, torch.full((2, 2, 2), 1 / 16))


def test_layout_cache_is_per_size_and_bounded():
    attn = WindowAttention(8, 2, window_size=3, shift_size=1)
    for n in range(4, 30):
        attn(torch.randn(1, n, 5, 8))
    assert 0 < len(attn._layouts) <= 17


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(dim=10, num_heads=3), "divisible"),
        (dict(dim=8, num_heads=2, window_size=4, shift_size=4), "shift"),
        (dict(dim=8, num_heads=2, window_size=0), "window"),
        (dict(dim=8, num_heads=2, attn_drop=1.5), "attn_drop"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WindowAttention(**kwargs)


def test_forward_errors_name_the_mechanism():
    attn = sa.create("twins_lsa", 8, 2)
    with pytest.raises(ValueError, match="twins_lsa.*4-D"):
        attn(torch.randn(2, 16, 8))
    with pytest.raises(ValueError, match="twins_lsa"):
        attn(torch.randn(2, 4, 4, 6))  # wrong channels


# -- global attention, GSA, PEG -----------------------------------------------------------


def test_global_attention_equals_explicit_math():
    torch.manual_seed(0)
    attn = GlobalAttention(16, 4).eval()
    x = torch.randn(2, 5, 3, 16)
    q, k, v = attn.qkv(x.reshape(2, 15, 16)).view(2, 15, 3, 4, 4).permute(2, 0, 3, 1, 4)
    w = (q @ k.transpose(-1, -2) / 2).softmax(-1)
    expected = attn.proj((w @ v).transpose(1, 2).reshape(2, 15, 16)).view(2, 5, 3, 16)
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("H,W,sr", [(8, 8, 4), (9, 7, 2), (3, 5, 4), (6, 6, 1)])
def test_gsa_equals_reduce_then_attend(H, W, sr):
    torch.manual_seed(0)
    gsa = GlobalSubsampledAttention(8, 2, sr_ratio=sr).eval()
    x = torch.randn(2, H, W, 8)
    kv_src = x
    if sr > 1:  # the official reduction, on a zero-padded map when it is smaller than sr
        fmap = x.permute(0, 3, 1, 2)
        fmap = F.pad(fmap, (0, max(0, sr - W), 0, max(0, sr - H)))
        kv_src = gsa.norm(F.conv2d(fmap, gsa.sr.weight, gsa.sr.bias, stride=sr).permute(0, 2, 3, 1))
    q = gsa.q(x).reshape(2, H * W, 2, 4).transpose(1, 2)
    k, v = gsa.kv(kv_src.reshape(2, -1, 8)).reshape(2, -1, 2, 2, 4).permute(2, 0, 3, 1, 4)
    w = (q @ k.transpose(-1, -2) / 2).softmax(-1)
    expected = gsa.proj((w @ v).transpose(1, 2).reshape(2, H * W, 8)).view(2, H, W, 8)
    torch.testing.assert_close(gsa(x), expected, atol=1e-5, rtol=1e-5)
    with capture_attention(gsa) as maps:
        gsa(x)
    (weights,) = maps.values()
    assert weights.shape[-1] == max(1, H // sr) * max(1, W // sr)


def test_peg_is_residual_depthwise_conv():
    torch.manual_seed(0)
    peg = PositionEncodingGenerator(6)
    x = torch.randn(2, 5, 7, 6)
    conv = peg.proj[0]
    code = F.conv2d(x.permute(0, 3, 1, 2), conv.weight, conv.bias, padding=1, groups=6)
    expected = x + code.permute(0, 2, 3, 1)
    torch.testing.assert_close(peg(x), expected, atol=1e-5, rtol=1e-5)
    assert set(peg.state_dict()) == {"proj.0.weight", "proj.0.bias"}


# -- against timm's layers (optional) --------------------------------------------------


def _timm():
    sys.path.insert(0, str(Path(__file__).parent))
    import _torchvision_shim  # noqa: F401

    return pytest.importorskip("timm")


@pytest.mark.parametrize("shift", [0, 3])
def test_equals_timm_swin_block_attention(shift):
    _timm()
    from timm.models.swin_transformer import SwinTransformerBlock

    torch.manual_seed(0)
    block = SwinTransformerBlock(32, (14, 14), num_heads=2, window_size=7, shift_size=shift).eval()
    ours = WindowAttention(32, 2, window_size=7, shift_size=shift).eval()
    ours.load_state_dict(block.attn.state_dict(), strict=False)
    x = torch.randn(2, 14, 14, 32)
    torch.testing.assert_close(ours(x), block._attn(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("H,W,M,s", [(8, 8, 4, 0), (9, 10, 4, 2), (7, 5, 3, 1)])
def test_flex_inference_path_equals_sdpa(H, W, M, s):
    torch.manual_seed(0)
    attn = WindowAttention(8, 2, window_size=M, shift_size=s).eval()
    with torch.no_grad():
        attn.relative_position_bias_table.normal_()
    x = torch.randn(2, H, W, 8)
    with torch.no_grad():
        expected = attn(x)
        attn.attn_impl = "flex"
        torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)
        assert attn._block_masks  # the flex path really ran
    attn.train()  # training (and CPU autograd) stays on the SDPA path
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)
