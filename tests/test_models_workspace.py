"""workspace_transformer / vanilla_transformer: shapes, shared steps, memory, reference weights."""

import pytest
import torch
import torch.nn.functional as F

from spatial_attention import capture_attention
from spatial_attention.apps.sort_of_clevr import generate
from spatial_attention.errors import UsageError
from spatial_attention.layers.workspace import SharedWorkspace, split_workspace_records
from spatial_attention.models import create_model, list_models
from spatial_attention.models.workspace import (
    convert_reference_state_dict,
    load_reference_weights,
    sinusoid_code,
)

SMALL = dict(dim=16, ffn_dim=32, depth=3, num_heads=4)


def _inputs(batch=2, h=75, w=75):
    torch.manual_seed(1)
    return torch.rand(batch, 3, h, w), torch.eye(18)[:batch]


def test_registered_with_the_reference_configuration():
    assert {"workspace_transformer", "vanilla_transformer"} <= set(list_models())
    ws = create_model("workspace_transformer")
    tr = create_model("vanilla_transformer")
    attn = ws.layers[0].self_attn
    assert isinstance(attn, SharedWorkspace) and (attn.num_slots, attn.top_k) == (8, 5)
    assert len(ws.layers) == len(tr.layers) == 1 and ws.depth == 4  # one shared layer
    assert ws.patch_to_embedding.in_features == 3 * 15 * 15
    assert ws.layers[0].fc1.out_features == 512 and ws.mlp_head.in_features == 256


@pytest.mark.parametrize("name", ["workspace_transformer", "vanilla_transformer"])
@pytest.mark.parametrize("size,batch", [((75, 75), 2), ((64, 80), 1), ((15, 15), 3)])
def test_forward_any_size(name, size, batch):
    m = create_model(name, **SMALL).eval()
    img, q = _inputs(batch, *size)
    out = m(img, q)
    assert out.shape == (batch, 10) and torch.isfinite(out).all()


def test_separate_layers_and_errors():
    m = create_model("workspace_transformer", share_layers=False, **SMALL)
    assert len(m.layers) == 3
    img, q = _inputs()
    with pytest.raises(ValueError, match=r"expected images \(B, 3, H, W\)"):
        m(img[:, :2], q)
    with pytest.raises(ValueError, match=r"expected questions \(2, 18\)"):
        m(img, q[:, :10])
    with pytest.raises(ValueError, match="workspace options"):
        create_model("vanilla_transformer", top_k=3)
    with pytest.raises(ValueError, match="depth must be positive"):
        create_model("vanilla_transformer", depth=0)


def test_memory_is_carried_across_the_shared_steps():
    m = create_model("workspace_transformer", **SMALL).eval()
    img, q = _inputs()
    with capture_attention(m) as maps:
        out = m(img, q)
    writes, reads = split_workspace_records(maps.calls("layers.0.self_attn"))
    assert len(writes) == len(reads) == 3 and writes[0].shape == (2, 4, 8, 2 + 25)
    # step by step, carrying the memory, gives the model's output ...
    layer, x, memory = m.layers[0], m.tokens(img, q), None
    for _ in range(3):
        x, memory = layer(x, memory)
    torch.testing.assert_close(m.mlp_head(x[:, 0]), out)
    # ... and restarting from the initial memory at every step does not
    x = m.tokens(img, q)
    for _ in range(3):
        x, _ = layer(x, None)
    assert not torch.allclose(m.mlp_head(x[:, 0]), out)


def test_position_code_is_the_references():
    code = sinusoid_code(5, 8)
    s = torch.sigmoid(torch.tensor(1.0))
    torch.testing.assert_close(code[3, 2], torch.sin(torch.tensor(3 / 10000 ** (4 / 8))) * s)
    torch.testing.assert_close(code[3, 3], torch.cos(torch.tensor(3 / 10000 ** (6 / 8))) * s)
    assert (code[0, 0::2] == 0).all()


def test_a_small_model_learns_a_few_questions():
    # many tiny ops: one thread avoids the barrier waits of an oversubscribed machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        data = generate(6, seed=0, questions_per_kind=2, kinds=("non_relational",))
        index, questions, answers, _ = data.flat()
        images = data.images[index].float() / 255
        m = create_model("workspace_transformer", dim=16, ffn_dim=32, depth=2, dropout=0.0)
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        losses = []
        for _ in range(40):
            loss = F.cross_entropy(m(images, questions), answers)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    assert losses[-1] < 0.4 * losses[0]


# ---- the authors' checkpoints ---------------------------------------------------------
def _reference_state(workspace: bool, dim=16, ffn=32, slots=8, heads=4, key=32):
    """A state dict with the authors' key names and shapes (random values)."""
    r = torch.randn
    s = {
        "patch_to_embedding.weight": r(dim, 675), "patch_to_embedding.bias": r(dim),
        "question_to_embedding.weight": r(dim, 18), "question_to_embedding.bias": r(dim),
        "cls_token": r(1, 1, dim), "mlp_head.weight": r(10, dim), "mlp_head.bias": r(10),
        "net.pe.pe": r(1, 300, dim), "net.pe.pos_emb_weight": r(1, 300, dim),
        "net.pe_state.pe": r(1, 300, dim), "net.pe_state.pos_emb_weight": r(1, 300, dim),
    }
    layer = {
        "self_attn_layer_norm.weight": r(dim), "self_attn_layer_norm.bias": r(dim),
        "fc1.weight": r(ffn, dim), "fc1.bias": r(ffn), "fc2.weight": r(dim, ffn),
        "fc2.bias": r(dim), "final_layer_norm.weight": r(dim), "final_layer_norm.bias": r(dim),
    }
    if workspace:
        rm = "self_attn.relational_memory."
        mlp_w, mlp_b = r(dim, dim), r(dim)
        layer |= {
            rm + "query_proj.weight": r(key * heads, dim), rm + "query_proj.bias": r(key * heads),
            rm + "key_proj.weight": r(key * heads, dim), rm + "key_proj.bias": r(key * heads),
            rm + "value_proj.weight": r(dim, dim), rm + "value_proj.bias": r(dim),
            rm + "input_projector.weight": r(dim, dim), rm + "input_projector.bias": r(dim),
            rm + "attended_memory_layernorm.weight": r(dim),
            rm + "attended_memory_layernorm.bias": r(dim),
            rm + "attended_memory_layernorm2.weight": r(dim),
            rm + "attended_memory_layernorm2.bias": r(dim),
            rm + "input_gate_projector.w": r(dim),
            rm + "input_gate_projector.linear.weight": r(2 * dim, dim),
            rm + "input_gate_projector.linear.bias": r(2 * dim),
            rm + "input_gate_projector.pe.pe": r(1, 300, dim),
            rm + "input_gate_projector.pe.pos_emb_weight": r(1, 300, dim),
            rm + "memory_gate_projector.weight": r(slots, dim, 2 * dim),
            rm + "memory_gate_projector.bias": r(slots, 2 * dim),
            rm + "forget_bias": torch.tensor(1.0), rm + "input_bias": torch.tensor(0.0),
            "self_attn.mem_att.GLN_qs.weight": r(4, 3),
        }
        for i in range(4):  # one nn.Linear listed four times
            layer |= {rm + f"attention_mlp.{i}.weight": mlp_w,
                      rm + f"attention_mlp.{i}.bias": mlp_b}
    else:
        for p in ("q", "k", "v", "out"):
            layer |= {f"self_attn.{p}_proj.weight": r(1, dim, dim),
                      f"self_attn.{p}_proj.bias": r(1, dim)}
    return s | {f"net.enc.{k}": v for k, v in layer.items()}


def test_loads_the_authors_workspace_weights(tmp_path):
    ref = _reference_state(workspace=True)
    path = tmp_path / "ref.pth"
    torch.save(ref, path)
    m = create_model("workspace_transformer", **SMALL)
    load_reference_weights(m, path)
    ws = m.layers[0].self_attn
    rm = "net.enc.self_attn.relational_memory."
    assert torch.equal(ws.memory_gate_weight, ref[rm + "memory_gate_projector.weight"])
    assert torch.equal(ws.input_gate_weight, ref[rm + "input_gate_projector.w"])
    assert torch.equal(ws.attention_mlp.weight, ref[rm + "attention_mlp.2.weight"])
    assert torch.equal(m.layers[0].fc1.weight, ref["net.enc.fc1.weight"])
    assert torch.isfinite(m(*_inputs())).all()


def test_loads_the_authors_baseline_weights_transposing_grouped_linears(tmp_path):
    ref = _reference_state(workspace=False)
    torch.save(ref, tmp_path / "tr.pth")
    m = create_model("vanilla_transformer", **SMALL)
    load_reference_weights(m, tmp_path / "tr.pth")
    w = ref["net.enc.self_attn.q_proj.weight"][0]
    assert torch.equal(m.layers[0].self_attn.q_proj.weight, w.t())
    x = torch.randn(3, 16)
    torch.testing.assert_close(m.layers[0].self_attn.q_proj(x),
                               x @ w + ref["net.enc.self_attn.q_proj.bias"][0])


def test_reference_weights_with_wrong_keys_are_named(tmp_path):
    ref = _reference_state(workspace=True)
    del ref["net.enc.self_attn.relational_memory.forget_bias"]
    ref["net.enc.extra.weight"] = torch.zeros(1)
    torch.save(ref, tmp_path / "bad.pth")
    with pytest.raises(UsageError, match="forget_bias") as err:
        load_reference_weights(create_model("workspace_transformer", **SMALL), tmp_path / "bad.pth")
    assert err.match("layers.0.extra.weight")
    ref = _reference_state(workspace=True)
    ref["net.enc.self_attn.relational_memory.attention_mlp.3.bias"] = torch.zeros(16)
    with pytest.raises(ValueError, match="attention_mlp.3.bias differs"):
        convert_reference_state_dict(ref)
    torch.save({"model": ref}, tmp_path / "nested.pth")
    with pytest.raises(UsageError, match="unexpected keys: model"):
        load_reference_weights(create_model("workspace_transformer", **SMALL),
                               tmp_path / "nested.pth")
