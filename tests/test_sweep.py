"""A seeded random sweep over every registered mechanism: what a new user may send.

Valid inputs (batch 1-3; H and W from 1 to 40, primes, 1xN and Nx1; channel and head
counts and constructor options the signature allows) must give the documented shape and
dtype, finite; the fast path equals the explicit one; train-mode no_grad, inference_mode
and grad mode agree, and a training call still works after an inference_mode call;
channels_last and non-contiguous inputs agree; float64 runs and agrees; bf16 autocast
stays near fp32. Malformed inputs (rank, channels, dtype, empty, NaN, valid_lens, views)
give a ValueError naming the mechanism (TypeError for non-tensors), or NaN propagates;
never an error from inside torch.

Budget: ``SA_SWEEP_CASES`` valid cases per mechanism (default 6, about 20 s for the
registry on 2 cores); ``pytest --sweep-long`` runs 10x more. ``SA_SWEEP_SEED`` changes
the draw. Each case's description is in the assertion message, so a failure replays.
"""

from __future__ import annotations

import inspect
import os
import random

import pytest
import torch

import spatial_attention as sa
from spatial_attention import explicit_path

NAMES = sa.list_mechanisms()
SEED = int(os.environ.get("SA_SWEEP_SEED", "2026"))
SIZES = [1, 2, 3, 5, 7, 8, 11, 13, 16, 17, 23, 31, 37, 40]
CHANNELS = [8, 16, 24, 32, 48]
# constructor options varied where a mechanism's signature has them; a combination the
# constructor rejects with a ValueError is a documented refusal, not a failure
OPTIONS: dict[str, list] = {
    "window_size": [2, 3, 4, 7],
    "shift_size": [0, 1, 2, 3],
    "shift": [0, 1, 2],
    "group_size": [3, 4, 8, 16],
    "overlap": [0, 1, 2],
    "split_size": [1, 2, 3, 7],
    "reduction": [1, 2, 4, 16],
    "rate": [2, 4],
    "sr_ratio": [1, 2, 3],
    "kv_stride": [1, 2],
    "spatial_range": [-1, 2],
    "attention_type": ["1111", "1000", "0100", "0010", "0001", "1010", "0110", "0011"],
    "deform_groups": [1, 2],
    "dilation": [1, 2],
    "num_views": [2, 3],
    "num_bases": [2, 4, 16],
    "num_slots": [2, 8],
    "top_k": [1, 3, 5],
    "dilations": [(1, 2), (1, 3)],
}
# BOAT's clustering is a discrete choice: a change of precision can move a token across
# a genuine near-tie, so cross-precision checks compare these only for finiteness
CLUSTERING = {"fsla", "bilateral_local_attention"}


def _cases() -> int:
    return int(os.environ.get("SA_SWEEP_CASES", "6"))


@pytest.fixture
def cases(request) -> int:  # noqa: D401 - the number of valid cases per mechanism
    return _cases() * (10 if request.config.getoption("--sweep-long") else 1)


def _draw(name: str, rng: random.Random, max_area: int = 640) -> dict:
    info = sa.info(name)
    params = inspect.signature(info.cls.__init__).parameters
    C = rng.choice(CHANNELS)
    options = {k: rng.choice(v) for k, v in OPTIONS.items() if k in params}
    if info.layout in ("tokens",) or name == "multi_head":
        options["num_heads"] = rng.choice([h for h in (1, 2, 3, 4) if C % h == 0])
    H, W = rng.choice(SIZES), rng.choice(SIZES)
    while H * W > max_area:  # the long sweep lifts this (40 x 40 and the like)
        H, W = rng.choice(SIZES), rng.choice(SIZES)
    if info.layout == "clip":  # (B, T, C, H, W) already costs T frames
        H, W = min(H, 16), min(W, 16)
    return {"batch": rng.randint(1, 3), "channels": C, "size": (H, W), "options": options}


def _build(name: str, case: dict):
    torch.manual_seed(0)
    try:
        module, inputs = sa.info(name).cls.example(
            name, case["batch"], case["channels"], case["size"], **case["options"]
        )
    except ValueError as exc:  # a combination the constructor refuses, with a reason
        assert name in str(exc), f"{name}: refusal does not name the mechanism: {exc}"
        return None
    return module.eval(), inputs


def _close(a, b, what, case, atol=1e-4, rtol=1e-4):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{what} {case}: {m}")


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


@pytest.mark.parametrize("name", NAMES)
def test_sweep_valid_inputs(name, cases):
    rng = random.Random(f"{SEED}-{name}")
    layout = sa.info(name).layout
    ran = 0
    for _ in range(cases * 4):
        if ran == cases:
            break
        case = _draw(name, rng, 640 if cases <= _cases() else 40 * 40)
        built = _build(name, case)
        if built is None:
            continue
        ran += 1
        module, inputs = built
        case = {"name": name, **case}
        out = module(*inputs)
        # shape, dtype, finite
        assert out.dtype == inputs[0].dtype, case
        assert out.shape[0] == case["batch"], case
        if layout != "sequence":
            assert out.shape == inputs[0].shape, case
        assert torch.isfinite(out).all(), case

        # fast == explicit (and input gradients on every other case)
        with explicit_path(module):
            _close(module(*inputs), out, "explicit", case)
        if ran % 2:
            grads = []
            for explicit in (False, True):
                xs = tuple(t.clone().requires_grad_() for t in inputs)
                with explicit_path(module, explicit=explicit):
                    y = module(*xs)
                weight = torch.linspace(-1, 1, y.numel()).view_as(y)
                (y * weight).sum().backward()
                grads.append(xs[0].grad)
            _close(grads[1], grads[0], "explicit input gradient", case, atol=1e-3, rtol=1e-3)

        # grad modes agree, in train mode; a training call after inference_mode works
        # (train mode moves BatchNorm's running statistics: restore them afterwards; a
        # BatchNorm over pooled (B, C, 1, 1) descriptors cannot train on one sample, as
        # in the official SK and GAM code, so batch 1 checks the modes in eval instead)
        saved = {k: v.clone() for k, v in module.state_dict().items()}
        has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                     for m in module.modules())
        module.train(not (has_bn and case["batch"] == 1))
        with torch.no_grad():
            a = module(*inputs)
        with torch.inference_mode():
            b = module(*inputs)
        xs = tuple(t.clone().requires_grad_() for t in inputs)
        c = module(*xs)
        c.sum().backward()
        assert xs[0].grad is not None and torch.isfinite(xs[0].grad).all(), case
        _close(b.clone(), a, "inference_mode vs no_grad", case, atol=1e-6, rtol=1e-6)
        _close(c.detach(), a, "grad vs no_grad", case, atol=1e-6, rtol=1e-6)
        module.eval()
        module.load_state_dict(saved)

        # memory formats
        x = inputs[0]
        strided = torch.stack([x, x], -1)[..., 0]  # same values, non-contiguous
        assert not strided.is_contiguous()
        _close(module(strided, *inputs[1:]), out, "non-contiguous", case)
        if x.dim() == 4 and layout == "map":
            cl = x.contiguous(memory_format=torch.channels_last)
            _close(module(cl, *inputs[1:]), out, "channels_last", case)

        # float64 and bf16 autocast
        double = module.double()(*(t.double() for t in inputs))
        module.float()
        assert double.dtype == torch.float64 and torch.isfinite(double).all(), case
        if name not in CLUSTERING:
            _close(double.float(), out, "float64 vs float32", case, atol=1e-3, rtol=1e-3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = module(*inputs)
        assert torch.isfinite(low).all(), case
        if name not in CLUSTERING:
            assert _rel(low, out) < 0.1, (case, _rel(low, out))
    assert ran, f"{name}: every drawn option set was refused; widen OPTIONS"


def _raises_named(name, fn, case, types=(ValueError,)):
    with pytest.raises(types) as err:
        fn()
    assert name in str(err.value), f"{case}: message does not name {name}: {err.value}"


@pytest.mark.parametrize("name", NAMES)
def test_sweep_malformed_inputs(name):
    rng = random.Random(f"{SEED}-bad-{name}")
    info = sa.info(name)
    for _ in range(8):
        built = _build(name, _draw(name, rng))
        if built is not None:
            break
    module, inputs = built
    x, rest = inputs[0], inputs[1:]
    case = f"{name} {tuple(x.shape)}"

    def call(first, *more):
        return module(first, *(more or rest))

    # wrong rank, integer and bool dtypes, a float dtype unlike the parameters', empty
    _raises_named(name, lambda: call(x.flatten(0, 1)), case)
    _raises_named(name, lambda: call(x.unsqueeze(0)), case)
    _raises_named(name, lambda: call(x.round().long()), case)
    _raises_named(name, lambda: call(x > 0), case)
    if any(p.is_floating_point() for p in module.parameters()):
        _raises_named(name, lambda: call(x.double()), case)
    _raises_named(name, lambda: call(x[:0]), case)
    # not a tensor at all
    _raises_named(name, lambda: call(x.tolist()), case, (ValueError, TypeError))

    # wrong channel count: a named refusal, or (channel-agnostic mechanisms) a valid output
    axis = {"map": 1, "clip": 2}.get(info.layout, -1)
    fewer = x.narrow(axis, 0, x.shape[axis] - 1)
    try:
        y = call(fewer)
    except ValueError as exc:
        assert name in str(exc), f"{case}: {exc}"
    else:
        assert torch.isfinite(y).all(), case

    # NaN: refused by name, or propagated
    poisoned = x.clone()
    poisoned.view(-1)[poisoned.numel() // 2] = float("nan")
    try:
        y = call(poisoned)
    except ValueError as exc:
        assert name in str(exc), f"{case}: {exc}"
    else:
        assert torch.isnan(y).any(), f"{case}: a NaN input vanished from the output"

    # valid_lens for the sequence mechanisms that take them
    if "valid_lens" in inspect.signature(module.forward).parameters:
        B = x.shape[0]
        keys = (rest[0] if rest else x).shape[1]
        lens = [keys] * B
        torch.testing.assert_close(
            module(*inputs, valid_lens=lens), module(*inputs, valid_lens=torch.tensor(lens))
        )
        for bad in ([-1] * B, [keys + 1] * B, torch.full((B,), 1.0), torch.ones(B).bool(),
                    [keys] * (B + 1), "all"):
            _raises_named(name, lambda bad=bad: module(*inputs, valid_lens=bad), case)

    # the wrong number of views
    if info.family == "multi_view":
        extra = torch.cat([x, x[:, :1]], 1)
        _raises_named(name, lambda: call(extra), case)
