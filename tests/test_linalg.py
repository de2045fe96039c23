"""The pure math of ``lightning_kfac.kfac.linalg`` against explicit dense computations."""

from __future__ import annotations

import pytest
import torch

from lightning_kfac.kfac import linalg
from tests.helpers import assert_close, dense_damped_kron_solve, random_spd


@pytest.mark.parametrize("damping", [1e-4, 1e-2, 1.0])
@pytest.mark.parametrize("rank_deficient", [False, True])
def test_eigen_preconditioning_is_exact_damped_kronecker_inverse(
    damping: float, rank_deficient: bool
) -> None:
    gen = torch.Generator().manual_seed(0)
    da, dg, blocks = 5, 3, 2
    A = torch.stack(
        [random_spd(da, rank=2 if rank_deficient else None, generator=gen) for _ in range(blocks)]
    )
    G = torch.stack([random_spd(dg, generator=gen) for _ in range(blocks)])
    grad = torch.randn(blocks, dg, da, dtype=torch.float64, generator=gen)
    ea, qa = linalg.symmetric_eigh(A, torch.float64)
    eg, qg = linalg.symmetric_eigh(G, torch.float64)
    got = linalg.precondition_eigen(grad, ea, qa, eg, qg, damping)
    for b in range(blocks):
        assert_close(
            got[b], dense_damped_kron_solve(A[b], G[b], grad[b], damping), rtol=1e-8, atol=1e-10
        )


def test_identity_factors_without_damping_reduce_to_sgd() -> None:
    grad = torch.randn(1, 4, 6, dtype=torch.float64)
    ea, qa = torch.ones(1, 6, dtype=torch.float64), torch.eye(6, dtype=torch.float64)[None]
    eg, qg = torch.ones(1, 4, dtype=torch.float64), torch.eye(4, dtype=torch.float64)[None]
    assert_close(linalg.precondition_eigen(grad, ea, qa, eg, qg, 0.0), grad)


@pytest.mark.parametrize("append_ones", [False, True])
def test_covariance_sum_matches_explicit_outer_products(append_ones: bool) -> None:
    rows = torch.randn(3, 7, 4, dtype=torch.float64)
    expected_rows = (
        torch.cat([rows, torch.ones(3, 7, 1, dtype=torch.float64)], -1) if append_ones else rows
    )
    expected = torch.stack([sum(torch.outer(r, r) for r in block) for block in expected_rows])
    assert_close(linalg.covariance_sum(rows, append_ones=append_ones), expected)


@pytest.mark.parametrize("damping", [1e-3, 1e-1])
def test_inverse_method_equals_dense_factored_tikhonov(damping: float) -> None:
    gen = torch.Generator().manual_seed(1)
    A, G = random_spd(5, generator=gen)[None], random_spd(3, generator=gen)[None] * 40
    grad = torch.randn(1, 3, 5, dtype=torch.float64, generator=gen)
    pi = torch.sqrt((torch.trace(A[0]) / 5) / (torch.trace(G[0]) / 3))
    means = [linalg.mean_diagonal(F_, diagonal=False) for F_ in (A, G)]
    assert_close(linalg.pi_correction(*means), pi.reshape(1))
    root = damping**0.5
    pi = pi.reshape(1)
    inv_a = linalg.shifted_inverse(A, pi * root, torch.float64)
    inv_g = linalg.shifted_inverse(G, root / pi, torch.float64)
    got = linalg.precondition_inverse(grad, inv_a, inv_g)
    dense = torch.kron(
        A[0] + pi * root * torch.eye(5, dtype=torch.float64),
        G[0] + root / pi * torch.eye(3, dtype=torch.float64),
    )
    expected = torch.linalg.solve(dense, grad[0].mT.reshape(-1)).reshape(5, 3).mT
    assert_close(got[0], expected, rtol=1e-8, atol=1e-10)


def test_kl_clip_equals_formula_and_caps_at_one() -> None:
    gen = torch.Generator().manual_seed(2)
    ps = [torch.randn(1, 3, 4, dtype=torch.float64, generator=gen) for _ in range(2)]
    gs = [p + 0.1 * torch.randn(p.shape, dtype=torch.float64, generator=gen) for p in ps]
    lrs, kappa = [0.1, 0.3], 1e-3
    vg = sum(lr**2 * float((p * g).sum()) for p, g, lr in zip(ps, gs, lrs, strict=True))
    expected = min(1.0, (kappa / vg) ** 0.5)
    assert expected < 1.0
    assert float(linalg.kl_clip_scale(ps, gs, lrs, kappa)) == pytest.approx(expected, rel=1e-12)
    # A gradient still multiplied by a loss scale s gives the same ν once s is passed.
    scaled = linalg.kl_clip_scale(
        [p * 64 for p in ps], [g * 64 for g in gs], lrs, kappa, grad_scale=64.0
    )
    assert float(scaled) == pytest.approx(expected, rel=1e-12)
    assert float(linalg.kl_clip_scale(ps, gs, lrs, 1e6)) == 1.0
    assert float(linalg.kl_clip_scale(ps, [-g for g in ps], lrs, kappa)) == 1.0


def test_symmetric_eigh_returns_contiguous_eigenvectors_and_clamped_eigenvalues() -> None:
    # eigh's eigenvectors are column-major; every rank must multiply the same layout (bitwise
    # identical DDP replicas), so they are returned contiguous.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    rank_deficient = (x @ x.T)[None]
    values, vectors = linalg.symmetric_eigh(rank_deficient, torch.float64)
    assert vectors.is_contiguous()
    assert bool((values >= 0).all())
    assert_close(vectors @ torch.diag_embed(values) @ vectors.mT, rank_deficient, atol=1e-12)


def test_diagonal_factors_precondition_like_dense_diagonal_matrices() -> None:
    gen = torch.Generator().manual_seed(2)
    a_diag = torch.rand(1, 5, generator=gen, dtype=torch.float64)
    g_diag = torch.rand(1, 3, generator=gen, dtype=torch.float64)
    grad = torch.randn(1, 3, 5, generator=gen, dtype=torch.float64)
    got = linalg.precondition_eigen(grad, a_diag, None, g_diag, None, 0.1)
    expected = dense_damped_kron_solve(torch.diag(a_diag[0]), torch.diag(g_diag[0]), grad[0], 0.1)
    assert_close(got[0], expected)
    assert_close(linalg.diagonal_sum(grad, append_ones=True)[0, :3], (grad[0] ** 2).sum(0)[:3])
    inverse = linalg.precondition_inverse(
        grad,
        linalg.shifted_inverse_diagonal(a_diag, torch.tensor([0.5]), torch.float64),
        linalg.shifted_inverse_diagonal(g_diag, torch.tensor([0.2]), torch.float64),
    )
    dense = (
        torch.linalg.inv(torch.diag(g_diag[0]) + 0.2 * torch.eye(3))
        @ grad[0]
        @ torch.linalg.inv(torch.diag(a_diag[0]) + 0.5 * torch.eye(5))
    )
    assert_close(inverse[0], dense)
