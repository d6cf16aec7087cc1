"""Recurrent Independent Mechanisms: sparsely activated recurrent units that communicate.

Goyal, Lamb, Hoffmann, Sodhani, Levine, Bengio, Schölkopf, *Recurrent Independent
Mechanisms* (ICLR 2021). The hidden state is split into ``U`` units, each with its own LSTM
or GRU weights. At every step ``t``:

1. **Input attention.** Each unit's query ``q_u = h_u W^q_u`` attends over two keys, the
   input ``x_t`` and a null input (zeros): ``A_u = softmax_2(q_u [k(x_t), k(0)]^T /
   sqrt(dk))``, averaged over the input heads; values ``v = mean_heads(W^v [x_t, 0] + b)``.
   The ``k`` units that put the most attention on the real input are *active*; the others
   read nothing (their read is multiplied by 0).
2. **Independent dynamics.** ``h~_u, c~_u = Cell_u(A_u v, (h_u, c_u))`` for all units at
   once: the per-unit weights are stacked ``(U, in, out)`` and applied as one batched
   matmul (the block-diagonal LSTM of the paper), without a bias, as ``RIM.py``.
3. **Communication.** ``communication="attention"`` (the RIMs paper): multi-head attention
   among the units' fresh states, queries only from active units, keys and values from
   all of them (the gradient into inactive units' fresh states is blocked), per-unit output
   map and a residual: ``h^_u = h~_u + W^o_u concat_heads(softmax(q k^T / sqrt(dc)) v)``.
   ``communication="workspace"`` (Goyal et al. ICLR 2022, *Coordination Among Neural
   Modules Through a Shared Global Workspace*): the active units' fresh states are the
   specialists of a :class:`~.workspace.SharedWorkspace`: they compete to write into its
   memory slots (top-k per slot), the slots are updated, and the workspace is broadcast
   back to the active units, ``h^_u = h~_u + broadcast_u``. The memory is carried from step
   to step.
4. **Sparse update.** Active units take ``h^_u`` (and ``c~_u``); inactive units keep their
   previous state exactly (``torch.where``, bit for bit).

The arithmetic follows ``RIM.py`` of ``dido1998/Recurrent-Independent-Mechanisms`` (the
``RIMCell`` the issue names), checked against the authors' ``anirudh9119/RIMs``
(``event_based/blocks_core.py``) where they agree; the class docstring lists where they
differ and which one this module follows.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_positive, check_probability, check_valid_lens
from ..functional.dispatch import attention
from ..registry import register
from .base import AttentionModule
from .workspace import SharedWorkspace

__all__ = ["RIMs", "RIMsState", "convert_reference_state_dict"]

_CELLS = {"LSTM": 4, "GRU": 3}
_COMMUNICATION = ("attention", "workspace")
_RANK_BY = ("probability", "score")
_CHUNK = 8  # steps whose cell inputs the fused path projects in one product


class RIMsState(NamedTuple):
    """Final (or initial) state: ``h`` and ``c`` ``(B, U*H)`` (``c`` None for a GRU) and the
    workspace memory ``(B, S, H)`` (None with ``communication="attention"``)."""

    h: Tensor
    c: Tensor | None = None
    memory: Tensor | None = None


_COST = ("2·B·T·C·nh·(dk+V) (input keys, values) + 2·B·T·U·V·G·H (cell input) + "
         "2·B·T·U·H·(G·H + nh·dk) (cell state, queries) + communication: 2·B·T·U·H·nc·"
         "(2dc+dv) + 2·B·T·nc·U²·(dc+dv) + 2·B·T·U·nc·dv·H (G = 4 LSTM, 3 GRU)")


@register(
    "rims_workspace",
    family="workspace",
    layout="sequence",
    paper="Goyal et al., Coordination Among Neural Modules Through a Shared Global Workspace "
    "(RIMs + SW: the active RIMs write into the workspace, which is broadcast back to them)",
    year=2022,
    cost=_COST.split(" + communication")[0] + " + per step shared_workspace's cost with N = k "
    "positions (the active units) of width H (G = 4 LSTM, 3 GRU)",
    captures="per call: input attention (B, T, U, 2), active units (B, T, U), workspace "
    "write (B, T, heads, S, U) and broadcast (B, T, heads, U, S)",
    communication="workspace",
)
@register(
    "rims",
    family="sequence",
    layout="sequence",
    paper="Goyal et al., Recurrent Independent Mechanisms (input attention with a null "
    "input, top-k active units, independent LSTM/GRU units, attention among the units)",
    year=2021,
    cost=_COST,
    captures="per call: input attention (B, T, U, 2) over (input, null), active units "
    "(B, T, U), communication attention (B, T, heads, U, U)",
)
class RIMs(AttentionModule):
    """Recurrent Independent Mechanisms (Goyal et al. ICLR 2021), optionally with a workspace.

    Steps (module doc): input attention over ``[x_t, 0]``, the ``k`` of ``U`` units most
    attentive to ``x_t`` run their own LSTM/GRU, communicate (``"attention"`` among units, or
    ``"workspace"``: Goyal et al. ICLR 2022's shared workspace), inactive units keep state.
    ``forward(x, valid_lens=None, state=None, return_state=False)``: ``(B, T, input_size) ->
    (B, T, U*H)`` the hidden states, plus a :class:`RIMsState` with ``return_state=True``.
    ``valid_lens`` ``(B,)``: from step ``valid_lens[b]`` on no unit updates (outputs 0 there).
    Defaults as ``RIM.py`` (``hidden_size`` 100, 6 units, ``k`` 4 as the authors' copying
    task; keys 64, values 400, 1 input head; comm keys 32, values ``H``, 4 heads);
    ``workspace``: :class:`SharedWorkspace` options. ``block_inactive_grad`` (as ``RIM.py``):
    no gradient into inactive units' fresh states, read as keys/values (not the exact
    derivative then). Cost per step: ``2·B·U·(V·G·H + H·(G·H + nh·dk))`` + communication.
    Deviations from ``RIM.py``: units are ranked by their attention *probability* on the real
    input (the paper and the authors' code; ``rank_by="score"``: ``RIM.py``'s raw score), ties
    to the lower unit index; the initial state is zeros (``RIM.py`` draws ``randn``); GRU
    weights start uniform(+-1/sqrt(H)) (``RIM.py``: all ones); dropouts default 0 (``RIM.py``:
    0.1, names swapped); under autocast it runs in the parameters' dtype (a bf16 state flips
    near-tied choices of units, and a flip changes the whole trajectory). The authors'
    ``BlocksCore`` differs more (biased masked ``LSTMCell``, gated tanh communication output).
    Workspace mode: only active units write and read (inactive units keep state), the memory
    starts as the workspace's identity and is carried.
    attn_impl: ``auto`` projects the input side of 8 steps at a time (keys, values and every
    unit's cell input as one product) and runs communication through the dispatcher (``sdpa``,
    ``kept_probs`` likewise); ``explicit`` writes each step out as ``RIM.py`` and records.
    """

    attn_impls = ("auto", "explicit", "sdpa", "kept_probs")

    layout = "sequence"

    def __init__(
        self,
        input_size: int,
        hidden_size: int = 100,
        num_units: int = 6,
        k: int = 4,
        rnn_cell: str = "LSTM",
        communication: str = "attention",
        input_key_size: int = 64,
        input_value_size: int = 400,
        num_input_heads: int = 1,
        input_dropout: float = 0.0,
        comm_key_size: int = 32,
        comm_value_size: int | None = None,
        num_comm_heads: int = 4,
        comm_dropout: float = 0.0,
        rank_by: str = "probability",
        block_inactive_grad: bool = True,
        workspace: dict[str, Any] | None = None,
        attn_impl: str | None = None,
    ) -> None:
        super().__init__(attn_impl=attn_impl)
        name = "rims"
        comm_value_size = hidden_size if comm_value_size is None else comm_value_size
        sizes = dict(input_size=input_size, hidden_size=hidden_size, num_units=num_units, k=k,
                     input_key_size=input_key_size, input_value_size=input_value_size,
                     num_input_heads=num_input_heads, comm_key_size=comm_key_size,
                     comm_value_size=comm_value_size, num_comm_heads=num_comm_heads)
        for label, value in sizes.items():
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name}: {label} must be an integer, got {value!r}")
        check_positive(name, **sizes)
        if k > num_units:
            raise ValueError(f"{name}: k (active units) must be at most num_units "
                             f"{num_units}, got k={k}")
        if rnn_cell not in _CELLS:
            raise ValueError(f"{name}: rnn_cell must be one of {tuple(_CELLS)}, got {rnn_cell!r}")
        if communication not in _COMMUNICATION:
            raise ValueError(f"{name}: communication must be one of {_COMMUNICATION}, "
                             f"got {communication!r}")
        if rank_by not in _RANK_BY:
            raise ValueError(f"{name}: rank_by must be one of {_RANK_BY}, got {rank_by!r}")
        check_probability(name, input_dropout=input_dropout, comm_dropout=comm_dropout)
        if workspace is not None and communication != "workspace":
            raise ValueError(f"{name}: workspace options need communication='workspace'")

        U, H, G = num_units, hidden_size, _CELLS[rnn_cell]
        self.input_size, self.hidden_size, self.num_units, self.k = input_size, H, U, k
        self.rnn_cell, self.communication, self.rank_by = rnn_cell, communication, rank_by
        self.input_key_size, self.input_value_size = input_key_size, input_value_size
        self.num_input_heads, self.input_dropout = num_input_heads, float(input_dropout)
        self.comm_key_size, self.comm_value_size = comm_key_size, comm_value_size
        self.num_comm_heads, self.comm_dropout = num_comm_heads, float(comm_dropout)
        self.gates, self.block_inactive_grad = G, bool(block_inactive_grad)

        # input attention: shared key/value maps of the input, one query map per unit
        self.input_key = nn.Linear(input_size, num_input_heads * input_key_size)
        self.input_value = nn.Linear(input_size, num_input_heads * input_value_size)
        self.input_query = nn.Parameter(0.01 * torch.randn(U, H, num_input_heads * input_key_size))
        # the U cells: (U, in, G*H) blocks, no bias, gates [i, f, o, g] (LSTM) / [r, z, n] (GRU)
        bound = 1.0 / math.sqrt(H)
        self.cell_input = nn.Parameter(
            torch.empty(U, input_value_size, G * H).uniform_(-bound, bound))
        self.cell_hidden = nn.Parameter(torch.empty(U, H, G * H).uniform_(-bound, bound))
        if communication == "attention":
            qk, vv = num_comm_heads * comm_key_size, num_comm_heads * comm_value_size
            self.comm_query = nn.Parameter(0.01 * torch.randn(U, H, qk))
            self.comm_key = nn.Parameter(0.01 * torch.randn(U, H, qk))
            self.comm_value = nn.Parameter(0.01 * torch.randn(U, H, vv))
            self.comm_output = nn.Parameter(0.01 * torch.randn(U, vv, H))
            self.workspace = None
        else:
            options = dict(workspace or {})
            options.setdefault("num_heads", math.gcd(H, 4))
            try:
                self.workspace = SharedWorkspace(H, attn_impl=attn_impl, **options)
            except TypeError as exc:
                raise ValueError(f"{name}: workspace options {sorted(options)}: {exc}") from None
            except ValueError as exc:
                raise ValueError(f"{name}: workspace: {exc}") from None

    def extra_repr(self) -> str:
        return (f"{self.input_size}, hidden_size={self.hidden_size}, num_units={self.num_units}, "
                f"k={self.k}, rnn_cell={self.rnn_cell!r}, communication={self.communication!r}, "
                + super().extra_repr())

    # -- validation -------------------------------------------------------------------
    def _check(self, x: Tensor, valid_lens: Any, state: Any) -> tuple[Tensor | None, RIMsState]:
        name = self.mechanism_name
        self.check_input(x, self.input_size)
        B = x.shape[0]
        valid_lens = check_valid_lens(name, valid_lens, B, x.shape[1], device=x.device)
        U, H = self.num_units, self.hidden_size
        lstm, ws = self.rnn_cell == "LSTM", self.workspace is not None
        if state is None:
            zeros = x.new_zeros(B, U * H)
            memory = self.workspace.initial_memory(B, x.dtype, x.device) if ws else None
            return valid_lens, RIMsState(zeros, zeros if lstm else None, memory)
        if not isinstance(state, (tuple, list)) or len(state) not in (1, 2, 3):
            raise ValueError(f"{name}: state must be a RIMsState or a tuple (h, c, memory), "
                             f"got {type(state).__name__}")
        h, c, memory = (tuple(state) + (None, None))[:3]
        shapes = {"h": (h, (B, U * H)), "c": (c, (B, U * H) if lstm else None),
                  "memory": (memory, (B, self.workspace.num_slots, H) if ws else None)}
        for label, (value, shape) in shapes.items():
            if value is None and (shape is None or label != "h"):
                continue
            if shape is None:
                raise ValueError(f"{name}: state has a {label} but this {self.rnn_cell} with "
                                 f"{self.communication} communication takes none")
            if not isinstance(value, Tensor) or tuple(value.shape) != shape:
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"{name}: state {label} must have shape {shape}, got {got}")
            if value.dtype != x.dtype:
                raise ValueError(f"{name}: state {label} dtype {value.dtype} differs from the "
                                 f"input's {x.dtype}")
        if c is None and lstm:
            c = x.new_zeros(B, U * H)
        if memory is None and ws:
            memory = self.workspace.initial_memory(B, x.dtype, x.device)
        return valid_lens, RIMsState(h, c, memory)

    # -- pieces shared by both paths ------------------------------------------------
    def _select(self, probs: Tensor, scores: Tensor) -> Tensor:
        """``(B, U)`` bool: the ``k`` units ranked highest on the real input, ties to the
        lower index (pairwise comparisons: exact, no sort, exports anywhere)."""
        s = probs[..., 0] if self.rank_by == "probability" else scores[..., 0]  # (B, U)
        U = s.shape[-1]
        earlier = torch.ones(U, U, dtype=torch.bool, device=s.device).tril(-1)  # v < u
        above = (s.unsqueeze(1) > s.unsqueeze(2)) | ((s.unsqueeze(1) == s.unsqueeze(2)) & earlier)
        return above.sum(-1) < self.k  # rank < k; [b, u, v]: does unit v outrank unit u

    def _cell(self, pre: Tensor, h: Tensor, c: Tensor | None,
              hidden_part: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """One step of every unit's cell from its pre-activations (input + hidden parts for
        the LSTM; for the GRU ``pre`` is the input part and ``hidden_part`` the hidden one)."""
        H = self.hidden_size
        if self.rnn_cell == "LSTM":
            ifo = torch.sigmoid(pre[..., : 3 * H])
            g = torch.tanh(pre[..., 3 * H:])
            i, f, o = ifo.split(H, dim=-1)
            c_new = c * f + i * g
            return o * torch.tanh(c_new), c_new
        i_r, i_z, i_n = pre.split(H, dim=-1)
        h_r, h_z, h_n = hidden_part.split(H, dim=-1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return n + z * (h - n), None

    def _dropout(self, weights: Tensor, p: float) -> Tensor:
        return F.dropout(weights, p) if (self.training and p > 0) else weights

    def _workspace_step(self, fresh: Tensor, active: Tensor, memory: Tensor,
                        collect: list | None) -> tuple[Tensor, Tensor]:
        """The active units' fresh states ``(B, U, H)`` write into and read from the
        workspace: ``(B, U, H)`` (inactive rows as given) and the new memory."""
        B, U, H = fresh.shape
        order = active.to(fresh.dtype) * torch.arange(U, 0, -1, device=fresh.device,
                                                      dtype=fresh.dtype)
        idx = order.topk(self.k, dim=-1).indices  # (B, k): the active units, ascending
        rows = idx.unsqueeze(-1).expand(B, self.k, H)
        units = fresh.gather(1, rows)  # (B, k, H)
        if collect is not None:
            records: list[Tensor] = []
            saved = self.workspace._recorder
            self.workspace._recorder = lambda _m, w: records.append(w)
            try:
                read, new_memory = self.workspace(units, memory=memory, return_memory=True)
            finally:
                self.workspace._recorder = saved
            write, broadcast = records  # (B, h, S, k), (B, h, k, S): back to unit order
            on = active.any(-1).to(write.dtype)[:, None, None, None]
            heads, S = write.shape[1], write.shape[2]
            w_full = write.new_zeros(B, heads, S, U).scatter(
                -1, idx[:, None, None, :].expand(B, heads, S, self.k), write)
            b_full = broadcast.new_zeros(B, heads, U, S).scatter(
                2, idx[:, None, :, None].expand(B, heads, self.k, S), broadcast)
            collect.append((w_full * on, b_full * on))
        else:
            read, new_memory = self.workspace(units, memory=memory, return_memory=True)
        return fresh.scatter(1, rows, units + read), new_memory

    # -- forward ----------------------------------------------------------------------
    def forward(
        self,
        x: Tensor,
        valid_lens: Tensor | None = None,
        state: RIMsState | tuple | None = None,
        return_state: bool = False,
    ) -> Tensor | tuple[Tensor, RIMsState]:
        device = x.device.type if isinstance(x, Tensor) else "cpu"
        if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
            # the recurrence runs in the parameters' precision: the choice of units turns on
            # score gaps (~1e-5 at RIM.py's init) that bf16 rounding of the state flips, and
            # one flip changes the rest of the trajectory
            dtype = self.input_key.weight.dtype

            def cast(t: Any) -> Any:
                return t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t

            if isinstance(state, (tuple, list)):
                state = type(state)(*map(cast, state)) if isinstance(state, RIMsState) \
                    else tuple(map(cast, state))
            with torch.autocast(device, enabled=False):
                return self.forward(cast(x), valid_lens, state, return_state)
        valid_lens, state = self._check(x, valid_lens, state)
        B, T, _ = x.shape
        if valid_lens is None:
            valid = None
        else:
            valid = torch.arange(T, device=x.device) < valid_lens.unsqueeze(-1)  # (B, T)
        run = self._explicit if self.impl == "explicit" else self._fused
        out, final = run(x, valid, state)
        return (out, final) if return_state else out

    def _fused(self, x: Tensor, valid: Tensor | None, state: RIMsState
               ) -> tuple[Tensor, RIMsState]:
        B, T, _ = x.shape
        U, H, G = self.num_units, self.hidden_size, self.gates
        nh, dk, V = self.num_input_heads, self.input_key_size, self.input_value_size
        # the input side outside the recurrence: every step's keys at once; head-averaged
        # values and each unit's cell input 8 steps at a time (a unit reads a blend of the
        # real input's and the null input's value, so its cell input is the same blend of
        # their projections)
        keys = self.input_key(x)  # (B, T, nh*dk)
        null_key = self.input_key.bias.expand_as(keys)  # the key of the zero input
        keys = torch.stack((keys, null_key), -1) / (nh * math.sqrt(dk))  # (B, T, nh*dk, 2)
        inputs = x.split(_CHUNK, dim=1)  # values projected _CHUNK steps at a time (memory)
        null_value = self.input_value.bias.view(nh, V).mean(0)  # (V,)
        cell_input = self.cell_input.transpose(0, 1).reshape(V, U * G * H)  # one GEMM, all units
        from_null = torch.matmul(null_value, self.cell_input).unsqueeze(1)  # (U, 1, GH)
        if self.workspace is None:
            nc, dc, dv = self.num_comm_heads, self.comm_key_size, self.comm_value_size

        # per-step views taken once: indexing inside the loop would make autograd build a
        # full-size zero gradient for every step
        keys_t = keys.unbind(1)
        h = state.h.view(B, U, H).transpose(0, 1)  # (U, B, H): units lead for the bmm's
        c = None if state.c is None else state.c.view(B, U, H).transpose(0, 1)
        memory = state.memory
        outs = []
        for t in range(T):
            if t % _CHUNK == 0:  # the cell inputs of the next steps' real inputs, (U, B, GH)
                chunk = self.input_value(inputs[t // _CHUNK])  # (B, L, nh V)
                steps = chunk.shape[1]
                chunk = chunk.view(B * steps, nh, V).mean(1)  # head-averaged values
                from_input = chunk @ cell_input  # (B L, U GH)
                from_input = from_input.view(B, steps, U, G * H).transpose(0, 2).unbind(1)
            from_hidden = torch.bmm(h, self.cell_hidden)  # (U, B, GH)
            query = torch.bmm(h, self.input_query)  # (U, B, nh dk)
            scores = torch.bmm(query.transpose(0, 1), keys_t[t])  # (B, U, 2)
            probs = torch.softmax(scores, dim=-1)
            active = self._select(probs, scores)
            if valid is not None:
                active = active & valid[:, t, None]
            read = self._dropout(probs, self.input_dropout) * active.unsqueeze(-1)
            read = read.transpose(0, 1)  # (U, B, 2)
            cell_in = read[..., :1] * from_input[t % _CHUNK] + read[..., 1:] * from_null
            if self.rnn_cell == "LSTM":
                fresh, c_new = self._cell(cell_in + from_hidden, h, c)
            else:
                fresh, c_new = self._cell(cell_in, h, None, from_hidden)
            on = active.transpose(0, 1).unsqueeze(-1)  # (U, B, 1)
            if self.workspace is None:
                if self.block_inactive_grad:  # no gradient into inactive units' fresh states
                    fresh = torch.where(on, fresh, fresh.detach())
                q, kk, v = (torch.bmm(fresh, w).unflatten(-1, (nc, -1)).permute(1, 2, 0, 3)
                            for w in (self.comm_query, self.comm_key, self.comm_value))
                ctx = attention(q, kk, v, scale=1.0 / math.sqrt(dc),
                                dropout_p=self.comm_dropout if self.training else 0.0,
                                impl=self.impl)  # (B, nc, U, dv)
                ctx = ctx.permute(2, 0, 1, 3).reshape(U, B, nc * dv)
                new = fresh + torch.bmm(ctx, self.comm_output)  # residual + W^o ctx
            else:
                new, new_memory = self._workspace_step(fresh.transpose(0, 1),
                                                       active, memory, None)
                new = new.transpose(0, 1)
                memory = new_memory if valid is None else torch.where(
                    valid[:, t, None, None], new_memory, memory)
            h = torch.where(on, new, h)
            if c is not None:
                c = torch.where(on, c_new, c)
            outs.append(h)
        return self._finish(outs, valid, h, c, memory, B, T)

    def _finish(self, outs: list[Tensor], valid: Tensor | None, h: Tensor, c: Tensor | None,
                memory: Tensor | None, B: int, T: int) -> tuple[Tensor, RIMsState]:
        U, H = self.num_units, self.hidden_size
        out = torch.stack([o.transpose(0, 1) for o in outs], 1).view(B, T, U * H)  # one copy
        if valid is not None:
            out = torch.where(valid.unsqueeze(-1), out, out.new_zeros(()))
        flat = lambda s: None if s is None else s.transpose(0, 1).reshape(B, U * H)  # noqa: E731
        return out, RIMsState(flat(h), flat(c), memory)

    def _explicit(self, x: Tensor, valid: Tensor | None, state: RIMsState
                  ) -> tuple[Tensor, RIMsState]:
        """Each step as ``RIM.py`` writes it, in ``(B, U, H)``; records when capturing."""
        B, T, _ = x.shape
        U, H = self.num_units, self.hidden_size
        nh, dk, V = self.num_input_heads, self.input_key_size, self.input_value_size
        h = state.h.view(B, U, H)
        c = None if state.c is None else state.c.view(B, U, H)
        memory = state.memory
        rec = self.capturing
        inputs_rec, active_rec, comm_rec, ws_rec = [], [], [], ([] if rec else None)
        outs = []
        for t, xt in enumerate(x.unbind(1)):
            both = torch.stack((xt, torch.zeros_like(xt)), 1)  # (B, 2, C): + null
            value = self.input_value(both).view(B, 2, nh, V).mean(2)  # (B, 2, V)
            key = self.input_key(both).view(B, 2, nh, dk).transpose(1, 2)  # (B, nh, 2, dk)
            query = torch.einsum("buh,uho->buo", h, self.input_query)
            query = query.view(B, U, nh, dk).transpose(1, 2)  # (B, nh, U, dk)
            scores = (query @ key.transpose(-1, -2) / math.sqrt(dk)).mean(1)  # (B, U, 2)
            probs = torch.softmax(scores, dim=-1)
            active = self._select(probs, scores)  # (B, U)
            if valid is not None:
                active = active & valid[:, t, None]
            mask = active.to(x.dtype).unsqueeze(-1)  # (B, U, 1)
            read = (self._dropout(probs, self.input_dropout) @ value) * mask  # (B, U, V)
            from_input = torch.einsum("buv,uvg->bug", read, self.cell_input)
            from_hidden = torch.einsum("buh,uhg->bug", h, self.cell_hidden)
            if self.rnn_cell == "LSTM":
                fresh, c_new = self._cell(from_input + from_hidden, h, c)
            else:
                fresh, c_new = self._cell(from_input, h, None, from_hidden)
            if self.workspace is None:
                blocked = fresh
                if self.block_inactive_grad:
                    blocked = torch.where(active.unsqueeze(-1), fresh, fresh.detach())
                nc, dc, dv = self.num_comm_heads, self.comm_key_size, self.comm_value_size
                q = torch.einsum("buh,uho->buo", blocked, self.comm_query)
                kk = torch.einsum("buh,uho->buo", blocked, self.comm_key)
                v = torch.einsum("buh,uho->buo", blocked, self.comm_value)
                q, kk, v = (a.view(B, U, nc, -1).transpose(1, 2) for a in (q, kk, v))
                weights = torch.softmax(q @ kk.transpose(-1, -2) / math.sqrt(dc), dim=-1)
                weights = weights * mask.unsqueeze(1)  # only active units read
                ctx = self._dropout(weights, self.comm_dropout) @ v  # (B, nc, U, dv)
                ctx = ctx.transpose(1, 2).reshape(B, U, nc * dv)
                new = torch.einsum("bui,uio->buo", ctx, self.comm_output) + blocked
                if rec:
                    comm_rec.append(weights)
            else:
                new, new_memory = self._workspace_step(fresh, active, memory, ws_rec)
                memory = new_memory if valid is None else torch.where(
                    valid[:, t, None, None], new_memory, memory)
            h = torch.where(active.unsqueeze(-1), new, h)
            if c is not None:
                c = torch.where(active.unsqueeze(-1), c_new, c)
            outs.append(h.transpose(0, 1))
            if rec:
                inputs_rec.append(probs)
                active_rec.append(active.to(x.dtype))
        if rec:
            self.record(torch.stack(inputs_rec, 1))  # (B, T, U, 2): (input, null)
            self.record(torch.stack(active_rec, 1))  # (B, T, U)
            if self.workspace is None:
                self.record(torch.stack(comm_rec, 1))  # (B, T, nc, U, U)
            else:
                self.record(torch.stack([w for w, _ in ws_rec], 1))  # (B, T, h, S, U)
                self.record(torch.stack([b for _, b in ws_rec], 1))  # (B, T, h, U, S)
        return self._finish(outs, valid, h.transpose(0, 1),
                            None if c is None else c.transpose(0, 1), memory, B, T)

    # -- records, examples --------------------------------------------------------------
    def split_records(self, records: list[Tensor]) -> list[dict[str, Tensor]]:
        """``maps.calls(name)`` -> one dict per forward call: ``input`` ``(B, T, U, 2)``,
        ``active`` ``(B, T, U)``, and ``communication`` ``(B, T, heads, U, U)`` or
        ``write`` ``(B, T, heads, S, U)`` and ``broadcast`` ``(B, T, heads, U, S)``."""
        keys = ["input", "active"] + (["communication"] if self.workspace is None
                                      else ["write", "broadcast"])
        if len(records) % len(keys):
            raise ValueError(f"{self.mechanism_name}: expected groups of {len(keys)} records "
                             f"({', '.join(keys)}), got {len(records)}")
        return [dict(zip(keys, records[i:i + len(keys)], strict=True))
                for i in range(0, len(records), len(keys))]

    @classmethod
    def spatial_map(cls, weights: Tensor, size: tuple[int, int]) -> Tensor:
        """An input attention record ``(B, T, U, 2)`` with ``T = H*W``: the attention on the
        real input, averaged over units, per step; an active-unit record: their count."""
        H, W = size
        if weights.dim() == 4 and weights.shape[-1] == 2 and weights.shape[1] == H * W:
            return weights[..., 0].float().mean(-1).reshape(-1, H, W)
        if weights.dim() == 3 and weights.shape[1] == H * W:
            return weights.float().sum(-1).reshape(-1, H, W)
        return super().spatial_map(weights, size)

    @classmethod
    def example(cls, name: str, batch: int, channels: int, size: tuple[int, int], **kwargs: Any):
        """``(B, min(H*W, 64), C)`` steps through a small RIMs (4 units of 8, 2 active; keys 8,
        values 16, comm keys 4: the defaults are the paper's, far larger per step), with
        ``block_inactive_grad=False`` so that autograd's gradient is the exact derivative
        (gradcheck); the default blocks it, as ``RIM.py``."""
        from ..registry import create

        for key, value in (("hidden_size", 8), ("num_units", 4), ("k", 2),
                           ("input_key_size", 8), ("input_value_size", 16),
                           ("comm_key_size", 4), ("block_inactive_grad", False)):
            kwargs.setdefault(key, value)
        module = create(name, channels, **kwargs)
        # a recurrence runs its steps one after another: at most 64 of them, so `bench`'s
        # 28x28 default is not 784 sequential steps
        return module, (torch.randn(batch, min(size[0] * size[1], 64), channels),)


_REFERENCE_KEYS = {
    "key.weight": "input_key.weight", "key.bias": "input_key.bias",
    "value.weight": "input_value.weight", "value.bias": "input_value.bias",
    "query.w": "input_query", "rnn.i2h.w": "cell_input", "rnn.x2h.w": "cell_input",
    "rnn.h2h.w": "cell_hidden", "query_.w": "comm_query", "key_.w": "comm_key",
    "value_.w": "comm_value", "comm_attention_output.w": "comm_output",
}


def convert_reference_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A ``RIM.py`` ``RIMCell`` state dict (or a one-layer, one-direction ``RIM``'s, keys
    ``rimcell.0.*``) as :class:`RIMs` keys; shapes are the same."""
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("rimcell.0.")
        if key not in _REFERENCE_KEYS:
            raise ValueError(f"convert_reference_state_dict: unexpected key {key!r} (only a "
                             "single-layer, single-direction RIM converts)")
        out[_REFERENCE_KEYS[key]] = value
    return out
