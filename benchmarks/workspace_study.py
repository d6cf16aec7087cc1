"""Sort-of-CLEVR: Transformer (TR) vs Transformer with a shared workspace (TR + HSW).

Both models are built by ``spatial_attention.models`` (``vanilla_transformer``,
``workspace_transformer``) with the same width, depth, heads, FFN and shared layers, and
trained on the same generated data in the same order (same seed), with the same optimiser
and budget. Accuracy is reported per question kind (non-relational, relational, ternary)
and per subtype on a held-out set generated with another seed. One JSON line per
evaluation is appended to ``--out`` as training goes, so a cut-off run keeps its results.

The defaults are the paper's run (``shared_workspace/sort_of_clevr/run_transformer.sh``:
dim 256, 4 steps, shared layers, 8 slots, top-k 5, batch 64, Adam 1e-4, 100 epochs over
9,800 images x 30 questions). The recorded CPU pilot in ``workspace.md`` is far smaller;
its command is written there.

    python benchmarks/workspace_study.py --device cuda            # the full run
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from spatial_attention.apps.sort_of_clevr import KINDS, SUBTYPES, generate
from spatial_attention.models import create_model


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["vanilla_transformer", "workspace_transformer"])
    p.add_argument("--train-images", type=int, default=9800)
    p.add_argument("--test-images", type=int, default=200)
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS,
                   help="question kinds to train and test on (default: all three)")
    p.add_argument("--epochs", type=float, default=100, help="passes over the questions")
    p.add_argument("--eval-every", type=float, default=1.0, help="epochs between evaluations")
    p.add_argument("--max-minutes", type=float, default=None, help="stop a model after this")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--ffn-dim", type=int, default=512)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--normalize", choices=["channel", "none"], default="channel",
                   help="channel: subtract the training images' per-channel mean and divide "
                   "by their std (default); none: pixels / 255 as the reference feeds them")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/workspace_study/results.jsonl")
    p.add_argument("--summarize", nargs="+", metavar="JSONL",
                   help="print a Markdown table of these result files and exit")
    return p.parse_args(argv)


def summarize(paths) -> str:
    """Accuracy per kind and subtype, one row per (model, evaluation), in Markdown."""
    rows = [json.loads(line) for p in paths for line in Path(p).read_text().splitlines()]
    cols = ["overall"] + [c for k in KINDS for c in (k, *(f"{k}/{s}" for s in SUBTYPES[k]))]
    short = {c: c.replace("non_relational", "non-rel").replace("relational", "rel") for c in cols}
    out = ["| model | params | epochs | samples | minutes | train loss | "
           + " | ".join(short[c] for c in cols) + " |",
           "|---" * (6 + len(cols)) + "|"]
    for r in sorted(rows, key=lambda r: (r["epochs"], r["model"])):
        acc = r["accuracy"]
        out.append(
            f"| {r['model']} | {r['params']:,} | {r['epochs']} | {r['samples']:,} | "
            f"{r['minutes']} | {r['train_loss']} | "
            + " | ".join(f"{100 * acc[c]:.1f}" if c in acc else "" for c in cols) + " |"
        )
    return "\n".join(out)


class Pixels:
    """uint8 images -> model input: ``/ 255``, then (``channel``) the training set's
    per-channel standardisation. On the white canvas the raw ``[0, 1]`` input makes every
    patch token nearly the same vector; the CPU pilots with it never left the
    question-only plateau (see workspace.md), standardised ones did."""

    def __init__(self, train_images, mode: str) -> None:
        self.mean = self.std = None
        if mode == "channel":
            x = train_images.float().div_(255)
            self.mean = x.mean((0, 2, 3), keepdim=True)
            self.std = x.std((0, 2, 3), keepdim=True)

    def __call__(self, images, device):
        x = images.to(device).float().div_(255)
        if self.mean is not None:
            x = (x - self.mean.to(device)) / self.std.to(device)
        return x


@torch.no_grad()
def evaluate(model, data, device, pixels, batch_size=500) -> dict:
    model.eval()
    index, questions, answers, kinds = data.flat()
    subtypes = data.subtypes.reshape(-1)
    correct = torch.zeros_like(answers, dtype=torch.bool)
    for s in range(0, len(index), batch_size):
        sl = slice(s, s + batch_size)
        images = pixels(data.images[index[sl]], device)
        logits = model(images, questions[sl].to(device))
        correct[sl] = logits.argmax(-1).cpu() == answers[sl]
    result = {"overall": correct.float().mean().item()}
    for k, kind in enumerate(KINDS):
        sel = kinds == k
        if sel.any():
            result[kind] = correct[sel].float().mean().item()
            for s, sub in enumerate(SUBTYPES[kind]):
                both = sel & (subtypes == s)
                if both.any():
                    result[f"{kind}/{sub}"] = correct[both].float().mean().item()
    model.train()
    return result


def run_model(name, args, train, test, out) -> None:
    pixels = Pixels(train.images, args.normalize)
    torch.manual_seed(args.seed)
    kwargs = dict(dim=args.dim, ffn_dim=args.ffn_dim, depth=args.depth, num_heads=args.heads,
                  dropout=args.dropout)
    if name == "workspace_transformer":
        kwargs.update(num_slots=args.slots, top_k=args.top_k)
    model = create_model(name, **kwargs).to(args.device)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    index, questions, answers, _ = train.flat()
    n = len(index)
    steps_per_epoch = n // args.batch_size
    total = int(args.epochs * steps_per_epoch)
    eval_every = max(1, int(args.eval_every * steps_per_epoch))
    gen = torch.Generator().manual_seed(args.seed)  # the same batches for every model
    order = torch.randperm(n, generator=gen)
    start, losses, step = time.perf_counter(), [], 0
    model.train()
    while step < total:
        pos = (step % steps_per_epoch) * args.batch_size
        if step and pos == 0:
            order = torch.randperm(n, generator=gen)
        b = order[pos : pos + args.batch_size]
        images = pixels(train.images[index[b]], args.device)
        loss = F.cross_entropy(model(images, questions[b].to(args.device)),
                               answers[b].to(args.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        step += 1
        minutes = (time.perf_counter() - start) / 60
        out_of_time = args.max_minutes is not None and minutes >= args.max_minutes
        if step % eval_every == 0 or step == total or out_of_time:
            acc = evaluate(model, test, args.device, pixels)
            row = {
                "model": name, "params": params, "step": step,
                "epochs": round(step / steps_per_epoch, 3),
                "samples": step * args.batch_size, "minutes": round(minutes, 2),
                "train_loss": round(sum(losses[-eval_every:]) / len(losses[-eval_every:]), 4),
                "accuracy": {k: round(v, 4) for k, v in acc.items()},
                "config": {k: v for k, v in vars(args).items() if k != "models"},
            }
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps({k: row[k] for k in ("model", "epochs", "minutes", "train_loss")}
                             | {"acc": {k: v for k, v in row["accuracy"].items()
                                        if "/" not in k}}), flush=True)
        if out_of_time:
            break


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize))
        return
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    kinds = tuple(args.kinds)
    train = generate(args.train_images, seed=args.seed, kinds=kinds)
    test = generate(args.test_images, seed=args.seed + 10_000, kinds=kinds)
    print(f"generated {len(train)} + {len(test)} images in {time.perf_counter() - t:.1f}s",
          flush=True)
    for name in args.models:
        run_model(name, args, train, test, out)


if __name__ == "__main__":
    main()
