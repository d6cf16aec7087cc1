import pytest
import torch

import spatial_attention as sa
from spatial_attention import capture_attention, explicit_path


def _qkv(B=2, Q=4, K=6, d=8, dv=5, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(B, Q, d, generator=g, dtype=dtype),
        torch.randn(B, K, d, generator=g, dtype=dtype),
        torch.randn(B, K, dv, generator=g, dtype=dtype),
    )


@pytest.mark.parametrize("name", ["dot_product", "scaled_dot_product"])
@pytest.mark.parametrize(
    "lens", [None, torch.tensor([3, 6]), torch.tensor([[1, 2, 3, 6], [6, 5, 4, 0]])]
)
def test_dot_product_fused_equals_explicit(name, lens):
    m = sa.create(name)
    q, k, v = _qkv()
    fused = m(q, k, v, lens)
    with explicit_path(m):
        explicit = m(q, k, v, lens)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)


def test_dot_product_scaling_and_masking_by_hand():
    q, k, v = _qkv(B=1, Q=1, K=3, d=4, dv=2)
    lens = torch.tensor([2])
    for name, scale in (("dot_product", 1.0), ("scaled_dot_product", 0.5)):
        w = torch.softmax((q @ k.transpose(1, 2))[..., :2] * scale, -1)
        torch.testing.assert_close(sa.create(name)(q, k, v, lens), w @ v[:, :2])


def test_additive_matches_bahdanau_by_hand():
    m = sa.create("additive", 8, 8, 6)
    q, k, v = _qkv()
    lens = torch.tensor([2, 6])
    out = m(q, k, v, lens)
    Wq, Wk, wv = m.W_q.weight, m.W_k.weight, m.w_v.weight[0]
    for b in range(2):
        for i in range(4):
            e = torch.stack(
                [wv @ torch.tanh(Wq @ q[b, i] + Wk @ k[b, j]) for j in range(int(lens[b]))]
            )
            torch.testing.assert_close(out[b, i], torch.softmax(e, 0) @ v[b, : int(lens[b])])


def test_multi_head_matches_torch_reference():
    torch.manual_seed(0)
    m = sa.create("multi_head", 16, 4).eval()
    ref = torch.nn.MultiheadAttention(16, 4, batch_first=True).eval()
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([m.q_proj.weight, m.k_proj.weight, m.v_proj.weight]))
        ref.in_proj_bias.copy_(torch.cat([m.q_proj.bias, m.k_proj.bias, m.v_proj.bias]))
        ref.out_proj.weight.copy_(m.out_proj.weight)
        ref.out_proj.bias.copy_(m.out_proj.bias)
    x = torch.randn(2, 7, 16)
    lens = torch.tensor([7, 3])
    pad = torch.arange(7)[None] >= lens[:, None]  # True = ignore, torch's convention
    expected, _ = ref(x, x, x, key_padding_mask=pad)
    torch.testing.assert_close(m(x, valid_lens=lens), expected, atol=1e-5, rtol=1e-5)
    with explicit_path(m):
        torch.testing.assert_close(m(x, valid_lens=lens), expected, atol=1e-5, rtol=1e-5)


def test_multi_head_cross_attention_dims():
    m = sa.create("multi_head", 16, 2, kdim=12, vdim=10)
    out = m(torch.randn(3, 5, 16), torch.randn(3, 9, 12), torch.randn(3, 9, 10))
    assert out.shape == (3, 5, 16)


@pytest.mark.parametrize("fused", [True, False])
def test_multi_head_gradcheck_float64(fused):
    torch.manual_seed(0)
    m = sa.create("multi_head", 8, 2).double()
    m.attn_impl = None if fused else "explicit"
    x = torch.randn(2, 4, 8, dtype=torch.float64, requires_grad=True)
    lens = torch.tensor([4, 2])
    torch.autograd.gradcheck(lambda t: m(t, valid_lens=lens), (x,))


@pytest.mark.parametrize("fused", [True, False])
def test_dot_and_additive_gradcheck_float64(fused):
    q, k, v = (t.requires_grad_() for t in _qkv(B=1, Q=2, K=3, d=4, dv=2, dtype=torch.float64))
    lens = torch.tensor([2])
    dp = sa.create("scaled_dot_product")
    dp.attn_impl = None if fused else "explicit"
    torch.autograd.gradcheck(lambda a, b, c: dp(a, b, c, lens), (q, k, v))
    ad = sa.create("additive", 4, 4, 3).double()
    ad.attn_impl = None if fused else "explicit"
    torch.autograd.gradcheck(lambda a, b, c: ad(a, b, c, lens), (q, k, v))


def test_dropout_only_in_training():
    m = sa.create("multi_head", 8, 2, dropout=0.5).eval()
    x = torch.randn(1, 5, 8)
    torch.testing.assert_close(m(x), m(x))
    m.train()
    torch.manual_seed(0)
    a = m(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, m(x))


def test_capture_shapes_and_no_leftovers():
    model = torch.nn.Sequential(sa.create("multi_head", 8, 2), sa.create("multi_head", 8, 4))
    x = torch.randn(3, 5, 8)
    with capture_attention(model) as maps:
        y = model(x)
        model[0](x)  # a second call of the same module is kept in history
    assert set(maps) == {"0", "1"}
    assert maps["0"].shape == (3, 2, 5, 5) and maps["1"].shape == (3, 4, 5, 5)
    assert len(maps.calls("0")) == 2 and len(maps.calls("1")) == 1
    torch.testing.assert_close(maps["1"].sum(-1), torch.ones(3, 4, 5))
    torch.testing.assert_close(y, model(x), atol=1e-5, rtol=1e-5)  # fused again afterwards
    assert all(m._recorder is None and m.fused for m in model)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    model(x)
    assert len(maps.calls("0")) == 2  # nothing recorded outside the block


def test_capture_restores_after_exception():
    m = sa.create("multi_head", 8, 2)
    with pytest.raises(RuntimeError):
        with capture_attention(m):
            raise RuntimeError("boom")
    assert m._recorder is None


def test_capture_requires_a_mechanism():
    with pytest.raises(ValueError, match="no spatial_attention mechanism"):
        with capture_attention(torch.nn.Linear(2, 2)):
            pass


@pytest.mark.parametrize(
    "build,args,match",
    [
        (lambda: sa.create("multi_head", 10, 3), None, "not divisible"),
        (lambda: sa.create("multi_head", 8, 2, dropout=1.5), None, "dropout"),
        (lambda: sa.create("additive", 0, 4, 4), None, "query_dim"),
    ],
)
def test_bad_hyper_parameters(build, args, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_bad_inputs_raise_clear_errors():
    m = sa.create("multi_head", 8, 2)
    with pytest.raises(ValueError, match=r"multi_head.*\(B, N, C\)"):
        m(torch.randn(5, 8))
    with pytest.raises(ValueError, match="8 channels"):
        m(torch.randn(2, 5, 6))
    with pytest.raises(ValueError, match="valid_lens"):
        m(torch.randn(2, 5, 8), valid_lens=torch.tensor([1, 2, 3]))
    dp = sa.create("dot_product")
    with pytest.raises(ValueError, match="query dim"):
        dp(torch.randn(1, 2, 3), torch.randn(1, 4, 5), torch.randn(1, 4, 5))
    with pytest.raises(ValueError, match="batch"):
        dp(torch.randn(1, 2, 3), torch.randn(2, 4, 3), torch.randn(2, 4, 3))


def test_batch_one_and_single_token():
    m = sa.create("multi_head", 8, 2)
    assert m(torch.randn(1, 1, 8)).shape == (1, 1, 8)


def test_multi_head_compiles_fullgraph():
    m = sa.create("multi_head", 16, 2).eval()
    x = torch.randn(2, 9, 16)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(
        compiled(x, valid_lens=torch.tensor([9, 4])), m(x, valid_lens=torch.tensor([9, 4]))
    )


def test_multi_head_torch_export():
    m = sa.create("multi_head", 16, 2).eval()
    x = torch.randn(2, 9, 16)
    ep = torch.export.export(m, (x,))
    torch.testing.assert_close(ep.module()(x), m(x))


def test_autocast_bf16_and_channels_last_friendly():
    m = sa.create("multi_head", 16, 2)
    x = torch.randn(2, 9, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), m(x), atol=0.1, rtol=0.1)
