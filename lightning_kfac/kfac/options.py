"""K-FAC's options: one validated object shared by the preconditioner, the strategies and the CLI.

``KFACOptions`` holds every K-FAC keyword with its range check, so a bad value is rejected where
the user passes it (the constructor, in the main process) with a message that names the option
and the fix. ``KFACPreconditioner``, both ``KFACDDPStrategy`` classes and ``examples/train.py``
take the same names; none of them repeats the list (``option_names()``).

Choices are ``str``-Enums: ``ComputeMethod("eigen")`` and ``ComputeMethod.EIGEN`` are the same.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

#: A hyper-parameter given either as a constant or as a function of the optimizer step
#: (the number of completed ``KFACPreconditioner.step`` calls, starting at 0).
Schedule = float | Callable[[int], float]

#: What ``skip_modules`` accepts: a qualified module name or class name (an ``fnmatch`` pattern such
#: as ``"head.*"`` or ``"Conv2d"``), or a module class.
SkipSpec = str | type[nn.Module]


class StrEnum(str, enum.Enum):
    """A string-valued choice: ``Choice("value")`` and ``Choice.VALUE == "value"`` both work."""

    def __str__(self) -> str:
        return str(self.value)

    @classmethod
    def parse(cls, value: Any, option: str) -> Any:
        """``cls(value)`` with an error that names the option and lists the choices."""
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(repr(member.value) for member in cls)
            raise ValueError(f"{option}={value!r} is not one of {choices}") from None


class ComputeMethod(StrEnum):
    """How the damped Kronecker factors are inverted.

    - ``EIGEN`` (default): eigendecompose ``A = Q_A diag(e_A) Q_A^T`` and
      ``G = Q_G diag(e_G) Q_G^T`` and divide by ``e_G e_A^T + λ`` in the eigenbasis. This is the
      *exact* inverse of the damped Kronecker product ``A ⊗ G + λ I`` (George et al. 2018,
      "EKFAC", §3; Osawa et al. 2019).
    - ``INVERSE``: factored Tikhonov damping with the π correction of Martens & Grosse 2015, §6.3:
      ``(A + π √λ I)^-1 ⊗ (G + √λ / π I)^-1`` with ``π = sqrt((tr A / dim A) / (tr G / dim G))``.
      Cheaper to apply, but only an approximation of ``(A ⊗ G + λ I)^-1``.
    """

    EIGEN = "eigen"
    INVERSE = "inverse"


class KFACApproximation(StrEnum):
    """How a weight-shared use (``T`` positions per sample) forms its factors (Eschenhagen et al.
    2023, "Kronecker-Factored Approximate Curvature for Modern Neural Network Architectures").

    - ``EXPAND`` (default): every position is a sample of its own for ``A``;
      ``A = (1/(N·T)) Σ_{n,t} a a^T``, ``G = (1/N) Σ_{n,t} g g^T`` (KFC for convolutions).
    - ``REDUCE``: positions are summed per sample first; ``a_n = (1/T) Σ_t a_{n,t}``,
      ``g_n = Σ_t g_{n,t}``, ``A = (1/N) Σ_n a_n a_n^T``, ``G = (1/N) Σ_n g_n g_n^T``. Exact for
      linear weight-shared layers whose loss depends on a sum over positions; its factors cost
      ``O(N d²)`` instead of ``O(N T d²)``. Uses with ``T = 1`` are identical under both.
    """

    EXPAND = "expand"
    REDUCE = "reduce"


class DistributionMode(StrEnum):
    """What owners send after decomposing (Pauloski et al. 2021, KAISA, §4).

    - ``BROADCAST_DECOMPOSITIONS`` (COMM-OPT, default): owners broadcast the decompositions and
      every rank preconditions every layer locally.
    - ``BROADCAST_GRADIENTS`` (MEM-OPT): decompositions stay on their owner, which preconditions
      its layers each step and broadcasts the preconditioned gradients.
    """

    BROADCAST_DECOMPOSITIONS = "broadcast_decompositions"
    BROADCAST_GRADIENTS = "broadcast_gradients"


class NonFiniteGradients(StrEnum):
    """What K-FAC does when the raw gradients of a step are not finite and no AMP scaler will skip
    the step: ``SKIP_STEP`` (default) zeroes every gradient (so the optimizer's step changes no
    weight through the gradient), leaves K-FAC's state unchanged and warns once; ``RAISE`` raises
    ``FloatingPointError``."""

    SKIP_STEP = "skip_step"
    RAISE = "raise"


_DTYPE_NAMES = {"float32": torch.float32, "float64": torch.float64}


def _parse_dtype(value: Any, option: str) -> torch.dtype | None:
    if value is None:
        return None
    if isinstance(value, str):
        name = value.removeprefix("torch.")
        if name in _DTYPE_NAMES:
            return _DTYPE_NAMES[name]
    elif value in _DTYPE_NAMES.values():
        return value
    raise ValueError(
        f"{option}={value!r} is not supported: use torch.float32 or torch.float64 "
        "(or the names 'float32', 'float64'); decompositions need full precision"
    )


def _check_positive_int(value: Any, option: str, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        none = " or None" if allow_none else ""
        raise ValueError(f"{option} must be a positive integer{none}, got {value!r}")


def _check_number(value: Any, option: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{option} must be a number or a callable of the step, got {value!r}")
    return float(value)


def check_schedule_value(option: str, value: float) -> float:
    """Range check of one (evaluated) schedulable option; raises naming the option and the fix."""
    if not math.isfinite(value):
        raise ValueError(f"{option} must be finite, got {value!r}")
    if option == "factor_decay":
        if not 0.0 <= value < 1.0:
            raise ValueError(
                f"factor_decay must lie in [0, 1) (0 keeps only the last batch; 1 would never "
                f"update the factors), got {value!r}"
            )
    elif value <= 0.0:
        hint = {
            "damping": "K-FAC divides by e_G e_A^T + damping; use e.g. 1e-3",
            "kl_clip": "use None to disable the KL-clip",
            "lr": "omit lr to read it from the optimizer",
        }.get(option, "")
        raise ValueError(f"{option} must be > 0, got {value!r}" + (f" ({hint})" if hint else ""))
    return value


def evaluate(value: Schedule | None, step: int, option: str = "value") -> float | None:
    """The value of a constant-or-callable option at ``step``, range-checked (schedules are
    checked here, when evaluated, since their values are unknown before)."""
    if value is None:
        return None
    if callable(value):
        result = value(step)
        if isinstance(result, torch.Tensor):
            result = float(result)
        return check_schedule_value(option, _check_number(result, f"{option}({step})"))
    return float(value)


@dataclasses.dataclass(frozen=True)
class KFACOptions:
    """Every K-FAC option, validated on construction.

    Args:
        damping: ``λ`` (> 0, float or callable of the step). Eigen method: added to the
            eigenvalue products, i.e. the exact inverse of ``A ⊗ G + λ I``.
        factor_update_interval: Capture activations / output gradients and update the factors
            every this many steps.
        inverse_update_interval: Recompute the decompositions every this many steps.
        factor_decay: Running-average decay of the factors, in ``[0, 1)``.
        kl_clip: ``κ`` of the KL-clip (> 0); ``None`` disables it.
        lr: Learning rate for the KL-clip (> 0); omitted: each param group's current lr.
        skip_modules: Modules whose parameters K-FAC leaves to the optimizer: qualified names or
            class names (``fnmatch`` patterns such as ``"head.*"`` or ``"Conv2d"``) or classes.
        factor_dtype: Dtype of the factors (``torch.float32``/``torch.float64`` or their names);
            default float32, or the parameter dtype if wider.
        inverse_dtype: Dtype of the decompositions; default as ``factor_dtype``.
        compute_method: ``"eigen"`` (exact damped inverse) or ``"inverse"`` (factored Tikhonov).
        approximation: ``"expand"`` (default) or ``"reduce"`` for weight-shared uses.
        factor_max_rows: Estimate each use's ``A``/``G`` batch from at most this many of its
            ``N·T`` rows (uniform without replacement, rescaled: unbiased); ``None``: all rows.
        max_factor_dim: A factor side above this is kept diagonal (memory ``d`` instead of
            ``d²``, no eigendecomposition). The default 8192 keeps a dense factor and its
            eigenvectors at 0.5 GB in float32 and puts a 50k-token head's vocabulary side on the
            diagonal (docs/design.md §7).
        nonfinite_gradients: ``"skip_step"`` or ``"raise"`` when raw gradients are not finite.
        batch_dim: ``N``, the number of samples the loss averages over, is the size of this
            dimension of the first tensor among the model's forward arguments (in Lightning:
            of the batch). 1 for sequence-first batches ``(L, N, ...)``. ``G`` is built from
            per-sample gradients ``N · ∂loss/∂s``, so a wrong ``N`` rescales it.
        padding_mask: Which positions of a padded batch are real (docs/design.md, "Padding"): a
            key looked up in the training forward's keyword arguments and in a mapping among its
            positional arguments (a dict / ``BatchEncoding`` batch) — default
            ``"attention_mask"`` —, or a callable of the batch (the forward's first positional
            argument, else its keyword arguments) returning an ``[N, T]`` mask (nonzero: real),
            or None. Padded positions are not positions of the uses laid out over ``[N, T]``
            (linear, embedding, normalisation and elementwise uses; convolutions keep KFC's
            all-locations convention). Without a mask nothing changes.
        distribution_mode: ``"broadcast_decompositions"`` or ``"broadcast_gradients"``.
        factor_bucket_cap_mb: Size of the factor all-reduce buckets (MiB, > 0); not DDP's own
            ``bucket_cap_mb`` (gradient buckets), which ``KFACDDPStrategy`` passes to DDP.
    """

    damping: Schedule = 1e-3
    factor_update_interval: int = 1
    inverse_update_interval: int = 10
    factor_decay: Schedule = 0.95
    kl_clip: Schedule | None = 1e-3
    lr: Schedule | None = None
    skip_modules: tuple[SkipSpec, ...] = ()
    factor_dtype: torch.dtype | str | None = None
    inverse_dtype: torch.dtype | str | None = None
    compute_method: ComputeMethod | str = ComputeMethod.EIGEN
    approximation: KFACApproximation | str = KFACApproximation.EXPAND
    factor_max_rows: int | None = None
    max_factor_dim: int = 8192
    nonfinite_gradients: NonFiniteGradients | str = NonFiniteGradients.SKIP_STEP
    batch_dim: int = 0
    padding_mask: str | Callable[[Any], Any] | None = "attention_mask"
    distribution_mode: DistributionMode | str = DistributionMode.BROADCAST_DECOMPOSITIONS
    factor_bucket_cap_mb: float = 25.0

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        for option in ("damping", "factor_decay", "kl_clip", "lr"):
            value = getattr(self, option)
            if value is None:
                if option in ("damping", "factor_decay"):
                    raise ValueError(f"{option} must be given (a number or a callable of the step)")
                continue
            if not callable(value):
                set_(self, option, check_schedule_value(option, _check_number(value, option)))
        _check_positive_int(self.factor_update_interval, "factor_update_interval")
        _check_positive_int(self.inverse_update_interval, "inverse_update_interval")
        _check_positive_int(self.factor_max_rows, "factor_max_rows", allow_none=True)
        _check_positive_int(self.max_factor_dim, "max_factor_dim")
        if isinstance(self.batch_dim, bool) or not isinstance(self.batch_dim, int):
            raise ValueError(f"batch_dim must be an integer, got {self.batch_dim!r}")
        mask = self.padding_mask
        if not (mask is None or callable(mask) or (isinstance(mask, str) and mask)):
            raise ValueError(
                f"padding_mask must be a key of the batch (e.g. 'attention_mask'), a callable of "
                f"the batch returning an [N, T] mask, or None, got {mask!r}"
            )
        bucket = _check_number(self.factor_bucket_cap_mb, "factor_bucket_cap_mb")
        if not (math.isfinite(bucket) and bucket > 0):
            raise ValueError(
                f"factor_bucket_cap_mb must be a positive number, got {self.factor_bucket_cap_mb!r}"
            )
        set_(self, "factor_bucket_cap_mb", bucket)
        set_(self, "factor_dtype", _parse_dtype(self.factor_dtype, "factor_dtype"))
        set_(self, "inverse_dtype", _parse_dtype(self.inverse_dtype, "inverse_dtype"))
        set_(self, "compute_method", ComputeMethod.parse(self.compute_method, "compute_method"))
        set_(self, "approximation", KFACApproximation.parse(self.approximation, "approximation"))
        set_(
            self,
            "nonfinite_gradients",
            NonFiniteGradients.parse(self.nonfinite_gradients, "nonfinite_gradients"),
        )
        set_(
            self,
            "distribution_mode",
            DistributionMode.parse(self.distribution_mode, "distribution_mode"),
        )
        skip = self.skip_modules
        if isinstance(skip, str | type):
            skip = (skip,)
        skip = tuple(skip)
        for spec in skip:
            if not (
                isinstance(spec, str) or (isinstance(spec, type) and issubclass(spec, nn.Module))
            ):
                raise ValueError(
                    f"skip_modules entries must be name/class patterns (str) or nn.Module classes, "
                    f"got {spec!r}"
                )
        set_(self, "skip_modules", skip)

    # -- construction from keywords ----------------------------------------------------------
    @classmethod
    def from_kwargs(cls, options: KFACOptions | None = None, **kwargs: Any) -> KFACOptions:
        """``options`` (or the defaults) with ``kwargs`` replacing fields; unknown keywords are
        rejected with the closest option name."""
        reject_unknown(kwargs, option_names(), where="K-FAC")
        base = options if options is not None else cls()
        return dataclasses.replace(base, **kwargs) if kwargs else base

    def to_dict(self) -> dict[str, Any]:
        """Plain values (enums and dtypes as strings, callables by name) for loggers' configs."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, enum.Enum):
                value = value.value
            elif isinstance(value, torch.dtype):
                value = str(value).removeprefix("torch.")
            elif callable(value) and not isinstance(value, type):
                value = getattr(value, "__qualname__", repr(value))
            elif field.name == "skip_modules":
                value = [s if isinstance(s, str) else s.__name__ for s in value]
            out[field.name] = value
        return out


def option_names() -> tuple[str, ...]:
    """The K-FAC keyword names, in declaration order."""
    return tuple(field.name for field in dataclasses.fields(KFACOptions))


def split_options(kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``kwargs`` split into (K-FAC options, the rest)."""
    names = set(option_names())
    kfac = {k: v for k, v in kwargs.items() if k in names}
    rest = {k: v for k, v in kwargs.items() if k not in names}
    return kfac, rest


def reject_unknown(
    kwargs: Iterable[str], known: Iterable[str], *, where: str, others: str = ""
) -> None:
    """Raise ``TypeError`` for keywords not in ``known`` (K-FAC's options, then any other accepted
    names), suggesting the closest known names."""
    known = list(known)
    unknown = [name for name in kwargs if name not in known]
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise TypeError(
        f"unexpected {where} keyword argument(s): {', '.join(hints)}; "
        f"K-FAC options are: {', '.join(option_names())}" + (f"; {others}" if others else "")
    )
