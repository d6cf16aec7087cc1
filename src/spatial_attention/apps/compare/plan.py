"""What a compare queue has left, and about how long it will take (``compare --plan``).

The queue is several CPU-hours and is run over several sittings, so before it trains
(and alone, with ``--plan``) the command says, per entry, how many runs are finished,
which one resumes and from which step, how many are still to start, and the time their
training steps should take. The rate comes from the folder's timing pass
(``timing.csv``: interleaved on a quiet machine, the trustworthy source) when it has the
entry, else from the entry's finished runs (measured under whatever load they shared
the machine with), else it is unknown and said to be.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import UsageError
from ..training.checkpoints import CHECKPOINT_DIR, load_state
from .runner import read_result
from .timing import read_timing

__all__ = ["EntryPlan", "plan_queue", "format_plan"]


@dataclass
class EntryPlan:
    """One entry's share of the queue."""

    name: str
    batch_size: int
    seeds: int = 0
    finished: int = 0
    resuming: list[tuple[int, int]] = field(default_factory=list)  #: (seed, steps done)
    to_start: int = 0
    steps_left: int = 0
    img_s: float | None = None
    rate_from: str = ""  #: "timing pass, T threads", "its N finished run(s)" or ""

    @property
    def seconds(self) -> float | None:
        """Time the steps left should take at ``img_s`` (None without a rate)."""
        return None if self.img_s is None else self.steps_left * self.batch_size / self.img_s


def _steps_done(run_dir: Path) -> int:
    """Steps an interrupted run has behind it (0 when its state cannot be read)."""
    state = run_dir / CHECKPOINT_DIR / "state.pt"
    if not state.is_file():
        return 0
    try:
        return int(load_state(state).get("step", 0))
    except (UsageError, TypeError, ValueError):
        return 0


def plan_queue(out: str | Path, queue: Sequence[tuple[str, int]], steps_per_run: int,
               batch_size: int) -> list[EntryPlan]:
    """Per entry (in queue order), what is finished, resuming and left of ``queue``.

    ``queue`` holds the ``(entry, seed)`` pairs the command would run, ``steps_per_run``
    and ``batch_size`` are the protocol's."""
    out = Path(out)
    timing = read_timing(out)
    plans: dict[str, EntryPlan] = {}
    for name, seed in queue:
        plan = plans.get(name)
        if plan is None:
            plan = plans[name] = EntryPlan(name, batch_size)
        plan.seeds += 1
        run_dir = out / "runs" / name / f"seed{seed}"
        result = read_result(run_dir)
        if result is not None:
            plan.finished += 1
            continue
        done = _steps_done(run_dir)
        if done:
            plan.resuming.append((seed, done))
        else:
            plan.to_start += 1
        plan.steps_left += max(steps_per_run - done, 0)
    for plan in plans.values():
        row = timing.get(plan.name)
        if row is not None:
            plan.img_s = float(row["train_img_s"])
            plan.rate_from = f"timing pass, {row.get('threads', '?')} threads"
            continue
        rates = []
        for seed in range(plan.seeds):  # queue seeds are 0..n-1
            result = read_result(out / "runs" / plan.name / f"seed{seed}")
            if result is not None and result.get("train_img_s"):
                rates.append(float(result["train_img_s"]))
        if rates:
            plan.img_s = sum(rates) / len(rates)
            plan.rate_from = f"its {len(rates)} finished run(s)"
    return list(plans.values())


def _hours(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


def format_plan(plans: Sequence[EntryPlan], steps_per_run: int) -> list[str]:
    """The plan as printed lines: one per entry with work left, then a total."""
    runs = sum(p.seeds for p in plans)
    finished = sum(p.finished for p in plans)
    resuming = sum(len(p.resuming) for p in plans)
    to_start = sum(p.to_start for p in plans)
    lines = [f"plan: {runs} runs in the queue: {finished} finished, {resuming} to resume, "
             f"{to_start} to start ({steps_per_run} steps each)"]
    known, unknown = 0.0, []
    for p in plans:
        if not p.steps_left:
            continue
        parts = []
        if p.finished:
            parts.append(f"{p.finished} finished")
        parts += [f"seed {s} resumes at step {d}" for s, d in p.resuming]
        if p.to_start:
            parts.append(f"{p.to_start} to start")
        if p.seconds is None:
            cost = "time unknown (no timing pass or finished run)"
            unknown.append(p.name)
        else:
            known += p.seconds
            cost = f"about {_hours(p.seconds)} at {p.img_s:.0f} img/s ({p.rate_from})"
        lines.append(f"  {p.name}: {', '.join(parts)}; {cost}")
    if not to_start and not resuming:
        lines.append("  nothing left to train")
        return lines
    total = f"about {_hours(known)} of training steps"
    if unknown:
        total += (f" for the entries with a rate, plus {len(unknown)} without one "
                  "(`--timing` gives every entry a rate)")
    lines.append(f"  total: {total}; a lower bound: evaluation, checkpoints and a shared "
                 "CPU add to it")
    return lines
