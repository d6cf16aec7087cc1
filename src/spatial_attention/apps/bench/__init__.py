"""The cost harness (``spatial-attention bench``): parameters, FLOPs, time and memory.

:mod:`.bench` runs mechanisms and writes tables and plots, :mod:`.flops` counts FLOPs
(with the formulas PyTorch lacks or gets wrong), :mod:`.memory` tracks peak live tensor
bytes on CPU. The tests use the last two to hold the paper models to their tables.
"""

from .bench import (
    CSV_COLUMNS,
    DEFAULT_BATCH,
    DEFAULT_CHANNELS,
    DEFAULT_SIZE,
    DTYPES,
    BenchResult,
    add_arguments,
    benchmark,
    format_table,
    forward_case,
    interleaved_times,
    keep_freed_memory,
    plot,
    profile_table,
    run,
    train_case,
    write_csv,
)
from .flops import count_flops
from .memory import TensorMemoryTracker, peak_memory_bytes

__all__ = [
    "CSV_COLUMNS",
    "DEFAULT_BATCH",
    "DEFAULT_CHANNELS",
    "DEFAULT_SIZE",
    "DTYPES",
    "BenchResult",
    "TensorMemoryTracker",
    "add_arguments",
    "benchmark",
    "count_flops",
    "format_table",
    "forward_case",
    "interleaved_times",
    "train_case",
    "keep_freed_memory",
    "peak_memory_bytes",
    "plot",
    "profile_table",
    "run",
    "write_csv",
]
