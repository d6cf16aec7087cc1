"""Issue #15 on the token mechanisms: cached window layouts across inference_mode, FSLA's
grouping under tiny perturbations and across grad modes, the 4-D mask form that CUDA
takes in window_sdpa, and BOAT's clustering under autocast."""

import functools

import pytest
import torch

import spatial_attention as sa
from spatial_attention import explicit_path
from spatial_attention.functional.clustering import balanced_binary_clustering
from spatial_attention.functional.scoring import attention
from spatial_attention.layers import bilateral, multiview, window

# every mechanism that caches a window layout, at a size that needs padding, a shift or
# both (5 x 5 with window 4: padded; 8 x 8 shifted; 6 x 7 shifted and padded)
CACHED = [
    ("window_attention", {"window_size": 4}, (1, 5, 5, 16)),
    ("shifted_window_attention", {"window_size": 4}, (1, 8, 8, 16)),
    ("shifted_window_attention", {"window_size": 4}, (1, 6, 7, 16)),
    ("twins_lsa", {"window_size": 4}, (1, 5, 5, 16)),
    ("multi_view_window_attention", {"window_size": 4, "shift": 2}, (1, 2, 6, 7, 16)),
    ("multi_view_concat_attention", {"window_size": 4}, (1, 2, 5, 5, 16)),
    ("bilateral_local_attention", {"window_size": 4, "shift_size": 2, "group_size": 3,
                                   "overlap": 1}, (1, 6, 7, 16)),
]


def _layout_caches(m: torch.nn.Module):
    return [mod._layouts for mod in m.modules() if hasattr(mod, "_layouts")]


@pytest.mark.parametrize("first", ["inference_mode", "no_grad"])
@pytest.mark.parametrize("name,kwargs,shape", CACHED)
def test_training_call_after_an_inference_call(name, kwargs, shape, first):
    torch.manual_seed(0)
    m = sa.create(name, 16, 2, **kwargs)
    x = torch.randn(*shape)
    mode = torch.inference_mode() if first == "inference_mode" else torch.no_grad()
    with mode:
        before = m(x)
    caches = _layout_caches(m)
    assert caches and all(caches), "the call should have cached a layout"
    for cache in caches:
        for layout in cache.values():
            assert not any(t.is_inference() for t in layout if isinstance(t, torch.Tensor))
    xg = x.clone().requires_grad_()
    out = m(xg)
    out.sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
    torch.testing.assert_close(out.detach(), before, atol=1e-5, rtol=1e-5)
    # and back: the training call's layouts serve inference as well
    with torch.inference_mode():
        torch.testing.assert_close(m(x), before, atol=1e-5, rtol=1e-5)


def test_flex_block_mask_cache_holds_no_inference_tensor():
    # CPU runs FlexAttention only without grad, but on CUDA an eval call with grad reuses
    # the block mask an inference_mode call cached
    torch.manual_seed(0)
    m = sa.create("shifted_window_attention", 16, 2, window_size=4).eval()
    m.attn_impl = "flex"
    x = torch.randn(1, 6, 7, 16)
    with torch.inference_mode():
        out = m(x)
    masks = list(m._block_masks.values())
    assert masks
    for bm in masks:
        tensors = [t for t in vars(bm).values() if isinstance(t, torch.Tensor)]
        assert tensors and not any(t.is_inference() for t in tensors)
    m.attn_impl = None
    with torch.no_grad():
        torch.testing.assert_close(out, m(x), atol=1e-5, rtol=1e-5)


# -- FSLA's grouping is a function of the input, not of rounding noise -------------------

def _fsla_and_input(seed: int = 0):
    torch.manual_seed(seed)
    m = sa.create("fsla", 8, 2, group_size=3, overlap=1)  # 130 tokens: padded to 3 * 2^6
    return m, torch.randn(1, 10, 13, 8)


def test_clustering_ignores_a_tiny_relative_perturbation():
    torch.manual_seed(0)
    q = torch.randn(4, 130, 4)
    perm = balanced_binary_clustering(q, 3)
    for eps in (1e-6, -1e-6):
        assert torch.equal(balanced_binary_clustering(q * (1 + eps), 3), perm)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fsla_ignores_a_tiny_relative_perturbation(seed):
    m, x = _fsla_and_input(seed)
    with torch.no_grad():
        ref = m(x)
        for eps in (1e-6, -1e-6):
            torch.testing.assert_close(m(x * (1 + eps)), ref, atol=1e-4, rtol=0)


def _in_modes(m: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    outs = {"grad": m(x.clone().requires_grad_()).detach()}
    with torch.no_grad():
        outs["no_grad"] = m(x)
    with torch.inference_mode():
        outs["inference_mode"] = m(x).clone()
    return outs


def test_fsla_same_output_with_grad_without_grad_and_in_inference_mode():
    m, x = _fsla_and_input()
    outs = _in_modes(m, x)
    torch.testing.assert_close(outs["no_grad"], outs["grad"], atol=1e-6, rtol=0)
    torch.testing.assert_close(outs["inference_mode"], outs["grad"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bilateral_same_output_with_grad_without_grad_and_in_inference_mode(seed):
    # the window branch's CPU training kernel and SDPA differ by ~1e-7; that must not
    # reach the grouping of the FSLA branch behind it
    torch.manual_seed(seed)
    m = sa.create("bilateral_local_attention", 8, 2, window_size=4, group_size=3, overlap=1)
    x = torch.randn(1, 10, 13, 8)
    outs = _in_modes(m, x)
    torch.testing.assert_close(outs["no_grad"], outs["grad"], atol=1e-5, rtol=0)
    torch.testing.assert_close(outs["inference_mode"], outs["grad"], atol=1e-5, rtol=0)


# -- window_sdpa's 4-D (CUDA) form, forced on CPU ------------------------------------------

def test_window_sdpa_4d_form_takes_concatenated_keys():
    torch.manual_seed(0)
    B, nW, h, N, d, V = 2, 3, 2, 4, 8, 2
    q = torch.randn(B, nW, h, N, d)
    k, v = torch.randn(2, B, nW, h, V * N, d).unbind(0)
    mask = torch.randn(nW, h, N, V * N)
    mask[0, :, :, -1] = float("-inf")
    ref = attention(q, k, v, mask, scale=0.3, fused=False)
    for flat in (False, True):
        out = window.window_sdpa(q, k, v, mask, 0.3, 0.0, flat_mask=flat)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("name,kwargs,shape", [
    ("multi_view_concat_attention", {"window_size": 4}, (2, 2, 5, 5, 16)),
    ("multi_view_concat_attention", {"window_size": 4, "shift": 2, "num_views": 3},
     (2, 3, 6, 7, 16)),
    ("multi_view_window_attention", {"mode": "self", "window_size": 4}, (2, 2, 5, 5, 16)),
    ("shifted_window_attention", {"window_size": 4}, (2, 6, 7, 16)),
    ("twins_lsa", {"window_size": 4}, (2, 5, 5, 16)),
])
def test_both_mask_forms_match_the_explicit_path(name, kwargs, shape, flat, monkeypatch):
    forced = functools.partial(window.window_sdpa, flat_mask=flat)
    monkeypatch.setattr(window, "window_sdpa", forced)
    monkeypatch.setattr(multiview, "window_sdpa", forced)
    torch.manual_seed(0)
    m = sa.create(name, 16, 2, **kwargs)
    x = torch.randn(*shape)
    with torch.no_grad():
        fused = m(x)
        with explicit_path(m):
            ref = m(x)
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-5)
    # with grad as well (CPU training kernels)
    xg = x.clone().requires_grad_()
    out = m(xg)
    out.sum().backward()
    torch.testing.assert_close(out.detach(), ref, atol=1e-5, rtol=1e-5)


# -- BOAT's clustering under autocast ----------------------------------------------------

def test_clustering_under_autocast_groups_as_float32():
    torch.manual_seed(0)
    q = torch.randn(2, 2, 130, 4)
    ref = balanced_binary_clustering(q, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(balanced_binary_clustering(q, 3), ref)


def _spy_groups(monkeypatch) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []

    def spy(*args, **kwargs):
        perm = balanced_binary_clustering(*args, **kwargs)
        seen.append(perm)
        return perm

    monkeypatch.setattr(bilateral, "balanced_binary_clustering", spy)
    return seen


@pytest.mark.parametrize("seed", [0, 1])
def test_fsla_under_autocast_groups_as_float32(seed, monkeypatch):
    seen = _spy_groups(monkeypatch)
    torch.manual_seed(seed)
    m = sa.create("fsla", 8, 2, group_size=3, overlap=1)
    x = torch.randn(1, 10, 13, 8)
    with torch.no_grad():
        ref = m(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = m(x)
    assert low.dtype == torch.bfloat16
    assert len(seen) == 2 and torch.equal(seen[1], seen[0])
    torch.testing.assert_close(low.float(), ref, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("seed", [0, 1])
def test_bilateral_fsla_branch_under_autocast_groups_as_float32(seed, monkeypatch):
    # the window branch runs in bf16, so the FSLA branch's input is not float32's: the
    # branch is compared with float32 on the input it actually received
    seen = _spy_groups(monkeypatch)
    torch.manual_seed(seed)
    m = sa.create("bilateral_local_attention", 8, 2, window_size=4, group_size=3, overlap=1)
    x = torch.randn(1, 10, 13, 8)
    got = []
    m.attnC.register_forward_hook(lambda mod, args, out: got.append((args[0], out)))
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            m(x)
        branch_in, low = got[0]
        ref = m.attnC(branch_in.float())
    assert low.dtype == torch.bfloat16
    assert len(seen) == 2 and torch.equal(seen[1], seen[0])
    torch.testing.assert_close(low.float(), ref, atol=3e-2, rtol=3e-2)
