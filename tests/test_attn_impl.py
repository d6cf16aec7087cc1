"""The one kernel switch: attn_impl on every mechanism, a process default, old aliases."""

import pytest
import torch

import spatial_attention as sa
from spatial_attention import capture_attention
from spatial_attention.functional import get_attn_impl, set_attn_impl, use_attn_impl

NAMES = sa.list_mechanisms()


def _example(name):
    torch.manual_seed(0)
    module, inputs = sa.info(name).cls.example(name, 2, 16, (5, 3))
    return module.eval(), inputs


@pytest.mark.parametrize("name", NAMES)
def test_every_mechanism_takes_attn_impl_and_shows_it(name):
    info = sa.info(name)
    assert {"auto", "explicit"} <= set(info.attn_impls)
    assert "attn_impl" in info.signature
    assert "attn_impl:" in info.describe()
    module, inputs = _example(name)
    assert "attn_impl=" in repr(module)
    ref = module(*inputs)
    for impl in info.attn_impls:
        if impl == "flex":
            continue  # held equal in tests/test_layers_window.py (eval, no grad)
        module.attn_impl = impl
        torch.testing.assert_close(module(*inputs), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["se", "window_attention"])
def test_an_impl_not_offered_is_a_named_value_error(name):
    with pytest.raises(ValueError, match=f"{name}: attn_impl 'bogus' \\(unknown\\)"):
        sa.create(name, 16, **({} if name == "se" else {"num_heads": 2}), attn_impl="bogus")
    if name == "se":
        with pytest.raises(ValueError, match="se: attn_impl 'sdpa' is not offered"):
            sa.create("se", 16, attn_impl="sdpa")


def test_process_default_context_manager_and_capture():
    m = sa.create("global_attention", 16, 2)
    assert m.attn_impl is None and m.impl == "auto" and get_attn_impl() == "auto"
    with use_attn_impl("explicit"):
        assert m.impl == "explicit"
        se = sa.create("se", 16)
        assert se.impl == "explicit"
    assert m.impl == "auto"
    with use_attn_impl("kept_probs"):  # a default a mechanism does not offer: its auto
        assert sa.create("se", 16).impl == "auto"
        assert m.impl == "kept_probs"
    m.attn_impl = "sdpa"
    with use_attn_impl("explicit"):
        assert m.impl == "sdpa"  # the module's own choice wins
    with capture_attention(m):
        assert m.impl == "explicit"  # capture needs the weights
    assert m.impl == "sdpa"
    with pytest.raises(ValueError, match="set_attn_impl: unknown implementation"):
        set_attn_impl("fast")


def test_environment_variable_sets_the_default(tmp_path):
    import subprocess
    import sys

    code = "import spatial_attention as sa; print(sa.create('multi_head', 8, 2).impl)"
    env = {"SA_ATTN_IMPL": "explicit", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True)
    assert out.stdout.strip() == "explicit"


def test_deprecated_switches_warn_and_map_to_attn_impl():
    w = sa.create("window_attention", 16, 2, window_size=4)
    with pytest.warns(DeprecationWarning, match='attn_impl="kept_probs"'):
        w.save_probs = True
    assert w.attn_impl == "kept_probs" and w.save_probs
    with pytest.warns(DeprecationWarning, match='attn_impl="flex"'):
        w.flex = True
    assert w.attn_impl == "flex"
    with pytest.warns(DeprecationWarning, match="attn_impl"):
        w.fused = False
    assert w.attn_impl == "explicit" and not w.fused
    with pytest.warns(DeprecationWarning, match='attn_impl="sdpa"'):
        g = sa.create("generalized_attention", 16, num_heads=2, memory_efficient=True)
    assert g.attn_impl == "sdpa" and g.memory_efficient
    f = sa.create("fsla", 16, 2, group_size=4, overlap=1)
    assert f.impl == "kept_probs" and f.save_probs  # its auto, as before


def test_functional_attention_impls_agree_and_old_keywords_map():
    from spatial_attention.functional import attention

    q, k, v = (torch.randn(2, 3, 7, 8, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(7, 7) > 0.3
    mask[:, 0] = True
    ref = attention(q, k, v, mask, impl="explicit")
    for impl in ("auto", "sdpa", "kept_probs"):
        torch.testing.assert_close(attention(q, k, v, mask, impl=impl), ref)
    torch.testing.assert_close(attention(q, k, v, mask, fused=False), ref)
    torch.testing.assert_close(attention(q, k, v, mask, save_probs=True), ref)
    with pytest.raises(ValueError, match="attention: unknown implementation 'flex'"):
        attention(q, k, v, impl="flex")
