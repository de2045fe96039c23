"""Mixup and CutMix in pure PyTorch: sampling, input mixing, and labels that mix their loss.

Mixup (Zhang et al. 2018) trains on ``x̃_i = λ_i x_i + (1 − λ_i) x_π(i)`` with the loss
``λ_i CE(f(x̃_i), y_i) + (1 − λ_i) CE(f(x̃_i), y_π(i))``; CutMix (Yun et al. 2019) pastes a box of
``x_π(i)`` into ``x_i`` and sets ``λ_i`` to the kept area. Naganuma & Yokota (CCGRID 2019) show the
smoothing closes K-FAC's large-batch generalization gap.

``MixedLabels`` lets an *unmodified* ``training_step`` compute that loss: it is an integer label
tensor whose values are each sample's dominant label (``y_i`` if ``λ_i ≥ 1/2`` else ``y_π(i)``:
valid integer labels for metrics and ``argmax`` comparisons) and which carries both label sets
and ``λ``. ``F.cross_entropy`` / ``nn.CrossEntropyLoss`` called with it return the exact mixed
loss (with ``weight``, ``ignore_index``, ``label_smoothing`` and any reduction); any other loss
raises ``MixupLossError`` instead of silently training on un-mixed labels.

Everything random takes an explicit ``torch.Generator``; no global RNG state is touched.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

SUPPORTED_FORMS = (
    "F.cross_entropy(logits, y) or nn.CrossEntropyLoss(...)(logits, y) on integer class labels "
    "(weight, ignore_index, label_smoothing and every reduction are supported), or float "
    "(soft / one-hot) targets in the batch, which are mixed directly"
)


class MixupLossError(TypeError):
    """A loss the mixup callback cannot make exact was called with mixed labels."""


# -- sampling ---------------------------------------------------------------------------------
def sample_gamma(shape: float, count: int, generator: torch.Generator) -> Tensor:
    """``count`` draws of Gamma(shape, 1) from ``generator`` (Marsaglia & Tsang 2000).

    For ``shape < 1`` uses ``Gamma(a) = Gamma(a + 1) · U^(1/a)``.
    """
    boost = shape < 1.0
    a = shape + 1.0 if boost else shape
    d = a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    out = torch.empty(count, dtype=torch.float64)
    pending = torch.arange(count)
    while pending.numel():
        n = pending.numel()
        z = torch.randn(n, generator=generator, dtype=torch.float64)
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        v = (1.0 + c * z) ** 3
        accept = (v > 0) & (
            torch.log(u) < 0.5 * z**2 + d - d * v + d * torch.log(v.clamp_min(1e-300))
        )
        out[pending[accept]] = (d * v)[accept]
        pending = pending[~accept]
    if boost:
        u = torch.rand(count, generator=generator, dtype=torch.float64)
        out = out * u ** (1.0 / shape)
    return out


def sample_beta(alpha: float, count: int, generator: torch.Generator) -> Tensor:
    """``count`` draws of Beta(α, α) as ``X / (X + Y)`` with ``X, Y ~ Gamma(α)`` (float64, CPU)."""
    x = sample_gamma(alpha, count, generator)
    y = sample_gamma(alpha, count, generator)
    return x / (x + y)


def mix_inputs(inputs: Tensor, partner: Tensor, lam: Tensor) -> Tensor:
    """``λ_i x_i + (1 − λ_i) x'_i`` with ``lam`` of shape ``[N]`` (``x' = x[π]`` for mixup)."""
    weights = lam.to(device=inputs.device, dtype=inputs.dtype).view(-1, *([1] * (inputs.dim() - 1)))
    return weights * inputs + (1 - weights) * partner


def cutmix_boxes(
    lam: Tensor, height: int, width: int, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Boxes ``[top, bottom) x [left, right)`` of area ≈ ``(1 − λ) H W``, centred uniformly and
    clipped to the image (Yun et al. 2019). Returns int64 tensors of shape ``[N]``."""
    ratio = torch.sqrt(1.0 - lam)
    box_h = (height * ratio).floor()
    box_w = (width * ratio).floor()
    centre_y = torch.randint(0, height, (lam.numel(),), generator=generator).double()
    centre_x = torch.randint(0, width, (lam.numel(),), generator=generator).double()
    top = (centre_y - box_h / 2).floor().clamp(0, height).long()
    bottom = (centre_y + box_h / 2).floor().clamp(0, height).long()
    left = (centre_x - box_w / 2).floor().clamp(0, width).long()
    right = (centre_x + box_w / 2).floor().clamp(0, width).long()
    return top, bottom, left, right


def cutmix_inputs(
    inputs: Tensor, partner: Tensor, lam: Tensor, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Paste a box of ``x'_i`` into ``x_i`` (inputs ``[N, C, H, W]``, ``x' = x[π]`` for CutMix);
    return the mixed inputs and the *exact* ``λ_i = 1 − box area / (H W)`` after clipping."""
    if inputs.dim() != 4:
        raise ValueError(
            f"CutMix needs image batches [N, C, H, W], got shape {tuple(inputs.shape)}"
        )
    height, width = inputs.shape[-2:]
    top, bottom, left, right = cutmix_boxes(lam, height, width, generator)
    rows = torch.arange(height).view(1, -1, 1)
    cols = torch.arange(width).view(1, 1, -1)
    inside = (
        (rows >= top.view(-1, 1, 1))
        & (rows < bottom.view(-1, 1, 1))
        & (cols >= left.view(-1, 1, 1))
        & (cols < right.view(-1, 1, 1))
    )  # [N, H, W]
    mask = inside.unsqueeze(1).to(inputs.device)
    mixed = torch.where(mask, partner, inputs)
    exact_lam = 1.0 - inside.flatten(1).double().mean(1)
    return mixed, exact_lam


# -- targets ----------------------------------------------------------------------------------
def mix_soft_targets(
    targets: Tensor, partner: Tensor, lam: Tensor, label_smoothing: float = 0.0
) -> Tensor:
    """``λ t + (1 − λ) t'`` for float targets ``[N, C, ...]``, then ``(1 − ε) t + ε / C``."""
    weights = lam.to(device=targets.device, dtype=targets.dtype).view(
        -1, *([1] * (targets.dim() - 1))
    )
    mixed = weights * targets + (1 - weights) * partner
    if label_smoothing:
        mixed = (1 - label_smoothing) * mixed + label_smoothing / targets.shape[1]
    return mixed


class MixedLabels(Tensor):
    """Integer labels carrying their mixup partner; see the module docstring.

    Attributes:
        labels_a: The batch's own labels ``y``.
        labels_b: The partner labels ``y_π`` (None when the partner is ``soft_partner``).
        soft_partner: Float partner targets ``[N, C]`` (running mixup), else None.
        lam: ``λ`` per sample, shape ``[N]``.
        label_smoothing: Used when the loss call does not set its own.
        on_soft_targets: Called with the (unsmoothed) soft targets of this batch when the loss
            is computed, so running mixup can mix the next batch with them.
    """

    labels_a: Tensor
    labels_b: Tensor | None
    soft_partner: Tensor | None
    lam: Tensor
    label_smoothing: float
    on_soft_targets: Callable[[Tensor], None] | None

    @staticmethod
    def __new__(
        cls,
        labels_a: Tensor,
        lam: Tensor,
        *,
        labels_b: Tensor | None = None,
        soft_partner: Tensor | None = None,
        label_smoothing: float = 0.0,
        on_soft_targets: Callable[[Tensor], None] | None = None,
    ) -> MixedLabels:
        if (labels_b is None) == (soft_partner is None):
            raise ValueError("give exactly one of labels_b and soft_partner")
        lam_view = lam.to(labels_a.device).view(-1, *([1] * (labels_a.dim() - 1)))
        if labels_b is not None:
            dominant = torch.where(lam_view >= 0.5, labels_a, labels_b)
        else:
            assert soft_partner is not None
            partner_labels = soft_partner.argmax(1).to(labels_a.device)
            dominant = torch.where(lam_view >= 0.5, labels_a, partner_labels)
        instance = Tensor._make_subclass(cls, dominant.detach())
        instance.labels_a = labels_a
        instance.labels_b = labels_b
        instance.soft_partner = soft_partner
        instance.lam = lam
        instance.label_smoothing = label_smoothing
        instance.on_soft_targets = on_soft_targets
        return instance

    @classmethod
    def __torch_function__(
        cls, func: Callable[..., Any], types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.cross_entropy:
            return _mixed_cross_entropy(*args, **kwargs)
        if func in _UNSUPPORTED and any(
            isinstance(a, MixedLabels) for a in (*args, *kwargs.values())
        ):
            raise MixupLossError(
                f"MixupCallback cannot make {func.__name__} exact for mixed labels. Supported: "
                f"{SUPPORTED_FORMS}."
            )
        with torch._C.DisableTorchFunctionSubclass():
            return func(*_plain(args), **_plain(kwargs))


def _plain(value: Any) -> Any:
    """Replace ``MixedLabels`` by plain tensors of their dominant labels (recursively)."""
    if isinstance(value, MixedLabels):
        return value.as_subclass(Tensor)
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


_UNSUPPORTED = {
    F.nll_loss,
    F.mse_loss,
    F.l1_loss,
    F.smooth_l1_loss,
    F.huber_loss,
    F.binary_cross_entropy,
    F.binary_cross_entropy_with_logits,
    F.kl_div,
    F.poisson_nll_loss,
    F.gaussian_nll_loss,
    F.multi_margin_loss,
    F.multilabel_margin_loss,
    F.multilabel_soft_margin_loss,
    F.soft_margin_loss,
    F.hinge_embedding_loss,
    F.margin_ranking_loss,
    F.cosine_embedding_loss,
    F.ctc_loss,
    F.one_hot,  # a one-hot of the dominant labels would silently drop the partner
}


def _mixed_cross_entropy(
    input: Tensor,
    target: MixedLabels,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """Exact mixed cross-entropy.

    With per-sample terms ``ℓ_i(y) = w_y CE_i(y)`` (PyTorch's ``reduction="none"``, zero for
    ``ignore_index``), the loss is ``Σ_i [λ_i ℓ_i(y_i) + (1 − λ_i) ℓ_i(y_π(i))] / D`` with
    ``D = Σ_i [λ_i w(y_i) + (1 − λ_i) w(y_π(i))]`` for ``"mean"`` (``w = 1`` without weights, ``0``
    for ignored targets) and ``D = 1`` for ``"sum"``. For a per-batch λ this is exactly
    ``λ CE(f, y) + (1 − λ) CE(f, y_π)`` with the same arguments; without weights or ignored
    targets it is ``mean_i[λ_i CE_i(y_i) + (1 − λ_i) CE_i(y_π(i))]``.
    """
    if size_average is not None or reduce is not None:
        raise MixupLossError("the deprecated size_average / reduce arguments are not supported")
    if isinstance(input, MixedLabels) or not isinstance(target, MixedLabels):
        raise MixupLossError(
            f"mixed labels must be the target of cross_entropy. {SUPPORTED_FORMS}."
        )
    smoothing = label_smoothing or target.label_smoothing
    logits = input
    labels_a = target.labels_a
    lam = target.lam.to(device=logits.device, dtype=logits.dtype)
    if target.soft_partner is not None:  # running mixup: the partner is a soft distribution
        classes = logits.shape[1]
        if bool((labels_a == ignore_index).any()):
            raise MixupLossError("running mixup does not support ignore_index targets")
        soft = mix_soft_targets(
            F.one_hot(labels_a, classes).to(logits.dtype), target.soft_partner.to(logits), lam
        )
        if target.on_soft_targets is not None:
            target.on_soft_targets(soft.detach())
        return F.cross_entropy(
            logits, soft, weight=weight, reduction=reduction, label_smoothing=smoothing
        )
    labels_b = target.labels_b
    assert labels_b is not None
    options = dict(weight=weight, ignore_index=ignore_index, label_smoothing=smoothing)
    loss_a = F.cross_entropy(logits, labels_a, reduction="none", **options)
    loss_b = F.cross_entropy(logits, labels_b, reduction="none", **options)
    lam = lam.view(-1, *([1] * (loss_a.dim() - 1)))
    total = lam * loss_a + (1 - lam) * loss_b
    if target.on_soft_targets is not None and labels_a.dim() == 1:
        classes = logits.shape[1]
        valid_a, valid_b = labels_a.clamp_min(0), labels_b.clamp_min(0)
        soft = mix_soft_targets(
            F.one_hot(valid_a, classes).to(logits.dtype),
            F.one_hot(valid_b, classes).to(logits.dtype),
            lam.flatten(),
        )
        target.on_soft_targets(soft.detach())
    if reduction == "none":
        return total
    if reduction == "sum":
        return total.sum()
    if reduction != "mean":
        raise ValueError(f"unknown reduction {reduction!r}")

    def class_weight(labels: Tensor) -> Tensor:
        valid = labels != ignore_index
        if weight is None:
            return valid.to(logits.dtype)
        return torch.where(valid, weight.to(logits.dtype)[labels.clamp_min(0)], 0.0)

    denominator = (lam * class_weight(labels_a) + (1 - lam) * class_weight(labels_b)).sum()
    return total.sum() / denominator
