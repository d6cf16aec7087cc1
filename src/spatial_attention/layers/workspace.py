"""The shared global workspace: positions write to a few memory slots, then read them back.

Goyal, Didolkar, Lamb, Badola, Ke, Rahaman, Binas, Blundell, Mozer, Bengio, *Coordination
Among Neural Modules Through a Shared Global Workspace* (ICLR 2022). Instead of every
position attending to every other (``N x N`` pairs), ``S`` memory slots (``S << N``)
attend to the positions and only the ``k`` strongest writers per slot get weight (the
competition for a bandwidth-limited channel); the updated slots are then broadcast:
every position attends to the ``S`` slots. Cost is linear in ``N``.

The arithmetic follows the authors' code (``anirudh9119/shared_workspace``,
``sort_of_clevr/transformer_utilities/relational_memory_volatile.py``, the
``RelationalMemory`` that ``MultiheadAttention(shared_memory_attention=True)`` calls), not
a re-reading of the paper's prose. With ``h`` heads, value width ``dv = dim / h``, key
width ``dk = key_dim`` and memory ``M`` ``(B, S, dim)``, every step of
:class:`SharedWorkspace`:

1. ``R = input_projector(x)``, the positions (specialists), ``(B, N, dim)``.
2. **Write** (competition): per head, ``A = softmax_N(q(M) k(R)^T * scale)``,
   ``(B, h, S, N)``; per slot only the ``top_k`` largest weights of ``A`` are kept, the
   others set to zero, *without renormalising* (the reference multiplies the softmax by
   a 0/1 top-k mask); ``M~ = concat_h(A v(R))``.
3. Slot update, as in the relational memory core the reference builds on:
   ``M' = LN1(M + M~)``, ``M' = LN2(M' + mlp(M'))`` where ``mlp`` applies *one* linear map
   ``mlp_layers`` times, each followed by ReLU (the reference's ``ModuleList`` holds the
   same ``nn.Linear`` object ``mlp_layers`` = 4 times, so the weights are shared).
4. Gated update (``gate='unit'``, LSTM-like): ``i, f = split(G_m(tanh M) + G_x(R))`` with
   a per-slot linear map ``G_m`` and ``G_x(R) = W mean_N(relu(w * R))``;
   ``M_new = sigmoid(i + b_i) * tanh(M') + sigmoid(f + b_f) * M`` (``b_i = 0``,
   ``b_f = 1`` learned scalars). ``gate='memory'`` uses one gate per slot, ``None`` keeps
   ``M'``.
5. **Broadcast**: per head, ``softmax_S(q(R) k(M_new)^T * scale) v(M_new)`` for every
   position, heads concatenated, ``(B, N, dim)``. The same ``query_proj``, ``key_proj``
   and ``value_proj`` serve the write and the broadcast (as in the reference, which calls
   one attention function with the roles swapped); there is no top-k and no output
   projection in the broadcast.

Fast path: the write takes ``torch.topk`` of the raw scores, weights
``exp(score - logsumexp)`` for the winners only and a ``gather`` of their values
(``S * k`` rows, never the dense masked matrix); the broadcast is one attention call.
Explicit path: the dense softmax, the 0/1 top-k mask, and the broadcast weights, each
recorded: per call ``capture_attention`` gets the write weights ``(B, h, S, N)``, then the
broadcast weights ``(B, h, N, S)`` (see :func:`split_workspace_records`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_divisible, check_positive, check_valid_lens
from ..functional.dispatch import attention
from ..functional.scoring import masked_softmax, sequence_mask
from ..registry import register
from .base import AttentionModule

__all__ = ["SharedWorkspace", "split_workspace_records"]

_GATES = ("unit", "memory", None)


@register(
    "shared_workspace",
    family="workspace",
    layout="sequence",
    paper="Goyal et al., Coordination Among Neural Modules Through a Shared Global "
    "Workspace (write: top-k competition into memory slots; broadcast: positions "
    "attend to the slots)",
    year=2022,
    cost="2·B·N·C·(2C + 2·h·dk) (projections) + 2·B·h·S·N·dk + 2·B·h·S·k·dv (top-k "
    "write) + 2·B·h·N·S·(dk + dv) (broadcast) + O(B·S·C²) (slot MLP, gates): linear in N",
    captures="per call two records: write (B, heads, S, N) with k non-zero writers per "
    "slot, then broadcast (B, heads, N, S)",
)
class SharedWorkspace(AttentionModule):
    """Shared global workspace (Goyal et al. ICLR 2022): top-k write into slots, broadcast.

    Goyal et al., *Coordination Among Neural Modules Through a Shared Global Workspace*,
    ICLR 2022, as the authors' ``RelationalMemory`` code computes it (its five steps, write,
    slot update, gates and broadcast, are in the module docstring).
    ``forward(x, valid_lens=None, memory=None, return_memory=False)``: ``(B, N, dim) ->
    (B, N, dim)``, plus the new ``(B, S, dim)`` memory with ``return_memory=True`` (to carry
    to the next layer step, as the reference does). ``memory`` defaults to the reference's
    initial state, ``eye(S, dim)`` (zero-padded or truncated), for every sample.

    Args (defaults: the reference's Sort-of-CLEVR TR + HSW): ``dim``; ``num_heads`` 4;
    ``num_slots`` ``S`` 8; ``top_k`` 5 writers per slot; ``key_dim`` ``dk`` 32;
    ``mlp_layers`` 4 applications of one shared linear map; ``gate`` ``'unit'``,
    ``'memory'`` or None; ``scale`` None means 1 (the reference does not scale by
    ``1/sqrt(dk)``).
    Cost: ``2·B·N·C·(2C + 2·h·dk)`` (projections) ``+ 2·B·h·S·N·dk + 2·B·h·S·k·dv`` (top-k
    write) ``+ 2·B·h·N·S·(dk + dv)`` (broadcast) ``+ O(B·S·C²)``: linear in ``N``.
    Deviation: ``valid_lens`` ``(B,)`` masks positions ``>= valid_lens[b]`` out of the write
    (weight exactly zero, so a slot has ``min(top_k, valid)`` writers) and the input gate's
    mean; they still read the workspace, so their outputs are defined (like padded queries of
    ``multi_head``). The reference ignores the padding mask here.
    attn_impl: ``auto``, ``sdpa`` and ``kept_probs`` run the sparse top-k write and hand the
    broadcast to that kernel; ``explicit`` the dense masked softmax, recorded (write, then
    broadcast weights). Measured in benchmarks/workspace.md.
    """

    attn_impls = ("auto", "explicit", "sdpa", "kept_probs")

    layout = "sequence"

    def __init__(
        self,
        dim: int,
        num_heads: int = 4,
        num_slots: int = 8,
        top_k: int = 5,
        key_dim: int = 32,
        mlp_layers: int = 4,
        gate: str | None = "unit",
        scale: float | None = None,
        attn_impl: str | None = None,
    ) -> None:
        super().__init__(attn_impl=attn_impl)
        name = "shared_workspace"
        check_divisible(name, dim, num_heads)
        check_positive(
            name, num_slots=num_slots, top_k=top_k, key_dim=key_dim, mlp_layers=mlp_layers
        )
        for label, value in (("num_slots", num_slots), ("top_k", top_k),
                             ("key_dim", key_dim), ("mlp_layers", mlp_layers)):
            if int(value) != value:
                raise ValueError(f"{name}: {label} must be an integer, got {value!r}")
        if gate not in _GATES:
            raise ValueError(f"{name}: gate must be one of {_GATES}, got {gate!r}")
        if scale is not None:
            check_positive(name, scale=scale)
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.num_slots, self.top_k, self.key_dim = int(num_slots), int(top_k), int(key_dim)
        self.mlp_layers, self.gate = int(mlp_layers), gate
        self.scale = 1.0 if scale is None else float(scale)

        self.input_projector = nn.Linear(dim, dim)
        self.query_proj = nn.Linear(dim, key_dim * num_heads)
        self.key_proj = nn.Linear(dim, key_dim * num_heads)
        self.value_proj = nn.Linear(dim, dim)
        self.attention_mlp = nn.Linear(dim, dim)  # applied mlp_layers times
        self.attended_memory_layernorm = nn.LayerNorm(dim)
        self.attended_memory_layernorm2 = nn.LayerNorm(dim)
        if gate is not None:
            width = dim if gate == "unit" else 1
            # G_x: relu(w * R), averaged over positions, then a linear map to both gates
            self.input_gate_weight = nn.Parameter(torch.randn(dim))
            self.input_gate_projector = nn.Linear(dim, 2 * width)
            # G_m: one (dim -> 2 width) map per slot, uniform(+-1/sqrt(2 width)) as the
            # reference's grouped linear layer
            bound = 1.0 / math.sqrt(2 * width)
            self.memory_gate_weight = nn.Parameter(
                torch.empty(num_slots, dim, 2 * width).uniform_(-bound, bound)
            )
            self.memory_gate_bias = nn.Parameter(
                torch.empty(num_slots, 2 * width).uniform_(-bound, bound)
            )
            self.input_bias = nn.Parameter(torch.tensor(0.0))
            self.forget_bias = nn.Parameter(torch.tensor(1.0))

    # -- pieces ---------------------------------------------------------------------
    def initial_memory(self, batch: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The reference's initial state: ``eye(S, dim)`` for every sample, ``(B, S, dim)``."""
        eye = torch.eye(self.num_slots, self.dim, dtype=dtype, device=device)
        return eye.expand(batch, self.num_slots, self.dim)

    def _heads(self, x: Tensor, width: int) -> Tensor:  # (B, L, h*w) -> (B, h, L, w)
        return x.unflatten(-1, (self.num_heads, width)).transpose(1, 2)

    def _write(self, q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None) -> Tensor:
        """Top-k competition: ``(B, h, S, dk), (B, h, N, dk), (B, h, N, dv) -> (B, h, S, dv)``."""
        scores = (q @ k.transpose(-2, -1)) * self.scale  # (B, h, S, N)
        n = scores.shape[-1]
        winners = min(self.top_k, n)
        key_mask = None if keep is None else keep[:, None, None, :]
        if self.use_fused:
            if key_mask is not None:
                scores = scores.masked_fill(~key_mask, torch.finfo(scores.dtype).min)
            top, idx = scores.topk(winners, dim=-1)  # (B, h, S, k): softmax is monotone
            weights = torch.exp(top - scores.logsumexp(-1, keepdim=True))
            if key_mask is not None:  # a sample with no valid position writes nothing
                weights = weights * key_mask.expand_as(scores).gather(-1, idx)
            B, h, S, _ = q.shape
            rows = idx.reshape(B, h, S * winners, 1).expand(-1, -1, -1, v.shape[-1])
            picked = v.gather(2, rows).unflatten(2, (S, winners))  # (B, h, S, k, dv)
            return (weights.unsqueeze(-1) * picked).sum(-2)
        weights = masked_softmax(scores, mask=key_mask)  # (B, h, S, N)
        idx = weights.topk(winners, dim=-1).indices
        chosen = torch.zeros_like(weights, dtype=torch.bool).scatter(-1, idx, True)
        weights = weights * chosen  # no renormalisation, as in the reference
        self.record(weights)
        return weights @ v

    def _gates(self, inputs: Tensor, memory: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor]:
        """Input and forget gates ``(B, S, dim | 1)`` from the positions and the old memory."""
        act = F.relu(inputs * self.input_gate_weight)  # (B, N, C)
        if keep is None:
            pooled = act.mean(1)
        else:
            w = keep.to(act.dtype).unsqueeze(-1)
            pooled = (act * w).sum(1) / w.sum(1).clamp(min=1.0)
        from_inputs = self.input_gate_projector(pooled).unsqueeze(1)  # (B, 1, 2g)
        from_memory = torch.einsum("bsc,scg->bsg", torch.tanh(memory), self.memory_gate_weight)
        i, f = (from_memory + self.memory_gate_bias + from_inputs).chunk(2, dim=-1)
        return torch.sigmoid(i + self.input_bias), torch.sigmoid(f + self.forget_bias)

    # -- forward --------------------------------------------------------------------
    def _check(self, x: Tensor, valid_lens: Tensor | None,
               memory: Tensor | None) -> Tensor | None:
        name = self.mechanism_name
        self.check_input(x, self.dim)
        B = x.shape[0]
        valid_lens = check_valid_lens(name, valid_lens, B, x.shape[1], device=x.device)
        if memory is not None:
            expected = (B, self.num_slots, self.dim)
            if not isinstance(memory, Tensor) or tuple(memory.shape) != expected:
                got = tuple(memory.shape) if isinstance(memory, Tensor) else type(memory)
                raise ValueError(
                    f"{name}: memory must have shape (B, num_slots, dim) = {expected}, got {got}"
                )
        return valid_lens

    def forward(
        self,
        x: Tensor,
        valid_lens: Tensor | None = None,
        memory: Tensor | None = None,
        return_memory: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        valid_lens = self._check(x, valid_lens, memory)
        B, N, C = x.shape
        if memory is None:
            memory = self.initial_memory(B, x.dtype, x.device)
        keep = None if valid_lens is None else sequence_mask(valid_lens, N)  # (B, N)
        inputs = self.input_projector(x)  # (B, N, C)

        # write: slots query the positions; only the top-k writers per slot count
        written = self._write(
            self._heads(self.query_proj(memory), self.key_dim),
            self._heads(self.key_proj(inputs), self.key_dim),
            self._heads(self.value_proj(inputs), self.head_dim),
            keep,
        ).transpose(1, 2).reshape(B, self.num_slots, C)
        updated = self.attended_memory_layernorm(memory + written)
        hidden = updated
        for _ in range(self.mlp_layers):
            hidden = F.relu(self.attention_mlp(hidden))
        updated = self.attended_memory_layernorm2(updated + hidden)
        if self.gate is not None:
            input_gate, forget_gate = self._gates(inputs, memory, keep)
            updated = input_gate * torch.tanh(updated) + forget_gate * memory

        # broadcast: every position reads the updated slots
        q = self._heads(self.query_proj(inputs), self.key_dim)  # (B, h, N, dk)
        k = self._heads(self.key_proj(updated), self.key_dim)  # (B, h, S, dk)
        v = self._heads(self.value_proj(updated), self.head_dim)  # (B, h, S, dv)
        if self.use_fused:
            out = attention(q, k, v, scale=self.scale, impl=self.impl)
        else:
            out, weights = attention(q, k, v, scale=self.scale, impl="explicit",
                                     return_weights=True)
            self.record(weights)
        out = out.transpose(1, 2).reshape(B, N, C)
        return (out, updated) if return_memory else out

    @classmethod
    def example(cls, name: str, batch: int, channels: int, size: tuple[int, int], **kwargs: Any):
        """``(B, H*W, C)`` positions; 4 heads where ``C`` allows (the reference's count)."""
        from ..registry import create

        kwargs.setdefault("num_heads", math.gcd(channels, 4))
        module = create(name, channels, **kwargs)
        return module, (torch.randn(batch, size[0] * size[1], channels),)


def split_workspace_records(records: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """``maps.calls(name)`` of a workspace -> (write records, broadcast records), in order.

    Each call of :class:`SharedWorkspace` records its write weights ``(B, h, S, N)`` and
    then its broadcast weights ``(B, h, N, S)``; a workspace shared by ``L`` layer steps
    records ``2 L`` tensors.
    """
    if len(records) % 2:
        raise ValueError(
            f"split_workspace_records: expected write/broadcast pairs, got {len(records)} records"
        )
    return list(records[0::2]), list(records[1::2])
