"""Pure mixup math: the exact mixed cross-entropy, CutMix areas, Beta sampling, clear errors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from lightning_kfac.mixup import (
    MixedLabels,
    MixupLossError,
    UnmixedLabels,
    cutmix_inputs,
    mix_inputs,
    sample_beta,
    sample_gamma,
    sampling,
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
    for alpha in (0.05, 0.2, 0.4, 1.0, 2.0):
        draws = sample_beta(alpha, 40000, gen)
        assert bool(((draws >= 0) & (draws <= 1)).all())
        assert float(draws.mean()) == pytest.approx(0.5, abs=0.01)
        variance = 1 / (4 * (2 * alpha + 1))  # Var Beta(a, a)
        assert float(draws.var()) == pytest.approx(variance, rel=0.05)


# -- sampling: validated, bounded, never NaN ----------------------------------------------------
@pytest.mark.parametrize("alpha", [math.nan, math.inf, -math.inf, -0.5, 0.0])
def test_invalid_alpha_raises_instead_of_hanging(alpha: float) -> None:
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="alpha must be finite and > 0"):
        sample_beta(alpha, 4, gen)
    with pytest.raises(ValueError, match="shape must be finite and > 0"):
        sample_gamma(alpha, 4, gen)


def test_rejection_sampler_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(0)
    monkeypatch.setattr(sampling, "MAX_REJECTION_ROUNDS", 0)
    with pytest.raises(RuntimeError, match="still rejected after 0 rounds"):
        sample_gamma(2.0, 3, gen)


@pytest.mark.parametrize("alpha", [1e-300, 1e-30, 5e-324])  # 5e-324: subnormal, both logs -inf
def test_tiny_alpha_gives_a_fair_coin_never_nan(alpha: float) -> None:
    gen = torch.Generator().manual_seed(1)
    draws = sample_beta(alpha, 4000, gen)
    assert not bool(torch.isnan(draws).any())
    assert bool(((draws == 0) | (draws == 1)).all())  # Beta(α, α) -> Bernoulli(1/2) as α -> 0
    assert float(draws.mean()) == pytest.approx(0.5, abs=0.05)
    # the ratio X / (X + Y) of the linear-space draws is 0 / 0 here: the reason for log space
    x, y = sample_gamma(alpha, 4000, gen), sample_gamma(alpha, 4000, gen)
    assert bool(torch.isnan(x / (x + y)).any())


def test_small_alpha_matches_the_beta_distribution_in_the_tails() -> None:
    """α = 0.01: Gamma draws underflow often, yet P(λ < 0.1) = I_0.1(α, α) exactly."""
    gen = torch.Generator().manual_seed(2)
    alpha = 0.01
    draws = sample_beta(alpha, 40000, gen)
    assert bool(((draws >= 0) & (draws <= 1)).all()) and not bool(torch.isnan(draws).any())
    # regularized incomplete beta by Simpson's rule on t = u^(1/α) (smooth integrand), float64
    u = torch.linspace(0, 0.1**alpha, 20001, dtype=torch.float64)
    integrand = (1 - u ** (1 / alpha)) ** (alpha - 1) / alpha
    weights = torch.ones_like(u)
    weights[1:-1:2], weights[2:-1:2] = 4, 2
    incomplete = float((weights * integrand).sum() * (u[1] - u[0]) / 3)
    beta_function = math.exp(2 * math.lgamma(alpha) - math.lgamma(2 * alpha))
    expected = incomplete / beta_function
    assert float((draws < 0.1).double().mean()) == pytest.approx(expected, abs=0.01)


@pytest.mark.parametrize("alpha", [1e6, 1e300])
def test_huge_alpha_concentrates_at_one_half(alpha: float) -> None:
    gen = torch.Generator().manual_seed(3)
    draws = sample_beta(alpha, 40000, gen)
    variance = 1 / (4 * (2 * alpha + 1))
    assert float((draws - 0.5).abs().max()) < 10 * math.sqrt(variance) + 1e-15
    if alpha == 1e6:
        assert float(draws.var()) == pytest.approx(variance, rel=0.05)


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool])
def test_mix_inputs_refuses_integer_inputs(dtype: torch.dtype) -> None:
    x = torch.ones(4, 3, dtype=dtype)
    with pytest.raises(TypeError, match=r"mixup mixes float inputs.*Mix embeddings inside"):
        mix_inputs(x, x.flip(0), torch.full((4,), 0.3, dtype=torch.float64))


# -- MixedLabels keep their mix, or raise --------------------------------------------------------
def mixed(n: int = 12, classes: int = 5, shape: tuple[int, ...] = ()):
    """Logits, per-sample λ, labels y of shape [n, *shape], partner y[perm], and MixedLabels."""
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(n, classes, *shape, dtype=torch.float64, generator=gen)
    y = torch.randint(0, classes, (n, *shape), generator=gen)
    perm = torch.randperm(n, generator=gen)
    lam = torch.rand(n, dtype=torch.float64, generator=gen)
    return logits.requires_grad_(), lam, y, y[perm], MixedLabels(y, lam, labels_b=y[perm])


def explicit_mixed_ce(logits, lam, y_a, y_b, ignore_index: int = -100) -> torch.Tensor:
    """``Σ_e [λ ℓ(y_a) + (1 − λ) ℓ(y_b)] / Σ_e [λ [y_a valid] + (1 − λ) [y_b valid]]``, float64,
    one element at a time (λ of the element's sample)."""
    numerator = torch.zeros((), dtype=torch.float64)
    denominator = 0.0
    for position in itertools.product(*(range(size) for size in y_a.shape)):
        row = logits[(position[0], slice(None), *position[1:])]  # logits [N, C, ...]
        log_p = row.log_softmax(0)
        sample = position[0]
        for weight, label in ((lam[sample], y_a[position]), (1 - lam[sample], y_b[position])):
            if int(label) != ignore_index:
                numerator = numerator - weight * log_p[int(label)]
                denominator += float(weight)
    return numerator / denominator


CARRIED = {
    "long": lambda y: y.long(),
    "to(torch.long)": lambda y: y.to(torch.long),
    "to('cpu')": lambda y: y.to("cpu"),
    "to(device)": lambda y: y.to(torch.device("cpu")),
    "cpu": lambda y: y.cpu(),
    "clone": lambda y: y.clone(),
    "detach": lambda y: y.detach(),
    "contiguous": lambda y: y.contiguous(),
    "view(-1)": lambda y: y.view(-1),
    "reshape(-1)": lambda y: y.reshape(-1),
    "flatten": lambda y: y.flatten(),
    "torch.flatten": lambda y: torch.flatten(y),
    "unsqueeze.squeeze": lambda y: y.unsqueeze(1).squeeze(),
    "unsqueeze.view(-1)": lambda y: y.unsqueeze(1).view(-1),
    "view(-1, 1).squeeze(1)": lambda y: y.view(-1, 1).squeeze(1),
    "flip.flip": lambda y: y.flip(0).flip(0),
    "cat(split)": lambda y: torch.cat(y.split(5)),
    "long.to.view.clone": lambda y: y.long().to("cpu").view(-1).clone(),
}


@pytest.mark.parametrize("op", CARRIED.values(), ids=CARRIED.keys())
def test_the_mix_follows_conversions_and_reshapes(op) -> None:
    logits, lam, y_a, y_b, labels = mixed()
    out = op(labels)
    assert type(out) is MixedLabels
    dominant = torch.where(lam >= 0.5, y_a, y_b)
    assert out.dtype == torch.int64 and torch.equal(out.as_subclass(torch.Tensor), dominant)
    expected = explicit_mixed_ce(logits, lam, y_a, y_b)
    assert_close(F.cross_entropy(logits, out), expected)
    assert_close(nn.CrossEntropyLoss()(logits, out), expected)
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, out), logits)
    (grad_ref,) = torch.autograd.grad(expected, logits)
    assert_close(grad, grad_ref)


def test_column_labels_flattened_like_hugging_face() -> None:
    """[N, 1] labels: ``F.cross_entropy(logits.view(-1, C), y.view(-1))`` is the mixed loss."""
    logits, lam, y_a, y_b, _ = mixed()
    labels = MixedLabels(y_a[:, None], lam, labels_b=y_b[:, None])
    assert labels.lam.shape == (12, 1)
    expected = explicit_mixed_ce(logits, lam, y_a, y_b)
    assert_close(F.cross_entropy(logits.view(-1, 5), labels.view(-1)), expected)
    assert_close(F.cross_entropy(logits, labels.squeeze(1)), expected)
    assert_close(F.cross_entropy(logits, labels.reshape(-1).long()), expected)
    # un-flattened: the [N, C, 1] logits of an [N, 1] target
    assert_close(F.cross_entropy(logits.unsqueeze(-1), labels), expected)


def test_selections_apply_to_both_label_sets() -> None:
    logits, lam, y_a, y_b, labels = mixed()
    keep = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1, 0, 1, 1, 0], dtype=torch.bool)
    order = torch.tensor([3, 7, 0, 11, 5])
    for select in (keep, order, slice(2, 9)):
        out = labels[select]
        assert type(out) is MixedLabels
        expected = explicit_mixed_ce(logits[select], lam[select], y_a[select], y_b[select])
        assert_close(F.cross_entropy(logits[select], out), expected)
    flipped = torch.flip(labels, [0])
    expected = explicit_mixed_ce(logits.flip(0), lam.flip(0), y_a.flip(0), y_b.flip(0))
    assert_close(F.cross_entropy(logits.flip(0), flipped), expected)


def test_device_moves_take_the_partner_and_lambda_along() -> None:
    _, _, _, _, labels = mixed()
    moved = labels.to("meta")
    assert type(moved) is MixedLabels
    assert moved.device.type == moved.labels_a.device.type == moved.labels_b.device.type == "meta"
    assert moved.lam.device.type == "meta" and moved.lam.dtype == torch.float64
    narrow = labels.to(torch.int32)
    assert narrow.labels_a.dtype == narrow.labels_b.dtype == torch.int32
    assert torch.equal(narrow.labels_b.long(), labels.labels_b)


CASTS = {
    "Tensor.float": lambda y: y.float(),
    "Tensor.double": lambda y: y.double(),
    "Tensor.to": lambda y: y.to(torch.float32),
    "Tensor.bool": lambda y: y.bool(),
}


@pytest.mark.parametrize("name", CASTS)
def test_casts_out_of_the_integers_raise_naming_the_op(name: str) -> None:
    *_, labels = mixed()
    with pytest.raises(MixupLossError, match=rf"{name} would turn mixed labels into"):
        CASTS[name](labels)


def test_sequence_labels_flattened_like_hugging_face() -> None:
    """[N, T] token labels with ``ignore_index``: λ of each sample broadcast over its tokens."""
    logits, lam, y_a, y_b, _ = mixed(n=6, classes=7, shape=(5,))  # logits [N, V, T]
    y_a[0, 3:] = -100  # padding, ignored
    y_a[4, :2] = -100
    perm = torch.tensor([2, 0, 5, 1, 4, 3])  # sample 4 is its own partner
    y_b = y_a[perm]
    labels = MixedLabels(y_a, lam, labels_b=y_b)
    flat_logits = logits.transpose(1, 2).reshape(-1, 7)  # Hugging Face: logits.view(-1, V)
    got = F.cross_entropy(flat_logits, labels.view(-1))
    expected = explicit_mixed_ce(logits, lam, y_a, y_b)
    assert_close(got, expected)
    assert_close(F.cross_entropy(logits, labels), expected)  # unflattened [N, V, T]
    per_token = F.cross_entropy(flat_logits, labels.view(-1), reduction="none")
    assert per_token.shape == (30,)
    # per-batch λ: exactly λ CE(y) + (1 − λ) CE(y_π) with the same flattening
    batch = MixedLabels(y_a, torch.full((6,), 0.3, dtype=torch.float64), labels_b=y_b)
    assert_close(
        F.cross_entropy(flat_logits, batch.view(-1)),
        0.3 * F.cross_entropy(flat_logits, y_a.view(-1))
        + 0.7 * F.cross_entropy(flat_logits, y_b.view(-1)),
    )


def derived_losses() -> dict:
    return {
        "F.one_hot": lambda logits, y: F.mse_loss(logits, F.one_hot(y, 5).double()),
        "Tensor.mul": lambda logits, y: -(logits.log_softmax(1) * F.one_hot(y, 5)).sum(1).mean(),
        "Tensor.gather": lambda logits, y: -logits.log_softmax(1).gather(1, y[:, None]).mean(),
        "Tensor.__getitem__": lambda logits, y: -logits.log_softmax(1)[torch.arange(12), y].mean(),
        "Tensor.add": lambda logits, y: F.cross_entropy(logits, (y + 1) - 1),  # origin: the first
        "torch.where": lambda logits, y: F.cross_entropy(logits, torch.where(y == 0, -100, y)),
        "Tensor.copy_": lambda logits, y: torch.empty(12, dtype=torch.long).copy_(y),
        "Tensor.__setitem__": lambda logits, y: (y.__setitem__(0, 3), F.cross_entropy(logits, y)),
        "modified in place": lambda logits, y: (
            y.view(-1).__setitem__(0, 3),  # through a view: the shared version counter sees it
            F.cross_entropy(logits, y),
        ),
    }


@pytest.mark.parametrize("name", derived_losses())
def test_ops_that_drop_the_mix_raise_before_a_loss_trains_on_it(name: str) -> None:
    logits, *_, labels = mixed()
    with pytest.raises(MixupLossError, match=name):
        derived_losses()[name](logits, labels)


def test_ops_that_drop_the_mix_still_compute_on_the_dominant_labels() -> None:
    """Metrics and logging keep working: values of the dominant labels, plain bool comparisons."""
    logits, lam, y_a, y_b, labels = mixed(n=5, classes=5)  # N == C: silent broadcasting bites
    dominant = torch.where(lam >= 0.5, y_a, y_b)
    hot = F.one_hot(labels, 5)
    assert type(hot) is UnmixedLabels and hot.origin == "F.one_hot"
    assert torch.equal(hot.as_subclass(torch.Tensor), F.one_hot(dominant, 5))
    assert type(hot.float()) is UnmixedLabels  # the mark survives further ops
    assert type(labels.view(-1) == 1) is torch.Tensor
    assert torch.equal(logits.argmax(1) == labels.view(-1), logits.argmax(1) == dominant)
    assert int(labels.max()) == int(dominant.max()) and labels.tolist() == dominant.tolist()
    with torch.no_grad():  # not a loss: combining with logits is fine without grad
        picked = logits[torch.arange(5), labels]
    assert_close(picked, logits.detach()[torch.arange(5), dominant])
    counts = torch.zeros(5, dtype=torch.long)
    counts.index_add_(0, labels, torch.ones(5, dtype=torch.long))  # labels as indices: fine
    assert type(counts) is torch.Tensor and torch.equal(counts, torch.bincount(dominant, None, 5))
    for options in (dict(average="micro"), dict(), dict(top_k=2), dict(ignore_index=3)):
        metric = torchmetrics.classification.MulticlassAccuracy(num_classes=5, **options)
        reference = torchmetrics.classification.MulticlassAccuracy(num_classes=5, **options)
        got = metric(logits.detach(), labels.long().view(-1))
        assert float(got) == pytest.approx(float(reference(logits.detach(), dominant)))
        assert all(type(getattr(metric, s)) is torch.Tensor for s in ("tp", "fp", "tn", "fn"))
