"""Pure linear algebra of K-FAC: covariances, decompositions, preconditioning, KL-clip.

Every function here is stateless and works on *batched* blocks: a leading dimension ``B``
holds independent Kronecker blocks (``B = groups`` for grouped convolutions, ``B = 1`` otherwise).
Shapes use ``d_a`` for the input side (``A``, ``d_a = fan_in (+1 with bias)``) and ``d_g`` for the
output side (``G``). A layer's gradient is the matrix ``dW`` of shape ``[B, d_g, d_a]``
(weight with the bias as its last column).

Conventions (DESIGN §2): with column-major ``vec``, ``(A ⊗ G) vec(X) = vec(G X A)``, so the
damped Kronecker inverse acts on the matrix gradient as

    P = Q_G [(Q_G^T dW Q_A) / (e_G e_A^T + λ)] Q_A^T.
"""

from __future__ import annotations

import torch
from torch import Tensor


def covariance_sum(rows: Tensor, *, append_ones: bool) -> Tensor:
    """Return ``Σ_m r_m r_m^T`` for ``rows`` of shape ``[B, M, d]``, shape ``[B, d', d']``.

    With ``append_ones`` every row is treated as ``[r_m; 1]`` (the bias column of ``a``) without
    materialising the concatenation: the extra row/column is the column sum ``Σ_m r_m`` and the
    corner is ``M``. This avoids one full copy of the (often large) patch matrix.
    """
    gram = rows.mT @ rows
    if not append_ones:
        return gram
    blocks, count, dim = rows.shape
    column_sum = rows.sum(dim=1)  # [B, d]
    out = rows.new_empty(blocks, dim + 1, dim + 1)
    out[:, :dim, :dim] = gram
    out[:, :dim, dim] = column_sum
    out[:, dim, :dim] = column_sum
    out[:, dim, dim] = count
    return out


def symmetric_eigh(matrix: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of a batch of symmetric PSD matrices in ``dtype``.

    The input is symmetrised (``(F + F^T) / 2``) against round-off and the eigenvalues are clamped
    at zero: a covariance is PSD, negative eigenvalues are round-off and would make
    ``e_G e_A^T + λ`` vanish for small ``λ``. Raises ``torch.linalg.LinAlgError`` when ``eigh``
    does not converge and ``FloatingPointError`` when its result is not finite.
    """
    sym = matrix.to(dtype)
    sym = (sym + sym.mT) / 2
    eigenvalues, eigenvectors = torch.linalg.eigh(sym)
    if not bool(torch.isfinite(eigenvalues).all() & torch.isfinite(eigenvectors).all()):
        raise FloatingPointError("eigh returned non-finite values")
    return eigenvalues.clamp_min(0), eigenvectors


def precondition_eigen(
    grad: Tensor,
    eigenvalues_a: Tensor,
    eigenvectors_a: Tensor,
    eigenvalues_g: Tensor,
    eigenvectors_g: Tensor,
    damping: float,
) -> Tensor:
    """Exact ``(A ⊗ G + λ I)^-1 vec(dW)`` from the eigendecompositions of ``A`` and ``G``.

    ``P = Q_G [(Q_G^T dW Q_A) / (e_G e_A^T + λ)] Q_A^T`` (shapes ``[B, d_g, d_a]``).
    """
    rotated = eigenvectors_g.mT @ grad @ eigenvectors_a
    rotated = rotated / (eigenvalues_g.unsqueeze(-1) * eigenvalues_a.unsqueeze(-2) + damping)
    return eigenvectors_g @ rotated @ eigenvectors_a.mT


def pi_correction(factor_a: Tensor, factor_g: Tensor) -> Tensor:
    """π of Martens & Grosse 2015 §6.3: ``sqrt((tr A / dim A) / (tr G / dim G))`` per block.

    Returns shape ``[B]``; a zero trace (e.g. a dead layer) gives ``π = 1``.
    """
    mean_a = torch.diagonal(factor_a, dim1=-2, dim2=-1).mean(-1)
    mean_g = torch.diagonal(factor_g, dim1=-2, dim2=-1).mean(-1)
    ratio = mean_a / mean_g
    valid = (mean_a > 0) & (mean_g > 0) & torch.isfinite(ratio)
    return torch.where(valid, ratio, torch.ones_like(ratio)).sqrt()


def shifted_inverse(matrix: Tensor, shift: Tensor, dtype: torch.dtype) -> Tensor:
    """``(F + shift I)^-1`` per block (``shift`` of shape ``[B]``), by Cholesky in ``dtype``.

    Raises ``torch.linalg.LinAlgError`` when the shifted matrix is not positive definite and
    ``FloatingPointError`` when the result is not finite.
    """
    sym = matrix.to(dtype)
    sym = (sym + sym.mT) / 2
    eye = torch.eye(sym.shape[-1], dtype=dtype, device=sym.device)
    shifted = sym + shift.to(dtype).view(-1, 1, 1) * eye
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(shifted))
    if not bool(torch.isfinite(inverse).all()):
        raise FloatingPointError("inverse is not finite")
    return inverse


def precondition_inverse(grad: Tensor, inverse_a: Tensor, inverse_g: Tensor) -> Tensor:
    """Factored-Tikhonov step ``P = G_damped^-1 dW A_damped^-1`` (shapes ``[B, d_g, d_a]``)."""
    return inverse_g @ grad @ inverse_a


def kl_clip_scale(
    preconditioned: list[Tensor],
    gradients: list[Tensor],
    learning_rates: list[float],
    kl_clip: float,
    grad_scale: float | Tensor = 1.0,
) -> Tensor:
    """KL-clip factor of Ba et al. 2017 (distributed K-FAC), with per-layer learning rates.

    ``ν = min(1, sqrt(κ / Σ_l lr_l² <P_l, dW_l>))``. ``grad_scale`` is the factor by which both
    ``P`` and ``dW`` are currently scaled (a GradScaler's loss scale); it is divided out squared.
    A non-positive sum (no curvature information) gives ``ν = 1``. Returns a 0-dim tensor without
    synchronising with the device.
    """
    if not preconditioned:
        return torch.ones(())
    terms = [
        (lr**2) * (p.to(torch.float64) * g.to(torch.float64)).sum()
        for p, g, lr in zip(preconditioned, gradients, learning_rates, strict=True)
    ]
    vg_sum = torch.stack(terms).sum() / torch.as_tensor(grad_scale, dtype=torch.float64) ** 2
    tiny = torch.finfo(torch.float64).tiny
    nu = torch.sqrt(kl_clip / vg_sum.clamp_min(tiny)).clamp(max=1.0)
    return torch.where(vg_sum > 0, nu, torch.ones_like(nu))
