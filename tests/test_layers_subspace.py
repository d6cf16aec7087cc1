"""SSA (NBNet subspace attention): the projection's algebra, both paths, dtypes, errors."""

import pytest
import torch

import spatial_attention as sa
from spatial_attention import capture_attention, explicit_path
from spatial_attention.layers.subspace import (
    _ridge_gram,
    _unrolled_spd_solve,
    l1_normalise_bases,
    projection_matrix,
    subspace_project,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("shape", [(2, 4, 6, 5), (1, 16, 9, 7), (3, 5, 2, 4)])
def test_projection_is_idempotent_and_symmetric(shape):
    bases = torch.randn(shape, dtype=torch.float64)
    P = projection_matrix(bases, ridge=0.0)  # the exact Eq. 5
    torch.testing.assert_close(P @ P, P, atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(P, P.transpose(1, 2), atol=1e-10, rtol=1e-8)
    # the default ridge moves P by far less than float32 resolution of the features
    Pr = projection_matrix(bases)
    torch.testing.assert_close(Pr @ Pr, Pr, atol=1e-5, rtol=0)
    torch.testing.assert_close(Pr, P, atol=1e-5, rtol=0)
    # rank = number of (independent) bases, when N >= K
    N, K = shape[2] * shape[3], shape[1]
    expected_rank = min(N, K)
    assert torch.allclose(
        torch.diagonal(P, dim1=1, dim2=2).sum(-1),
        torch.full((shape[0],), float(expected_rank), dtype=torch.float64), atol=1e-4
    )


def test_span_is_kept_and_complement_removed():
    torch.manual_seed(1)
    B, K, C, H, W = 2, 4, 3, 6, 5
    bases = torch.randn(B, K, H, W, dtype=torch.float64)
    V = l1_normalise_bases(bases)  # (B, K, N)
    inside = (torch.randn(B, C, K, dtype=torch.float64) @ V).view(B, C, H, W)
    for fused in (True, False):
        torch.testing.assert_close(subspace_project(inside, bases, 0.0, fused), inside)
    # a component orthogonal to every basis is removed
    x = torch.randn(B, C, H * W, dtype=torch.float64)
    coef = torch.linalg.solve(V @ V.transpose(1, 2), V @ x.transpose(1, 2))
    ortho = (x - (V.transpose(1, 2) @ coef).transpose(1, 2)).view(B, C, H, W)
    for fused in (True, False):
        out = subspace_project(ortho, bases, 0.0, fused)
        assert out.abs().max() < 1e-8


@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("size", [(7, 5), (1, 1), (3, 2), (16, 9)])
def test_fused_equals_explicit_any_size(guided, size):
    C = 8
    m = sa.create("ssa", C, num_bases=16, guide_channels=C if guided else 0).eval()
    x = torch.randn(2, C, *size)
    inputs = (x, torch.randn(2, C, *size)) if guided else (x,)
    fused = m(*inputs)
    with explicit_path(m):
        explicit = m(*inputs)
    assert fused.shape == x.shape and torch.isfinite(fused).all()
    torch.testing.assert_close(fused, explicit, atol=1e-4, rtol=1e-4)


def test_gradcheck_guided_float64():
    m = sa.create("ssa", 4, num_bases=3, guide_channels=2).double()
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    for fused in (True, False):
        m.attn_impl = None if fused else "explicit"
        assert torch.autograd.gradcheck(lambda a, b: m(a, b), (x, g), fast_mode=True)


def test_channels_last_in_channels_last_out():
    m = sa.create("ssa", 16).eval()
    x = torch.randn(2, 16, 12, 10)
    ref = m(x)
    out = m(x.to(memory_format=torch.channels_last))
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_bfloat16_input_projects_in_float32():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 10, 9)
    bases = torch.randn(2, 16, 10, 9)
    ref = subspace_project(x, bases)
    out = subspace_project(x.bfloat16(), bases.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    # bf16 rounding of inputs and output only (the solve ran in float32)
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()
    m = sa.create("ssa", 8).to(torch.bfloat16)
    assert m(x.bfloat16()).dtype == torch.bfloat16


def test_autocast_bfloat16_keeps_the_solve_in_float32():
    m = sa.create("ssa", 8, guide_channels=8).eval()
    x, g = torch.randn(1, 8, 12, 10), torch.randn(1, 8, 12, 10)
    ref = m(x, g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, g)  # bf16 convolutions, float32 projection
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_zero_bases_give_zero_not_nan():
    x = torch.randn(1, 3, 4, 4)
    out = subspace_project(x, torch.zeros(1, 16, 4, 4))
    assert torch.isfinite(out).all() and out.abs().max() == 0


def test_unrolled_solve_matches_linalg():
    v = l1_normalise_bases(torch.randn(3, 16, 7, 9, dtype=torch.float64))
    gram = _ridge_gram(v, 1e-6)
    rhs = torch.randn(3, 16, 5, dtype=torch.float64)
    torch.testing.assert_close(_unrolled_spd_solve(gram, rhs), torch.linalg.solve(gram, rhs))


def test_capture_records_l1_normalised_bases_on_the_fused_path():
    m = sa.create("ssa", 8, num_bases=5).eval()
    x = torch.randn(2, 8, 6, 7)
    with capture_attention(m) as maps:
        out = m(x)
    rec = maps[""]
    assert rec.shape == (2, 5, 6, 7)
    torch.testing.assert_close(rec.abs().flatten(2).sum(-1), torch.ones(2, 5), atol=1e-4,
                               rtol=1e-4)
    assert m.fused  # capture did not need the N x N path
    torch.testing.assert_close(out, m(x))
    assert sa.info("ssa").cls.spatial_map(rec, (6, 7)).shape == (2, 6, 7)


def test_errors_name_the_mechanism():
    m = sa.create("ssa", 8, guide_channels=4)
    x = torch.randn(1, 8, 5, 5)
    with pytest.raises(ValueError, match="ssa.*guide"):
        m(x)
    with pytest.raises(ValueError, match="ssa.*4 channels"):
        m(x, torch.randn(1, 3, 5, 5))
    with pytest.raises(ValueError, match="ssa.*does not match"):
        m(x, torch.randn(1, 4, 5, 6))
    with pytest.raises(ValueError, match="ssa.*8 channels"):
        m(torch.randn(1, 7, 5, 5), torch.randn(1, 4, 5, 5))
    with pytest.raises(ValueError, match="ssa.*num_bases"):
        sa.create("ssa", 8, num_bases=0)
    with pytest.raises(ValueError, match="ssa.*guide"):
        sa.create("ssa", 8)(x, torch.randn(1, 4, 5, 5))
