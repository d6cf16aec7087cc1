"""CUDA correctness of the fast paths; skipped on machines without a GPU."""

import pytest
import torch

import spatial_attention as sa
from spatial_attention import explicit_path
from spatial_attention.functional import attention, window_attention_mask

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize(
    "dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2), (torch.float16, 3e-3)]
)
@pytest.mark.parametrize("kind", ["none", "bool", "float"])
def test_attention_fused_equals_explicit_cuda(dtype, tol, kind):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4, 49, 32, device="cuda", dtype=dtype, generator=g) for _ in range(3))
    mask = None
    if kind == "bool":
        mask, _, _ = window_attention_mask(14, 14, 7, 3, device="cuda")  # (4, 49, 49)
    elif kind == "float":
        mask = torch.randn(4, 49, 49, device="cuda", dtype=dtype, generator=g)
    fused = attention(q, k, v, mask)
    ref = attention(
        q.double(),
        k.double(),
        v.double(),
        mask if mask is None or mask.dtype == torch.bool else mask.double(),
        fused=False,
    )
    torch.testing.assert_close(fused.double(), ref, atol=tol, rtol=tol)


def test_fully_masked_rows_zero_and_finite_grads_cuda():
    q, k, v = (torch.randn(1, 2, 8, 16, device="cuda", requires_grad=True) for _ in range(3))
    keep = torch.ones(1, 1, 8, 8, dtype=torch.bool, device="cuda")
    keep[..., 3, :] = False
    out = attention(q, k, v, keep)
    assert torch.isfinite(out).all() and (out[..., 3, :] == 0).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("name", ["multi_head", "se", "eca"])
def test_cuda_matches_cpu(name):
    cls = sa.info(name).cls
    module, inputs = cls.example(name, 2, 32, (7, 5))
    module = module.eval()
    ref = module(*inputs)
    gpu = module.cuda()
    out = gpu(*(t.cuda() for t in inputs))
    torch.testing.assert_close(out.cpu(), ref, atol=1e-4, rtol=1e-4)
    with explicit_path(gpu):
        torch.testing.assert_close(
            gpu(*(t.cuda() for t in inputs)).cpu(), ref, atol=1e-4, rtol=1e-4
        )


def test_multi_head_backward_cuda_bf16_autocast():
    m = sa.create("multi_head", 64, 4).cuda()
    x = torch.randn(4, 196, 64, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = m(x, valid_lens=torch.tensor([196, 100, 50, 1], device="cuda"))
    y.float().sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("shape", [(2, 14, 14), (2, 9, 11)])
def test_window_attention_cuda_matches_cpu_with_grads(shape):
    from spatial_attention.layers.window import WindowAttention

    torch.manual_seed(0)
    attn = WindowAttention(32, 2, window_size=7, shift_size=3)
    x = torch.randn(*shape, 32)
    outs = []
    for device in ("cpu", "cuda"):
        m = attn.to(device)
        m.zero_grad(set_to_none=True)
        xi = x.to(device).requires_grad_()
        y = m(xi)
        y.pow(2).sum().backward()
        outs.append((y.cpu(), xi.grad.cpu(), m.relative_position_bias_table.grad.cpu()))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_swin_and_twins_cuda_match_cpu():
    from spatial_attention.models import create_model

    for name in ("swin_micro_cifar", "twins_svt_micro_cifar"):
        torch.manual_seed(0)
        model = create_model(name).eval()
        x = torch.randn(2, 3, 37, 45)
        with torch.no_grad():
            ref = model(x)
            got = model.cuda()(x.cuda()).cpu()
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_window_attention_flex_path_cuda():
    from spatial_attention.layers.window import WindowAttention

    torch.manual_seed(0)
    attn = WindowAttention(64, 2, window_size=7, shift_size=3).cuda().eval()
    x = torch.randn(2, 30, 23, 64, device="cuda")
    with torch.no_grad():
        expected = attn(x)
        attn.attn_impl = "flex"
        torch.testing.assert_close(attn(x), expected, atol=1e-4, rtol=1e-4)


# -- the conformance promises on the device, under autocast ------------------------------

NAMES = sa.list_mechanisms()
# the token and sequence mechanisms whose fast path hands attention to SDPA's fused
# kernels on CUDA (README: "fused F.scaled_dot_product_attention")
FUSED_ON_CUDA = ["global_attention", "twins_gsa", "multi_head", "scaled_dot_product",
                 "window_attention", "shifted_window_attention", "twins_lsa",
                 "cswin_attention", "temporal", "multi_view_concat_attention"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
def test_every_mechanism_on_cuda_under_autocast(name, dtype):
    torch.manual_seed(0)
    module, inputs = sa.info(name).cls.example(name, 2, 32, (9, 7))
    module = module.eval()
    with torch.no_grad():
        ref = module(*inputs)
    gpu = module.cuda()
    xs = tuple(t.cuda() for t in inputs)
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype or torch.float32,
                                         enabled=dtype is not None):
        out = gpu(*xs)
        with explicit_path(gpu):
            explicit = gpu(*xs)
    assert torch.isfinite(out).all()
    tol = 1e-4 if dtype is None else 5e-2
    rel = float((out.float().cpu() - ref).norm() / ref.norm().clamp_min(1e-12))
    assert rel < tol, (name, dtype, rel)
    torch.testing.assert_close(out.float(), explicit.float(), atol=tol * 10, rtol=tol * 10)


@pytest.mark.parametrize("name", FUSED_ON_CUDA)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_paths_run_on_flash_or_efficient_kernels(name, dtype):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    module, inputs = sa.info(name).cls.example(name, 2, 64, (14, 14))
    gpu = module.cuda().train()
    xs = tuple(t.cuda().requires_grad_() for t in inputs)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]), \
            torch.autocast("cuda", dtype=dtype):
        out = gpu(*xs)
    out.float().sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(xs[0].grad).all()
