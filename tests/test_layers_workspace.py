"""shared_workspace: top-k write, masks, the reference arithmetic, memory, errors."""

import pytest
import torch
import torch.nn.functional as F

import spatial_attention as sa
from spatial_attention import capture_attention, explicit_path
from spatial_attention.layers.workspace import SharedWorkspace, split_workspace_records


def _module(dim=16, **kwargs):
    torch.manual_seed(0)
    kwargs.setdefault("num_heads", 4)
    return SharedWorkspace(dim, **kwargs).eval()


def _records(module, *args, **kwargs):
    with capture_attention(module) as maps:
        out = module(*args, **kwargs)
    writes, reads = split_workspace_records(maps.calls(""))
    return out, writes, reads


def test_registered_with_reference_defaults():
    m = sa.create("shared_workspace", 32)
    assert (m.num_slots, m.top_k, m.num_heads, m.key_dim, m.gate) == (8, 5, 4, 32, "unit")
    assert sa.info("shared_workspace").family == "workspace"


def test_exactly_k_writers_per_slot():
    m = _module(top_k=3)
    x = torch.randn(2, 11, 16)
    out, (write,), (read,) = _records(m, x)
    assert write.shape == (2, 4, 8, 11) and read.shape == (2, 4, 11, 8)
    assert ((write > 0).sum(-1) == 3).all()
    # the winners are the 3 largest of the dense softmax, which is not renormalised
    dense_sum = write.sum(-1)
    assert (dense_sum < 1).all() and (dense_sum > 0).all()
    torch.testing.assert_close(read.sum(-1), torch.ones(2, 4, 11))


def test_masked_positions_never_write_and_do_not_change_valid_outputs():
    m = _module(top_k=5)
    x = torch.randn(3, 9, 16)
    lens = torch.tensor([9, 4, 2])
    out, (write,), _ = _records(m, x, valid_lens=lens)
    counts = (write > 0).sum(-1)  # (B, h, S)
    assert (counts[0] == 5).all() and (counts[1] == 4).all() and (counts[2] == 2).all()
    assert (write[1, ..., 4:] == 0).all() and (write[2, ..., 2:] == 0).all()
    # changing padded positions changes no valid output and not the new memory
    y = x.clone()
    y[1, 4:] = torch.randn(5, 16) * 10
    y[2, 2:] = torch.randn(7, 16) * 10
    for fused in (True, False):
        with explicit_path(m, explicit=not fused):
            a, mem_a = m(x, lens, return_memory=True)
            b, mem_b = m(y, lens, return_memory=True)
        torch.testing.assert_close(a[1, :4], b[1, :4])
        torch.testing.assert_close(a[2, :2], b[2, :2])
        torch.testing.assert_close(mem_a, mem_b)
    # full lengths are the same as no mask
    torch.testing.assert_close(m(x, torch.tensor([9, 9, 9])), m(x))


@pytest.mark.parametrize("gate", ["unit", "memory", None])
def test_fused_equals_explicit_with_masks(gate):
    m = _module(gate=gate, top_k=4)
    x = torch.randn(4, 7, 16)
    lens = torch.tensor([7, 3, 0, 1])  # fewer valid positions than k, and none at all
    memory = torch.randn(4, 8, 16)
    fused, mem_f = m(x, lens, memory, return_memory=True)
    with explicit_path(m):
        explicit, mem_e = m(x, lens, memory, return_memory=True)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mem_f, mem_e, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(fused).all()


def _reference_forward(m, x, memory):
    """The authors' RelationalMemory step (volatile variant) written out for one sample."""
    h, dk, dv = m.num_heads, m.key_dim, m.head_dim
    R = x @ m.input_projector.weight.T + m.input_projector.bias  # (N, C)

    def mha(queries_from, keys_from, topk):
        q = (queries_from @ m.query_proj.weight.T + m.query_proj.bias).view(-1, h, dk)
        k = (keys_from @ m.key_proj.weight.T + m.key_proj.bias).view(-1, h, dk)
        v = (keys_from @ m.value_proj.weight.T + m.value_proj.bias).view(-1, h, dv)
        outs = []
        for head in range(h):
            w = torch.softmax(q[:, head] @ k[:, head].T, dim=-1)
            if topk:
                keep = torch.zeros_like(w)
                keep.scatter_(1, w.topk(m.top_k, dim=-1).indices, 1.0)
                w = w * keep
            outs.append(w @ v[:, head])
        return torch.cat(outs, dim=-1)

    M = memory
    new = F.layer_norm(M + mha(M, R, True), (m.dim,),
                       m.attended_memory_layernorm.weight, m.attended_memory_layernorm.bias)
    mlp = new
    for _ in range(4):
        mlp = torch.relu(mlp @ m.attention_mlp.weight.T + m.attention_mlp.bias)
    new = F.layer_norm(new + mlp, (m.dim,),
                       m.attended_memory_layernorm2.weight, m.attended_memory_layernorm2.bias)
    g_in = torch.relu(m.input_gate_weight * R).mean(0) @ m.input_gate_projector.weight.T
    g_in = g_in + m.input_gate_projector.bias
    g_mem = torch.stack([torch.tanh(M[s]) @ m.memory_gate_weight[s] for s in range(m.num_slots)])
    gates = g_mem + m.memory_gate_bias + g_in
    i, f = gates[:, : m.dim], gates[:, m.dim:]
    new = torch.sigmoid(i + m.input_bias) * torch.tanh(new) + torch.sigmoid(f + m.forget_bias) * M
    return mha(R, new, False), new


@pytest.mark.parametrize("fused", [True, False])
def test_matches_the_reference_arithmetic(fused):
    m = _module(dim=16, num_heads=2, top_k=3)
    x = torch.randn(2, 6, 16)
    memory = torch.randn(2, 8, 16)
    with explicit_path(m, explicit=not fused):
        out, mem = m(x, memory=memory, return_memory=True)
    for b in range(2):
        ref_out, ref_mem = _reference_forward(m, x[b], memory[b])
        torch.testing.assert_close(out[b], ref_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mem[b], ref_mem, atol=1e-5, rtol=1e-5)


def test_initial_memory_is_the_identity_and_memory_carries():
    m = _module(dim=16)
    x = torch.randn(2, 5, 16)
    eye = torch.eye(8, 16).expand(2, 8, 16)
    torch.testing.assert_close(m(x), m(x, memory=eye))
    out1, mem1 = m(x, return_memory=True)
    assert mem1.shape == (2, 8, 16) and not torch.allclose(mem1, eye)
    out2 = m(x, memory=mem1)
    assert not torch.allclose(out1, out2)


def test_top_k_at_least_n_is_the_dense_write():
    x = torch.randn(2, 4, 16)
    m4, m9 = _module(top_k=4), _module(top_k=9)  # same seed, same weights
    out4, (w4,), _ = _records(m4, x)
    out9, (w9,), _ = _records(m9, x)
    torch.testing.assert_close(w4, w9)
    torch.testing.assert_close(w9.sum(-1), torch.ones(2, 4, 8))  # a plain softmax
    torch.testing.assert_close(m4(x), m9(x))
    assert not torch.allclose(_module(top_k=1)(x), m9(x))


def test_gradcheck_with_masks_both_paths():
    m = _module(dim=8, num_heads=2, key_dim=4, num_slots=3, top_k=2).double()
    x = torch.randn(2, 4, 8, dtype=torch.float64, requires_grad=True)
    memory = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    lens = torch.tensor([4, 3])
    for fused in (True, False):
        m.attn_impl = None if fused else "explicit"
        torch.autograd.gradcheck(lambda a, b: m(a, lens, b, return_memory=True), (x, memory))


def test_compile_fullgraph_with_masks_and_memory():
    m = _module()
    x, lens = torch.randn(2, 6, 16), torch.tensor([6, 2])
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    a, mem_a = compiled(x, lens, return_memory=True)
    b, mem_b = m(x, lens, return_memory=True)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(mem_a, mem_b)


def test_capture_in_a_stack_records_every_step():
    m = _module()
    x = torch.randn(1, 6, 16)
    with capture_attention(m) as maps:
        out, mem = m(x, return_memory=True)
        m(out, memory=mem)
    writes, reads = split_workspace_records(maps.calls(""))
    assert len(writes) == len(reads) == 2
    assert SharedWorkspace.spatial_map(writes[0], (2, 3)).shape == (1, 2, 3)
    with pytest.raises(ValueError, match="pairs"):
        split_workspace_records(maps.calls("")[:3])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(dim=10, num_heads=4), "dim 10 is not divisible"),
        (dict(dim=16, top_k=0), "top_k must be positive"),
        (dict(dim=16, num_slots=0), "num_slots must be positive"),
        (dict(dim=16, num_slots=2.5), "num_slots must be an integer"),
        (dict(dim=16, gate="lstm"), "gate must be one of"),
        (dict(dim=16, scale=-1.0), "scale must be positive"),
    ],
)
def test_bad_hyper_parameters(kwargs, match):
    with pytest.raises(ValueError, match=f"shared_workspace: {match}"):
        SharedWorkspace(**kwargs)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda m: m(torch.randn(2, 5, 12)), "expected 16 channels"),
        (lambda m: m(torch.randn(2, 4, 4, 16)), "expected a 3-D tensor"),
        (lambda m: m(torch.randn(2, 5, 16), torch.tensor([[5] * 5] * 2)), r"shape \(2,\)"),
        (lambda m: m(torch.randn(2, 5, 16), torch.tensor([5])), r"shape \(2,\)"),
        (lambda m: m(torch.randn(2, 5, 16), torch.tensor([5.0, 2.0])), "integers"),
        (lambda m: m(torch.randn(2, 5, 16), torch.tensor([True, False])), "integers"),
        (lambda m: m(torch.randn(2, 5, 16), memory=torch.randn(2, 4, 16)), "memory must"),
        (lambda m: m(torch.randn(0, 5, 16)), "empty"),
    ],
)
def test_bad_inputs_are_clear_value_errors(call, match):
    with pytest.raises(ValueError, match="shared_workspace") as err:
        call(_module())
    assert err.match(match)
