import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from spatial_attention.functional import (
    additive_scores,
    attention,
    dispatch,
    dot_product_scores,
    masked_softmax,
    materialized_attention,
    scaled_dot_product_scores,
    scoring,
    sequence_mask,
)
from spatial_attention.functional.kernels import kept_probs


@pytest.fixture(params=["short_keys", "sdpa"])
def fused_path(request):
    """Keyword arguments that run a test on each fused CPU path: the short-key products
    with saved probabilities (``save_probs=True``) and SDPA (the default)."""
    return {"save_probs": True} if request.param == "short_keys" else {}


def test_masked_softmax_1d_valid_lens_hand_computed():
    scores = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], [[1.0, 1.0, 5.0], [2.0, 0.0, 1.0]]])
    out = masked_softmax(scores, torch.tensor([2, 3]))
    e1, e2 = math.exp(1.0), math.exp(2.0)
    expected0 = torch.tensor([[e1 / (e1 + e2), e2 / (e1 + e2), 0.0], [0.5, 0.5, 0.0]])
    torch.testing.assert_close(out[0], expected0)
    torch.testing.assert_close(out[1], torch.softmax(scores[1], -1))
    assert (out[0, :, 2] == 0).all()  # exactly zero, not merely small


def test_masked_softmax_2d_valid_lens_per_query():
    scores = torch.zeros(1, 3, 4)
    out = masked_softmax(scores, torch.tensor([[1, 2, 4]]))
    expected = torch.tensor([[[1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [0.25, 0.25, 0.25, 0.25]]])
    torch.testing.assert_close(out, expected)


def test_masked_softmax_length_zero_gives_zeros_not_nan():
    scores = torch.randn(2, 2, 3)
    out = masked_softmax(scores, torch.tensor([0, 3]))
    assert torch.isfinite(out).all()
    assert (out[0] == 0).all()
    torch.testing.assert_close(out[1], torch.softmax(scores[1], -1))


def test_masked_softmax_full_length_equals_softmax():
    scores = torch.randn(3, 4, 5)
    torch.testing.assert_close(
        masked_softmax(scores, torch.tensor([5, 5, 5])), F.softmax(scores, -1)
    )
    torch.testing.assert_close(masked_softmax(scores), F.softmax(scores, -1))


def test_masked_softmax_broadcasts_over_heads():
    scores = torch.randn(2, 4, 3, 6)  # (B, heads, Q, K)
    out = masked_softmax(scores, torch.tensor([2, 6]))
    assert (out[0, ..., 2:] == 0).all()
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 4, 3))


def test_masked_softmax_bad_valid_lens():
    with pytest.raises(ValueError, match="valid_lens"):
        masked_softmax(torch.randn(2, 3, 4), torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="batch"):
        masked_softmax(torch.randn(2, 3, 4), torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match="boolean"):
        masked_softmax(torch.randn(2, 3, 4), mask=torch.ones(2, 3, 4))


def test_masked_softmax_gradcheck_float64():
    scores = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda s: masked_softmax(s, torch.tensor([2, 0])), (scores,))
    torch.autograd.gradcheck(
        lambda s: masked_softmax(s, torch.tensor([[1, 2, 4], [3, 3, 3]])), (scores,)
    )


def test_sequence_mask():
    m = sequence_mask(torch.tensor([0, 2, 3]), 3)
    assert m.tolist() == [[False, False, False], [True, True, False], [True, True, True]]


def test_scores_match_definitions():
    q, k = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    torch.testing.assert_close(dot_product_scores(q, k), torch.einsum("bqd,bkd->bqk", q, k))
    torch.testing.assert_close(
        scaled_dot_product_scores(q, k), dot_product_scores(q, k) / math.sqrt(8)
    )
    wq, wk, wv = torch.randn(6, 8), torch.randn(6, 8), torch.randn(6)
    ref = torch.empty(2, 3, 5)
    for b in range(2):
        for i in range(3):
            for j in range(5):
                ref[b, i, j] = wv @ torch.tanh(wq @ q[b, i] + wk @ k[b, j])
    torch.testing.assert_close(additive_scores(q, k, wq, wk, wv), ref)


def _masks(B, h, Q, K):
    keep = torch.rand(B, 1, Q, K) > 0.3
    keep[..., 0] = True  # every query keeps a key
    return {
        "none": None,
        "bool": keep,
        "float": torch.randn(1, h, Q, K),
    }


@pytest.mark.parametrize("kind", ["none", "bool", "float"])
def test_fused_equals_explicit(kind, fused_path):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 7, 16), torch.randn(2, 3, 9, 16), torch.randn(2, 3, 9, 8)
    mask = _masks(2, 3, 7, 9)[kind]
    fused = attention(q, k, v, mask, **fused_path)
    explicit, w = attention(q, k, v, mask, fused=False, return_weights=True)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)
    assert w.shape == (2, 3, 7, 9)
    if kind == "bool":
        assert (w[~mask.expand_as(w)] == 0).all()


def test_fully_masked_query_row_is_zero_on_both_paths(fused_path):
    q, k, v = torch.randn(1, 1, 3, 4), torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 4)
    keep = torch.ones(1, 1, 3, 5, dtype=torch.bool)
    keep[..., 1, :] = False
    fused = attention(q, k, v, keep, **fused_path)
    explicit = attention(q, k, v, keep, fused=False)
    assert torch.isfinite(fused).all() and (fused[..., 1, :] == 0).all()
    torch.testing.assert_close(fused, explicit)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("kind", ["none", "bool", "float"])
def test_attention_gradcheck_float64(fused, kind, fused_path):
    torch.manual_seed(1)
    q = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 5, 3, dtype=torch.float64, requires_grad=True)
    mask = _masks(1, 2, 3, 5)[kind]
    if kind == "float":
        mask = mask.double().requires_grad_()
        torch.autograd.gradcheck(
            lambda a, b, c, m: attention(a, b, c, m, fused=fused, **fused_path), (q, k, v, mask)
        )
    else:
        torch.autograd.gradcheck(
            lambda a, b, c: attention(a, b, c, mask, fused=fused, **fused_path), (q, k, v)
        )


def _grads(q, k, v, mask, **kw):
    inputs = [t for t in (q, k, v, mask) if t is not None and t.requires_grad]
    out = attention(q, k, v, mask, **kw)
    return [out, *torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out))
                                      .sum(), inputs)]


@pytest.mark.parametrize("kind", ["none", "bool", "float", "bool_empty_row"])
def test_short_key_path_is_taken_and_matches_the_explicit_gradients(kind, monkeypatch):
    """With ``save_probs``, windows-sized attention on CPU runs as batched products with
    a hand-written backward; its values and the gradients of q, k, v and a learned
    (broadcast) bias equal autograd's through the explicit math. Keys and values shared
    across the batch (broadcast by matmul) get their gradients summed back."""
    calls = []
    apply = scoring._ShortKeyAttention.apply
    monkeypatch.setattr(scoring._ShortKeyAttention, "apply",
                        lambda *a: calls.append(1) or apply(*a))
    torch.manual_seed(0)
    q = torch.randn(2, 3, 7, 16, requires_grad=True)
    k = torch.randn(1, 3, 9, 16, requires_grad=True)  # shared by both samples
    v = torch.randn(2, 3, 9, 8, requires_grad=True)
    mask = _masks(2, 3, 7, 9)[kind.replace("_empty_row", "")]
    if kind == "float":
        mask.requires_grad_()
    if kind == "bool_empty_row":
        mask = mask.clone()
        mask[1, :, 4] = False
    fast = _grads(q, k, v, mask, save_probs=True)
    assert calls, "the short-key path was not taken"
    explicit = _grads(q, k, v, mask, fused=False)
    for a, b in zip(fast, explicit, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    if kind == "bool_empty_row":
        assert (fast[0][1, :, 4] == 0).all() and all(torch.isfinite(g).all() for g in fast)


def test_short_key_path_only_where_it_wins(monkeypatch):
    calls = []
    apply = scoring._ShortKeyAttention.apply
    monkeypatch.setattr(scoring._ShortKeyAttention, "apply",
                        lambda *a: calls.append(1) or apply(*a))
    q = torch.randn(1, 2, 8, 16)

    def used(k_len=9, save_probs=True, **kw) -> bool:
        calls.clear()
        k = torch.randn(1, 2, k_len, 16)
        attention(q, k, k, save_probs=save_probs, **kw)
        return bool(calls)

    assert used() and not used(save_probs=False)  # opt-in: it costs memory
    assert used(scale=0.5) and used(k_len=scoring.SHORT_KEYS)
    assert not used(k_len=scoring.SHORT_KEYS + 1)  # long keys: the flash kernel
    assert not used(dropout_p=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not used()
    calls.clear()
    attention(q.bfloat16(), q.bfloat16(), q.bfloat16(), save_probs=True)
    assert not calls


@pytest.mark.parametrize("kind", ["none", "bool", "float"])
@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_materialized_attention_any_key_length_matches_the_explicit_math(kind, scale, monkeypatch):
    """``materialized_attention`` keeps the probabilities at any key length (the caller
    forms the scores anyway): on CPU it runs the hand-written backward, also past
    ``SHORT_KEYS`` keys, with queries and keys wider than the values; values and all
    gradients equal autograd's through the plain math, scale 1 included (where the
    backward skips its scale passes)."""
    calls = []
    apply = scoring._ShortKeyAttention.apply
    monkeypatch.setattr(scoring._ShortKeyAttention, "apply",
                        lambda *a: calls.append(1) or apply(*a))
    torch.manual_seed(0)
    nk = scoring.SHORT_KEYS + 3
    q = torch.randn(2, 3, 5, 12, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, nk, 12, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 3, nk, 4, dtype=torch.float64, requires_grad=True)
    mask = None
    if kind == "bool":
        mask = torch.rand(5, nk) > 0.5
        mask[:, 0] = True
    elif kind == "float":
        mask = torch.randn(3, 5, nk, dtype=torch.float64, requires_grad=True)
    inputs = [t for t in (q, k, v, mask) if t is not None and t.requires_grad]
    weight = torch.linspace(-1, 1, 2 * 3 * 5 * 4, dtype=torch.float64).view(2, 3, 5, 4)
    out = materialized_attention(q, k, v, mask, scale)
    assert calls, "the kept-probabilities path was not taken"
    grads = torch.autograd.grad((out * weight).sum(), inputs)
    scores = (q @ k.transpose(-2, -1)) * scale
    if kind == "bool":
        scores = scores.masked_fill(~mask, float("-inf"))
    elif kind == "float":
        scores = scores + mask
    ref = torch.softmax(scores, -1) @ v
    ref_grads = torch.autograd.grad((ref * weight).sum(), inputs)
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", ["none", "bool_whole", "bool_batched", "float_whole",
                                  "float_batched", "energy_only", "energy_whole",
                                  "energy_per_head", "float_per_head",
                                  "constant_columns"])
def test_kept_probabilities_tiled_equal_untiled(kind, monkeypatch):
    """Large batches of blocks run in cache-sized tiles (``TILE_BYTES``); values and every
    gradient equal the untiled computation, for each kind of mask and with constant key
    columns (whose gradient is zero), and with an empty row under a boolean mask."""
    torch.manual_seed(0)
    B, h, Q, K, d, dv = 3, 4, 6, 5, 8, 3
    q = torch.randn(B, h, Q, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, h, K, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, h, K, dv, dtype=torch.float64, requires_grad=True)
    mask, fixed = None, 0
    if kind == "bool_whole":
        mask = torch.rand(Q, K) > 0.4
        mask[:, 0] = True
    elif kind == "bool_batched":
        mask = torch.rand(B, h, Q, K) > 0.4
        mask[..., 0] = True
        mask[1, 2, 3] = False  # an empty row: zero weights
    elif kind in ("float_whole", "energy_only", "energy_whole"):
        mask = torch.randn(1, 1, Q, K, dtype=torch.float64, requires_grad=True)
    elif kind == "float_per_head":  # untiled forward (partly broadcast), tiled backward
        mask = torch.randn(1, h, Q, K, dtype=torch.float64, requires_grad=True)
    elif kind == "float_batched":
        mask = torch.randn(B, h, Q, K, dtype=torch.float64, requires_grad=True)
    elif kind == "constant_columns":
        fixed = 3
    if kind == "energy_only":
        mask = torch.randn(B, h, Q, K, dtype=torch.float64, requires_grad=True)
        q = k = None
    elif kind == "energy_whole":  # one energy for every block
        q = k = None
    elif kind == "energy_per_head":  # shared by the batch: forward keeps P per head only
        mask = torch.randn(1, h, Q, K, dtype=torch.float64, requires_grad=True)
        q = k = None
    inputs = [t for t in (q, k, v, mask) if t is not None and t.requires_grad]

    def run(tile_bytes):
        monkeypatch.setattr(kept_probs, "TILE_BYTES", tile_bytes)
        out = materialized_attention(q, k, v, mask, 0.7, constant_key_columns=fixed)
        weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
        return [out, *torch.autograd.grad((out * weight).sum(), inputs)]

    whole = run(2**40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no out= tensor may be resized behind our back
        tiled = run(2 * Q * K * 8)  # two blocks per tile: six tiles
    for a, b in zip(tiled, whole, strict=True):
        torch.testing.assert_close(a, b)
    if fixed:  # the other columns get the true gradient, the constant ones zero
        out = torch.softmax((q @ k.transpose(-2, -1)) * 0.7, -1) @ v
        weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
        true_dk = torch.autograd.grad((out * weight).sum(), k)[0]
        torch.testing.assert_close(tiled[2][..., :-fixed], true_dk[..., :-fixed])
        assert (tiled[2][..., -fixed:] == 0).all()
    if kind == "bool_batched":
        assert (tiled[0][1, 2, 3] == 0).all()


def test_materialized_attention_plain_ops_under_autocast_and_clear_errors(monkeypatch):
    calls = []
    apply = scoring._ShortKeyAttention.apply
    monkeypatch.setattr(scoring._ShortKeyAttention, "apply",
                        lambda *a: calls.append(1) or apply(*a))
    q, v = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = materialized_attention(q, q, v)
    assert not calls and out.shape == (1, 2, 6, 3)
    torch.testing.assert_close(out.float(), torch.softmax(q @ q.transpose(-2, -1), -1) @ v,
                               atol=3e-2, rtol=3e-2)
    with pytest.raises(ValueError, match="query dim"):
        materialized_attention(q, q[..., :4], v)


@pytest.mark.parametrize("kind", ["bool", "float", "energy_only"])
def test_materialized_attention_plain_path_matches_the_kept_probabilities(kind, monkeypatch):
    """Where the custom function does not run (GPU, compile, export, autocast) the plain
    ops give the same values and gradients, the energy-only form included."""
    torch.manual_seed(0)
    q = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, 7, 6, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 3, 7, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    if kind == "bool":
        mask = torch.rand(5, 7) > 0.5
        mask[:, 0] = True
    if kind == "energy_only":
        q = k = None
    inputs = [t for t in (q, k, v, mask) if t is not None and t.requires_grad]

    def run():
        out = materialized_attention(q, k, v, mask, 0.5)
        return [out, *torch.autograd.grad(out.square().sum(), inputs)]

    kept = run()
    monkeypatch.setattr(dispatch, "kept_probs_applies", lambda t: False)
    plain = run()
    for a, b in zip(kept, plain, strict=True):
        torch.testing.assert_close(a, b)


def test_materialized_attention_bad_arguments_are_clear_value_errors():
    q, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 3)
    energy = torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match="neither and a float mask"):
        materialized_attention(None, q, v, energy)  # only one of query and key
    with pytest.raises(ValueError, match="neither and a float mask"):
        materialized_attention(None, None, v, energy > 0)  # a boolean energy
    with pytest.raises(ValueError, match="neither and a float mask"):
        materialized_attention(None, None, v)
    with pytest.raises(ValueError, match="does not match values"):
        materialized_attention(None, None, v, torch.randn(1, 2, 4, 5))
    with pytest.raises(ValueError, match="constant_key_columns"):
        materialized_attention(q, q, v, constant_key_columns=9)
    with pytest.raises(ValueError, match="constant_key_columns"):
        materialized_attention(q, q, v, constant_key_columns=-1)


def test_kept_probabilities_tiled_pass_gradcheck(monkeypatch):
    """float64 gradcheck of the tiled path (one block per tile), float energy included."""
    monkeypatch.setattr(scoring, "TILE_BYTES", 3 * 4 * 8)
    torch.manual_seed(0)
    q = torch.randn(2, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 4, 3, dtype=torch.float64, requires_grad=True)
    energy = torch.randn(2, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, c, e: materialized_attention(a, b, c, e, 0.7), (q, k, v, energy))
    assert torch.autograd.gradcheck(
        lambda c, e: materialized_attention(None, None, c, e), (v, energy))


def test_attention_clear_errors():
    with pytest.raises(ValueError, match="query dim"):
        attention(torch.randn(1, 3, 4), torch.randn(1, 3, 5), torch.randn(1, 3, 5))
    with pytest.raises(ValueError, match="values"):
        attention(torch.randn(1, 3, 4), torch.randn(1, 3, 4), torch.randn(1, 2, 4))
    with pytest.raises(ValueError, match="rank"):
        attention(torch.randn(4), torch.randn(4), torch.randn(4))
