"""The token-mixer benchmark's network: a compact hierarchical transformer for 32x32 inputs.

Shape::

    stem: conv3x3 s1 (3 -> d0/2) -> BN -> GELU -> conv3x3 s2 (-> d0)    32x32 -> 16x16 grid
    stage k (grid 16, 8, 4; dims d0, d1, d2; heads h0, h1, h2; depth n_k):
        n_k blocks  x = x + mixer(LN(x));  x = x + MLP(LN(x))           tokens (B, H, W, C)
        patch merging between stages: 2x2 neighbours concatenated -> LN -> linear 4C -> C'
    LN -> mean over tokens -> linear head

Default dims 64/128/256, heads 2/4/8, depths 2/2/2, MLP ratio 2. An *entry* names the
mixer of every block: the blocks of a stage cycle through its pattern (``swin``:
window_attention, shifted_window_attention; ``twins``: twins_lsa, twins_gsa; ``boat``:
bilateral_local_attention; ``cswin``: cswin_attention; ``global``: global_attention, the
baseline); every other registered token mixer is an entry of its own name. Mixers are
built with ``sa.create(name, dim, heads, **mixer_kwargs(name, grid))``; the table
(:data:`MIXER_SIZES`, for the 16x16 grid) only scales each paper's window to the grid,
no per-mechanism tuning beyond that: window 4 (window/shifted/twins_lsa/boat/maxvit
block), shift 2, grid 4 (maxvit grid), kernel 5 (neighborhood), split 2 (cswin; full
attention in the last stage as CSWin's), n_win 4 and topk 4 (bi-level routing), group
16 overlap 6 (fsla, boat: 49/20 scaled to 16 tokens); grid-bound sizes follow each stage
(twins_gsa sr_ratio and deformable stride grid/4, a 4x4 key grid; deformable q_size =
grid). Each mixer draws its initial weights from a stream of its own (as the CNN's
attention slot), so every entry starts from the same backbone for a given seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["TokenNet", "ENTRIES", "MIXER_SIZES", "TOKEN_FAMILIES", "entry_pattern",
           "mixer_kwargs", "make_mixer", "list_entries", "attention_flops"]

#: composite entries: name -> the mixers the blocks of a stage cycle through
ENTRIES: dict[str, tuple[str, ...]] = {
    "global": ("global_attention",),
    "swin": ("window_attention", "shifted_window_attention"),
    "twins": ("twins_lsa", "twins_gsa"),
    "boat": ("bilateral_local_attention",),
    "cswin": ("cswin_attention",),
}
#: registry families whose token mixers join the comparison by registration
TOKEN_FAMILIES = ("token_local", "token_global", "token_feature_space")

#: sizes for the 16x16 grid (each paper's 7-token window at a 56 grid scaled to 4 here)
MIXER_SIZES: dict[str, dict[str, Any]] = {
    "window_attention": {"window_size": 4},
    "shifted_window_attention": {"window_size": 4, "shift_size": 2},
    "twins_lsa": {"window_size": 4},
    "bilateral_local_attention": {"window_size": 4, "group_size": 16, "overlap": 6},
    "fsla": {"group_size": 16, "overlap": 6},
    "cswin_attention": {"split_size": 2},
    "maxvit_block_attention": {"window_size": 4},
    "maxvit_grid_attention": {"grid_size": 4},
    "neighborhood_attention": {"kernel_size": 5},
    "bi_level_routing_attention": {"n_win": 4, "topk": 4},
    "deformable_attention": {"ksize": 5},
}


def mixer_kwargs(name: str, grid: int, last_stage: bool = False) -> dict[str, Any]:
    """Constructor keywords of mixer ``name`` for a ``grid x grid`` token grid."""
    kw = dict(MIXER_SIZES.get(name, {}))
    if name == "twins_gsa":
        kw["sr_ratio"] = max(1, grid // 4)
    elif name == "deformable_attention":
        kw.update(q_size=grid, stride=max(1, grid // 4))
    elif name == "cswin_attention" and last_stage:
        kw["last_stage"] = True
    return kw


def list_entries() -> list[str]:
    """Every entry: the composites, then each registered token mixer no composite uses."""
    from ... import registry

    used = {m for pattern in ENTRIES.values() for m in pattern}
    singles = [n for n in registry.list_mechanisms(layout="tokens")
               if registry.info(n).family in TOKEN_FAMILIES and n not in used]
    return list(ENTRIES) + singles


def entry_pattern(entry: str) -> tuple[str, ...]:
    """The mixers of ``entry`` (a composite, or one registered token mixer)."""
    if entry in ENTRIES:
        return ENTRIES[entry]
    from ... import registry

    return (registry.info(entry).name,)


def make_mixer(name: str, dim: int, heads: int, grid: int, last_stage: bool = False
               ) -> nn.Module:
    import spatial_attention as sa

    return sa.create(name, dim, heads, **mixer_kwargs(name, grid, last_stage))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mixer: str, grid: int, mlp_ratio: float,
                 last_stage: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        attn_seed = int(torch.randint(2**31 - 1, (), device="cpu"))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(attn_seed)
            self.mixer = make_mixer(mixer, dim, heads, grid, last_stage)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.mixer(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """``(B, H, W, C)`` -> ``(B, H/2, W/2, C')``: each 2x2 neighbourhood concatenated."""

    def __init__(self, dim: int, out: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2],
                       x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class TokenNet(nn.Module):
    """The hierarchical transformer of the module docstring; ``entry`` names its mixers."""

    def __init__(self, entry: str = "global", dims: Sequence[int] = (64, 128, 256),
                 heads: Sequence[int] = (2, 4, 8), depths: Sequence[int] = (2, 2, 2),
                 mlp_ratio: float = 2.0, num_classes: int = 10, image_size: int = 32
                 ) -> None:
        super().__init__()
        if not len(dims) == len(heads) == len(depths):
            raise ValueError("TokenNet: dims, heads and depths need one value per stage")
        pattern = entry_pattern(entry)
        self.entry = entry
        self.stem = nn.Sequential(
            nn.Conv2d(3, dims[0] // 2, 3, padding=1, bias=False),
            nn.BatchNorm2d(dims[0] // 2), nn.GELU(),
            nn.Conv2d(dims[0] // 2, dims[0], 3, stride=2, padding=1),
        )
        grid = image_size // 2
        self.grids: list[int] = []
        stages, merges = [], []
        for k, (dim, h, depth) in enumerate(zip(dims, heads, depths, strict=True)):
            if k > 0:
                merges.append(PatchMerging(dims[k - 1], dim))
                grid = (grid + 1) // 2
            self.grids.append(grid)
            last = k == len(dims) - 1
            stages.append(nn.Sequential(*[
                Block(dim, h, pattern[i % len(pattern)], grid, mlp_ratio, last)
                for i in range(depth)]))
        self.stages = nn.ModuleList(stages)
        self.merges = nn.ModuleList(merges)
        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x).permute(0, 2, 3, 1)
        for k, stage in enumerate(self.stages):
            if k > 0:
                x = self.merges[k - 1](x)
            x = stage(x)
        return self.head(self.norm(x).mean(dim=(1, 2)))


@torch.no_grad()
def attention_flops(entry: str, dim: int, heads: int, grid: int) -> int:
    """FLOPs of one image through the entry's mixer (projections included) on a
    ``grid x grid`` token grid at width ``dim``; a pattern counts its mean per block."""
    from ..bench.flops import count_flops

    total = 0
    pattern = entry_pattern(entry)
    for name in pattern:
        mixer = make_mixer(name, dim, heads, grid).eval()
        flops, _ = count_flops(mixer, torch.zeros(1, grid, grid, dim))
        total += int(flops)
    return total // len(pattern)
