"""Translate dates written by people into ISO 8601 with Bahdanau attention.

    "24 november 2026", "nov 24, 2026", "tuesday, 24/11/2026"  ->  "2026-11-24"

The classic teaching case for additive attention (Bahdanau, Cho & Bengio, ICLR 2015):
a bidirectional GRU encoder reads the characters of the input, and a GRU decoder writes
the ten characters of the ISO date one by one. Before each output character the
decoder *looks back* at the input with :class:`spatial_attention.AdditiveAttention`,
query = its previous state, keys = values = the encoder states, padded positions masked
with ``valid_lens``. After training, the alignment it learned is plain to see: writing
the year it reads the year, writing the month it reads the month name or number.

Training uses teacher forcing; evaluation decodes greedily on dates the model has never
seen (a held-out set of calendar days, each in a random format), reports exact-match
accuracy, and draws the alignment (decoder steps x input characters) of one example
with :func:`spatial_attention.viz.show_heatmaps`, read through
:func:`spatial_attention.capture_attention`.

    python examples/date_translation.py                 # about a minute on 2 CPU cores
    python examples/date_translation.py --steps 200 --out /tmp/alignment.png
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from spatial_attention import AdditiveAttention, capture_attention

# -- data: dates written in code, no download ----------------------------------------------
MONTHS = ["january", "february", "march", "april", "may", "june", "july", "august",
          "september", "october", "november", "december"]
WEEKDAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
FIRST_DAY, LAST_DAY = dt.date(1900, 1, 1), dt.date(2099, 12, 31)


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


# Day-first numeric forms only: "05/11/2026" must not be read two ways.
FORMATS = [
    lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",          # 24 november 2026
    lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",         # november 24, 2026
    lambda d: f"{MONTHS[d.month - 1][:3]} {d.day}, {d.year}",     # nov 24, 2026
    lambda d: f"{d.day} {MONTHS[d.month - 1][:3]} {d.year}",      # 24 nov 2026
    lambda d: f"{_ordinal(d.day)} of {MONTHS[d.month - 1]} {d.year}",  # 24th of november 2026
    lambda d: f"{d.day:02d}/{d.month:02d}/{d.year}",              # 24/11/2026
    lambda d: f"{d.day}.{d.month}.{d.year}",                      # 24.11.2026
    lambda d: f"{d.day:02d}-{d.month:02d}-{d.year}",              # 24-11-2026
    lambda d: f"{WEEKDAYS[d.weekday()]}, {d.day} {MONTHS[d.month - 1]} {d.year}",
    lambda d: f"{WEEKDAYS[d.weekday()][:3]} {MONTHS[d.month - 1][:3]} {d.day:02d} {d.year}",
]

PAD, BOS, EOS = 0, 1, 2
SPECIALS = ["<pad>", "<bos>", "<eos>"]


class Vocab:
    """Characters <-> ids, with ``<pad>``, ``<bos>``, ``<eos>`` first."""

    def __init__(self, chars: str) -> None:
        self.itos = SPECIALS + sorted(set(chars))
        self.stoi = {c: i for i, c in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        return [self.stoi[c] for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        out = []
        for i in ids:
            if i == EOS:
                break
            if i >= len(SPECIALS):
                out.append(self.itos[i])
        return "".join(out)


SRC = Vocab("abcdefghijklmnopqrstuvwxyz0123456789 ,./-")
TGT = Vocab("0123456789-")
TGT_LEN = len("2026-11-24") + 1  # the ISO date and <eos>


def split_days(seed: int, held_out: int) -> tuple[list[dt.date], list[dt.date]]:
    """All days 1900-2099, shuffled; the first ``held_out`` are never trained on."""
    days = [FIRST_DAY + dt.timedelta(n) for n in range((LAST_DAY - FIRST_DAY).days + 1)]
    random.Random(seed).shuffle(days)
    return days[held_out:], days[:held_out]


def make_pairs(days: Sequence[dt.date], rng: random.Random) -> list[tuple[str, str]]:
    return [(rng.choice(FORMATS)(d), d.isoformat()) for d in days]


def to_batch(pairs: Sequence[tuple[str, str]]) -> tuple[Tensor, Tensor, Tensor]:
    """Padded source ids ``(B, S)``, their lengths ``(B,)``, target ids ``(B, T)``."""
    src = [SRC.encode(s) for s, _ in pairs]
    lens = torch.tensor([len(s) for s in src])
    x = torch.full((len(src), int(lens.max())), PAD, dtype=torch.long)
    for i, s in enumerate(src):
        x[i, : len(s)] = torch.tensor(s)
    y = torch.tensor([TGT.encode(t) + [EOS] for _, t in pairs])
    return x, lens, y


# -- the model -----------------------------------------------------------------------------
class Encoder(nn.Module):
    """Bidirectional GRU over the characters: states ``(B, S, 2h)``."""

    def __init__(self, vocab: int, embed: int, hidden: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, embed, padding_idx=PAD)
        self.rnn = nn.GRU(embed, hidden, batch_first=True, bidirectional=True)

    def forward(self, x: Tensor, lens: Tensor) -> tuple[Tensor, Tensor]:
        # Packing lets the backward direction start at each sequence's real last
        # character instead of running through padding first.
        packed = pack_padded_sequence(self.embedding(x), lens.cpu(), batch_first=True,
                                      enforce_sorted=False)
        states, last = self.rnn(packed)
        states, _ = pad_packed_sequence(states, batch_first=True, total_length=x.shape[1])
        return states, last[1]  # (B, S, 2h) and the backward state at the first char (B, h)


class AttentionDecoder(nn.Module):
    """GRU decoder that attends over the encoder states before every output character.

    Bahdanau et al. 2015, appendix A.2.2: ``s_0 = tanh(W_s h_1_backward)``; at step ``i``
    the context ``c_i = sum_j a_ij h_j`` with ``a_ij = softmax_j(v^T tanh(W s_{i-1} + U
    h_j))``, then ``s_i = GRU([y_{i-1}; c_i], s_{i-1})`` and the output reads
    ``[s_i; c_i; y_{i-1}]``.
    """

    def __init__(self, vocab: int, embed: int, hidden: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, embed)
        self.init_state = nn.Linear(hidden, hidden)
        self.attention = AdditiveAttention(query_dim=hidden, key_dim=2 * hidden,
                                           hidden_dim=hidden)
        self.cell = nn.GRUCell(embed + 2 * hidden, hidden)
        self.out = nn.Linear(hidden + 2 * hidden + embed, vocab)

    def step(self, y_prev: Tensor, state: Tensor, memory: Tensor, lens: Tensor):
        e = self.embedding(y_prev)  # (B, E)
        context = self.attention(state[:, None], memory, memory, lens)[:, 0]  # (B, 2h)
        state = self.cell(torch.cat([e, context], -1), state)
        return self.out(torch.cat([state, context, e], -1)), state

    def forward(self, y_in: Tensor, memory: Tensor, first: Tensor, lens: Tensor) -> Tensor:
        """Teacher forcing: ``y_in`` ``(B, T)`` is the target shifted right (``<bos>`` first)."""
        state = torch.tanh(self.init_state(first))
        logits = []
        for t in range(y_in.shape[1]):
            out, state = self.step(y_in[:, t], state, memory, lens)
            logits.append(out)
        return torch.stack(logits, 1)  # (B, T, vocab)

    @torch.no_grad()
    def greedy(self, memory: Tensor, first: Tensor, lens: Tensor, steps: int) -> Tensor:
        state = torch.tanh(self.init_state(first))
        y = torch.full((memory.shape[0],), BOS, dtype=torch.long, device=memory.device)
        ids = []
        for _ in range(steps):
            out, state = self.step(y, state, memory, lens)
            y = out.argmax(-1)
            ids.append(y)
        return torch.stack(ids, 1)  # (B, steps)


class DateTranslator(nn.Module):
    def __init__(self, hidden: int = 64, embed: int = 32) -> None:
        super().__init__()
        self.encoder = Encoder(len(SRC), embed, hidden)
        self.decoder = AttentionDecoder(len(TGT), embed, hidden)

    def forward(self, x: Tensor, lens: Tensor, y: Tensor) -> Tensor:
        memory, first = self.encoder(x, lens)
        y_in = torch.cat([torch.full_like(y[:, :1], BOS), y[:, :-1]], 1)
        return self.decoder(y_in, memory, first, lens)

    def translate(self, x: Tensor, lens: Tensor, steps: int = TGT_LEN) -> Tensor:
        memory, first = self.encoder(x, lens)
        return self.decoder.greedy(memory, first, lens, steps)


# -- train, evaluate, draw ------------------------------------------------------------------
def evaluate(model: DateTranslator, pairs: Sequence[tuple[str, str]], batch: int = 512):
    """Exact-match accuracy of greedy decoding, and the predictions."""
    model.eval()
    preds = []
    for i in range(0, len(pairs), batch):
        x, lens, _ = to_batch(pairs[i: i + batch])
        preds += [TGT.decode(row.tolist()) for row in model.translate(x, lens)]
    correct = sum(p == t for p, (_, t) in zip(preds, pairs, strict=True))
    return correct / max(1, len(pairs)), preds


def alignment(model: DateTranslator, source: str) -> tuple[Tensor, list[str], str]:
    """Greedy translation of one source: ``(steps, source chars)`` attention, the token
    written at each step, and the translation."""
    model.eval()
    x, lens, _ = to_batch([(source, "")])
    with capture_attention(model) as maps:
        ids = model.translate(x, lens)[0].tolist()
    # The decoder's attention ran once a step; each call recorded (1, 1, S) weights.
    weights = torch.cat(maps.calls("decoder.attention"), dim=1)[0]  # (steps, S)
    n = ids.index(EOS) + 1 if EOS in ids else len(ids)
    return weights[:n], [TGT.itos[i] for i in ids[:n]], TGT.decode(ids)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1200, help="training steps (default 1200)")
    p.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    p.add_argument("--hidden", type=int, default=64, help="GRU width (default 64)")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default 3e-3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-size", type=int, default=2000,
                   help="held-out calendar days to evaluate on (default 2000)")
    p.add_argument("--example", default="tuesday, 24 november 2026",
                   help="the input whose alignment is drawn")
    p.add_argument("--out", default="date_alignment.png", help="PNG of the alignment")
    p.add_argument("--log-every", type=int, default=100)
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.hidden < 1 or args.test_size < 1:
        p.error("--steps, --batch, --hidden and --test-size must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Train, evaluate, draw. Returns the losses, the accuracy, the PNG path and timings."""
    args = parse_args(argv)
    unknown = set(args.example) - set(SRC.stoi)
    if unknown:
        raise SystemExit(f"--example has characters the model cannot read: {sorted(unknown)}")
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    train_days, test_days = split_days(args.seed, args.test_size)
    test_pairs = make_pairs(test_days, random.Random(args.seed + 1))

    model = DateTranslator(hidden=args.hidden)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps,
                                                pct_start=0.1)
    losses = []
    start = time.perf_counter()
    model.train()
    for step in range(1, args.steps + 1):
        x, lens, y = to_batch(make_pairs(rng.choices(train_days, k=args.batch), rng))
        logits = model(x, lens, y)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=PAD)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if args.log_every and (step % args.log_every == 0 or step == args.steps):
            print(f"step {step:5d}  loss {loss.item():.4f}  "
                  f"{time.perf_counter() - start:6.1f}s")
    train_s = time.perf_counter() - start

    accuracy, preds = evaluate(model, test_pairs)
    print(f"held-out accuracy: {accuracy:.2%} exact match on {len(test_pairs)} unseen dates "
          f"(trained {args.steps} steps in {train_s:.1f}s)")
    for (src, tgt), pred in list(zip(test_pairs, preds, strict=True))[:5]:
        print(f"  {src:<34} -> {pred:<10} {'ok' if pred == tgt else 'expected ' + tgt}")
    wrong = [(s, t, p) for (s, t), p in list(zip(test_pairs, preds, strict=True))[5:] if p != t]
    for src, tgt, pred in wrong[:5]:
        print(f"  miss: {src:<28} -> {pred:<10} expected {tgt}")

    from spatial_attention.viz import show_heatmaps

    weights, out_labels, translation = alignment(model, args.example)
    show_heatmaps(
        weights[None, None], xlabel="input characters", ylabel="output characters",
        titles=[f"{args.example!r} -> {translation}"],
        figsize=(0.28 * len(args.example) + 1.8, 0.28 * len(out_labels) + 1.6),
        xticklabels=[c if c != " " else "\u2423" for c in args.example],
        yticklabels=out_labels,
        out=args.out,
    )
    print(f"alignment of {args.example!r} -> {translation!r} written to {args.out}")
    return {"losses": losses, "accuracy": accuracy, "out": args.out, "train_seconds": train_s,
            "translation": translation}


if __name__ == "__main__":
    main()
