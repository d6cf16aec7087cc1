"""The cost harness: FLOP formulas, the CPU memory tracker, benchmark(), the CLI."""

import csv
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from spatial_attention import registry
from spatial_attention.apps.bench import bench
from spatial_attention.apps.bench.flops import (
    count_flops,
    register_cpu_attention_formulas,
    sdpa_backward_flops,
    sdpa_forward_flops,
)
from spatial_attention.apps.bench.memory import (
    TensorMemoryTracker,
    peak_memory_bytes,
    storage_bytes,
)
from spatial_attention.errors import UsageError
from spatial_attention.layers.base import AttentionModule

CPU_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


# -- FLOPs -------------------------------------------------------------------------------
def test_cpu_sdpa_flops_equal_the_explicit_matmul_count():
    B, h, Q, K, d = 2, 3, 16, 12, 8
    q = torch.randn(B, h, Q, d, requires_grad=True)
    k = torch.randn(B, h, K, d, requires_grad=True)
    v = torch.randn(B, h, K, d, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        out = F.scaled_dot_product_attention(q, k, v)
    # the fused CPU kernel ran, and was counted as q k^T plus weights @ v
    assert CPU_FLASH in counter.get_flop_counts()["Global"]
    assert counter.get_total_flops() == 4 * B * h * Q * K * d
    # the same count as the explicit math, whose matmuls PyTorch already knows
    explicit, _ = count_flops(lambda: (q @ k.transpose(-2, -1)).softmax(-1) @ v)
    assert explicit == 4 * B * h * Q * K * d

    backward, _ = count_flops(lambda: out.sum().backward())
    assert backward == 2 * B * h * Q * K * (3 * d + 2 * d)  # scores recomputed
    assert q.grad is not None


def test_sdpa_formulas_with_other_value_width_and_registration_is_idempotent():
    register_cpu_attention_formulas()
    register_cpu_attention_formulas()  # no "duplicate registration" error
    q, k, v = torch.randn(2, 2, 5, 4), torch.randn(2, 2, 7, 4), torch.randn(2, 2, 7, 6)
    flops, _ = count_flops(F.scaled_dot_product_attention, q, k, v)
    assert flops == sdpa_forward_flops(q.shape, k.shape, v.shape) == 2 * 4 * 5 * 7 * (4 + 6)
    assert sdpa_backward_flops(q.shape, k.shape, v.shape) == 2 * 4 * 5 * 7 * (3 * 4 + 2 * 6)
    with pytest.raises(ValueError, match="incompatible"):
        sdpa_forward_flops((2, 5, 4), (2, 7, 3), (2, 7, 6))


def test_matrix_vector_products_are_counted():
    # additive attention's w_v^T tanh(...) is (B, Q, K, h) @ (h,): an aten.mv
    features, w = torch.randn(2, 3, 4, 5), torch.randn(5)
    assert count_flops(torch.matmul, features, w)[0] == 2 * (2 * 3 * 4) * 5
    assert count_flops(torch.dot, w, w)[0] == 2 * 5
    assert count_flops(torch.addmv, torch.randn(3), torch.randn(3, 5), w)[0] == 2 * 3 * 5


@pytest.mark.parametrize("groups", [1, 4])
def test_conv_backward_counts_each_gradient_as_one_forward_whatever_the_groups(groups):
    conv = torch.nn.Conv2d(8, 8, 3, padding=1, groups=groups)
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    forward, y = count_flops(conv, x)
    assert forward == 2 * 2 * 25 * 8 * (8 // groups) * 9
    backward, _ = count_flops(lambda: y.sum().backward())
    assert backward == 2 * forward  # input and weight gradients (bias not counted)
    y = conv(x.detach())  # no input gradient: the weight's alone
    assert count_flops(lambda: y.sum().backward())[0] == forward


@pytest.mark.skipif(not hasattr(torch._C._nn, "thnn_conv2d"), reason="no thnn_conv2d")
def test_cpu_im2col_convolution_is_counted():
    x = torch.randn(2, 2, 6, 6, requires_grad=True)
    w = torch.randn(1, 2, 3, 3, requires_grad=True)
    forward, y = count_flops(torch._C._nn.thnn_conv2d, x, w, (3, 3), None, (1, 1), (1, 1))
    assert forward == 2 * 2 * 36 * (1 * 2 * 9)
    assert count_flops(lambda: y.sum().backward())[0] == 2 * forward


def test_additive_flops_by_hand():
    B, C, (H, W) = 2, 8, (2, 3)
    Q, K, h = H, H * W, C  # its example: H decoder steps reading H*W encoder states
    (r,) = bench.benchmark(["additive"], batch=B, channels=C, size=(H, W), repeats=1,
                           warmup=0)
    projections = 2 * B * Q * C * h + 2 * B * K * C * h
    scores = 2 * B * Q * K * h  # w_v^T tanh(W_q q + W_k k); the tanh itself is free
    weighting = 2 * B * Q * K * C
    assert round(r.fwd_gflops * 1e9) == projections + scores + weighting


# -- memory ------------------------------------------------------------------------------
def test_tracker_counts_allocations_frees_views_and_in_place_by_hand():
    with TensorMemoryTracker() as mem:
        a = torch.empty(1000)  # 4000 B
        b = torch.empty(500, dtype=torch.float64)  # 4000 B -> 8000
        a_view = a[10:].view(-1, 10)  # a view allocates nothing
        b.add_(1.0)  # neither does an in-place op
        assert mem.current_bytes == 8000
        del a  # the view keeps a's storage alive
        assert mem.current_bytes == 8000
        del a_view  # now it is freed
        assert mem.current_bytes == 4000
        c = torch.empty(3000)  # 12000 B -> 16000, the peak
        del b, c
        d = torch.ones(10, dtype=torch.uint8)  # 10 B
        assert mem.current_bytes == 10
    assert mem.peak_bytes == 16000
    assert storage_bytes([d, d[2:], d.view(2, 5)]) == 10  # aliases count once


def test_tracker_on_a_linear_forward_backward_by_hand():
    lin = torch.nn.Linear(16, 8, bias=False)  # weight 8 x 16 fp32: 512 B
    x = torch.randn(4, 16)  # 256 B, no grad
    with TensorMemoryTracker() as mem:
        mem.add_existing([lin.weight, x, lin.weight.T])  # 768 B; the alias once
        out = lin(x)  # mm: 4 x 8 -> 128 B
        loss = out.sum()  # 4 B
        loss.backward()  # ones_like(loss) 4 B, grad_out is a view; dW = 8 x 16: 512 B
    assert mem.peak_bytes == 768 + 128 + 4 + 4 + 512
    assert lin.weight.grad is not None and out.shape == (4, 8)


def test_peak_memory_bytes_counts_existing_once_plus_the_step():
    x = torch.randn(256)  # 1024 B

    def step():
        y = x * 2  # 1024 B
        return y + 1  # 1024 B, returned and dropped at the end

    assert peak_memory_bytes(step, "cpu", [x, x[1:]]) == 1024 + 2048


# -- benchmark() -------------------------------------------------------------------------
def test_benchmark_two_tiny_mechanisms():
    B, C, (H, W) = 1, 8, (4, 4)
    results = bench.benchmark(
        ["multi_head", "scaled_dot_product"], batch=B, channels=C, size=(H, W),
        repeats=2, warmup=1,
    )
    assert [r.name for r in results] == ["multi_head", "scaled_dot_product"]
    for r in results:
        assert r.ok, r.error
        assert r.fwd_gflops > 0 and r.fwd_bwd_gflops > r.fwd_gflops
        assert r.fwd_ms > 0 and r.fwd_bwd_ms > 0 and r.peak_mib > 0
        assert r.family == "sequence" and r.layout == "sequence"
        assert r.dtype == "float32" and r.device == "cpu" and r.threads >= 1
        assert r.torch_version == torch.__version__
    mh, sdp = results
    assert mh.params == 4 * C * C + 4 * C
    assert sdp.params == 0
    N = H * W
    # four projections plus the fused attention (one head of width C), all counted
    assert round(mh.fwd_gflops * 1e9) == 4 * 2 * B * N * C * C + 4 * B * N * N * C
    assert mh.input_shape == f"{B}x{N}x{C}"
    # the inputs alone (one tensor, passed three times) are the least peak possible
    assert sdp.peak_mib * 2**20 > B * N * C * 4


def test_benchmark_dtypes_and_forward_only():
    for dtype in ("bfloat16", "float64"):
        (r,) = bench.benchmark(["multi_head"], batch=1, channels=8, size=(2, 3), dtype=dtype,
                               repeats=1, warmup=0)
        assert r.ok, r.error
        assert r.dtype == dtype and r.fwd_gflops > 0
    (r,) = bench.benchmark(["multi_head"], batch=1, channels=8, size=(2, 3), backward=False,
                           repeats=1, warmup=0)
    assert r.ok and r.fwd_ms > 0 and r.peak_mib > 0
    assert math.isnan(r.fwd_bwd_ms) and math.isnan(r.fwd_bwd_gflops)


class _FailsAtRunTime(AttentionModule):
    """A mechanism that builds but breaks when it computes (as if out of memory)."""

    layout = "sequence"

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):
        if not x.is_meta:
            raise RuntimeError("boom: out of memory")
        return self.proj(x)


def test_a_failing_mechanism_gets_an_error_row_and_the_others_run(monkeypatch):
    info = registry.MechanismInfo(
        name="fails_at_run_time", cls=_FailsAtRunTime, family="sequence", layout="sequence",
        paper="none", year=None,
    )
    monkeypatch.setitem(registry._REGISTRY, "fails_at_run_time", info)
    monkeypatch.setattr(_FailsAtRunTime, "registered_names", ("fails_at_run_time",))
    results = bench.benchmark(["fails_at_run_time", "multi_head"], batch=1, channels=8,
                              size=(2, 2), repeats=1, warmup=0)
    broken, ok = results
    assert "boom" in broken.error and math.isnan(broken.fwd_ms)
    assert broken.params == 8 * 8 + 8  # measured before it failed
    assert ok.ok and ok.fwd_ms > 0
    table = bench.format_table(results)
    assert "fails_at_run_time: RuntimeError: boom" in table


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(size=(0, 4)), "size"),
        (dict(size=(4,)), "size"),
        (dict(channels=0), "channels"),
        (dict(channels=100), "cannot run with channels=100"),  # 3 heads do not divide 100
        (dict(batch=0), "batch"),
        (dict(repeats=0), "repeats"),
        (dict(dtype="float16"), "dtype"),
        (dict(device="tpu"), "device"),
        (dict(threads=0), "threads"),
    ],
)
def test_bad_arguments_raise_usage_error_before_any_compute(monkeypatch, kwargs, match):
    def no_compute(*args, **kw):
        raise AssertionError("computed before validating")

    monkeypatch.setattr(bench, "_bench_one", no_compute)
    with pytest.raises(UsageError, match=match):
        bench.benchmark(["multi_head"], **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is there")
def test_cuda_without_cuda_is_a_usage_error():
    with pytest.raises(UsageError, match="CUDA is not available"):
        bench.benchmark(["multi_head"], device="cuda")


def test_unknown_name_is_the_registry_error():
    with pytest.raises(ValueError, match="multi_head"):
        bench.benchmark(["multihead"])


def test_write_csv_one_row_per_mechanism_with_empty_cells_for_nan(tmp_path):
    rows = [
        bench.BenchResult("a", "sequence", "sequence", "1x2x3", "float32", "cpu", 10,
                          fwd_gflops=0.5, fwd_ms=1.25, peak_mib=2.0, threads=2),
        bench.BenchResult("b", "channel", "map", "", "float32", "cpu", 0, error="oom"),
    ]
    path = bench.write_csv(rows, tmp_path / "sub" / "r.csv")
    with path.open() as f:
        got = list(csv.DictReader(f))
    assert tuple(got[0]) == bench.CSV_COLUMNS
    assert got[0]["fwd_gflops"] == "0.5" and got[0]["fwd_bwd_ms"] == ""
    assert got[1]["error"] == "oom" and got[1]["fwd_ms"] == ""


# -- the command line --------------------------------------------------------------------
def test_cli_writes_csv_and_png(cli, tmp_path):
    out, png = tmp_path / "tmp.csv", tmp_path / "tmp.png"
    r = cli("bench", "multi_head", "--size", "4", "4", "--channels", "8", "--batch", "1",
            "--repeats", "2", "--out", str(out), "--plot", str(png))
    assert r.returncode == 0, r.stderr
    assert "multi_head" in r.stdout and "fwd ms" in r.stdout
    with out.open() as f:
        (row,) = list(csv.DictReader(f))
    assert row["name"] == "multi_head" and row["params"] == str(4 * 8 * 8 + 4 * 8)
    assert row["input_shape"] == "1x16x8" and row["error"] == ""
    assert float(row["fwd_ms"]) > 0 and float(row["peak_mib"]) > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args", [("nosuch",), ("multi_head", "--size", "0", "4")])
def test_cli_bad_input_exits_2_with_one_line(cli, args):
    r = cli("bench", *args)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr and "bench" in lines[0]


def test_profile_table_names_the_ops_that_ran_with_their_shapes():
    from spatial_attention.apps.bench.bench import profile_table

    a, b = torch.randn(8, 16), torch.randn(16, 4)
    table = profile_table(lambda: a @ b, calls=3, rows=5)
    assert "aten::mm" in table and "[8, 16]" in table


def test_interleaved_times_rotates_the_order_and_times_every_round():
    calls = []
    cases = {n: (lambda n=n: calls.append(n)) for n in "abc"}
    times = bench.interleaved_times(cases, repeats=3, warmup=1)
    assert calls[:3] == ["a", "b", "c"]  # warm-up
    assert calls[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert {n: len(t) for n, t in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert all(s >= 0 for t in times.values() for s in t)


def test_keep_freed_memory_reports_what_it_did():
    # in a child process: it changes the allocator of the process that calls it
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c",
         "from spatial_attention.apps.bench import keep_freed_memory as k; print(k())"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    import platform

    if platform.libc_ver()[0] == "glibc":
        assert out == "glibc keeps freed memory (mallopt)"
    else:  # musl, macOS: mallopt is glibc's
        assert out in ("mallopt refused: allocator as is", "libc not found: allocator left as is")


def test_timing_cases_run_forward_and_backward():
    from spatial_attention.apps.bench import forward_case, train_case

    m = registry.create("se", 8)
    x = torch.randn(2, 8, 4, 4)
    forward_case(m, x)()
    train_case(m, x, torch.ones(2, 8, 4, 4))()
    assert all(p.grad is not None for p in m.parameters())


# -- the plan, the estimate, output checks, models ---------------------------------------
def test_plan_names_targets_shapes_and_modes_without_compute(monkeypatch):
    def no_compute(*args, **kw):
        raise AssertionError("measured while planning")

    monkeypatch.setattr(bench, "_bench_one", no_compute)
    plan = bench.make_plan(["se", "multi_head", "se"], batch=1, channels=8, size=(4, 4))
    assert [t.name for t in plan.targets] == ["se", "multi_head"]  # once each
    assert plan.shapes == ["1x8x4x4", "1x16x8"]
    assert plan.modes == ("forward", "forward+backward")
    assert plan.calls_per_target() == (1 + 3 + 10, 1 + 3 + 10 + 1)
    assert plan.meta_flops[1] == 4 * 2 * 16 * 8 * 8 + 4 * 16 * 16 * 8  # as measured below
    text = plan.describe()
    assert "2 mechanisms x 1 input each x 2 modes (forward, forward+backward) = 4 timed" in text
    assert "map input 1x8x4x4: se" in text and "sequence input 1x16x8: multi_head" in text
    assert "quick look" not in text  # names were given
    fwd_only = bench.make_plan(["se"], backward=False, check=False)
    assert fwd_only.modes == ("forward",) and fwd_only.meta_seconds is None
    assert "1 mechanism x 1 input each x 1 mode (forward) = 1 timed" in fwd_only.describe()


def test_plan_of_every_mechanism_suggests_a_quick_look():
    plan = bench.make_plan(check=False)  # shapes only: building on meta, no forward
    assert len(plan.targets) == len(registry.list_mechanisms())
    assert "spatial-attention bench se cbam multi_head" in plan.describe()


def test_estimate_pilots_within_its_budget_and_extrapolates():
    plan = bench.make_plan(["se", "eca", "multi_head"], batch=1, channels=8, size=(4, 4))
    full = bench.estimate(plan)
    assert (full.measured, full.total) == (3, 3) and full.seconds > 0
    assert "one forward and one training step of each target" in full.describe()
    cut = bench.estimate(plan, budget_s=0.0)  # one target at least, the rest scaled
    assert (cut.measured, cut.total) == (1, 3) and cut.seconds > 0
    assert "1 of the 3 targets" in cut.describe()


def test_models_are_measured_whole():
    from spatial_attention.models import create_model

    (r,) = bench.benchmark(["resnet10_cifar"], size=(16, 16), repeats=1, warmup=0)
    assert r.ok, r.error
    assert r.layout == "model" and r.family == "classification"
    assert r.input_shape == "1x3x16x16"  # batch 1 by default for models
    model = create_model("resnet10_cifar").eval()
    assert r.params == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        flops, _ = count_flops(model, torch.randn(1, 3, 16, 16))
    assert round(r.fwd_gflops * 1e9) == flops
    assert r.fwd_ms > 0 and r.fwd_bwd_ms > 0 and r.peak_mib > 0
    assert bench.format_table([r]).splitlines()[1].startswith("name ")
    # BatchNorm on a 1x1 map cannot train on one image: the forward is still measured
    (r,) = bench.benchmark(["resnet10_cifar"], size=(8, 8), repeats=1, warmup=0)
    assert "--batch 2 or more" in r.error and r.fwd_ms > 0 and r.fwd_gflops > 0
    # nominal sizes, and Sort-of-CLEVR's question input, from meta builds alone
    plan = bench.make_plan(["swin_tiny", "workspace_transformer", "nbnet_small",
                            "vit_micro_cifar", "mvswin_micro_cifar"], check=False)
    assert plan.shapes == ["1x3x224x224", "1x3x75x75, 1x18", "1x3x256x256", "1x3x32x32",
                           "1x2x3x32x32"]
    assert "5 models" in plan.describe()


def test_unknown_name_lists_mechanisms_and_models():
    with pytest.raises(ValueError, match=r"unknown mechanism or model 'resnet10'.*resnet10_cifar"):
        bench.make_plan(["resnet10"])


def test_count_flops_is_documented():
    doc = count_flops.__doc__
    assert "multiply-add" in doc and "FlopCounterMode" in doc


def test_output_paths_are_checked_before_anything_runs(tmp_path, monkeypatch):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(UsageError, match="is a directory"):
        bench.check_output_path("--out", tmp_path)
    with pytest.raises(UsageError, match="is not a directory"):
        bench.check_output_path("--out", a_file / "sub" / "r.csv")
    bench.check_output_path("--out", tmp_path / "new" / "dir" / "r.csv")  # made on write
    assert not (tmp_path / "new").exists()

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(bench.tempfile, "TemporaryFile", refuse)
    with pytest.raises(UsageError, match=r"--plot .*cannot write in .*Permission denied"):
        bench.check_output_path("--plot", tmp_path / "p.png")


@pytest.mark.parametrize("args, match", [
    (("--out", "{file}/r.csv"), "--out .* is not a directory"),
    (("--plot", "{dir}"), "--plot .* is a directory"),
    (("--plot", "{dir}/p.xyz"), "unknown image format .xyz"),
    (("--out", "{dir}/same", "--plot", "{dir}/same"), "same file"),
])
def test_cli_refuses_unwritable_outputs_first(capsys, tmp_path, args, match):
    import re

    from spatial_attention.cli import main

    (tmp_path / "f").write_text("x")
    args = [a.format(file=tmp_path / "f", dir=tmp_path) for a in args]
    assert main(["bench", "se", "--size", "4", "4", "--channels", "8", "--batch", "1",
                 *args]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1, lines  # before the plan: nothing else printed
    assert lines[0].startswith("spatial-attention bench: error: ")
    assert re.search(match, lines[0]), lines[0]


def test_cli_prints_the_plan_and_estimate_and_plan_measures_nothing(capsys, tmp_path):
    from spatial_attention.cli import main

    out = tmp_path / "r.csv"
    assert main(["bench", "se", "resnet10_cifar", "--size", "16", "16", "--channels", "8",
                 "--repeats", "1", "--warmup", "0", "--plan", "--out", str(out)]) == 0
    io = capsys.readouterr()
    assert "plan: 1 mechanism and 1 model x 1 input each x 2 modes" in io.err
    assert "map input 8x8x16x16: se" in io.err and "model input 1x3x16x16" in io.err
    assert "estimate: about" in io.err and "of each target" in io.err
    assert io.out == "" and not out.exists()
    assert main(["bench", "se", "--size", "4", "4", "--channels", "8", "--batch", "1",
                 "--repeats", "1", "--warmup", "0", "--no-estimate"]) == 0
    io = capsys.readouterr()
    assert "plan: 1 mechanism" in io.err and "estimate" not in io.err
    assert "se" in io.out and "fwd ms" in io.out


def test_ratio_table_reports_medians_minima_and_ratios_to_the_reference():
    from spatial_attention.apps.bench import ratio_table

    times = {"ours": [0.004, 0.002, 0.003], "other": [0.009, 0.006, 0.012]}
    peaks = {"ours": 3 * 2**20, "other": 1.5 * 2**20}
    lines = ratio_table(times, peaks, "ours", ms_digits=1, mib_digits=1).splitlines()
    assert lines[0] == "| case | median ms | min ms | x ours (median / min) | peak MiB |"
    assert lines[2] == "| ours | 3.0 | 2.0 | 1.00 / 1.00 | 3.0 |"
    assert lines[3] == "| other | 9.0 | 6.0 | 3.00 / 3.00 | 1.5 |"
