"""FSLA and the bilateral block: a per-leaf transcription, odd sizes, batch
independence, the reference's quirks behind their flags, gradcheck, compile, errors."""

import pytest
import torch
import torch.nn.functional as F

import spatial_attention as sa
from spatial_attention import capture_attention, explicit_path
from spatial_attention.functional.clustering import balanced_binary_clustering
from spatial_attention.layers.bilateral import FeatureSpaceLocalAttention, fsla_key_positions


def per_leaf_fsla(m: FeatureSpaceLocalAttention, x: torch.Tensor) -> torch.Tensor:
    """FSLA written leaf by leaf from the clustering's order (loops, no masks)."""
    B, H, W, C = x.shape
    N, h, g, o, dh = H * W, m.num_heads, m.group_size, m.overlap, m.head_dim
    qkv = m.qkv(x.reshape(B, N, C)).reshape(B, N, 3, h, dh)
    out = torch.zeros(B, N, h, dh, dtype=x.dtype)
    for b in range(B):
        for j in range(h):
            q, k, v = qkv[b, :, 0, j], qkv[b, :, 1, j], qkv[b, :, 2, j]
            perm = balanced_binary_clustering(q, g)
            leaves = [perm[i * g:(i + 1) * g] for i in range(perm.numel() // g)]
            for i, leaf in enumerate(leaves):
                sib = leaves[i ^ 1] if (i ^ 1) < len(leaves) else leaf[:0]
                extra = sib[:o] if i % 2 == 0 else sib[g - o:]
                keys = torch.cat([leaf, extra])
                keys, queries = keys[keys < N], leaf[leaf < N]
                if queries.numel() == 0:
                    continue
                w = torch.softmax(q[queries] @ k[keys].T * m.scale, dim=-1)
                out[b, queries, j] = w @ v[keys]
    out = out.reshape(B, N, C)
    v_img = qkv[:, :, 2].reshape(B, H, W, C).permute(0, 3, 1, 2)
    local = m.get_v(v_img).permute(0, 2, 3, 1).reshape(B, N, C)
    return m.proj(out + local).view(B, H, W, C)


@pytest.mark.parametrize("size,g,o", [((8, 8), 8, 3), ((7, 9), 8, 3), ((5, 5), 49, 20),
                                      ((3, 11), 4, 4), ((6, 6), 9, 0)])
def test_matches_a_per_leaf_transcription(size, g, o):
    torch.manual_seed(0)
    m = FeatureSpaceLocalAttention(16, 2, group_size=g, overlap=o).double().eval()
    x = torch.randn(1, *size, 16, dtype=torch.float64)
    with torch.no_grad():
        want = per_leaf_fsla(m, x)
        torch.testing.assert_close(m(x), want)
        with explicit_path(m):
            torch.testing.assert_close(m(x), want)


def test_default_groups_on_an_odd_map_and_batch_one():
    torch.manual_seed(0)
    m = sa.create("fsla", 32, 2).eval()  # g = 49, overlap 20
    x = torch.randn(3, 13, 11, 32)  # N = 143: three leaves, the last partial
    with torch.no_grad():
        y = m(x)
        torch.testing.assert_close(m(x[1:2]), y[1:2], atol=1e-5, rtol=1e-5)  # no mixing
        with explicit_path(m):
            torch.testing.assert_close(m(x), y, atol=1e-5, rtol=1e-5)
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_capture_records_weights_and_leaves():
    m = sa.create("fsla", 16, 2, group_size=8, overlap=3).eval()
    with capture_attention(m) as maps:
        m(torch.randn(2, 6, 5, 16))  # N = 30: 4 leaves of 8 slots, 2 padding
    weights, leaves = maps.calls("")
    assert weights.shape == (2, 2, 4, 8, 11)
    torch.testing.assert_close(weights.sum(-1)[:, :, :3], torch.ones(2, 2, 3, 8))
    assert leaves.shape == (2, 2, 6, 5)
    counts = torch.stack([(leaves == i).sum((2, 3)) for i in range(4)], -1)
    assert (counts == torch.tensor([8, 8, 8, 6])).all()
    assert sa.info("fsla").cls.spatial_map(leaves, (6, 5)).shape == (2, 6, 5)


def test_key_positions_read_the_sibling_nearest_the_cut():
    pos, valid = fsla_key_positions(4 * 5, 5, 2)
    assert pos[0].tolist() == [0, 1, 2, 3, 4, 5, 6]  # leaf 0 + first two of leaf 1
    assert pos[1].tolist() == [5, 6, 7, 8, 9, 3, 4]  # leaf 1 + last two of leaf 0
    assert valid.all()
    pos, valid = fsla_key_positions(12, 5, 2)  # 3 leaves, last partial and unpaired
    assert not valid[2, -2:].any() and valid[2, :2].all() and not valid[2, 2:5].any()


def test_reference_quirks_behind_flags():
    torch.manual_seed(0)
    x = torch.randn(4, 7, 7, 16)
    paired = sa.create("fsla", 16, 2, pair_batch=True).eval()
    plain = sa.create("fsla", 16, 2).eval()
    plain.load_state_dict(paired.state_dict())
    with torch.no_grad():
        a = paired(x)
        x2 = x.clone()
        x2[1] += 1.0  # image 1 is image 0's partner, image 2 is not
        b = paired(x2)
        assert not torch.allclose(a[0], b[0]) and torch.allclose(a[2:], b[2:])
        assert torch.allclose(plain(x)[0], plain(x2)[0])  # default: samples never mix
    with pytest.raises(ValueError, match="fsla: pair_batch"):
        paired(x[:3])
    assert sa.create("fsla", 16, 2, scale=1.0).scale == 1.0
    assert sa.create("fsla", 16, 2).scale == pytest.approx(8**-0.5)


def test_gradcheck_tiny_float64():
    torch.manual_seed(0)
    m = sa.create("fsla", 4, 2, group_size=2, overlap=1).double()
    x = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    for fused in (True, False):
        m.attn_impl = None if fused else "explicit"
        torch.autograd.gradcheck(m, (x,))


def test_bilateral_block_is_window_then_fsla_and_compiles():
    torch.manual_seed(0)
    blk = sa.create("bilateral_local_attention", 32, 2, window_size=4, shift_size=2).eval()
    x = torch.randn(2, 9, 13, 32)
    with torch.no_grad():
        mid = x + blk.attn(blk.norm1(x))
        torch.testing.assert_close(blk(x), mid + blk.attnC(blk.norm4(mid)))
        compiled = torch.compile(blk, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), blk(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(dim=16, num_heads=3), "divisible"),
    (dict(dim=16, num_heads=2, overlap=50), "overlap"),
    (dict(dim=16, num_heads=2, group_size=0), "group_size"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FeatureSpaceLocalAttention(**kwargs)


def test_wrong_channels_name_the_mechanism():
    with pytest.raises(ValueError, match="fsla"):
        sa.create("fsla", 16, 2)(torch.randn(1, 16, 4, 4))
    with pytest.raises(ValueError, match="bilateral_local_attention"):
        sa.create("bilateral_local_attention", 16, 2)(torch.randn(1, 4, 4, 8))
    assert F is not None


@pytest.mark.parametrize("size", [(13, 11), (14, 14), (28, 14)])
def test_fast_gather_backward_equals_the_plain_gather(size, monkeypatch):
    """The custom backward of the leaf gather (slots -> rows by a second gather) gives
    the gradients autograd derives for the plain index_select path: an unpaired partial
    last leaf (3 leaves), two and four sibling pairs."""
    from spatial_attention.functional.kernels import leaf_gather

    calls = []
    apply = leaf_gather.LeafGather.apply
    monkeypatch.setattr(leaf_gather.LeafGather, "apply",
                        lambda *a: calls.append(1) or apply(*a))

    torch.manual_seed(0)
    m = sa.create("fsla", 16, 2).double()  # g = 49, overlap 20
    x = torch.randn(2, *size, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, *size, 16, dtype=torch.float64)

    def grads():
        m.zero_grad()
        x.grad = None
        (m(x) * w).sum().backward()
        return [x.grad.clone()] + [p.grad.clone() for p in m.parameters()]

    fast = grads()
    assert calls, "the fast gather was not used"
    monkeypatch.setattr(leaf_gather, "exporting_graph", lambda: True)  # forces the plain gather
    m.attn_impl = "sdpa"  # and SDPA instead of the short-key products
    plain = grads()
    for a, b in zip(fast, plain, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
