"""Pure mixup math: the exact mixed cross-entropy, CutMix areas, Beta sampling, clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_kfac.mixing import (
    MixedLabels,
    MixupLossError,
    cutmix_inputs,
    mix_inputs,
    sample_beta,
)
from tests.helpers import assert_close


def data(n: int = 12, classes: int = 5):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(n, classes, dtype=torch.float64, generator=gen, requires_grad=True)
    labels = torch.randint(0, classes, (n,), generator=gen)
    permutation = torch.randperm(n, generator=gen)
    return logits, labels, permutation


@pytest.mark.parametrize("per_sample", [False, True])
def test_mixed_cross_entropy_is_the_mixup_formula(per_sample: bool) -> None:
    logits, y, perm = data()
    lam = (
        torch.rand(12, dtype=torch.float64)
        if per_sample
        else torch.full((12,), 0.3, dtype=torch.float64)
    )
    labels = MixedLabels(y, lam, labels_b=y[perm])
    got = F.cross_entropy(logits, labels)
    per = lam * F.cross_entropy(logits, y, reduction="none") + (1 - lam) * F.cross_entropy(
        logits, y[perm], reduction="none"
    )
    assert_close(got, per.mean())
    assert_close(nn.CrossEntropyLoss()(logits, labels), per.mean())
    # gradients flow to the logits exactly as through the explicit formula
    (g_got,) = torch.autograd.grad(got, logits)
    (g_ref,) = torch.autograd.grad(per.mean(), logits)
    assert_close(g_got, g_ref)


@pytest.mark.parametrize(
    "options",
    [
        dict(weight=torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5], dtype=torch.float64)),
        dict(label_smoothing=0.1),
        dict(ignore_index=2),
        dict(
            weight=torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5], dtype=torch.float64),
            label_smoothing=0.2,
            ignore_index=4,
        ),
        dict(reduction="sum"),
        dict(reduction="none"),
    ],
)
def test_per_batch_lambda_equals_mixing_two_cross_entropy_calls(options: dict) -> None:
    logits, y, perm = data()
    lam = 0.35
    labels = MixedLabels(y, torch.full((12,), lam, dtype=torch.float64), labels_b=y[perm])
    expected = lam * F.cross_entropy(logits, y, **options) + (1 - lam) * F.cross_entropy(
        logits, y[perm], **options
    )
    assert_close(F.cross_entropy(logits, labels, **options), expected)
    assert_close(nn.CrossEntropyLoss(**options)(logits, labels), expected)


def test_metrics_and_comparisons_see_dominant_integer_labels() -> None:
    torchmetrics = pytest.importorskip("torchmetrics")
    logits, y, perm = data(n=5, classes=5)  # N == C: the case where silent broadcasting bites
    lam = torch.tensor([0.9, 0.2, 0.5, 0.7, 0.1], dtype=torch.float64)
    labels = MixedLabels(y, lam, labels_b=y[perm])
    dominant = torch.where(lam >= 0.5, y, y[perm])
    assert type(labels == 1) is torch.Tensor
    assert torch.equal(logits.argmax(1) == labels, logits.argmax(1) == dominant)
    assert labels.dtype == torch.int64 and labels.shape == (5,)
    metric = torchmetrics.classification.MulticlassAccuracy(num_classes=5, average="micro")
    expected = float((logits.argmax(1) == dominant).double().mean())
    assert float(metric(logits.detach(), labels)) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    "loss",
    [
        lambda logits, y: F.nll_loss(F.log_softmax(logits, 1), y),
        lambda logits, y: F.mse_loss(logits, F.one_hot(y, 5).double()),
        lambda logits, y: nn.MSELoss()(logits[:, 0], y),
        lambda logits, y: F.binary_cross_entropy_with_logits(logits[:, 0], y),
    ],
)
def test_unsupported_losses_raise_naming_the_supported_forms(loss) -> None:
    logits, y, perm = data()
    labels = MixedLabels(y, torch.full((12,), 0.4, dtype=torch.float64), labels_b=y[perm])
    with pytest.raises(MixupLossError, match=r"F\.cross_entropy\(logits, y\)"):
        loss(logits, labels)


def test_mix_inputs_formula() -> None:
    x = torch.randn(4, 3, 2, 2)
    perm = torch.tensor([2, 0, 3, 1])
    lam = torch.tensor([0.1, 0.5, 0.9, 1.0])
    got = mix_inputs(x, x[perm], lam)
    for i in range(4):
        assert_close(got[i], lam[i] * x[i] + (1 - lam[i]) * x[perm[i]], rtol=1e-6, atol=1e-7)


def test_cutmix_box_area_matches_lambda() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.zeros(64, 1, 16, 12)
    partner_marker = torch.arange(64, dtype=torch.float32).view(-1, 1, 1, 1) + 1
    x = x + partner_marker  # every image constant: its index + 1
    perm = torch.roll(torch.arange(64), 1)
    lam = sample_beta(1.0, 64, gen)
    mixed, exact = cutmix_inputs(x, x[perm], lam, gen)
    pasted = (mixed != x).flatten(1).double().mean(1)  # fraction taken from the partner
    assert_close(exact, 1 - pasted)  # the returned λ is exactly the kept area
    # before clipping the box has area (1 - λ): clipping only shrinks it
    assert bool((exact >= lam - 2 * (1 / 16 + 1 / 12) - 1e-9).all())
    inside = (mixed != x)[:, 0]
    for i in range(64):  # the pasted region is one axis-aligned box of the partner's pixels
        if inside[i].any():
            rows, cols = inside[i].any(1).nonzero(), inside[i].any(0).nonzero()
            box = inside[i, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
            assert bool(box.all())
            assert torch.equal(mixed[i, 0][inside[i]], x[perm[i], 0][inside[i]])


def test_beta_sampling_matches_moments() -> None:
    gen = torch.Generator().manual_seed(0)
    for alpha in (0.2, 0.4, 1.0, 2.0):
        draws = sample_beta(alpha, 40000, gen)
        assert bool(((draws >= 0) & (draws <= 1)).all())
        assert float(draws.mean()) == pytest.approx(0.5, abs=0.01)
        variance = 1 / (4 * (2 * alpha + 1))  # Var Beta(a, a)
        assert float(draws.var()) == pytest.approx(variance, rel=0.05)
