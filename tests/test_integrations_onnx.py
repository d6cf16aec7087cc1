"""ONNX export as docs/integrations.md shows it: the page's block runs as written.

torch 2.13's default exporter (``dynamo=True``) needs onnxscript, which the ``onnx`` extra
installs; without onnx, onnxscript or onnxruntime the test skips.
"""

from __future__ import annotations

from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"


def _onnx_block() -> str:
    text = DOCS.read_text()
    section = text[text.index("## ONNX export\n"):]
    section = section[: section.index("\n## ", 1)]
    start = section.index("```python\n") + len("```python\n")
    return section[start: section.index("```", start)]


def test_docs_onnx_export_with_free_height_and_width(tmp_path, monkeypatch):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript", reason="torch.onnx.export (dynamo=True) needs onnxscript")
    code = _onnx_block()
    assert "dynamic_shapes=" in code and "onnxruntime" in code
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "docs/integrations.md (ONNX)", "exec"), scope)  # checks onnxruntime
    graph = onnx.load(str(tmp_path / "cbam.onnx")).graph
    (image,) = graph.input
    dims = image.type.tensor_type.shape.dim
    # batch, height and width are symbols in the graph, the channels a number
    assert [bool(d.dim_param) for d in dims] == [True, False, True, True]
    assert dims[1].dim_value == 3
    assert scope["shape"] == (2, 3, 5, 121)  # the loop ran to its last, odd-sized input
