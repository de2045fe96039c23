"""Update intervals, schedules, and state_dict round trips."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_kfac import ComputeMethod, KFACPreconditioner
from tests.helpers import assert_close

pytestmark = pytest.mark.usefixtures("float64")


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(4 * 5 * 5, 3)
    ).double()


def data(step: int, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(n, 2, 5, 5, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def train(
    model: nn.Module, pre: KFACPreconditioner, opt: torch.optim.Optimizer, steps: range
) -> None:
    for step in steps:
        x, y = data(step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step()
        opt.step()


def test_update_intervals_are_honoured_exactly() -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pre = KFACPreconditioner(
        model, factor_update_interval=3, inverse_update_interval=4, kl_clip=None
    )
    captured_before_step, factor_updates, decompositions = [], [], []
    for step in range(13):
        x, y = data(step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        (layer,) = [s for spec, s in pre.capture.uses.items() if spec.site == "0"]
        captured_before_step.append(layer.has_sums)
        a_factor = pre.block("0.weight").a if pre.blocks else None
        before = a_factor.updates if a_factor else 0
        old_decomposition = a_factor.decomposition if a_factor else None
        pre.step()
        opt.step()
        a_factor = pre.block("0.weight").a
        factor_updates.append(a_factor.updates > before)
        decompositions.append(a_factor.decomposition is not old_decomposition)
    assert [s for s, c in enumerate(captured_before_step) if c] == [0, 3, 6, 9, 12]
    assert [s for s, u in enumerate(factor_updates) if u] == [0, 3, 6, 9, 12]
    assert [s for s, d in enumerate(decompositions) if d] == [0, 4, 8, 12]
    assert pre.steps == 13


def test_no_capture_in_eval_or_no_grad() -> None:
    model = make_model()
    pre = KFACPreconditioner(model, kl_clip=None)
    x, _ = data(0)
    model.eval()
    model(x)
    model.train()
    with torch.no_grad():
        model(x)
    assert pre.capture.training_forwards == 0
    assert not any(sums.has_sums for sums in pre.capture.uses.values())


def test_schedules_are_evaluated_at_each_step() -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen: list[int] = []

    def damping(step: int) -> float:
        seen.append(step)
        return 1e-2 / (1 + step)

    pre = KFACPreconditioner(
        model, damping=damping, kl_clip=lambda s: 1e-3, lr=lambda s: 0.1, inverse_update_interval=1
    )
    train(model, pre, opt, range(3))
    assert sorted(set(seen)) == [0, 1, 2]
    assert pre.last_step.damping == pytest.approx(1e-2 / 3)


def test_running_average_first_update_is_batch_then_decays() -> None:
    model = make_model()
    pre = KFACPreconditioner(model, kl_clip=None, factor_decay=0.9)
    batches = []
    for step in range(2):
        x, y = data(step)
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        relu_out = model[1](model[0](x)).flatten(1).detach()
        batches.append(torch.cat([relu_out, torch.ones(8, 1)], 1))
        pre.step()
        layer = pre.block("3.weight")
        if step == 0:
            assert_close(layer.a.value[0], batches[0].T @ batches[0] / 8)
    expected = 0.9 * (batches[0].T @ batches[0] / 8) + 0.1 * (batches[1].T @ batches[1] / 8)
    assert_close(layer.a.value[0], expected)


@pytest.mark.parametrize("method", list(ComputeMethod))
@pytest.mark.parametrize("split", [4, 5, 6])
def test_state_dict_round_trip_continues_identically(method: ComputeMethod, split: int) -> None:
    kwargs = dict(
        factor_update_interval=2,
        inverse_update_interval=3,
        compute_method=method,
        kl_clip=1e-2,
        lr=0.1,
    )
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pre = KFACPreconditioner(model, damping=lambda s: 1e-2 * (1 + s), **kwargs)
    train(model, pre, opt, range(split))
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    saved_pre = copy.deepcopy(pre.state_dict())
    train(model, pre, opt, range(split, 10))

    resumed = make_model()
    resumed.load_state_dict(saved_model)
    resumed_opt = torch.optim.SGD(resumed.parameters(), lr=0.1, momentum=0.9)
    resumed_opt.load_state_dict(saved_opt)
    resumed_pre = KFACPreconditioner(resumed, damping=lambda s: 1e-2 * (1 + s), **kwargs)
    resumed_pre.load_state_dict(saved_pre)
    train(resumed, resumed_pre, resumed_opt, range(split, 10))
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert_close(q, p, rtol=0, atol=0)


def test_state_dict_rejects_other_model() -> None:
    model = make_model()
    pre = KFACPreconditioner(model, kl_clip=None)
    train(model, pre, torch.optim.SGD(model.parameters(), lr=0.1), range(1))
    other = KFACPreconditioner(nn.Sequential(nn.Linear(3, 3)), kl_clip=None)
    with pytest.raises(ValueError, match="which this model does not have"):
        other.load_state_dict(pre.state_dict())
    with pytest.raises(ValueError, match="unknown format"):
        other.load_state_dict({"steps": 3, "layers": {}})


def test_inverse_method_records_and_uses_the_damping_of_its_inverses() -> None:
    """With ``compute_method="inverse"`` the damping is baked into the inverses at the
    inverse-update step: a scheduled damping's later values do not reach the step until the next
    inverse update, and ``last_step.damping`` (what the strategy logs) is the value in use. The
    step equals the dense factored-Tikhonov solve with that damping (not the current one)."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = lambda step: 1e-2 * (1 + step)  # noqa: E731
    pre = KFACPreconditioner(
        model,
        damping=schedule,
        compute_method="inverse",
        inverse_update_interval=3,
        factor_update_interval=100,  # factors fixed after step 0: only the damping moves
        kl_clip=None,
    )
    used = []
    for step in range(5):
        x, y = data(step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        layer = pre.block("3.weight") if pre.blocks else None
        raw = pre.gradient_matrix(layer).clone() if layer is not None else None
        pre.step()
        used.append(pre.last_step.damping)
        if step == 4:
            damping = schedule(3)  # the last inverse update
            a, g = layer.a.value[0], layer.g.value[0]
            pi = ((a.trace() / a.shape[0]) / (g.trace() / g.shape[0])).sqrt()
            eye_a, eye_g = torch.eye(a.shape[0]), torch.eye(g.shape[0])
            expected = torch.linalg.solve(g + damping**0.5 / pi * eye_g, raw[0]) @ torch.linalg.inv(
                a + pi * damping**0.5 * eye_a
            )
            assert_close(pre.gradient_matrix(layer)[0], expected, rtol=1e-9, atol=1e-12)
        opt.step()
    assert used == [schedule(0), schedule(0), schedule(0), schedule(3), schedule(3)]
