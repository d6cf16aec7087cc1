"""The timing pass of ``spatial-attention compare --timing``: throughput measured apart
from the training runs.

The queue's runs take hours, on a machine that other jobs share, so the img/s each run
records is partly a measure of the load at the time. This pass builds every entry of
the table at once and times them round by round, interleaved (entry A, B, C, then A, B,
C again), so that a load change hits every entry alike; it keeps each entry's best
round (the least disturbed one) and its ratio to the baseline measured the same way.

What is timed: ``steps`` training steps (forward, backward, optimiser step on the
protocol's normalised, augmented batches of epoch 0; not the lookahead averaging or the
checkpoint writes) after one untimed step, and the evaluation of ``infer_images`` test
images with the protocol's test-time augmentation (every view counted as an image).
The result goes to ``<out>/timing.csv``; the summary tables then take their img/s from
it and say so under the table.
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .data import Cifar, augment, epoch_batches, flip_mask, normalise
from .runner import Protocol, _stats, _sync, build_model, evaluate
from .runner import _optimizer as cnn_optimizer

__all__ = ["TIMING_NAME", "TIMING_FIELDS", "timing_pass", "read_timing", "timing_note"]

TIMING_NAME = "timing.csv"
TIMING_FIELDS = ("mechanism", "train_img_s", "infer_img_s", "train_vs_baseline",
                 "infer_vs_baseline", "rounds", "steps", "threads", "device", "load_before")


def _build(entry: str, p: Any, data: Cifar, mean: torch.Tensor, std: torch.Tensor,
           device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer, str]:
    """The entry's network at seed 0, its protocol's optimiser, and the loss reduction."""
    if isinstance(p, Protocol):
        model = build_model(entry, p, data, mean, std, 0, device)
        return model, cnn_optimizer(model, p), "sum"
    from .token_runner import _optimizer as token_optimizer
    from .token_runner import build_token_model

    model = build_token_model(entry, p, len(data.classes), 0, device)
    return model, token_optimizer(model, p), "mean"


def timing_pass(entries: list[str], protocol: Any, data: Cifar, device: torch.device,
                baseline: str, rounds: int = 3, steps: int = 3,
                infer_images: int = 1000) -> list[dict[str, Any]]:
    """Rows of ``TIMING_FIELDS``, one per entry (see the module docstring)."""
    if rounds < 1 or steps < 1 or infer_images < 1:
        raise ValueError(f"timing: rounds, steps and infer_images must be >= 1, got "
                         f"{rounds}, {steps}, {infer_images}")
    p = protocol
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    mean, std = (t.to(device) for t in _stats(data))
    built = {e: _build(e, p, data, mean, std, device) for e in entries}
    for _, opt, _ in built.values():  # the warm-up factor of step 0: small, stable steps
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * 0.2
    batches = list(itertools.islice(
        epoch_batches(len(data.train_y), p.batch_size, 0, 0, p.translate), steps + 1))
    flips = flip_mask(len(data.train_y), 0, 0).to(device)
    xs = [augment(normalise(data.train_x[i.to(device)], mean, std), dy, dx,
                  flips[i.to(device)], p.translate) for i, dy, dx in batches]
    ys = [data.train_y[i.to(device)] for i, _, _ in batches]
    n_test = min(infer_images, len(data.test_y))
    test_x, test_y = data.test_x[:n_test], data.test_y[:n_test]

    def train_steps(entry: str, which: range) -> None:
        model, opt, reduction = built[entry]
        model.train()
        for k in which:
            k %= len(xs)  # a small training set has fewer batches than steps
            loss = F.cross_entropy(model(xs[k]), ys[k], label_smoothing=p.label_smoothing,
                                   reduction=reduction)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    best_train = dict.fromkeys(entries, float("inf"))
    best_infer = dict.fromkeys(entries, 0.0)
    for e in entries:  # one untimed step each: allocator and kernel caches warm
        train_steps(e, range(0, 1))
    for _ in range(rounds):
        for e in entries:
            _sync(device)
            t0 = time.perf_counter()
            train_steps(e, range(1, steps + 1))
            _sync(device)
            best_train[e] = min(best_train[e], time.perf_counter() - t0)
            _, img_s = evaluate(built[e][0], test_x, test_y, mean, std,
                                batch=min(1000, n_test), tta=p.tta)
            best_infer[e] = max(best_infer[e], img_s)
    train_img_s = {e: steps * p.batch_size / max(best_train[e], 1e-9) for e in entries}
    rows = []
    for e in entries:
        row = {"mechanism": e, "train_img_s": train_img_s[e], "infer_img_s": best_infer[e],
               "train_vs_baseline": "", "infer_vs_baseline": "", "rounds": rounds,
               "steps": steps, "threads": torch.get_num_threads(), "device": str(device),
               "load_before": f"{load:.2f}"}
        if baseline in entries:
            row["train_vs_baseline"] = train_img_s[e] / train_img_s[baseline]
            row["infer_vs_baseline"] = best_infer[e] / best_infer[baseline]
        rows.append(row)
    return rows


def read_timing(out: str | Path) -> dict[str, dict[str, str]]:
    """``timing.csv`` of a compare folder by mechanism (empty when there is none)."""
    from ..training.reporting import read_csv_rows

    path = Path(out) / TIMING_NAME
    return {r["mechanism"]: r for r in read_csv_rows(path)} if path.is_file() else {}


def timing_note(timing: dict[str, dict[str, str]]) -> str:
    """The line under a summary table whose img/s come from the timing pass (or passes:
    a pass over some entries keeps the other entries' rows of an earlier one; the load
    average at each pass's start tells them apart)."""
    r = next(iter(timing.values()))
    loads = sorted({row["load_before"] for row in timing.values()})
    if len(loads) == 1:
        when = f"load average {loads[0]} at its start"
    else:
        when = (f"rows from {len(loads)} passes (load averages {', '.join(loads)} at their "
                "starts; each entry's ratio is to the baseline of its own pass, so compare "
                "ratios rather than img/s across passes)")
    return (f"img/s from the separate timing pass (`--timing`): every entry built at once "
            f"and timed interleaved, best of {r['rounds']} rounds of {r['steps']} training "
            f"steps and one evaluation (the protocol's test-time augmentation, if any) each, "
            f"{r['threads']} thread(s) on {r['device']}, "
            f"{when}; timing.csv has the ratios to the baseline.")
