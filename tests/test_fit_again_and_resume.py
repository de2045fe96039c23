"""No silent restart of K-FAC (issue 18): a second ``fit`` continues it, a resume with other
options names each difference, a newly skipped module's state is dropped naming ``skip_modules``,
and a K-FAC checkpoint resumed without K-FAC says that its K-FAC state is dropped.

Two-rank runs use ``run_as_launched_ranks``: forked processes that look to Lightning as if
``torchrun`` started them, so that each keeps its Trainer across ``fit`` calls (Lightning refuses a
second ``fit`` with its fork and spawn launchers). One-rank runs happen in this process, where
warnings and the strategy are observable.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

from lightning_kfac import KFACDDPStrategy
from lightning_kfac.strategy import CHECKPOINT_MARKER
from tests.lightning_support import (
    TinyClassifier,
    destroy_process_group,
    fit_in_process,
    relative_difference,
    run_as_launched_ranks,
    trainer_kwargs,
)

MODES = ["broadcast_decompositions", "broadcast_gradients"]


class FreshSGD(TinyClassifier):
    """``configure_optimizers`` builds a new optimizer at each ``fit`` (as usual), without
    momentum: plain DDP's second ``fit`` then equals one longer fit exactly, stopped at an epoch
    boundary (Lightning restarts an interrupted epoch's data)."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def kfac_state(trainer: pl.Trainer) -> dict[str, Any]:
    pre = trainer.strategy.preconditioner
    return {
        "steps": pre.steps,
        "global_step": trainer.global_step,
        "factors": {n: [f.value.clone() for f in b.factors] for n, b in pre.blocks.items()},
    }


def fit_twice_and_once(rank: int, tmp_path: Path, mode: str) -> dict[str, Any]:
    """On each rank: fit 1 epoch, then fit on to 3 epochs with the same Trainer and module; and
    one fit of 3 epochs. 6 steps per epoch (96 samples, 2 ranks x 8); inverse updates every 4."""

    def strategy() -> KFACDDPStrategy:
        return KFACDDPStrategy(
            start_method="popen", inverse_update_interval=4, kl_clip=1e-2, distribution_mode=mode
        )

    twice = FreshSGD(batch_size=8)
    trainer = pl.Trainer(strategy=strategy(), devices=2, max_epochs=1, **trainer_kwargs(tmp_path))
    trainer.fit(twice)
    first = trainer.strategy.preconditioner.steps
    trainer.fit_loop.max_epochs = 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(twice)
    once = FreshSGD(batch_size=8)
    reference = pl.Trainer(strategy=strategy(), devices=2, max_epochs=3, **trainer_kwargs(tmp_path))
    reference.fit(once)
    return {
        "first_fit_steps": first,
        "twice": {"params": dict(twice.named_parameters()), **kfac_state(trainer)},
        "once": {"params": dict(once.named_parameters()), **kfac_state(reference)},
        "warnings": [str(w.message) for w in caught],
    }


@pytest.mark.parametrize("mode", MODES)
def test_second_fit_continues_kfac_like_one_longer_fit(tmp_path: Path, mode: str) -> None:
    results = run_as_launched_ranks(fit_twice_and_once, tmp_path, tmp_path, mode)
    for result in results:
        twice, once = result["twice"], result["once"]
        assert result["first_fit_steps"] == 6
        assert twice["global_step"] == once["global_step"] == 18
        assert twice["steps"] == once["steps"] == 18  # K-FAC's counter went on from 6
        assert relative_difference(twice["params"], once["params"]) <= 1e-12
        for name, values in once["factors"].items():
            for mine, reference in zip(twice["factors"][name], values, strict=True):
                assert torch.allclose(mine, reference, rtol=1e-12, atol=0), name
        # nothing about K-FAC's state is re-announced: no coverage warning, no resume warning
        assert not [w for w in result["warnings"] if "K-FAC" in w], result["warnings"]


def test_second_fit_of_another_module_starts_afresh(tmp_path: Path) -> None:
    strategy = KFACDDPStrategy(start_method="popen", kl_clip=None)
    trainer = fit_in_process(tmp_path, TinyClassifier(batch_size=16), strategy, max_steps=3)
    assert strategy.preconditioner.steps == 3
    trainer.fit_loop.epoch_loop.max_steps = 5
    other = TinyClassifier(batch_size=16)
    try:
        trainer.fit(other)
    finally:
        destroy_process_group()
    assert strategy.preconditioner.model is other
    assert strategy.preconditioner.steps == 2  # steps 3 and 4 of the Trainer, K-FAC's first two


def save_checkpoint(tmp_path: Path, **options: Any) -> Path:
    path = tmp_path / "kfac.ckpt"
    strategy = KFACDDPStrategy(start_method="popen", inverse_update_interval=2, **options)
    trainer = fit_in_process(tmp_path, TinyClassifier(batch_size=16), strategy, max_steps=3)
    trainer.save_checkpoint(path)
    return path


def resume(tmp_path: Path, path: Path, strategy: Any) -> tuple[pl.Trainer, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit_in_process(
            tmp_path, TinyClassifier(batch_size=16), strategy, max_steps=5, ckpt_path=path
        )
    return trainer, [str(w.message) for w in caught]


def test_resume_names_each_changed_option_once(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, damping=1e-3, kl_clip=1e-3, factor_decay=0.95)
    saved = torch.load(path, weights_only=True)["kfac"]["options"]  # plain data
    assert saved["damping"] == 1e-3 and saved["compute_method"] == "eigen"
    changed = {
        "damping": 1e-2,
        "kl_clip": None,
        "factor_decay": 0.9,
        "inverse_update_interval": 3,
        "approximation": "reduce",
        "compute_method": "inverse",
    }
    strategy = KFACDDPStrategy(start_method="popen", **changed)
    trainer, messages = resume(tmp_path, path, strategy)
    assert trainer.global_step == 5 and strategy.preconditioner.steps == 5
    named = [m for m in messages if m.startswith("K-FAC checkpoint saved with ")]
    for name in changed:
        mine = [m for m in named if m.startswith(f"K-FAC checkpoint saved with {name}=")]
        assert len(mine) == 1, (name, named)
    assert len(named) == len(changed), named
    (kl,) = [m for m in named if m.startswith("K-FAC checkpoint saved with kl_clip")]
    assert "kl_clip=0.001, resumed with kl_clip=None" in kl and "not clipped" in kl
    (method,) = [m for m in named if m.startswith("K-FAC checkpoint saved with compute_method")]
    assert "recomputed from the saved factors" in method


def test_resume_with_the_same_options_says_nothing_about_them(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, damping=1e-2)
    strategy = KFACDDPStrategy(start_method="popen", inverse_update_interval=2, damping=1e-2)
    _, messages = resume(tmp_path, path, strategy)
    assert not [m for m in messages if "K-FAC checkpoint" in m], messages


def test_checkpoint_without_saved_options_still_resumes(tmp_path: Path) -> None:
    """States saved before the options were recorded load as before (no comparison)."""
    path = save_checkpoint(tmp_path)
    checkpoint = torch.load(path, weights_only=False)
    del checkpoint["kfac"]["options"]
    torch.save(checkpoint, path)
    strategy = KFACDDPStrategy(start_method="popen", damping=5e-2)
    _, messages = resume(tmp_path, path, strategy)
    assert strategy.preconditioner.steps == 5
    assert not [m for m in messages if "K-FAC checkpoint saved with" in m], messages


def test_module_newly_skipped_on_resume_drops_its_state_naming_skip_modules(
    tmp_path: Path,
) -> None:
    path = save_checkpoint(tmp_path)
    strategy = KFACDDPStrategy(
        start_method="popen", inverse_update_interval=2, skip_modules="net.5"
    )
    trainer, messages = resume(tmp_path, path, strategy)
    assert any(m.startswith("K-FAC checkpoint saved with skip_modules=()") for m in messages)
    (dropped,) = [m for m in messages if "is dropped: skip_modules=" in m]
    assert "net.5.weight" in dropped and "skip_modules=['net.5']" in dropped
    assert trainer.global_step == 5
    blocks = strategy.preconditioner.blocks
    assert blocks and not any(name.startswith("net.5") for name in blocks)


def test_frozen_parameter_on_resume_is_named_as_frozen(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path)

    class Frozen(TinyClassifier):
        def __init__(self) -> None:
            super().__init__(batch_size=16)
            self.net[5].weight.requires_grad_(False)

    strategy = KFACDDPStrategy(start_method="popen")
    with pytest.raises(ValueError, match=r"net\.5\.weight, which does not require grad"):
        fit_in_process(tmp_path, Frozen(), strategy, max_steps=5, ckpt_path=path)


def test_kfac_checkpoint_resumed_without_kfac_says_the_state_is_dropped(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path)
    assert CHECKPOINT_MARKER in torch.load(path, weights_only=True)["callbacks"]
    with pytest.warns(UserWarning, match=r"K-FAC state .* is dropped unless the run resumes with"):
        trainer = fit_in_process(
            tmp_path, TinyClassifier(batch_size=16), "ddp", max_steps=5, ckpt_path=path
        )
    assert trainer.global_step == 5


def test_kfac_checkpoint_resumed_with_kfac_has_no_unclaimed_state(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path)
    strategy = KFACDDPStrategy(start_method="popen", inverse_update_interval=2)
    _, messages = resume(tmp_path, path, strategy)
    assert not [m for m in messages if "Please add the following callbacks" in m], messages
    assert strategy.preconditioner.steps == 5
