"""KFACDDPStrategy through Lightning with real gloo processes (``ddp_fork``), never mocked.

The central invariant (docs/design.md §8): R ranks × B samples give the same parameters as
1 rank × R·B samples, after several K-FAC steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader

from lightning_kfac import KFACDDPStrategy
from tests.lightning_support import SaveResult, TinyClassifier, relative_difference, trainer_kwargs

STEPS = 6


def fit(
    tmp_path: Path,
    name: str,
    *,
    devices: int,
    batch_size: int,
    module_kwargs: dict[str, Any] | None = None,
    strategy_kwargs: dict[str, Any] | None = None,
    **trainer_overrides: Any,
) -> dict[str, Any]:
    """Train with ``kfac_ddp_fork`` on ``devices`` CPU processes; return rank 0's result."""
    path = tmp_path / f"{name}.pt"
    options = dict(start_method="fork", kl_clip=1e-2, inverse_update_interval=2)
    options.update(strategy_kwargs or {})
    trainer_overrides.setdefault("max_steps", STEPS)
    trainer = pl.Trainer(
        strategy=KFACDDPStrategy(**options),
        devices=devices,
        callbacks=[SaveResult(path), *trainer_overrides.pop("callbacks", [])],
        **trainer_kwargs(tmp_path, **trainer_overrides),
    )
    trainer.fit(TinyClassifier(batch_size=batch_size, **(module_kwargs or {})))
    return torch.load(path)


@pytest.mark.parametrize("mode", ["broadcast_decompositions", "broadcast_gradients"])
@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_two_ranks_equal_one_rank_with_double_batch_float64(
    tmp_path: Path, mode: str, method: str
) -> None:
    options = dict(distribution_mode=mode, compute_method=method, factor_bucket_cap_mb=1e-4)
    two = fit(tmp_path, "two", devices=2, batch_size=8, strategy_kwargs=options)
    one = fit(tmp_path, "one", devices=1, batch_size=16, strategy_kwargs=options)
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["kfac_steps"] == one["kfac_steps"] == STEPS
    assert relative_difference(two["params"], one["params"]) <= 1e-9
    # Tiny buckets: several all-reduces per update, launched from the backward pass.
    assert two["buckets"]["buckets"] > 1
    # The first step's uses are agreed after its backward, so its buckets go at the step.
    assert two["buckets"]["launched_early"] == two["buckets"]["buckets"] * (STEPS - 1)


def test_k_fac_actually_changes_the_trajectory(tmp_path: Path) -> None:
    """Guards the equivalence tests: K-FAC must not silently be the identity."""
    kfac = fit(tmp_path, "kfac", devices=1, batch_size=16)
    sgd = pl.Trainer(
        devices=1,
        max_steps=STEPS,
        callbacks=[SaveResult(tmp_path / "sgd.pt")],
        **trainer_kwargs(tmp_path),
    )
    sgd.fit(TinyClassifier(batch_size=16))
    assert relative_difference(kfac["params"], torch.load(tmp_path / "sgd.pt")["params"]) > 1e-3


def test_gradient_accumulation_equals_larger_batch(tmp_path: Path) -> None:
    accumulated = fit(
        tmp_path,
        "acc",
        devices=2,
        batch_size=4,
        accumulate_grad_batches=2,
        strategy_kwargs=dict(factor_bucket_cap_mb=1e-4),
    )
    one = fit(tmp_path, "one", devices=1, batch_size=16)
    assert accumulated["kfac_steps"] == STEPS
    assert relative_difference(accumulated["params"], one["params"]) <= 1e-9
    # Factors are reduced once per update, from the final micro-batch's backward pass.
    assert accumulated["buckets"]["launched_early"] == accumulated["buckets"]["buckets"] * (
        STEPS - 1
    )


def test_adamw_with_two_param_groups_float32(tmp_path: Path) -> None:
    module_kwargs = dict(dtype=torch.float32, optimizer="adamw", lr=1e-2)
    two = fit(tmp_path, "two", devices=2, batch_size=8, module_kwargs=module_kwargs)
    one = fit(tmp_path, "one", devices=1, batch_size=16, module_kwargs=module_kwargs)
    assert relative_difference(two["params"], one["params"]) <= 1e-4


def test_manual_optimization_equals_automatic(tmp_path: Path) -> None:
    manual = fit(tmp_path, "manual", devices=2, batch_size=8, module_kwargs=dict(manual=True))
    automatic = fit(tmp_path, "auto", devices=2, batch_size=8)
    assert manual["kfac_steps"] == STEPS
    assert relative_difference(manual["params"], automatic["params"]) <= 1e-12


def test_validation_is_not_captured(tmp_path: Path) -> None:
    result = fit(
        tmp_path,
        "val",
        devices=2,
        batch_size=8,
        max_steps=-1,
        max_epochs=2,
        limit_val_batches=2,
        num_sanity_val_steps=2,
    )
    steps = result["global_step"]
    assert steps == 2 * 96 // 16
    assert set(result["factor_updates"].values()) == {
        steps
    }  # one per training step, none from validation


class RecordOrder(pl.Callback):
    """Checks the order: closure backward → K-FAC → on_before_optimizer_step → clipping → step."""

    def __init__(self) -> None:
        self.raw: dict[str, torch.Tensor] = {}
        self.checked = 0

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.raw = {n: p.grad.clone() for n, p in pl_module.named_parameters()}
        self.kfac_steps_before = trainer.strategy.preconditioner.steps

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer
    ) -> None:
        assert trainer.strategy.preconditioner.steps == self.kfac_steps_before + 1
        changed = [not torch.equal(p.grad, self.raw[n]) for n, p in pl_module.named_parameters()]
        assert all(changed)
        norm = torch.stack([p.grad.norm() for p in pl_module.parameters()]).norm()
        assert norm > 1e-3  # clipping (to 1e-3) has not happened yet
        self.checked += 1


def test_clipping_applies_to_preconditioned_gradient(tmp_path: Path) -> None:
    record = RecordOrder()
    trainer = pl.Trainer(  # popen with one device runs in this process: callbacks observable
        strategy=KFACDDPStrategy(start_method="popen", kl_clip=None),
        devices=1,
        max_steps=3,
        gradient_clip_val=1e-3,
        callbacks=[record],
        **trainer_kwargs(tmp_path),
    )
    model = TinyClassifier(batch_size=16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.fit(model)
    assert record.checked == 3
    # momentum SGD with clipped steps: each step moves parameters by at most lr·(1+0.9+0.81)·1e-3
    moved = torch.stack(
        [(p.detach() - before[n]).norm() for n, p in model.named_parameters()]
    ).norm()
    assert moved <= 0.1 * (1 + 1.9 + 2.71) * 1e-3 + 1e-12


def test_fp16_mixed_with_grad_scaler_matches_fp32(tmp_path: Path) -> None:
    module_kwargs = dict(dtype=torch.float32)
    fp32 = fit(tmp_path, "fp32", devices=1, batch_size=16, module_kwargs=module_kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    fp16 = fit(
        tmp_path,
        "fp16",
        devices=1,
        batch_size=16,
        module_kwargs=module_kwargs,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
    )
    assert fp16["skipped_steps"] == 0 and fp16["kfac_steps"] == STEPS
    # fp16 carries ~3 significant digits; 6 K-FAC steps compound it to a few 1e-3. Factors that
    # kept the loss scale (2^10, squared in G) would give a completely different trajectory.
    assert relative_difference(fp16["params"], fp32["params"]) <= 1e-2


def test_fp16_factors_equal_fp32_factors_after_one_step(tmp_path: Path) -> None:
    """The loss scale (2^12, squared in G) is divided out; factors are formed in fp32."""
    module_kwargs = dict(dtype=torch.float32)
    fp32 = fit(tmp_path, "fp32", devices=1, batch_size=16, module_kwargs=module_kwargs, max_steps=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    fp16 = fit(
        tmp_path,
        "fp16",
        devices=1,
        batch_size=16,
        module_kwargs=module_kwargs,
        max_steps=1,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
    )
    for name, (a32, g32) in fp32["factors"].items():
        a16, g16 = fp16["factors"][name]
        assert a16.dtype == g16.dtype == torch.float32
        assert float((a16 - a32).norm() / a32.norm()) < 5e-3, name
        assert float((g16 - g32).norm() / g32.norm()) < 5e-3, name


def test_fp16_overflow_skips_factor_update_with_the_step(tmp_path: Path) -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**60, growth_interval=1000)
    result = fit(
        tmp_path,
        "overflow",
        devices=1,
        batch_size=16,
        module_kwargs=dict(dtype=torch.float32),
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
    )
    # 2^60 overflows fp16 for every one of the 6 steps: the scaler skips them all, and K-FAC
    # rejects their factor batches on the device (its step counter advances with Lightning's).
    assert result["skipped_steps"] == result["global_step"] == result["kfac_steps"] == STEPS
    assert not any(result["factors_seen"].values())
    assert all(torch.isfinite(p).all() for p in result["params"].values())


def test_bf16_mixed_trains_close_to_fp32(tmp_path: Path) -> None:
    module_kwargs = dict(dtype=torch.float32)
    fp32 = fit(tmp_path, "fp32", devices=2, batch_size=8, module_kwargs=module_kwargs)
    bf16 = fit(
        tmp_path,
        "bf16",
        devices=2,
        batch_size=8,
        module_kwargs=module_kwargs,
        precision="bf16-mixed",
    )
    assert bf16["kfac_steps"] == STEPS
    assert relative_difference(bf16["params"], fp32["params"]) <= 5e-2


@pytest.mark.parametrize(
    ("name", "start_method"),
    [("kfac_ddp", "popen"), ("kfac_ddp_spawn", "spawn"), ("kfac_ddp_fork", "fork")],
)
def test_registered_names(tmp_path: Path, name: str, start_method: str) -> None:
    trainer = pl.Trainer(
        strategy=name, accelerator="cpu", devices=2, logger=False, default_root_dir=str(tmp_path)
    )
    assert isinstance(trainer.strategy, KFACDDPStrategy)
    assert trainer.strategy._start_method == start_method


def test_reimport_registration_is_safe() -> None:
    import importlib

    import lightning_kfac.pytorch_lightning as module

    importlib.reload(module)
    trainer = pl.Trainer(strategy="kfac_ddp_fork", accelerator="cpu", devices=1, logger=False)
    assert type(trainer.strategy).__name__ == "KFACDDPStrategy"


def test_strategy_rejects_several_optimizers(tmp_path: Path) -> None:
    class TwoOptimizers(TinyClassifier):
        def configure_optimizers(self):
            return [
                torch.optim.SGD(self.net[:3].parameters(), lr=0.1),
                torch.optim.SGD(self.net[3:].parameters(), lr=0.1),
            ]

    trainer = pl.Trainer(
        strategy=KFACDDPStrategy(start_method="popen"),
        devices=1,
        max_steps=1,
        **trainer_kwargs(tmp_path),
    )
    model = TwoOptimizers(batch_size=16, manual=True)
    with pytest.raises(ValueError, match="exactly one optimizer"):
        trainer.fit(model)


def test_validate_test_and_predict_leave_kfac_untouched(tmp_path: Path) -> None:
    strategy = KFACDDPStrategy(start_method="popen", kl_clip=None)
    trainer = pl.Trainer(
        strategy=strategy, devices=1, max_steps=2, **trainer_kwargs(tmp_path, limit_val_batches=1)
    )
    model = TinyClassifier(batch_size=16)
    trainer.fit(model)
    pre = strategy.preconditioner
    factors = {n: (block.a.value.clone(), block.g.value.clone()) for n, block in pre.blocks.items()}
    steps = pre.steps
    model.train()  # even in training mode, no hook is left on the module after fit
    loader = model.train_dataloader()
    trainer.validate(model, dataloaders=loader, verbose=False)
    trainer.test(model, dataloaders=loader, verbose=False)
    trainer.predict(
        model, dataloaders=DataLoader(torch.zeros(4, 2, 6, 6, dtype=torch.float64), batch_size=4)
    )
    model.train()
    model(torch.zeros(3, 2, 6, 6, dtype=torch.float64)).sum().backward()
    assert pre.steps == steps == 2
    for name, block in pre.blocks.items():
        assert not any(side.has_sum for side in block.sums.sides)
        assert torch.equal(block.a.value, factors[name][0])
        assert torch.equal(block.g.value, factors[name][1])


def test_strategy_and_preconditioner_share_one_validated_options_object() -> None:
    """No keyword list is repeated: both take ``KFACOptions`` fields, validated on construction
    (in the main process), with the closest name for a misspelt keyword."""
    from lightning_kfac import KFACOptions

    strategy = KFACDDPStrategy(damping=0.02, inverse_update_interval=3, find_unused_parameters=True)
    assert strategy.kfac_options == KFACOptions(damping=0.02, inverse_update_interval=3)
    assert strategy.kfac_options is not None
    base = KFACOptions(damping=0.5, kl_clip=None)
    assert KFACDDPStrategy(base, damping=0.1).kfac_options == KFACOptions(damping=0.1, kl_clip=None)
    with pytest.raises(TypeError, match="'dampin' \\(did you mean 'damping'\\?\\)"):
        KFACDDPStrategy(dampin=1e-3)
    with pytest.raises(ValueError, match="damping must be > 0"):
        KFACDDPStrategy(damping=0.0)
    with pytest.raises(
        ValueError, match="compute_method='cholesky' is not one of 'eigen', 'inverse'"
    ):
        KFACDDPStrategy(compute_method="cholesky")
