"""Copying task: LSTM vs RIMs (attention) vs RIMs + shared workspace, equal parameters.

    python benchmarks/rims_study.py --threads 1 --out benchmarks/rims_study/copying.jsonl
    python benchmarks/rims_study.py --summarize benchmarks/rims_study/copying.jsonl

The copying task of the RIMs paper (Goyal et al. ICLR 2021, Sec. 4.1), generated here:
``S`` symbols drawn from 8, then ``gap`` blanks whose last is a delimiter, then ``S``
blanks; the target is blank everywhere but the last ``S`` steps, which must repeat the
symbols. Cross-entropy over every step (as the paper); reported: the accuracy on the
copied symbols (chance 1/8) and the fraction of sequences copied exactly, at the training
gap and at a longer one (the paper trains at 50 and tests at 200). Every model sees the
same batches in the same order for a fixed number of steps; a CPU-time cap stops a run
early (recorded). Sizes are picked for about 49.5k parameters each (printed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from spatial_attention.layers.rims import RIMs

SYMBOLS, BLANK, DELIM = 8, 0, 9
VOCAB, CLASSES = 10, 9  # inputs: blank, 8 symbols, delimiter; outputs: blank, 8 symbols


def copying_batch(batch: int, symbols: int, gap: int, gen: torch.Generator):
    """``(B, S + gap + S)`` input tokens and targets."""
    seq = torch.randint(1, SYMBOLS + 1, (batch, symbols), generator=gen)
    T = symbols + gap + symbols
    x = torch.full((batch, T), BLANK)
    x[:, :symbols] = seq
    x[:, symbols + gap - 1] = DELIM
    y = torch.full((batch, T), BLANK)
    y[:, -symbols:] = seq
    return x, y


class Model(nn.Module):
    """One-hot tokens -> recurrent core -> linear readout at every step."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        if kind == "lstm":
            self.core, width = nn.LSTM(VOCAB, 104, batch_first=True), 104
        elif kind == "rims":
            self.core = RIMs(VOCAB, 20, 6, 4, input_key_size=16, input_value_size=40,
                             comm_key_size=16, num_comm_heads=2)
            width = 120
        elif kind == "rims_workspace":
            self.core = RIMs(VOCAB, 24, 6, 4, communication="workspace", input_key_size=16,
                             input_value_size=40,
                             workspace=dict(num_heads=2, num_slots=4, top_k=2, key_dim=8))
            width = 144
        else:
            raise ValueError(f"unknown model {kind!r}")
        self.state_size = width
        self.head = nn.Linear(width, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = F.one_hot(tokens, VOCAB).float()
        h = self.core(x)[0] if self.kind == "lstm" else self.core(x)
        return self.head(h)


@torch.no_grad()
def evaluate(model: Model, data) -> dict:
    model.eval()
    x, y = data
    logits = model(x)
    S = evaluate.symbols
    pred = logits[:, -S:].argmax(-1)
    correct = pred == y[:, -S:]
    model.train()
    return {"loss": F.cross_entropy(logits.flatten(0, 1), y.flatten()).item(),
            "symbol_acc": correct.float().mean().item(),
            "sequence_acc": correct.all(-1).float().mean().item()}


def run(args, kind: str, seed: int, out) -> None:
    torch.manual_seed(seed)
    model = Model(kind)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    data_gen = torch.Generator().manual_seed(1000 + seed)  # same batches for every model
    test_gen = torch.Generator().manual_seed(99)
    evaluate.symbols = args.symbols
    tests = {gap: copying_batch(args.test_size, args.symbols, gap, test_gen)
             for gap in args.test_gaps}
    cpu0, wall0 = time.process_time(), time.perf_counter()
    losses = []
    for step in range(1, args.steps + 1):
        x, y = copying_batch(args.batch, args.symbols, args.gap, data_gen)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        losses.append(loss.item())
        cpu = time.process_time() - cpu0
        stop = cpu > args.max_cpu_minutes * 60
        if step % args.eval_every == 0 or step == args.steps or stop:
            record = {"model": kind, "seed": seed, "params": params,
                      "state": model.state_size, "step": step,
                      "train_loss": statistics.mean(losses[-50:]),
                      "cpu_s": round(cpu, 1), "wall_s": round(time.perf_counter() - wall0, 1),
                      "stopped_by_cpu_cap": stop}
            for gap, data in tests.items():
                record.update({f"gap{gap}_{k}": v for k, v in evaluate(model, data).items()})
            print(json.dumps(record), flush=True)
            out.write(json.dumps(record) + "\n")
            out.flush()
        if stop:
            break


def summarize(path: str) -> None:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line]
    final = {}
    for r in rows:  # the last record of each run
        final[(r["model"], r["seed"])] = r
    gaps = sorted({int(k[3:].split("_")[0]) for k in rows[0] if k.startswith("gap")})
    head = ["model", "params", "state", "seeds", "steps", "CPU s / run", "train loss"]
    head += [f"gap {g}: symbol acc %" for g in gaps] + [f"gap {g}: exact %" for g in gaps]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for model in dict.fromkeys(m for m, _ in final):
        runs = [r for (m, _), r in final.items() if m == model]

        def cell(key, scale=100.0, fmt="{:.1f}", runs=runs):
            vals = [r[key] * scale for r in runs]
            each = ", ".join(fmt.format(v) for v in vals)
            return f"{fmt.format(statistics.mean(vals))} ({each})"

        line = [model, str(runs[0]["params"]), str(runs[0]["state"]),
                ", ".join(str(r["seed"]) for r in runs),
                ", ".join(str(r["step"]) for r in runs),
                ", ".join(f"{r['cpu_s']:.0f}" for r in runs),
                cell("train_loss", 1.0, "{:.3f}")]
        line += [cell(f"gap{g}_symbol_acc") for g in gaps]
        line += [cell(f"gap{g}_sequence_acc") for g in gaps]
        print("| " + " | ".join(line) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="lstm,rims,rims_workspace")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--symbols", type=int, default=3)
    p.add_argument("--gap", type=int, default=10)
    p.add_argument("--test-gaps", type=int, nargs="+", default=[10, 30])
    p.add_argument("--test-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--max-cpu-minutes", type=float, default=6.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/rims_study/copying.jsonl")
    p.add_argument("--summarize", default=None, help="print the table of a results file")
    args = p.parse_args()
    if args.summarize:
        summarize(args.summarize)
        return
    torch.set_num_threads(args.threads)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as out:
        for seed in (int(s) for s in args.seeds.split(",")):
            for kind in args.models.split(","):
                run(args, kind, seed, out)


if __name__ == "__main__":
    main()
