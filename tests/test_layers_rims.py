"""rims / rims_workspace: k active units, frozen inactive state, masks, the cells, errors."""

import math

import pytest
import torch

import spatial_attention as sa
from spatial_attention import capture_attention, explicit_path
from spatial_attention.layers.rims import RIMs, RIMsState, convert_reference_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = [(cell, comm) for cell in ("LSTM", "GRU") for comm in ("attention", "workspace")]


def _module(cell="LSTM", comm="attention", C=5, H=6, U=4, k=2, dtype=torch.float32, **kw):
    """A tiny RIMs with parameters large enough that the units' scores differ clearly
    (the 0.01 init of RIM.py leaves every probability near 1/2)."""
    torch.manual_seed(0)
    if comm == "workspace":
        kw.setdefault("workspace", dict(num_heads=2, num_slots=3, top_k=1, key_dim=4))
    m = RIMs(C, H, U, k, rnn_cell=cell, communication=comm, input_key_size=4,
             input_value_size=7, num_input_heads=2, comm_key_size=3, num_comm_heads=2, **kw)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if not name.startswith("workspace."):
                p.copy_(torch.randn_like(p) * 0.5)
    return m.to(dtype).eval()


def _records(m, *args, **kwargs):
    with capture_attention(m) as maps:
        out = m(*args, **kwargs)
    (rec,) = m.split_records(maps.calls(""))
    return out, rec


def test_registered_in_both_families_with_the_papers_defaults():
    m = sa.create("rims", 16)
    assert (m.hidden_size, m.num_units, m.k, m.rnn_cell) == (100, 6, 4, "LSTM")
    assert (m.input_key_size, m.input_value_size, m.num_input_heads) == (64, 400, 1)
    assert (m.comm_key_size, m.comm_value_size, m.num_comm_heads) == (32, 100, 4)
    assert sa.info("rims").family == "sequence" and sa.info("rims").layout == "sequence"
    w = sa.create("rims_workspace", 16)
    assert w.communication == "workspace" and w.workspace.num_heads == 4
    assert sa.info("rims_workspace").family == "workspace"
    assert w(torch.randn(2, 3, 16)).shape == (2, 3, 600)


@pytest.mark.parametrize("cell,comm", CONFIGS)
def test_exactly_k_units_active_and_inactive_state_kept_bit_for_bit(cell, comm):
    m = _module(cell, comm, U=5, k=3)
    x = torch.randn(3, 9, 5)
    out, rec = _records(m, x)
    active = rec["active"].bool()  # (B, T, U)
    assert active.shape == (3, 9, 5) and (active.sum(-1) == 3).all()
    assert len(set(map(tuple, active.reshape(-1, 5).tolist()))) > 1  # the choice moves
    # every path: h of an inactive unit at t is h at t-1 exactly; c too (one step a call)
    for explicit in (False, True):
        with explicit_path(m, explicit=explicit):
            hs = m(x).view(3, 9, 5, 6)
            state, cs = None, []
            for t in range(9):
                _, state = m(x[:, t:t + 1], state=state, return_state=True)
                cs.append(state.c)
        torch.testing.assert_close(hs, out.view(3, 9, 5, 6), atol=1e-5, rtol=1e-5)
        frozen = ~active[:, 1:]
        assert torch.equal(hs[:, 1:][frozen], hs[:, :-1][frozen])
        assert torch.equal(hs[:, 0][~active[:, 0]], torch.zeros_like(hs[:, 0][~active[:, 0]]))
        if cell == "LSTM":
            c = torch.stack(cs, 1).view(3, 9, 5, 6)
            assert torch.equal(c[:, 1:][frozen], c[:, :-1][frozen])
        assert (hs[:, 1:][~frozen] != hs[:, :-1][~frozen]).any()


def test_zero_state_ties_go_to_the_lower_units():
    m = _module(U=5, k=3)
    _, rec = _records(m, torch.randn(2, 2, 5))
    assert rec["active"][:, 0].tolist() == [[1, 1, 1, 0, 0]] * 2  # all scores 0 at t = 0


@pytest.mark.parametrize("cell,comm", CONFIGS)
def test_fused_equals_explicit_with_state_and_gradients(cell, comm):
    m = _module(cell, comm, dtype=torch.float64)
    x = torch.randn(2, 7, 5, dtype=torch.float64)
    B, UH = 2, 24
    state = RIMsState(torch.randn(B, UH, dtype=torch.float64),
                      torch.randn(B, UH, dtype=torch.float64) if cell == "LSTM" else None,
                      torch.randn(B, 3, 6, dtype=torch.float64) if comm == "workspace" else None)
    results = []
    for explicit in (False, True):
        m.zero_grad(set_to_none=True)
        xs = x.clone().requires_grad_()
        with explicit_path(m, explicit=explicit):
            out, final = m(xs, state=state, return_state=True)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        results.append([out, *[s for s in final if s is not None], xs.grad,
                        *[p.grad for p in m.parameters() if p.grad is not None]])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def _reference(m, x, h0=None, c0=None, detach=True):
    """RIMs written plainly, one sample, one step and one unit at a time."""
    B, T, _ = x.shape
    U, H, k = m.num_units, m.hidden_size, m.k
    nh, dk, V = m.num_input_heads, m.input_key_size, m.input_value_size
    nc, dc, dv = m.num_comm_heads, m.comm_key_size, m.comm_value_size
    Wk, bk = m.input_key.weight, m.input_key.bias
    Wv, bv = m.input_value.weight, m.input_value.bias
    outs = []
    for b in range(B):
        memory = None if m.workspace is None else m.workspace.initial_memory(1, x.dtype, x.device)
        h = [torch.zeros(H, dtype=x.dtype) if h0 is None else h0[b, u * H:(u + 1) * H]
             for u in range(U)]
        c = [torch.zeros(H, dtype=x.dtype) if c0 is None else c0[b, u * H:(u + 1) * H]
             for u in range(U)]
        steps = []
        for t in range(T):
            key_in, key_null = Wk @ x[b, t] + bk, bk
            val_in = (Wv @ x[b, t] + bv).view(nh, V).mean(0)
            val_null = bv.view(nh, V).mean(0)
            attn = []
            for u in range(U):
                q = h[u] @ m.input_query[u]
                s = [sum(q[i * dk:(i + 1) * dk] @ kk[i * dk:(i + 1) * dk] for i in range(nh))
                     / nh / math.sqrt(dk) for kk in (key_in, key_null)]
                attn.append(torch.softmax(torch.stack(s), 0))
            order = sorted(range(U), key=lambda u: (-attn[u][0].item(), u))
            active = set(order[:k])
            fresh, cell = [], []
            for u in range(U):
                read = attn[u][0] * val_in + attn[u][1] * val_null if u in active else 0 * val_in
                gx, gh = read @ m.cell_input[u], h[u] @ m.cell_hidden[u]
                if m.rnn_cell == "LSTM":
                    i, f, o = (torch.sigmoid(gx[j * H:(j + 1) * H] + gh[j * H:(j + 1) * H])
                               for j in range(3))
                    g = torch.tanh(gx[3 * H:] + gh[3 * H:])
                    cell.append(f * c[u] + i * g)
                    fresh.append(o * torch.tanh(cell[-1]))
                else:
                    r = torch.sigmoid(gx[:H] + gh[:H])
                    z = torch.sigmoid(gx[H:2 * H] + gh[H:2 * H])
                    n = torch.tanh(gx[2 * H:] + r * gh[2 * H:])
                    fresh.append((1 - z) * n + z * h[u])
                    cell.append(c[u])
            if detach:  # the gradient into inactive units' fresh states is blocked
                fresh = [f if u in active else f.detach() for u, f in enumerate(fresh)]
            new_h = list(h)
            if m.workspace is not None:  # the active units, in index order, are the writers
                units = torch.stack([fresh[u] for u in sorted(active)])[None]
                read, memory = m.workspace(units, memory=memory, return_memory=True)
                for i, u in enumerate(sorted(active)):
                    new_h[u], c[u] = fresh[u] + read[0, i], cell[u]
                active = set()
            for u in sorted(active):
                q = fresh[u] @ m.comm_query[u]
                heads = []
                for i in range(nc):
                    qi = q[i * dc:(i + 1) * dc]
                    ks = torch.stack([(fresh[w] @ m.comm_key[w])[i * dc:(i + 1) * dc]
                                      for w in range(U)])
                    vs = torch.stack([(fresh[w] @ m.comm_value[w])[i * dv:(i + 1) * dv]
                                      for w in range(U)])
                    heads.append(torch.softmax(ks @ qi / math.sqrt(dc), 0) @ vs)
                new_h[u] = fresh[u] + torch.cat(heads) @ m.comm_output[u]
                c[u] = cell[u]
            h = new_h
            steps.append(torch.cat(h))
        outs.append(torch.stack(steps))
    return torch.stack(outs)


@pytest.mark.parametrize("cell,comm", CONFIGS)
@pytest.mark.parametrize("explicit", [False, True])
def test_matches_a_plain_per_unit_transcription_and_its_gradient(cell, comm, explicit):
    m = _module(cell, comm, U=4, k=2, dtype=torch.float64)
    x = torch.randn(2, 5, 5, dtype=torch.float64)
    h0 = torch.randn(2, 24, dtype=torch.float64) * 0.5
    with explicit_path(m, explicit=explicit):
        xs = x.clone().requires_grad_()
        out = m(xs, state=(h0,))
        out.square().sum().backward()
    xr = x.clone().requires_grad_()
    ref = _reference(m, xr, h0=h0)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(xs.grad, xr.grad, atol=1e-10, rtol=1e-10)
    if comm == "workspace":  # only active units write: nothing inactive to block
        return
    blocked, xs.grad, xr.grad = xs.grad, None, None
    # without the block the gradient is the plain derivative, and differs
    m.block_inactive_grad = False
    with explicit_path(m, explicit=explicit):
        m(xs, state=(h0,)).square().sum().backward()
    _reference(m, xr, h0=h0, detach=False).square().sum().backward()
    torch.testing.assert_close(xs.grad, xr.grad, atol=1e-10, rtol=1e-10)
    assert not torch.allclose(xs.grad, blocked)


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_batched_cells_equal_torch_cells_unit_by_unit(cell):
    m = _module(cell, U=3, k=3)  # every unit active: the cells alone decide
    H, V = m.hidden_size, m.input_value_size
    read = torch.randn(4, 3, V)
    h, c = torch.randn(4, 3, H), torch.randn(4, 3, H)
    pre_x = torch.einsum("buv,uvg->bug", read, m.cell_input)
    pre_h = torch.einsum("buh,uhg->bug", h, m.cell_hidden)
    if cell == "LSTM":
        got_h, got_c = m._cell(pre_x + pre_h, h, c)
    else:
        got_h, _ = m._cell(pre_x, h, None, pre_h)
    for u in range(3):
        torch_cell = (torch.nn.LSTMCell if cell == "LSTM" else torch.nn.GRUCell)(V, H)
        with torch.no_grad():
            wi, wh = m.cell_input[u].T, m.cell_hidden[u].T  # (G*H, in)
            if cell == "LSTM":  # ours [i, f, o, g], torch's [i, f, g, o]
                perm = torch.cat([torch.arange(0, 2 * H), torch.arange(3 * H, 4 * H),
                                  torch.arange(2 * H, 3 * H)])
                wi, wh = wi[perm], wh[perm]
            torch_cell.weight_ih.copy_(wi)
            torch_cell.weight_hh.copy_(wh)
            torch_cell.bias_ih.zero_()
            torch_cell.bias_hh.zero_()
        if cell == "LSTM":
            th, tc = torch_cell(read[:, u], (h[:, u], c[:, u]))
            torch.testing.assert_close(got_c[:, u], tc)
        else:
            th = torch_cell(read[:, u], h[:, u])
        torch.testing.assert_close(got_h[:, u], th)


@pytest.mark.parametrize("comm", ["attention", "workspace"])
def test_valid_lens_freeze_the_state_and_zero_the_padding(comm):
    m = _module("LSTM", comm)
    x = torch.randn(3, 8, 5)
    lens = torch.tensor([8, 3, 0])
    for explicit in (False, True):
        with explicit_path(m, explicit=explicit):
            out, final = m(x, lens, return_state=True)
            y = x.clone()
            y[1, 3:] = torch.randn(5, 5) * 10
            y[2] = torch.randn(8, 5)
            torch.testing.assert_close(m(y, [8, 3, 0]), out)
            short, short_final = m(x[1:2, :3], return_state=True)
        assert (out[1, 3:] == 0).all() and (out[2] == 0).all()
        torch.testing.assert_close(out[1, :3], short[0])
        for a, b in zip(final, short_final, strict=True):
            if a is not None:
                torch.testing.assert_close(a[1:2], b)
        assert (final.h[2] == 0).all()
        if comm == "workspace":
            torch.testing.assert_close(final.memory[2], m.workspace.initial_memory(1, x.dtype,
                                                                                  x.device)[0])
    _, rec = _records(m, x, lens)
    assert rec["active"][1, 3:].sum() == 0 and rec["active"][2].sum() == 0
    assert (rec["active"][0].sum(-1) == 2).all() and (rec["active"][1, :3].sum(-1) == 2).all()
    torch.testing.assert_close(m(x, torch.tensor([8, 8, 8])), m(x))


@pytest.mark.parametrize("comm", ["attention", "workspace"])
def test_state_carries_across_calls(comm):
    m = _module("LSTM", comm)
    x = torch.randn(2, 9, 5)
    full, final = m(x, return_state=True)
    first, mid = m(x[:, :4], return_state=True)
    second, end = m(x[:, 4:], state=mid, return_state=True)
    torch.testing.assert_close(torch.cat([first, second], 1), full)
    for a, b in zip(end, final, strict=True):
        if a is not None:
            torch.testing.assert_close(a, b)


def test_capture_records_the_input_attention_the_choice_and_the_communication():
    m = _module("GRU", U=5, k=2)
    x = torch.randn(2, 6, 5)
    out, rec = _records(m, x)
    assert rec["input"].shape == (2, 6, 5, 2) and rec["communication"].shape == (2, 6, 2, 5, 5)
    torch.testing.assert_close(rec["input"].sum(-1), torch.ones(2, 6, 5))
    on = rec["active"].bool()
    # active units rank highest on the real input
    p = rec["input"][..., 0]
    assert (p.masked_fill(~on, 2).amin(-1) >= p.masked_fill(on, -1).amax(-1)).all()
    comm = rec["communication"]
    torch.testing.assert_close(comm.sum(-1), on[:, :, None].expand_as(comm.sum(-1)).float())
    torch.testing.assert_close(m(x), out)


def test_capture_records_the_workspace_in_unit_order():
    m = _module("LSTM", "workspace", U=5, k=3)
    x = torch.randn(2, 6, 5)
    _, rec = _records(m, x)
    write, read, on = rec["write"], rec["broadcast"], rec["active"].bool()
    assert write.shape == (2, 6, 2, 3, 5) and read.shape == (2, 6, 2, 5, 3)
    assert (write.masked_select(~on[:, :, None, None, :]) == 0).all()
    assert ((write > 0).sum(-1) == 1).all()  # top_k 1 writer per slot, among the active
    torch.testing.assert_close(read.sum(-1), on[:, :, None, :].expand(-1, -1, 2, -1).float())
    with capture_attention(m) as maps:  # the workspace's own per-step records are taken
        m(x)
    assert set(maps) == {""}


def test_rank_by_score_is_rim_py_and_agrees_when_the_null_key_is_zero():
    a = _module(U=6, k=3, rank_by="probability")
    b = _module(U=6, k=3, rank_by="score")
    x = torch.randn(2, 8, 5)
    assert not torch.equal(_records(a, x)[1]["active"], _records(b, x)[1]["active"])
    with torch.no_grad():
        a.input_key.bias.zero_()
        b.input_key.bias.zero_()
    torch.testing.assert_close(a(x), b(x))


def test_dropout_trains_and_eval_is_deterministic():
    m = _module(input_dropout=0.5, comm_dropout=0.5).train()
    x = torch.randn(2, 5, 5, requires_grad=True)
    m(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    m.eval()
    torch.testing.assert_close(m(x), m(x))


@pytest.mark.parametrize("comm", ["attention", "workspace"])
def test_gradcheck_float64(comm):
    m = _module("GRU", comm, C=3, H=4, U=3, k=2, dtype=torch.float64,
                block_inactive_grad=False)
    x = torch.randn(1, 3, 3, dtype=torch.float64, requires_grad=True)
    for explicit in (False, True):
        with explicit_path(m, explicit=explicit):
            torch.autograd.gradcheck(lambda t: m(t), (x,))


def test_errors_are_named_value_errors():
    with pytest.raises(ValueError, match="rims: k .* at most num_units 3"):
        RIMs(4, 8, 3, 4)
    with pytest.raises(ValueError, match="rnn_cell"):
        RIMs(4, 8, 3, 2, rnn_cell="RNN")
    with pytest.raises(ValueError, match="communication"):
        RIMs(4, 8, 3, 2, communication="pairs")
    with pytest.raises(ValueError, match="rank_by"):
        RIMs(4, 8, 3, 2, rank_by="x")
    with pytest.raises(ValueError, match="workspace options need"):
        RIMs(4, 8, 3, 2, workspace={"num_slots": 2})
    with pytest.raises(ValueError, match="rims_workspace: workspace"):
        sa.create("rims_workspace", 4, hidden_size=6, workspace={"num_heads": 4})
    with pytest.raises(ValueError, match="rims: num_units must be positive"):
        RIMs(4, 8, 0, 0)
    with pytest.raises(ValueError, match="rims: hidden_size must be an integer"):
        RIMs(4, 8.0, 3, 2)
    m = _module()
    with pytest.raises(ValueError, match="rims: expected 5 channels"):
        m(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="rims: expected a 3-D"):
        m(torch.randn(2, 5))
    with pytest.raises(ValueError, match="rims: state h must have shape"):
        m(torch.randn(2, 3, 5), state=(torch.randn(2, 5),))
    with pytest.raises(ValueError, match="rims: state has a memory"):
        m(torch.randn(2, 3, 5), state=(torch.randn(2, 24), None, torch.randn(2, 3, 6)))
    with pytest.raises(ValueError, match="rims: valid_lens"):
        m(torch.randn(2, 3, 5), [4, 1])
    g = _module("GRU", "workspace")
    with pytest.raises(ValueError, match="rims: state has a c"):
        g(torch.randn(2, 3, 5), state=(torch.randn(2, 24), torch.randn(2, 24)))


def test_convert_reference_state_dict_maps_rim_py_names():
    m = _module("GRU")
    ref = {"rimcell.0.key.weight": m.input_key.weight, "rimcell.0.key.bias": m.input_key.bias,
           "value.weight": m.input_value.weight, "value.bias": m.input_value.bias,
           "query.w": m.input_query, "rnn.x2h.w": m.cell_input, "rnn.h2h.w": m.cell_hidden,
           "query_.w": m.comm_query, "key_.w": m.comm_key, "value_.w": m.comm_value,
           "comm_attention_output.w": m.comm_output}
    converted = convert_reference_state_dict(ref)
    assert set(converted) == set(m.state_dict())
    m.load_state_dict(converted)
    with pytest.raises(ValueError, match="unexpected key"):
        convert_reference_state_dict({"rimcell.1.key.weight": m.input_key.weight})


@pytest.mark.parametrize("comm", ["attention", "workspace"])
def test_autocast_runs_the_recurrence_in_the_parameters_dtype(comm):
    m = _module("LSTM", comm)
    x = torch.randn(2, 6, 5)
    ref, ref_state = m(x, return_state=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, state = m(x.bfloat16(), state=(ref_state.h.bfloat16(),), return_state=True)
        again = m(x)
    assert out.dtype == torch.float32 and state.h.dtype == torch.float32
    torch.testing.assert_close(again, ref, atol=0, rtol=0)
