"""sa.create: typed, documented per layout, and a wrong keyword shows the signature."""

import inspect
import typing

import pytest
import torch

import spatial_attention as sa
from spatial_attention import registry
from spatial_attention.layers.base import AttentionModule


def test_create_returns_an_attention_module_by_its_annotation():
    hints = typing.get_type_hints(sa.create, localns={"AttentionModule": AttentionModule})
    assert hints["return"] is AttentionModule
    assert sa.create is registry.create
    m = sa.create("SE", 16)  # any case
    assert isinstance(m, AttentionModule) and isinstance(m, registry.info("se").cls)


def test_create_docstring_names_the_arguments_of_every_layout():
    doc = inspect.getdoc(sa.create)
    for layout in registry.LAYOUTS:
        assert f"``{layout}``" in doc, layout
    for text in ("create(name, channels, ...)", "create(name, dim, num_heads, ...)",
                 "multi_head(dim, num_heads)", "attn_impl"):
        assert text in doc, text


@pytest.mark.parametrize("name, args, layout", [
    ("cbam", (16,), "map"), ("window_attention", (32, 2), "tokens"),
    ("multi_head", (16, 2), "sequence"), ("temporal", (16,), "clip"),
])
def test_the_documented_first_arguments_build_each_layout(name, args, layout):
    m = sa.create(name, *args)
    assert registry.info(name).layout == layout
    assert isinstance(m, AttentionModule)


def test_a_wrong_keyword_shows_the_mechanisms_signature():
    with pytest.raises(TypeError) as err:
        sa.create("se", 64, reducton=8)
    msg = str(err.value)
    assert msg.startswith("se: ") and "reducton" in msg
    assert "did you mean 'reduction'?" in msg
    assert "signature: se(channels, reduction=16, attn_impl=None)" in msg
    with pytest.raises(TypeError, match=r"multi_head: .*signature: multi_head\(dim, num_heads"):
        sa.create("multi_head", 64)  # num_heads missing
    # a registered default shows in the signature of the name that binds it
    with pytest.raises(TypeError, match=r"scaled_dot_product\(scaled=True"):
        sa.create("scaled_dot_product", dropot=0.1)


def test_every_mechanism_class_documents_itself():
    # forward docstrings are the mechanisms' own; the class docstring is required
    for name in registry.list_mechanisms():
        assert inspect.getdoc(registry.info(name).cls), name
    assert torch.is_tensor(sa.create("se", 8)(torch.randn(1, 8, 2, 2)))
