"""Outputs of every mechanism and paper model, before and after a refactor, on fixed seeds.

    git worktree add /tmp/before <REV>
    python benchmarks/equivalence.py --before /tmp/before/src [--out benchmarks/equivalence.md]

Each side runs in its own process with its own ``src`` first on ``sys.path``: for every
registered mechanism, its example module and input (seed 0, batch 2, 16 channels,
5 x 3 and 9 x 13 maps) give the eval output and the input gradient of a fixed weighted
sum; a few small models give their logits. The two sets are compared tensor by tensor
(maximum absolute difference), and the table says which are bit-identical and which
differ by more than ``--tol``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("swin_micro_cifar", "twins_svt_micro_cifar", "boat_swin_micro_cifar",
          "resnet18_cifar", "nbnet_small")

_CHILD = r"""
import sys, warnings
import torch
warnings.simplefilter("ignore")
torch.set_num_threads(1)
import spatial_attention as sa
from spatial_attention.models import create_model
out = {}
for name in sa.list_mechanisms():
    for size in ((5, 3), (9, 13)):
        torch.manual_seed(0)
        module, inputs = sa.info(name).cls.example(name, 2, 16, size)
        module = module.eval()
        xs = tuple(t.clone().requires_grad_() for t in inputs)
        y = module(*xs)
        w = torch.linspace(-1, 1, y.numel()).view_as(y)
        (y * w).sum().backward()
        out[f"{name}@{size[0]}x{size[1]}"] = y.detach()
        out[f"{name}@{size[0]}x{size[1]}:grad"] = xs[0].grad
for name in MODELS:
    torch.manual_seed(0)
    model = create_model(name).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out[f"model:{name}"] = model(x)
torch.save(out, sys.argv[1])
"""


def _run(src: Path | None, path: Path) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if src is not None:
        env["PYTHONPATH"] = str(src)
    code = f"MODELS = {MODELS!r}\n" + _CHILD
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, env=env,
                   cwd=tempfile.gettempdir())
    import torch

    return torch.load(path, weights_only=True)


def compare(before: dict, after: dict, tol: float) -> list[dict]:
    rows = []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        if a is None or b is None:
            rows.append({"case": key, "status": "only " + ("after" if a is None else "before"),
                         "max_abs": ""})
            continue
        if a.shape != b.shape:
            rows.append({"case": key, "status": f"shape {tuple(a.shape)} -> {tuple(b.shape)}",
                         "max_abs": ""})
            continue
        diff = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
        status = "identical" if diff == 0 else ("within tol" if diff <= tol else "DIFFERS")
        rows.append({"case": key, "status": status, "max_abs": f"{diff:.3g}"})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, type=Path, help="src/ of the earlier version")
    p.add_argument("--after", type=Path, default=ROOT / "src", help="src/ of this version")
    p.add_argument("--tol", type=float, default=1e-6)
    p.add_argument("--out", type=Path, help="write the table (markdown) here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        before = _run(args.before.resolve(), Path(tmp) / "before.pt")
        after = _run(args.after.resolve(), Path(tmp) / "after.pt")
    rows = compare(before, after, args.tol)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("identical", "within tol")}
    new = [r for r in rows if r["status"] == "only after"]  # mechanisms added since
    bad = [r for r in rows if r["status"] not in ("identical", "within tol", "only after")]
    lines = [f"{len(rows) - len(new)} tensors in both: {counts['identical']} bit-identical, "
             f"{counts['within tol']} within {args.tol:g}, {len(bad)} beyond; "
             f"{len(new)} new (mechanisms added since)", "",
             "| case | status | max abs diff |", "|---|---|---|"]
    lines += [f"| {r['case']} | {r['status']} | {r['max_abs']} |"
              for r in rows if r["status"] not in ("identical", "only after")]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    print(json.dumps({"beyond_tol": [r["case"] for r in bad]}))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
