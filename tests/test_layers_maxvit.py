"""MaxViT block and grid attention: against a group-by-group transcription of Eq. 1 (any
size, padding never seen), against timm's AttentionCl with the same weights, the grid
helpers, timm's key names, capture and errors."""

import pytest
import torch

import spatial_attention as sa
from spatial_attention import capture_attention, explicit_path
from spatial_attention.functional.windows import (
    grid_attention_mask,
    grid_layout,
    grid_partition,
    grid_reverse,
    grid_token_index,
    pad_to_multiple,
)
from spatial_attention.layers.maxvit import (
    MaxViTBlockAttention,
    MaxViTGridAttention,
    convert_timm_maxvit_keys,
    tf_relative_position_index,
)


def groups(kind, H, W, P):
    """Every group as ``[(row, col, i, j)]``: map position and position inside the group,
    real tokens only (the padding a layer adds must not matter)."""
    ph, pw = P
    nh, nw = -(-H // ph), -(-W // pw)
    out = []
    for a in range(nh):
        for b in range(nw):
            cells = []
            for i in range(ph):
                for j in range(pw):
                    # block: window (a, b); grid: tokens nh (nw) apart, offset (a, b)
                    r, c = (a * ph + i, b * pw + j) if kind == "block" else (i * nh + a, j * nw + b)
                    if r < H and c < W:
                        cells.append((r, c, i, j))
            out.append(cells)
    return out


def transcription(m, x):
    """Eq. 1 written group by group: softmax(q k^T / sqrt(d) + B) v over the real tokens."""
    B, H, W, C = x.shape
    h, d = m.num_heads, C // m.num_heads
    ph, pw = m.size
    qkv = (x @ m.qkv.weight.T + m.qkv.bias).view(B, H, W, 3, h, d)
    out = torch.zeros(B, H, W, h, d, dtype=x.dtype)
    table = m.relative_position_bias_table
    for cells in groups(m.partition, H, W, (ph, pw)):
        rows = torch.tensor([c[0] for c in cells])
        cols = torch.tensor([c[1] for c in cells])
        q, k, v = (qkv[:, rows, cols, s].transpose(1, 2) for s in range(3))  # (B, h, n, d)
        scores = q @ k.transpose(-2, -1) * d**-0.5
        if table is not None:
            bias = torch.zeros(h, len(cells), len(cells), dtype=x.dtype)
            for u, (_, _, qi, qj) in enumerate(cells):
                for t, (_, _, ki, kj) in enumerate(cells):
                    if m.rel_pos == "tf":  # official: key minus query
                        bias[:, u, t] = table[:, ki - qi + ph - 1, kj - qj + pw - 1]
                    else:  # Swin: query minus key, flattened
                        bias[:, u, t] = table[(qi - ki + ph - 1) * (2 * pw - 1) + qj - kj + pw - 1]
            scores = scores + bias
        out[:, rows, cols] = (scores.softmax(-1) @ v).transpose(1, 2)
    return m.proj(out.reshape(B, H, W, C))


CLASSES = {"block": MaxViTBlockAttention, "grid": MaxViTGridAttention}


@pytest.mark.parametrize("kind", ["block", "grid"])
@pytest.mark.parametrize("size,P,rel", [((8, 8), 4, "tf"), ((7, 9), 3, "tf"), ((5, 3), 7, "tf"),
                                        ((1, 6), 2, "swin"), ((9, 4), (3, 2), None),
                                        ((6, 10), (2, 4), "tf"), ((12, 8), 4, "swin"),
                                        ((6, 12), (2, 3), "tf")])
def test_matches_a_group_by_group_transcription(kind, size, P, rel):
    torch.manual_seed(0)
    m = CLASSES[kind](16, 2, P, rel_pos=rel).double().eval()
    if m.relative_position_bias_table is not None:
        with torch.no_grad():
            m.relative_position_bias_table.normal_()  # large, so a wrong offset shows
    x = torch.randn(2, *size, 16, dtype=torch.float64)
    with torch.no_grad():
        want = transcription(m, x)
        for impl in m.attn_impls:
            m.attn_impl = impl
            torch.testing.assert_close(m(x), want, msg=lambda s, i=impl: f"{i}: {s}")


@pytest.mark.parametrize("kind", ["block", "grid"])
def test_impls_agree_in_training_with_padding_float64(kind):
    """Values and gradients (input, weights, bias table) of every path, padded map."""
    torch.manual_seed(0)
    m = CLASSES[kind](16, 2, 3).double()
    x = torch.randn(2, 5, 7, 16, dtype=torch.float64)
    grads = {}
    for impl in m.attn_impls:
        m.attn_impl = impl
        m.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        y = m(xi)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        grads[impl] = [y, xi.grad] + [p.grad for p in m.parameters()]
    for impl, got in grads.items():
        for a, b in zip(got, grads["explicit"], strict=True):
            torch.testing.assert_close(a, b, msg=lambda s, i=impl: f"{i}: {s}")


def test_padding_is_masked_not_attended():
    """Real tokens never attend padding: the recorded weights of padded keys are 0."""
    m = MaxViTGridAttention(16, 2, 4).eval()
    with capture_attention(m) as maps:
        m(torch.randn(1, 6, 5, 16))
    w = maps[""]  # (B, nW, heads, N, N)
    assert w.shape == (1, 2 * 2, 2, 16, 16)
    keep, pad_h, pad_w = grid_attention_mask(6, 5, 4)
    assert (pad_h, pad_w) == (2, 3)
    assert (w.masked_select(~keep[None, :, None]) == 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)))
    assert MaxViTGridAttention.spatial_map(w, (6, 5)).shape == (1, 6, 5)
    assert MaxViTBlockAttention.spatial_map(w, (6, 5)).shape == (1, 6, 5)


def test_capture_runs_explicit_and_records_each_group():
    torch.manual_seed(0)
    m = MaxViTBlockAttention(64).eval()  # num_heads None: 64 // 32 = 2 heads
    x = torch.randn(2, 14, 21, 64)
    out = m(x)
    with capture_attention(m) as maps:
        captured = m(x)
    assert maps[""].shape == (2, 6, 2, 49, 49)
    torch.testing.assert_close(captured, out, atol=1e-5, rtol=1e-5)


# -- the grid helpers in functional/windows.py ------------------------------------------


def test_grid_partition_groups_are_dilated():
    x = torch.arange(4 * 6).float().reshape(1, 4, 6, 1)  # value = 6 * row + col
    g = grid_partition(x, 2)  # groups (a, b) over a 2 x 3 offset grid, tokens 2 / 3 apart
    assert g.shape == (6, 4, 1)
    assert g[0, :, 0].tolist() == [0, 3, 12, 15]
    assert g[1, :, 0].tolist() == [1, 4, 13, 16]
    assert g[3, :, 0].tolist() == [6, 9, 18, 21]
    torch.testing.assert_close(grid_reverse(g, 2, 4, 6), x)
    with pytest.raises(ValueError, match="pad_to_multiple"):
        grid_partition(torch.randn(1, 5, 4, 1), 2)


@pytest.mark.parametrize("H,W,G", [(8, 8, 4), (9, 13, 4), (5, 3, 7), (1, 1, 2), (14, 21, 7)])
def test_grid_token_index_is_pad_then_partition(H, W, G):
    x = torch.randn(2, H, W, 3)
    padded, (ph, pw) = pad_to_multiple(x, G)
    want = grid_partition(padded, G)  # (B * nW, N, 3)
    gather, scatter = grid_token_index(H, W, G)
    got = x.reshape(2, H * W, 3)[:, gather].reshape(want.shape)
    real = grid_partition(pad_to_multiple(torch.ones(1, H, W, 1), G)[0], G)[..., 0].bool()
    real = real.repeat(2, 1)
    torch.testing.assert_close(got[real], want[real])
    torch.testing.assert_close(got.reshape(2, -1, 3)[:, scatter], x.reshape(2, H * W, 3))
    layout = grid_layout(H, W, G)
    assert layout.padded == bool(ph or pw) and (layout.keep is None) == (not (ph or pw))


def test_tf_index_is_the_official_one_hot_lookup():
    """ret[i, x, v] = 1{x - i + (L - 1) = v}, applied to heights then widths."""
    h, w = 3, 4

    def lookup(n):
        ret = torch.zeros(n, n, 2 * n - 1)
        for i in range(n):
            for k in range(n):
                ret[i, k, k - i + n - 1] = 1
        return ret

    table = torch.randn(2, 2 * h - 1, 2 * w - 1)
    t = torch.einsum("nhw,ixh->nixw", table, lookup(h))
    want = torch.einsum("nixw,jyw->nijxy", t, lookup(w)).reshape(2, h * w, h * w)
    got = table.flatten(1)[:, tf_relative_position_index((h, w))]
    torch.testing.assert_close(got, want)


# -- timm -------------------------------------------------------------------------------


def _timm():
    import _torchvision_shim  # noqa: F401

    return pytest.importorskip("timm")


@pytest.mark.parametrize("kind", ["block", "grid"])
@pytest.mark.parametrize("rel_type,ours,head_first", [("bias_tf", "tf", False),
                                                      ("bias", "swin", True)])
def test_equals_timm_with_the_same_weights(kind, rel_type, ours, head_first):
    _timm()
    from timm.models import maxxvit as tm

    torch.manual_seed(0)
    C, P, size = 64, 4, (8, 12)
    cfg = tm.MaxxVitTransformerCfg(rel_pos_type=rel_type, head_first=head_first, window_size=P)
    theirs = tm.AttentionCl(C, C, dim_head=32, head_first=head_first,
                            rel_pos_cls=tm.get_rel_pos_cls(cfg, (P, P))).eval()
    for p in theirs.parameters():
        torch.nn.init.normal_(p, std=0.2)
    m = CLASSES[kind](C, None, P, rel_pos=ours).eval()
    m.load_timm_state_dict(theirs.state_dict(), head_first=head_first)
    x = torch.randn(2, *size, C)
    split, merge = ((tm.window_partition, tm.window_reverse) if kind == "block"
                    else (tm.grid_partition, tm.grid_reverse))
    with torch.no_grad():
        for fused in (True, False):
            theirs.fused_attn = fused
            want = merge(theirs(split(x, (P, P))), (P, P), size)
            with explicit_path(m, explicit=not fused):
                torch.testing.assert_close(m(x), want, atol=1e-4, rtol=1e-4)


def test_timm_key_names_load():
    """A state dict with timm's MaxViT attention names and shapes (no timm needed)."""
    heads, C, P = 2, 64, 7
    pre = "stages.1.blocks.0.attn_grid.attn."
    timm_sd = {
        pre + "qkv.weight": torch.randn(3 * C, C), pre + "qkv.bias": torch.randn(3 * C),
        pre + "rel_pos.relative_position_bias_table": torch.randn(heads, 2 * P - 1, 2 * P - 1),
        pre + "proj.weight": torch.randn(C, C), pre + "proj.bias": torch.randn(C),
        "stages.1.blocks.0.attn_grid.norm1.weight": torch.randn(C),
    }
    ours = convert_timm_maxvit_keys(timm_sd)
    assert pre + "relative_position_bias_table" in ours and len(ours) == len(timm_sd)
    m = MaxViTGridAttention(C)
    m.load_timm_state_dict(timm_sd, prefix=pre)
    assert torch.equal(m.qkv.weight, timm_sd[pre + "qkv.weight"])
    assert torch.equal(m.relative_position_bias_table, timm_sd[pre + "rel_pos."
                                                               "relative_position_bias_table"])
    # head_first (timm's *_rw): qkv rows laid out (heads, 3, d) -> (3, heads, d)
    rows = torch.arange(3 * C, dtype=torch.float32)  # row r of head-first = (head, s, e)
    hf = convert_timm_maxvit_keys({"qkv.bias": rows}, head_first=True)["qkv.bias"]
    head, s, e = 1, 2, 5  # v, second head, channel 5 -> head-first row (1 * 3 + 2) * 32 + 5
    assert hf[s * C + head * 32 + e] == (head * 3 + s) * 32 + e


def test_num_heads_default_and_errors_name_the_mechanism():
    assert MaxViTBlockAttention(96).num_heads == 3 and MaxViTGridAttention(512).num_heads == 16
    with pytest.raises(ValueError, match="maxvit_block_attention: num_heads=None"):
        MaxViTBlockAttention(48)
    with pytest.raises(ValueError, match="maxvit_grid_attention: grid_size"):
        MaxViTGridAttention(32, 1, grid_size=0)
    with pytest.raises(ValueError, match="maxvit_grid_attention: rel_pos"):
        MaxViTGridAttention(32, 1, rel_pos="mlp")
    with pytest.raises(ValueError, match="maxvit_block_attention: dim 30"):
        sa.create("maxvit_block_attention", 30, 4)
    with pytest.raises(ValueError, match="maxvit_grid_attention"):
        sa.create("maxvit_grid_attention", 32, 1)(torch.randn(2, 32, 4, 4))
