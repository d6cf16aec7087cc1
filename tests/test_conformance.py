"""Promises every registered mechanism keeps, checked generically over the registry.

A new mechanism gets these tests for free by registering: any size, batch 1, fused ==
explicit, float64 gradcheck, capture, clear errors, torch.compile, torch.export, ONNX.
"""

import warnings

import pytest
import torch

import spatial_attention as sa
from spatial_attention import capture_attention, explicit_path

NAMES = sa.list_mechanisms()


def _example(name, batch=2, channels=16, size=(5, 3), dtype=torch.float32):
    torch.manual_seed(0)
    module, inputs = sa.info(name).cls.example(name, batch, channels, size)
    return module.to(dtype).eval(), tuple(t.to(dtype) for t in inputs)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size,batch", [((7, 5), 1), ((1, 1), 2), ((9, 13), 2)])
def test_any_size_and_batch_one(name, size, batch):
    module, inputs = _example(name, batch=batch, size=size)
    out = module(*inputs)
    assert out.shape[0] == batch and torch.isfinite(out).all()
    if sa.info(name).layout != "sequence":
        assert out.shape == inputs[0].shape


@pytest.mark.parametrize("name", NAMES)
def test_fused_equals_explicit(name):
    module, inputs = _example(name)
    fused = module(*inputs)
    with explicit_path(module):
        explicit = module(*inputs)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_fused_equals_explicit_gradients_float64(name):
    module, inputs = _example(name, channels=8, size=(5, 3), dtype=torch.float64)
    grads = []
    for fused in (True, False):
        module.zero_grad(set_to_none=True)
        xs = tuple(t.clone().requires_grad_() for t in inputs)
        with explicit_path(module, explicit=not fused):
            out = module(*xs)
        out.backward(torch.ones_like(out).mul_(torch.linspace(-1, 1, out.numel()).view_as(out)))
        params = [p.grad for p in module.parameters() if p.grad is not None]
        grads.append([x.grad for x in xs] + params)
    assert len(grads[0]) == len(grads[1])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_float64(name):
    module, inputs = _example(name, batch=1, channels=8, size=(3, 2), dtype=torch.float64)
    inputs = tuple(t.requires_grad_() for t in inputs)
    for fused in (True, False):
        module.attn_impl = None if fused else "explicit"
        torch.autograd.gradcheck(lambda *xs: module(*xs), inputs)


@pytest.mark.parametrize("name", NAMES)
def test_capture_records_and_leaves_nothing(name):
    module, inputs = _example(name)
    with capture_attention(module) as maps:
        out = module(*inputs)
    assert maps, f"{name} recorded nothing"
    assert all(torch.isfinite(t).all() for t in maps.values())
    assert all(m._recorder is None for m in module.modules() if hasattr(m, "_recorder"))
    torch.testing.assert_close(module(*inputs), out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_wrong_rank_is_a_clear_value_error(name):
    module, inputs = _example(name)
    bad = (inputs[0].flatten(0, 1),) + inputs[1:]
    with pytest.raises(ValueError, match=name):
        module(*bad)


@pytest.mark.parametrize("name", NAMES)
def test_compile_fullgraph(name):
    module, inputs = _example(name)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*inputs), module(*inputs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_torch_export(name):
    module, inputs = _example(name)
    ep = torch.export.export(module, inputs)
    torch.testing.assert_close(ep.module()(*inputs), module(*inputs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_onnx_export_runs_in_onnxruntime(name, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    module, inputs = _example(name)
    path = tmp_path / f"{name}.onnx"
    names = [f"in{i}" for i in range(len(inputs))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, inputs, str(path), dynamo=False, input_names=names, output_names=["out"]
        )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: inputs[names.index(i.name)].numpy() for i in session.get_inputs()}
    (out,) = session.run(None, feeds)
    torch.testing.assert_close(
        torch.from_numpy(out), module(*inputs).detach(), atol=1e-4, rtol=1e-4
    )
