import re
from pathlib import Path

import pytest
import torch

import spatial_attention as sa
from spatial_attention import registry
from spatial_attention.layers.base import AttentionModule

README = Path(__file__).resolve().parents[1] / "README.md"


def test_names_are_snake_case_and_metadata_valid():
    names = sa.list_mechanisms()
    assert {"dot_product", "scaled_dot_product", "additive", "multi_head"} <= set(names)
    for n in names:
        e = sa.info(n)
        assert re.match(r"^[a-z][a-z0-9_]*$", n)
        assert e.family in registry.FAMILIES and e.layout in registry.LAYOUTS
        assert e.paper and issubclass(e.cls, AttentionModule)
        assert e.cls.layout == e.layout, f"{n}: class layout {e.cls.layout} != registry {e.layout}"
        assert e.summary, f"{n} has no docstring"


def test_filters():
    assert sa.list_mechanisms(family="sequence") == sorted(
        n for n in sa.list_mechanisms() if sa.info(n).family == "sequence"
    )
    assert set(sa.list_mechanisms(layout="sequence")) >= {"multi_head"}
    with pytest.raises(ValueError, match="family"):
        sa.list_mechanisms(family="nope")
    with pytest.raises(ValueError, match="layout"):
        sa.list_mechanisms(layout="nope")


def test_unknown_name_lists_closest():
    with pytest.raises(ValueError, match="did you mean multi_head"):
        sa.create("multihead", 8, 2)
    with pytest.raises(ValueError, match="unknown model"):
        sa.create_model("no_such_model_xyz")


def test_registered_defaults_bind_the_variant():
    assert sa.create("dot_product").scaled is False
    assert sa.create("scaled_dot_product").scaled is True
    assert "scaled=False" in sa.info("dot_product").describe()


def test_info_signature_and_cost():
    e = sa.info("multi_head")
    assert e.signature.startswith("(dim, num_heads")
    assert "B" in e.cost and e.captures


def test_register_validates():
    with pytest.raises(ValueError, match="snake_case"):
        registry.register("BadName", family="sequence", layout="sequence", paper="x")
    with pytest.raises(ValueError, match="family"):
        registry.register("ok_name", family="nope", layout="sequence", paper="x")


@pytest.mark.parametrize("name", sa.list_mechanisms())
def test_every_mechanism_example_runs(name):
    cls = sa.info(name).cls
    module, inputs = cls.example(name, 2, 16, (5, 3))
    out = module(*inputs)
    assert out.dim() == inputs[0].dim() and out.shape[0] == 2


def test_readme_table_is_current():
    text = README.read_text()
    start, end = "<!-- mechanisms:start -->", "<!-- mechanisms:end -->"
    assert start in text and end in text, "README lacks the generated mechanism table markers"
    table = text.split(start)[1].split(end)[0].strip()
    assert table == registry.markdown_table(), (
        "README mechanism table is out of date: run `spatial-attention list --markdown` and "
        "paste it between the markers"
    )


def test_spatial_map_default():
    w = torch.softmax(torch.randn(2, 3, 6, 6), -1)  # (B, heads, Q, K), K = 2 x 3 grid
    m = AttentionModule.spatial_map(w, (2, 3))
    assert m.shape == (2, 2, 3)
    torch.testing.assert_close(m.sum((1, 2)), torch.ones(2))
    with pytest.raises(ValueError):
        AttentionModule.spatial_map(torch.randn(2, 5), (2, 3))


def test_a_wrong_keyword_shows_the_signature_and_the_closest_name():
    import pytest

    with pytest.raises(TypeError, match=r"se: got an unexpected keyword argument 'reductio' "
                       r"\(did you mean 'reduction'\?\); signature: se\(channels, "
                       r"reduction=16, attn_impl=None\)"):
        sa.create("se", 16, reductio=4)
    with pytest.raises(TypeError, match="window_attention: missing a required argument: "
                       "'num_heads'; signature: window_attention\\(dim, num_heads"):
        sa.create("window_attention", 16)
