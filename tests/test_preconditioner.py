"""KFACPreconditioner on Linear layers against dense per-sample math in float64."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_kfac import KFACPreconditioner
from lightning_kfac.kfac import KFACCoverageWarning
from tests.helpers import assert_close, dense_damped_kron_solve, per_sample_factors

pytestmark = pytest.mark.usefixtures("float64")


def make_mlp(bias: bool, inplace: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 6, bias=bias), nn.ReLU(inplace=inplace), nn.Linear(6, 3, bias=bias)
    ).double()


def _matrix(model: nn.Module, name: str, bias: bool = True) -> torch.Tensor:
    """``[W b]`` gradient of child ``name`` (independent of the preconditioner's code)."""
    layer = dict(model.named_children())[name]
    if not bias:
        return layer.weight.grad.clone()
    return torch.cat([layer.weight.grad, layer.bias.grad[:, None]], dim=1)


def batch(n: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=gen, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=gen
    )


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("damping", [1e-3, 1e-1, 1.0])
def test_one_step_equals_dense_solve_from_per_sample_gradients(bias: bool, damping: float) -> None:
    # The reference differentiates w.r.t. the layer output, which an in-place ReLU would
    # overwrite: it runs on a twin without in-place ops (same weights, same function).
    reference_model, model = make_mlp(bias, inplace=False), make_mlp(bias, inplace=True)
    x, y = batch()
    references = {
        name: per_sample_factors(reference_model, layer, x, y, F.cross_entropy, bias=bias)
        for name, layer in reference_model.named_children()
        if isinstance(layer, nn.Linear)
    }
    pre = KFACPreconditioner(model, damping=damping, kl_clip=None)
    F.cross_entropy(model(x), y).backward()
    raw = {name: _matrix(model, name, bias) for name in references}
    for name, (_, _, grad) in references.items():
        assert_close(raw[name], grad, rtol=1e-10, atol=1e-13)
    pre.step()
    for name, (A, G, grad) in references.items():
        layer = pre.block(f"{name}.weight")
        assert_close(layer.a.value[0], A, rtol=1e-10, atol=1e-13)
        assert_close(layer.g.value[0], G, rtol=1e-10, atol=1e-13)
        expected = dense_damped_kron_solve(A, G, grad, damping)
        assert_close(pre.gradient_matrix(layer)[0], expected, rtol=1e-7, atol=1e-10)


def test_linear_on_sequences_is_weight_sharing_with_expand_convention() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Flatten(), nn.Linear(15, 2)).double()
    x = torch.randn(8, 3, 4)  # N=8 samples, T=3 positions
    y = torch.randint(0, 2, (8,))
    A, G, grad = per_sample_factors(model, model[0], x, y, F.cross_entropy, bias=True)
    pre = KFACPreconditioner(model, damping=1e-2, kl_clip=None)
    F.cross_entropy(model(x), y).backward()
    pre.step()
    layer = pre.block("0.weight")
    assert_close(layer.a.value[0], A, rtol=1e-10, atol=1e-13)
    assert_close(layer.g.value[0], G, rtol=1e-10, atol=1e-13)
    assert_close(
        _matrix(model, "0"),
        dense_damped_kron_solve(A, G, grad, 1e-2),
        rtol=1e-7,
        atol=1e-10,
    )


def test_inplace_activation_after_layer_gives_same_factors() -> None:
    x, y = batch()
    values = []
    for inplace in (False, True):
        model = make_mlp(True, inplace=inplace)
        pre = KFACPreconditioner(model, kl_clip=None)
        F.cross_entropy(model(x), y).backward()
        pre.step()
        values.append([pre.block(f"{n}.weight").g.value for n in ("0", "2")])
    for plain, inplace in zip(*values, strict=True):
        assert_close(inplace, plain, rtol=0, atol=0)


def test_gradient_accumulation_with_loss_scale_equals_concatenated_batch() -> None:
    x, y = batch(16)
    full = make_mlp(True)
    pre_full = KFACPreconditioner(full, kl_clip=None)
    F.cross_entropy(full(x), y).backward()
    pre_full.step()

    accumulated = make_mlp(True)
    # 1/2 for two micro-batches, times an AMP-like scale
    pre_acc = KFACPreconditioner(accumulated, kl_clip=None, loss_scale=0.5 * 1024.0)
    for half in (slice(0, 8), slice(8, 16)):
        (F.cross_entropy(accumulated(x[half]), y[half]) * pre_acc.loss_scale).backward()
    for p in accumulated.parameters():
        p.grad /= 1024.0
    pre_acc.step()
    for name in ("0", "2"):
        acc, ful = pre_acc.block(f"{name}.weight"), pre_full.block(f"{name}.weight")
        assert_close(acc.a.value, ful.a.value, rtol=1e-12)
        assert_close(acc.g.value, ful.g.value, rtol=1e-10)
        assert_close(_matrix(accumulated, name), _matrix(full, name), rtol=1e-8, atol=1e-12)


def test_grad_scaler_scale_is_divided_out_of_factors_and_kl_clip() -> None:
    x, y = batch()
    plain, scaled = make_mlp(True), make_mlp(True)
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.1)
    opt_scaled = torch.optim.SGD(scaled.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    pre_plain = KFACPreconditioner(plain, optimizer=opt_plain, kl_clip=1e-4)
    pre_scaled = KFACPreconditioner(scaled, optimizer=opt_scaled, kl_clip=1e-4, grad_scaler=scaler)
    F.cross_entropy(plain(x), y).backward()
    pre_plain.step()
    scaler.scale(F.cross_entropy(scaled(x), y)).backward()
    pre_scaled.step(grad_scale=scaler.get_scale())  # before unscale_: KL-clip divides it out
    assert float(pre_plain.last_step.kl_scale) < 1.0
    for name in ("0", "2"):
        assert_close(
            pre_scaled.block(f"{name}.weight").g.value,
            pre_plain.block(f"{name}.weight").g.value,
            rtol=1e-10,
        )
        assert_close(
            _matrix(scaled, name) / scaler.get_scale(), _matrix(plain, name), rtol=1e-8, atol=1e-12
        )


def test_factors_are_fp32_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).float()
    x, y = batch()
    x = x.float()
    reference = KFACPreconditioner(model, kl_clip=None)
    F.cross_entropy(model(x), y).backward()
    reference.step()
    model.zero_grad()
    pre = KFACPreconditioner(model, kl_clip=None)
    reference.remove_hooks()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    pre.step()
    for name in ("0", "2"):
        mine_factors = pre.block(f"{name}.weight").factors
        reference_factors = reference.block(f"{name}.weight").factors
        for mine, ref in zip(mine_factors, reference_factors, strict=True):
            assert mine.value.dtype == torch.float32
            # bf16 activations carry ~3 significant digits
            assert_close(mine.value, ref.value, rtol=5e-2, atol=5e-2)


def test_coverage_names_skipped_and_frozen_and_leaves_them_untouched() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)
    ).double()
    model[3].weight.requires_grad_(False)
    pre = KFACPreconditioner(model, kl_clip=None, skip_modules=["4"])
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    raw = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    with pytest.warns(KFACCoverageWarning) as caught:
        pre.step()
    message = str(caught[0].message)
    assert "4.weight (matched skip_modules)" in message
    # 3.bias is trained but its weight is frozen: not a Kronecker block, so it is named too.
    assert "3.bias (used by bias of a weight K-FAC does not train" in message
    assert sorted(pre.blocks) == ["0.weight", "1.weight", "2.weight"]
    assert pre.block("1.weight").unit_wise  # BatchNorm: unit-wise block
    for name, param in model.named_parameters():
        if name.startswith(("4.", "3.bias")):
            assert torch.equal(param.grad, raw[name]), name
        if name.startswith(("0.", "1.", "2.")):
            assert not torch.equal(param.grad, raw[name]), name
    assert "left to the optimizer: matched skip_modules" in pre.coverage_report()
    by_pattern = KFACPreconditioner(model, kl_clip=None, skip_modules=["[24]", nn.BatchNorm1d])
    F.cross_entropy(model(x), y).backward()
    with pytest.warns(KFACCoverageWarning):
        by_pattern.step()
    assert sorted(by_pattern.blocks) == ["0.weight"]


def test_no_tracked_parameter_and_bad_options_raise_clear_errors() -> None:
    model = make_mlp(True)
    with pytest.raises(ValueError, match=r"no trainable parameter"):
        KFACPreconditioner(model, kl_clip=None, skip_modules=[nn.Linear])
    with pytest.raises(ValueError, match="pass optimizer="):
        KFACPreconditioner(model)
    with pytest.raises(ValueError, match="factor_update_interval"):
        KFACPreconditioner(model, kl_clip=None, factor_update_interval=0)
    with pytest.raises(
        ValueError, match="compute_method='cholesky' is not one of 'eigen', 'inverse'"
    ):
        KFACPreconditioner(model, kl_clip=None, compute_method="cholesky")
    with pytest.raises(RuntimeError, match="before any training forward"):
        KFACPreconditioner(model, kl_clip=None).step()


def test_importing_the_package_does_not_import_wandb() -> None:
    import subprocess

    code = "import sys, lightning_kfac; assert 'wandb' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("damping", [1e-3, 1e-1])
def test_inverse_method_step_equals_dense_factored_tikhonov(damping: float) -> None:
    reference_model, model = make_mlp(True, inplace=False), make_mlp(True)
    x, y = batch()
    A, G, grad = per_sample_factors(
        reference_model, reference_model[2], x, y, F.cross_entropy, bias=True
    )
    pre = KFACPreconditioner(model, damping=damping, kl_clip=None, compute_method="inverse")
    F.cross_entropy(model(x), y).backward()
    pre.step()
    pi = torch.sqrt((torch.trace(A) / A.shape[0]) / (torch.trace(G) / G.shape[0]))
    damped = torch.kron(
        A + pi * damping**0.5 * torch.eye(A.shape[0]), G + damping**0.5 / pi * torch.eye(G.shape[0])
    )
    expected = torch.linalg.solve(damped, grad.mT.reshape(-1)).reshape(grad.shape[1], -1).mT
    assert_close(_matrix(model, "2"), expected, rtol=1e-7, atol=1e-10)


def test_coverage_table_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3)).double()
    pre = KFACPreconditioner(model, kl_clip=None)
    x, y = batch()
    with caplog.at_level("DEBUG", logger="lightning_kfac"):
        for _ in range(2):
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            pre.step()
    records = [r.getMessage() for r in caplog.records if "K-FAC coverage" in r.getMessage()]
    assert len(records) == 1
    assert "100.0 % of 63 trainable parameter elements" in records[0]
    assert "unit-wise" in records[0] and "norm in '1'" in records[0]
    assert pre.preconditioned_fraction == 1.0


def test_kl_clip_reads_the_current_learning_rate_of_each_param_group() -> None:
    model = make_mlp(True)
    optimizer = torch.optim.SGD(
        [{"params": model[0].parameters(), "lr": 0.1}, {"params": model[2].parameters(), "lr": 0.2}]
    )
    pre = KFACPreconditioner(model, optimizer=optimizer, kl_clip=1e-6, inverse_update_interval=1)
    x, y = batch()
    scales = []
    for lr_factor in (1.0, 10.0):
        for group, base in zip(optimizer.param_groups, (0.1, 0.2), strict=True):
            group["lr"] = base * lr_factor  # what an LR scheduler does
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        raw = {n: _matrix(model, n) for n in ("0", "2")}
        pre.step()
        kl = sum(
            lr**2 * float((_matrix(model, n) * raw[n]).sum())
            for n, lr in (("0", 0.1 * lr_factor), ("2", 0.2 * lr_factor))
        )
        scales.append(float(pre.last_step.kl_scale))
        # ν = sqrt(κ / S) with S = Σ lr² <P, dW>; the step holds νP, so Σ lr² <νP, dW> = κ / ν
        nu = scales[-1]
        assert nu < 1.0
        assert kl * nu == pytest.approx(1e-6, rel=1e-8)
    # same gradients, 10x the learning rate: ν shrinks 10x (the factors moved only slightly)
    assert scales[1] == pytest.approx(scales[0] / 10, rel=0.2)


def test_batch_dim_option_makes_sequence_first_batches_equal_batch_first() -> None:
    """``N`` is read from ``batch_dim`` of the first forward argument: a sequence-first model
    (inputs ``(T, N, d)``) with ``batch_dim=1`` gets exactly the factors of its batch-first twin,
    and with the default (N read as T) a G scaled by T/N — the silent error the option avoids."""

    class Model(nn.Module):
        def __init__(self, sequence_first: bool) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.layer = nn.Linear(4, 3)
            self.sequence_first = sequence_first

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.layer(x)
            return out.mean(0 if self.sequence_first else 1)

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(8, 5, 4, generator=gen)  # N = 8 samples, T = 5 positions
    y = torch.randint(0, 3, (8,), generator=gen)
    factors = {}
    for name, sequence_first, batch_dim in (
        ("batch_first", False, 0),
        ("sequence_first", True, 1),
        ("sequence_first_default", True, 0),
    ):
        model = Model(sequence_first)
        pre = KFACPreconditioner(model, kl_clip=None, batch_dim=batch_dim)
        inputs = x.transpose(0, 1) if sequence_first else x
        F.cross_entropy(model(inputs), y).backward()
        pre.step()
        factors[name] = (pre.block("layer.weight").a.value, pre.block("layer.weight").g.value)
    for got, expected in zip(factors["sequence_first"], factors["batch_first"], strict=True):
        assert_close(got, expected, rtol=1e-12, atol=1e-14)
    assert_close(factors["sequence_first_default"][1], factors["batch_first"][1] * 5 / 8)
    with pytest.raises(ValueError, match="batch_dim must be an integer"):
        KFACPreconditioner(Model(False), kl_clip=None, batch_dim=1.0)
