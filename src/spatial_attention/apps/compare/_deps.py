"""The shared helpers compare uses, from wherever they live.

The checkpoint, CSV, FLOP and memory helpers are moving from the package root into
``apps/training`` and ``apps/bench`` while this app is written; importing them here,
new home first, keeps compare working on either side of that move. Once the move has
landed the fallbacks can go.
"""

from __future__ import annotations

try:
    from ..training.checkpoints import (
        CHECKPOINT_DIR, get_rng_state, load_state, save_checkpoint, set_rng_state,
    )
    from ..training.reporting import write_csv_rows
except ImportError:  # the layout before the move
    from ...checkpoint import (  # type: ignore[no-redef]
        CHECKPOINT_DIR, get_rng_state, load_state, save_checkpoint, set_rng_state,
        write_csv_rows,
    )
from ...checkpoint import read_weights

try:
    from ..bench.flops import count_flops
    from ..bench.memory import peak_memory_bytes
except ImportError:
    from ...flops import count_flops  # type: ignore[no-redef]
    from ...memory import peak_memory_bytes  # type: ignore[no-redef]

__all__ = [
    "CHECKPOINT_DIR", "count_flops", "get_rng_state", "load_state", "peak_memory_bytes",
    "read_weights", "save_checkpoint", "set_rng_state", "write_csv_rows",
]
