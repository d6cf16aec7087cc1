"""Transformers for Sort-of-CLEVR: with a shared global workspace, and the plain baseline.

The two models of the shared-workspace paper's Sort-of-CLEVR table (Goyal et al. ICLR
2022), laid out as the authors' code lays them out (``shared_workspace/sort_of_clevr/
model.py`` ``Transformer`` and ``transformers.py`` ``TransformerEncoder``):

* the image is cut into ``patch_size`` patches (``(p1 p2 c)`` order) and each is mapped
  linearly to ``dim`` (``patch_to_embedding``); the 18-dim question becomes one token
  (``question_to_embedding``); a learned class token leads: ``[cls, question, patches]``;
* a fixed sinusoidal position code is added (the reference's ``PositionEncoder``: column
  ``2i`` is ``sin(pos / 10000^(2*(2i)/d))``, column ``2i+1`` is ``cos(pos / 10000^(2*
  (2i+1)/d))``, scaled by ``sigmoid(1)`` because its learnable scale, initialised to 1,
  is wrapped out of the graph there and never trained);
* ``depth`` pre-norm encoder steps ``x + drop(mix(LN(x)))``, ``x + drop(fc2(relu(fc1(
  LN(x)))))``; with ``share_layers=True`` (the paper's TR and TR + HSW) one layer is
  applied ``depth`` times;
* ``mlp_head`` on the class token gives the 10 answer logits (the reference returns their
  ``log_softmax``; use ``cross_entropy`` on these).

``mix`` is :class:`~spatial_attention.layers.workspace.SharedWorkspace` in
``workspace_transformer`` (TR + HSW: 8 slots, top-k 5) and multi-head self-attention in
``vanilla_transformer`` (TR). The workspace memory starts from its initial state at each
forward and is carried from one layer step to the next, as the reference's shared layer
carries ``self.memory``. Defaults are the reference's: ``dim`` 256, 4 steps, 4 heads, FFN
512, dropout 0.1 (attention dropout 0.1 in the baseline), 75 x 75 images, patch 15.

Shapes: ``image (B, 3, H, W)``, ``question (B, 18)`` -> ``(B, num_classes)``; ``H``, ``W``
need not divide the patch (zero padding on the bottom/right).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers.scoring import MultiHeadAttention
from ..layers.workspace import SharedWorkspace
from . import register_model
from .features import factory_kwargs

__all__ = [
    "EncoderLayer",
    "SortOfClevrTransformer",
    "convert_reference_state_dict",
    "load_reference_weights",
    "sinusoid_code",
    "vanilla_transformer",
    "workspace_transformer",
]

_PAPER = "Goyal et al., Coordination Among Neural Modules Through a Shared Global Workspace"


def sinusoid_code(length: int, dim: int, device=None, dtype=torch.float32) -> Tensor:
    """The reference's fixed position code ``(length, dim)`` (see the module doc)."""
    pos = torch.arange(length, device=device, dtype=torch.float64)[:, None]
    cols = torch.arange(dim, device=device, dtype=torch.float64)
    angle = pos / torch.pow(10000.0, 2.0 * cols / dim)
    code = torch.where(cols.long() % 2 == 0, torch.sin(angle), torch.cos(angle))
    return (code * torch.sigmoid(torch.tensor(1.0, dtype=torch.float64))).to(dtype)


class EncoderLayer(nn.Module):
    """Pre-norm encoder step around a workspace or self-attention (the reference's
    ``TransformerEncoderLayerVanilla`` with ``encoder_normalize_before=True``).

    ``forward(x, memory=None) -> (x, memory)``: ``(B, N, dim)`` in and out; ``memory`` is
    the workspace's ``(B, S, dim)`` state (``None`` for self-attention).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_dim: int,
        dropout: float,
        mixer: str,
        attention_dropout: float = 0.1,
        **workspace: Any,
    ) -> None:
        super().__init__()
        if mixer == "workspace":
            self.self_attn: nn.Module = SharedWorkspace(dim, num_heads, **workspace)
        elif mixer == "attention":
            if workspace:
                raise ValueError(
                    f"EncoderLayer: workspace options {sorted(workspace)} need mixer='workspace'"
                )
            self.self_attn = MultiHeadAttention(dim, num_heads, dropout=attention_dropout)
        else:
            raise ValueError(
                f"EncoderLayer: mixer must be 'workspace' or 'attention', got {mixer!r}"
            )
        self.workspace = mixer == "workspace"
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.dropout = dropout

    def forward(self, x: Tensor, memory: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        h = self.self_attn_layer_norm(x)
        if self.workspace:
            h, memory = self.self_attn(h, memory=memory, return_memory=True)
        else:
            h = self.self_attn(h)
        x = x + F.dropout(h, self.dropout, self.training)
        h = self.fc2(F.relu(self.fc1(self.final_layer_norm(x))))
        return x + F.dropout(h, self.dropout, self.training), memory


class SortOfClevrTransformer(nn.Module):
    """Patch + question tokens, shared pre-norm encoder steps, class-token head.

    See the module doc for the layout; ``mixer='workspace'`` is TR + HSW and
    ``mixer='attention'`` TR. Cost per step: the mixer's plus ``4 N dim ffn_dim`` FLOPs
    for the feed-forward, ``N = 2 + (H/p)(W/p)`` tokens.
    """

    @factory_kwargs
    def __init__(
        self,
        mixer: str = "workspace",
        dim: int = 256,
        depth: int = 4,
        num_heads: int = 4,
        ffn_dim: int = 512,
        dropout: float = 0.1,
        patch_size: int = 15,
        in_chans: int = 3,
        question_dim: int = 18,
        num_classes: int = 10,
        share_layers: bool = True,
        **mixer_kwargs: Any,
    ) -> None:
        super().__init__()
        for label, value in (("dim", dim), ("depth", depth), ("patch_size", patch_size),
                             ("ffn_dim", ffn_dim), ("num_classes", num_classes)):
            if not value > 0:
                raise ValueError(f"SortOfClevrTransformer: {label} must be positive, got {value}")
        self.patch_size, self.in_chans, self.question_dim = patch_size, in_chans, question_dim
        self.depth, self.share_layers = depth, share_layers
        self.patch_to_embedding = nn.Linear(in_chans * patch_size**2, dim)
        self.question_to_embedding = nn.Linear(question_dim, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.layers = nn.ModuleList(
            EncoderLayer(dim, num_heads, ffn_dim, dropout, mixer, **mixer_kwargs)
            for _ in range(1 if share_layers else depth)
        )
        self.mlp_head = nn.Linear(dim, num_classes)

    def tokens(self, image: Tensor, question: Tensor) -> Tensor:
        """``(B, 2 + patches, dim)``: class token, question token, patch tokens, + position."""
        if image.dim() != 4 or image.shape[1] != self.in_chans:
            raise ValueError(
                f"SortOfClevrTransformer: expected images (B, {self.in_chans}, H, W), got "
                f"shape {tuple(image.shape)}"
            )
        if question.dim() != 2 or question.shape != (image.shape[0], self.question_dim):
            raise ValueError(
                f"SortOfClevrTransformer: expected questions ({image.shape[0]}, "
                f"{self.question_dim}), got shape {tuple(question.shape)}"
            )
        p = self.patch_size
        B, C, H, W = image.shape
        image = F.pad(image, (0, (-W) % p, 0, (-H) % p))
        gh, gw = image.shape[2] // p, image.shape[3] // p
        # b c (h p1) (w p2) -> b (h w) (p1 p2 c), the reference's patch order
        patches = image.reshape(B, C, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1)
        x = self.patch_to_embedding(patches.reshape(B, gh * gw, p * p * C))
        q = self.question_to_embedding(question).unsqueeze(1)
        x = torch.cat([self.cls_token.expand(B, -1, -1), q, x], dim=1)
        return x + sinusoid_code(x.shape[1], x.shape[2], x.device, x.dtype)

    def forward(self, image: Tensor, question: Tensor) -> Tensor:
        x = self.tokens(image, question)
        memory = None
        for step in range(self.depth):
            x, memory = self.layers[0 if self.share_layers else step](x, memory)
        return self.mlp_head(x[:, 0])


@register_model("workspace_transformer", paper=_PAPER + " (TR + HSW)", year=2022,
                family="visual_reasoning")
def workspace_transformer(**kwargs: Any) -> SortOfClevrTransformer:
    """Transformer whose self-attention is a shared workspace (TR + HSW), Sort-of-CLEVR."""
    kwargs.setdefault("num_slots", 8)
    kwargs.setdefault("top_k", 5)
    return SortOfClevrTransformer(mixer="workspace", **kwargs)


@register_model("vanilla_transformer", paper=_PAPER + " (TR baseline)", year=2022,
                family="visual_reasoning")
def vanilla_transformer(**kwargs: Any) -> SortOfClevrTransformer:
    """The same Transformer with multi-head self-attention (the paper's TR), Sort-of-CLEVR."""
    return SortOfClevrTransformer(mixer="attention", **kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# reference name inside ``relational_memory`` -> ours inside the workspace
_MEMORY_KEYS = {
    "input_gate_projector.w": "input_gate_weight",
    "input_gate_projector.linear.weight": "input_gate_projector.weight",
    "input_gate_projector.linear.bias": "input_gate_projector.bias",
    "memory_gate_projector.weight": "memory_gate_weight",
    "memory_gate_projector.bias": "memory_gate_bias",
}
# parts of the reference that hold weights its forward never uses
_UNUSED = re.compile(
    r"^net\.(pe|pe_state)\.|\.self_attn\.mem_att\.|\.relational_memory\.input_gate_projector\.pe\."
)


def convert_reference_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A state dict of the authors' Sort-of-CLEVR ``Transformer`` in our names and layout.

    Handles both their shared layer (``net.enc.*`` -> ``layers.0.*``) and separate layers
    (``net.layers.i.*``), the workspace (``self_attn.relational_memory.*``; its four
    ``attention_mlp`` entries are one shared linear map and must be equal) and the
    baseline's grouped linear projections (``(1, in, out)`` weights, transposed). Weights
    the reference builds but never uses (the position code's unused scale, ``mem_att``)
    are dropped; anything unknown is kept, so loading reports it by name.
    """
    out: dict[str, Tensor] = {}
    mlp: dict[str, list[tuple[str, Tensor]]] = {}
    for key, value in state.items():
        if _UNUSED.search(key):
            continue
        new = re.sub(r"^net\.enc\.", "layers.0.", key)
        new = re.sub(r"^net\.layers\.", "layers.", new)
        if ".self_attn.relational_memory." in new:
            head, tail = new.split(".relational_memory.", 1)
            match = re.fullmatch(r"attention_mlp\.\d+\.(weight|bias)", tail)
            if match:
                mlp.setdefault(f"{head}.attention_mlp.{match.group(1)}", []).append((key, value))
                continue
            new = f"{head}.{_MEMORY_KEYS.get(tail, tail)}"
        elif re.search(r"\.self_attn\.(q|k|v|out)_proj\.(weight|bias)$", new) and (
            value.dim() == (3 if new.endswith("weight") else 2) and value.shape[0] == 1
        ):
            value = value[0].t() if new.endswith("weight") else value[0]
        out[new] = value
    for new, copies in mlp.items():
        first_key, first = copies[0]
        for key, value in copies[1:]:
            if value.shape != first.shape or not torch.equal(value, first):
                raise ValueError(
                    f"convert_reference_state_dict: {key} differs from {first_key}; the "
                    "reference applies one shared linear map, so its copies must be equal"
                )
        out[new] = first
    return out


def load_reference_weights(model: SortOfClevrTransformer, path: str | os.PathLike) -> None:
    """Load a ``state_dict`` saved by the authors' ``main.py`` (``torch.save``) into ``model``.

    Read with ``torch.load(weights_only=True)`` (no pickle code runs), converted with
    :func:`convert_reference_state_dict` and checked: missing, unexpected and mis-shaped
    keys are reported by name (a ``UsageError``, a ``ValueError``).
    """
    from ..checkpoint import check_state_dict

    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(f"load_reference_weights: {path} holds a {type(state).__name__}, "
                         "not a state dict")
    converted = convert_reference_state_dict(state)
    check_state_dict(model.state_dict(), converted, source=str(path))
    model.load_state_dict(converted)

