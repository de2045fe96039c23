"""Pure linear algebra of K-FAC: covariances, decompositions, preconditioning, KL-clip.

Every function here is stateless and works on *batched* blocks: a leading dimension ``B`` holds
independent blocks (groups of a grouped convolution, channels of a unit-wise norm block, else 1).
Shapes use ``d_a`` for the input side (``A``, ``d_a = fan_in (+1 with bias)``) and ``d_g`` for the
output side (``G``). A use's gradient is the matrix ``dW`` of shape ``[B, d_g, d_a]`` (weight with
the bias as its last column). A factor is dense ``[B, d, d]`` or diagonal ``[B, d]``; a diagonal
side has eigenvectors ``I`` (passed as ``None``) and eigenvalues equal to its diagonal.

Conventions (docs/design.md): with column-major ``vec``, ``(A ⊗ G) vec(X) = vec(G X A)``, so the
damped Kronecker inverse acts on the matrix gradient as

    P = Q_G [(Q_G^T dW Q_A) / (e_G e_A^T + λ)] Q_A^T.

A unit-wise block (normalisation layers) is the case ``A = [1]``: ``P = (F + λ I)^-1 u``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def covariance_sum(rows: Tensor, *, append_ones: bool, mask: Tensor | None = None) -> Tensor:
    """Return ``Σ_m r_m r_m^T`` for ``rows`` of shape ``[B, M, d]``, shape ``[B, d', d']``.

    With ``append_ones`` every row is treated as ``[r_m; 1]`` (the bias column of ``a``) without
    materialising the concatenation: the extra row/column is the column sum ``Σ_m r_m`` and the
    corner is ``M``. This avoids one full copy of the (often large) patch matrix. ``mask``
    (``[M]``, 0 or 1) keeps only the rows it marks (padding positions are not rows): the sums and
    the corner run over them alone.
    """
    if mask is not None:
        rows = rows * mask.to(rows.dtype).reshape(1, -1, 1)
    gram = rows.mT @ rows
    if not append_ones:
        return gram
    count: int | Tensor = rows.shape[1] if mask is None else mask.to(rows.dtype).sum()
    return with_ones_row(gram, rows.sum(dim=1), count)


def with_ones_row(gram: Tensor, column_sum: Tensor, count: int | Tensor) -> Tensor:
    """``[[gram, s], [sᵀ, count]]`` per block: the covariance sum of rows ``[r_m; 1]`` from that of
    the rows ``r_m`` (``gram`` ``[B, d, d]``), their sum ``s = Σ_m r_m`` (``[B, d]``) and their
    number."""
    blocks, dim = gram.shape[:2]
    out = gram.new_empty(blocks, dim + 1, dim + 1)
    out[:, :dim, :dim] = gram
    out[:, :dim, dim] = column_sum
    out[:, dim, :dim] = column_sum
    out[:, dim, dim] = count
    return out


def factor_sum(
    rows: Tensor, *, diagonal: bool, append_ones: bool, mask: Tensor | None = None
) -> Tensor:
    """``covariance_sum`` of ``rows``, or only its diagonal (``diagonal_sum``) for a factor side
    kept diagonal (``mask``: the rows to keep)."""
    if diagonal:
        return diagonal_sum(rows, append_ones=append_ones, mask=mask)
    return covariance_sum(rows, append_ones=append_ones, mask=mask)


def diagonal_sum(rows: Tensor, *, append_ones: bool, mask: Tensor | None = None) -> Tensor:
    """The diagonal of ``covariance_sum(rows, append_ones, mask)``: ``Σ_m r_m²``, ``[B, d']``."""
    if mask is not None:
        rows = rows * mask.to(rows.dtype).reshape(1, -1, 1)
    squares = (rows * rows).sum(dim=1)
    if not append_ones:
        return squares
    count = rows.shape[1] if mask is None else mask.to(rows.dtype).sum()
    ones = torch.full_like(squares[:, :1], 1.0) * count
    return torch.cat([squares, ones], dim=1)


def symmetric_eigh(matrix: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of a batch of symmetric PSD matrices in ``dtype``.

    The input is symmetrised (``(F + F^T) / 2``) against round-off and the eigenvalues are clamped
    at zero: a covariance is PSD, negative eigenvalues are round-off and would make
    ``e_G e_A^T + λ`` vanish for small ``λ``. The eigenvectors are returned *contiguous*: ``eigh``
    gives them in a column-major layout, and a matrix product with a strided operand rounds
    differently from one with a contiguous copy — every rank must multiply the same layout for
    DDP replicas to stay bitwise identical. Raises ``torch.linalg.LinAlgError`` when ``eigh``
    does not converge (a non-finite result is left to the caller's validity mask).
    """
    sym = matrix.to(dtype)
    sym = (sym + sym.mT) / 2
    eigenvalues, eigenvectors = torch.linalg.eigh(sym)
    return eigenvalues.clamp_min(0), eigenvectors.contiguous()


def precondition_eigen(
    grad: Tensor,
    eigenvalues_a: Tensor,
    eigenvectors_a: Tensor | None,
    eigenvalues_g: Tensor,
    eigenvectors_g: Tensor | None,
    damping: float,
) -> Tensor:
    """Exact ``(A ⊗ G + λ I)^-1 vec(dW)`` from the eigendecompositions of ``A`` and ``G``.

    ``P = Q_G [(Q_G^T dW Q_A) / (e_G e_A^T + λ)] Q_A^T`` (shapes ``[B, d_g, d_a]``); a ``None``
    eigenvector matrix is the identity (a diagonal factor).
    """
    rotated = grad
    if eigenvectors_g is not None:
        rotated = eigenvectors_g.mT @ rotated
    if eigenvectors_a is not None:
        rotated = rotated @ eigenvectors_a
    rotated = rotated / (eigenvalues_g.unsqueeze(-1) * eigenvalues_a.unsqueeze(-2) + damping)
    if eigenvectors_g is not None:
        rotated = eigenvectors_g @ rotated
    if eigenvectors_a is not None:
        rotated = rotated @ eigenvectors_a.mT
    return rotated


def mean_diagonal(value: Tensor, *, diagonal: bool) -> Tensor:
    """``tr F / dim F`` per block (shape ``[B]``) of a dense or diagonal factor."""
    diag = value if diagonal else torch.diagonal(value, dim1=-2, dim2=-1)
    return diag.mean(-1)


def pi_correction(mean_a: Tensor, mean_g: Tensor) -> Tensor:
    """π of Martens & Grosse 2015 §6.3: ``sqrt((tr A / dim A) / (tr G / dim G))`` per block,
    from ``mean_diagonal`` of both factors. A zero trace (e.g. a dead layer) gives ``π = 1``."""
    ratio = mean_a / mean_g
    valid = (mean_a > 0) & (mean_g > 0) & torch.isfinite(ratio)
    return torch.where(valid, ratio, torch.ones_like(ratio)).sqrt()


def shifted_inverse(matrix: Tensor, shift: Tensor, dtype: torch.dtype) -> Tensor:
    """``(F + shift I)^-1`` per block (``shift`` of shape ``[B]``), by Cholesky in ``dtype``.

    Raises ``torch.linalg.LinAlgError`` when the shifted matrix is not positive definite.
    """
    sym = matrix.to(dtype)
    sym = (sym + sym.mT) / 2
    eye = torch.eye(sym.shape[-1], dtype=dtype, device=sym.device)
    shifted = sym + shift.to(dtype).view(-1, 1, 1) * eye
    return torch.cholesky_inverse(torch.linalg.cholesky(shifted)).contiguous()


def shifted_inverse_diagonal(diagonal: Tensor, shift: Tensor, dtype: torch.dtype) -> Tensor:
    """``(diag(F) + shift)^-1`` per block, shape ``[B, d]`` (the inverse of a diagonal factor)."""
    return 1.0 / (diagonal.to(dtype) + shift.to(dtype).view(-1, 1))


def precondition_inverse(grad: Tensor, inverse_a: Tensor, inverse_g: Tensor) -> Tensor:
    """Factored-Tikhonov step ``P = G_damped^-1 dW A_damped^-1`` (shapes ``[B, d_g, d_a]``); a
    ``[B, d]`` inverse is diagonal."""
    out = grad
    out = inverse_g.unsqueeze(-1) * out if inverse_g.dim() == 2 else inverse_g @ out
    out = out * inverse_a.unsqueeze(-2) if inverse_a.dim() == 2 else out @ inverse_a
    return out


def kl_clip_scale(
    preconditioned: list[Tensor],
    gradients: list[Tensor],
    learning_rates: list[float],
    kl_clip: float,
    grad_scale: float | Tensor = 1.0,
) -> Tensor:
    """KL-clip factor of Ba et al. 2017 (distributed K-FAC), with per-use learning rates.

    ``ν = min(1, sqrt(κ / Σ_u lr_u² <P_u, dW_u>))``. ``grad_scale`` is the factor by which both
    ``P`` and ``dW`` are currently scaled (a GradScaler's loss scale); it is divided out squared.
    A non-positive or non-finite sum gives ``ν = 1``. Returns a 0-dim float64 tensor without
    synchronising with the device.
    """
    if not preconditioned:
        return torch.ones((), dtype=torch.float64)
    terms = [
        (lr**2) * (p * g).sum(dtype=torch.float64)
        for p, g, lr in zip(preconditioned, gradients, learning_rates, strict=True)
    ]
    vg_sum = torch.stack(terms).sum() / torch.as_tensor(grad_scale, dtype=torch.float64) ** 2
    tiny = torch.finfo(torch.float64).tiny
    nu = torch.sqrt(kl_clip / vg_sum.clamp_min(tiny)).clamp(max=1.0)
    return torch.where((vg_sum > 0) & torch.isfinite(vg_sum), nu, torch.ones_like(nu))
