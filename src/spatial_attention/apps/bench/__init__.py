"""The cost harness (``spatial-attention bench``): parameters, FLOPs, time and memory.

:mod:`.bench` runs mechanisms and whole models (plan and time estimate first) and writes
tables and plots, :mod:`.flops` counts FLOPs (with the formulas PyTorch lacks or gets
wrong), :mod:`.memory` tracks peak live tensor bytes on CPU. The tests use the last two
to hold the paper models to their tables.
"""

from .bench import (
    CSV_COLUMNS,
    DEFAULT_BATCH,
    DEFAULT_CHANNELS,
    DEFAULT_MODEL_BATCH,
    DEFAULT_SIZE,
    DTYPES,
    BenchPlan,
    BenchResult,
    Estimate,
    Target,
    add_arguments,
    benchmark,
    check_output_path,
    estimate,
    format_table,
    forward_case,
    interleaved_times,
    keep_freed_memory,
    make_plan,
    plot,
    profile_table,
    ratio_table,
    resolve_target,
    run,
    run_plan,
    train_case,
    write_csv,
)
from .flops import count_flops
from .memory import TensorMemoryTracker, peak_memory_bytes

__all__ = [
    "CSV_COLUMNS",
    "DEFAULT_BATCH",
    "DEFAULT_CHANNELS",
    "DEFAULT_MODEL_BATCH",
    "DEFAULT_SIZE",
    "DTYPES",
    "BenchPlan",
    "BenchResult",
    "Estimate",
    "Target",
    "TensorMemoryTracker",
    "add_arguments",
    "benchmark",
    "check_output_path",
    "count_flops",
    "estimate",
    "format_table",
    "forward_case",
    "interleaved_times",
    "ratio_table",
    "train_case",
    "keep_freed_memory",
    "make_plan",
    "peak_memory_bytes",
    "plot",
    "profile_table",
    "resolve_target",
    "run",
    "run_plan",
    "write_csv",
]
