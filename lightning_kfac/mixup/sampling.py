"""Mixup's random draws: ``λ ~ Beta(α, α)`` and the partner permutation (pure torch).

Every function takes an explicit ``torch.Generator``; no global RNG state is touched. The
contract these draws serve is in :mod:`lightning_kfac.mixup`.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor

#: Rounds of the Gamma rejection sampler before it gives up. For the shapes it is used with
#: (``a ≥ 1``) each round accepts a draw with probability above 0.95, so a draw is still pending
#: after 64 rounds with probability below ``0.05^64 ≈ 5e-84``: reaching the bound means a bug or
#: an invalid shape, and the sampler raises instead of looping forever.
MAX_REJECTION_ROUNDS = 64


def real_as_float(value: Any) -> float | None:
    """``value`` as a float (``inf`` for an int beyond float64), or ``None`` when it is not a real
    number (a ``bool`` is not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        return float(value)
    except OverflowError:
        return math.inf


def _check_shape(shape: float, name: str = "shape") -> float:
    value = real_as_float(shape)
    if value is None:
        raise TypeError(f"{name} must be a real number, got {shape!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {shape!r}")
    return value


def sample_log_gamma(shape: float, count: int, generator: torch.Generator) -> Tensor:
    """``count`` draws of ``log X`` with ``X ~ Gamma(shape, 1)``, in float64 on the CPU.

    Marsaglia & Tsang (2000): for ``a ≥ 1``, ``X = d v`` with ``d = a − 1/3``,
    ``v = (1 + c z)³``, ``c = 1/√(9d)``, ``z ~ N(0, 1)``, accepted when
    ``log u < z²/2 + d − d v + d log v``; at most ``MAX_REJECTION_ROUNDS`` rounds, then
    ``RuntimeError``. For ``shape < 1``, ``Gamma(a) = Gamma(a + 1) · U^(1/a)``, so
    ``log X = log Gamma(a + 1) + log(U) / a`` with ``U ∈ (0, 1]``: in log space this stays finite
    where ``X`` itself underflows to 0 (at shape 0.01 about 6 draws in 10,000 are exactly 0 in
    float64; at 1e-30 all are), except for subnormal shapes, where it may be ``−∞``.

    Raises:
        ValueError: ``shape`` is not finite and positive.
    """
    shape = _check_shape(shape)
    boost = shape < 1.0
    a = shape + 1.0 if boost else shape
    d = a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    out = torch.empty(count, dtype=torch.float64)
    pending = torch.arange(count)
    for _ in range(MAX_REJECTION_ROUNDS):
        if not pending.numel():
            break
        n = pending.numel()
        z = torch.randn(n, generator=generator, dtype=torch.float64)
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        v = (1.0 + c * z) ** 3
        log_v = torch.log(v.clamp_min(1e-300))
        accept = (v > 0) & (torch.log(u) < 0.5 * z**2 + d - d * v + d * log_v)
        out[pending[accept]] = (math.log(d) + log_v)[accept]
        pending = pending[~accept]
    if pending.numel():
        raise RuntimeError(
            f"Gamma({shape}) rejection sampler: {pending.numel()} of {count} draws still rejected "
            f"after {MAX_REJECTION_ROUNDS} rounds (each accepts with probability > 0.95)"
        )
    if boost:
        u = 1.0 - torch.rand(count, generator=generator, dtype=torch.float64)  # (0, 1]
        out = out + torch.log(u) / shape
    return out


def sample_gamma(shape: float, count: int, generator: torch.Generator) -> Tensor:
    """``count`` draws of Gamma(shape, 1) from ``generator`` (Marsaglia & Tsang 2000).

    ``exp`` of :func:`sample_log_gamma`; draws below the smallest float64 are 0.
    """
    return sample_log_gamma(shape, count, generator).exp()


def sample_beta(alpha: float, count: int, generator: torch.Generator) -> Tensor:
    """``count`` draws of Beta(α, α) as ``X / (X + Y)`` with ``X, Y ~ Gamma(α)`` (float64, CPU).

    Computed as ``sigmoid(log X − log Y)``, which never divides ``0 / 0``: for tiny ``α`` both
    Gamma draws underflow in linear space, but their log difference is ``±O(1/α)`` and the
    sigmoid gives exactly 0 or 1 — Beta(α, α) tends to a fair coin on ``{0, 1}`` as ``α → 0``.
    Where the log difference is undefined (both log draws ``−∞``, possible only for subnormal
    ``α``), that limit is used: a fair coin from ``generator``. Huge ``α`` gives ``λ ≈ 1/2``
    (``Var = 1 / (4 (2α + 1))``). The result is in ``[0, 1]`` and never NaN.

    Raises:
        ValueError: ``alpha`` is not finite and positive (``MixupCallback`` uses ``alpha=0`` to
            switch mixup off and never samples it).
    """
    _check_shape(alpha, "alpha")
    difference = sample_log_gamma(alpha, count, generator) - sample_log_gamma(
        alpha, count, generator
    )
    undefined = torch.isnan(difference)
    if bool(undefined.any()):
        coin = torch.rand(int(undefined.sum()), generator=generator, dtype=torch.float64) < 0.5
        difference[undefined] = torch.where(coin, math.inf, -math.inf).to(difference)
    return torch.sigmoid(difference)


def sample_lambdas(
    alpha: float, count: int, generator: torch.Generator, *, per_sample: bool = False
) -> Tensor:
    """``λ`` for a batch of ``count`` samples (float64, shape ``[count]``): one draw of
    Beta(α, α) shared by the batch, or one per sample with ``per_sample`` (:func:`sample_beta`).

    Raises:
        ValueError: ``alpha`` is not finite and positive.
    """
    return sample_beta(alpha, count if per_sample else 1, generator).expand(count).clone()


def sample_permutation(count: int, generator: torch.Generator) -> Tensor:
    """The mixup partners: ``π``, a uniformly random permutation of ``range(count)`` (int64)."""
    return torch.randperm(count, generator=generator)
