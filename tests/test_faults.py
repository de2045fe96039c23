"""Numerical faults never corrupt weights: documented fallbacks, each reported once."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_kfac import KFACNumericalWarning, KFACPreconditioner
from tests.helpers import assert_close, dense_damped_kron_solve


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3)).double()


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(8, 4, generator=gen, dtype=torch.float64), torch.randint(
        0, 3, (8,), generator=gen
    )


def backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()


def overflowing_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Activations of 1e25: finite in float64, but ``a a^T`` overflows a float32 factor."""
    x, y = batch(7)
    x[0, 1] = 1e25
    return x, y


def test_non_finite_factor_batch_is_skipped_and_step_uses_previous_factor() -> None:
    model = make_model()
    pre = KFACPreconditioner(
        model,
        kl_clip=None,
        damping=1e-2,
        inverse_update_interval=1,
        factor_dtype=torch.float32,
        inverse_dtype=torch.float64,
    )
    backward(model, *batch(0))
    pre.step()
    layer = pre.block("0.weight")
    a_before = layer.a.value.clone()
    g_before = layer.g.value.clone()

    x, y = overflowing_batch()
    backward(model, x, y)
    raw = pre.gradient_matrix(layer).clone()
    assert torch.isfinite(raw).all()
    with pytest.warns(KFACNumericalWarning, match="non-finite factor batch for 0.weight.A"):
        pre.step()
    assert torch.equal(layer.a.value, a_before)  # A batch rejected
    assert not torch.equal(layer.g.value, g_before)  # G batch was finite: folded in
    got = pre.gradient_matrix(layer)
    assert torch.isfinite(got).all()
    expected = dense_damped_kron_solve(
        a_before[0].double(), layer.g.value[0].double(), raw[0], 1e-2
    )
    assert_close(got[0], expected, rtol=1e-5, atol=1e-8)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second occurrence is not reported again
        backward(model, x, y)
        pre.step()


def test_non_finite_first_batch_leaves_raw_gradient() -> None:
    model = make_model()
    pre = KFACPreconditioner(model, kl_clip=None, factor_dtype=torch.float32)
    x, y = overflowing_batch()
    backward(model, x, y)
    raw = model[0].weight.grad.clone()
    with pytest.warns(KFACNumericalWarning):
        pre.step()
    assert not bool(pre.block("0.weight").a.seen)  # no accepted batch yet
    assert torch.equal(model[0].weight.grad, raw)


def test_eigh_failure_is_retried_in_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    reference_model, model = make_model(), make_model()
    reference = KFACPreconditioner(
        reference_model, kl_clip=None, factor_dtype=torch.float32, inverse_dtype=torch.float64
    )
    backward(reference_model, *batch(0))
    reference.step()

    real_eigh = torch.linalg.eigh

    def eigh_failing_in_float32(matrix: torch.Tensor, *args, **kwargs):
        if matrix.dtype == torch.float32:
            raise torch.linalg.LinAlgError("forced failure")
        return real_eigh(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", eigh_failing_in_float32)
    pre = KFACPreconditioner(
        model, kl_clip=None, factor_dtype=torch.float32, inverse_dtype=torch.float32
    )
    backward(model, *batch(0))
    with pytest.warns(KFACNumericalWarning, match="retried in float64"):
        pre.step()
    assert pre.block("0.weight").a.decomposition["eigenvectors"].dtype == torch.float64
    assert_close(model[0].weight.grad, reference_model[0].weight.grad, rtol=1e-12, atol=1e-14)


def test_eigh_failing_twice_falls_back_to_raw_gradient_and_recovers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = make_model()
    sgd_model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sgd_opt = torch.optim.SGD(sgd_model.parameters(), lr=0.5)
    pre = KFACPreconditioner(model, kl_clip=None)
    real_eigh = torch.linalg.eigh

    def always_failing(*args, **kwargs):
        raise torch.linalg.LinAlgError("forced failure")

    monkeypatch.setattr(torch.linalg, "eigh", always_failing)
    with pytest.warns(KFACNumericalWarning) as record:
        for step in range(2):
            x, y = batch(step)
            backward(model, x, y)
            backward(sgd_model, x, y)
            pre.step()
            opt.step()
            sgd_opt.step()
    messages = [str(w.message) for w in record if issubclass(w.category, KFACNumericalWarning)]
    assert len(messages) == 1 and "using the raw gradient" in messages[0]
    for p, q in zip(model.parameters(), sgd_model.parameters(), strict=True):
        assert torch.isfinite(p).all()
        assert torch.equal(p, q)  # the documented fallback: a plain SGD step on raw gradients

    monkeypatch.setattr(torch.linalg, "eigh", real_eigh)
    backward(model, *batch(5))
    raw = model[0].weight.grad.clone()
    pre.step()  # not an inverse-update step, but the missing decomposition is recomputed
    assert pre.block("0.weight").has_decomposition
    assert not torch.equal(model[0].weight.grad, raw)
