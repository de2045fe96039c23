"""Command lines: ``--kfac.*`` options come from ``KFACOptions`` and are validated by it;
``LightningCLI`` takes ``--trainer.strategy=lightning_kfac.KFACDDPStrategy`` with the K-FAC options
as ``--trainer.strategy.<name>`` or in a YAML config (with ``MixupCallback`` among the callbacks),
in both Lightning namespaces."""

from __future__ import annotations

import argparse
import dataclasses
import textwrap
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

from lightning_kfac import KFACDDPStrategy, KFACOptions, MixupCallback
from lightning_kfac.cli import add_kfac_arguments, kfac_options_from_args
from tests.lightning_support import TinyClassifier, destroy_process_group


def parse(*argv: str, defaults: KFACOptions | None = None) -> KFACOptions:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_kfac_arguments(parser, defaults)
    return kfac_options_from_args(parser.parse_args(list(argv)))


def test_every_option_has_a_flag_and_defaults_round_trip() -> None:
    parser = argparse.ArgumentParser()
    add_kfac_arguments(parser)
    flags = {action.dest for action in parser._actions}
    assert {f"kfac.{field.name}" for field in dataclasses.fields(KFACOptions)} <= flags
    assert parse() == KFACOptions()
    assert parse(defaults=KFACOptions(damping=0.5)) == KFACOptions(damping=0.5)


def test_values_are_parsed_and_validated_like_keywords() -> None:
    options = parse(
        "--kfac.damping", "1e-2",
        "--kfac.inverse_update_interval", "5",
        "--kfac.kl_clip", "none",
        "--kfac.compute_method", "inverse",
        "--kfac.factor_dtype", "float64",
        "--kfac.skip_modules", "head.*", "LayerNorm",
        "--kfac.damping", "3",
    )  # fmt: skip
    assert options == KFACOptions(
        damping=3.0,
        inverse_update_interval=5,
        kl_clip=None,
        compute_method="inverse",
        factor_dtype=torch.float64,
        skip_modules=("head.*", "LayerNorm"),
    )
    with pytest.raises(ValueError, match="damping must be > 0"):
        parse("--kfac.damping", "0")
    with pytest.raises(ValueError, match="factor_update_interval must be a positive integer"):
        parse("--kfac.factor_update_interval", "1.5")
    with pytest.raises(ValueError, match="distribution_mode='ring' is not one of"):
        parse("--kfac.distribution_mode", "ring")


# -- LightningCLI: the strategy's signature lists the K-FAC options ----------------------------
class CLIClassifier(TinyClassifier):
    """A LightningModule whose constructor LightningCLI can read."""

    def __init__(self, batch_size: int = 16) -> None:
        super().__init__(batch_size=batch_size)


def lightning_cli(args: list[str], tmp_path: Path, *, unified: bool = False) -> Any:
    if unified:
        import lightning.pytorch as L
        from lightning.pytorch.cli import LightningCLI

        from tests.test_lightning_unified import UnifiedClassifier

        class Model(UnifiedClassifier):
            def __init__(self, batch_size: int = 16) -> None:
                super().__init__(batch_size)

        model: type = Model
        seed = L.seed_everything
    else:
        from pytorch_lightning.cli import LightningCLI

        model = CLIClassifier
        seed = pl.seed_everything
    seed(0, verbose=False)
    defaults = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(tmp_path),
    }
    return LightningCLI(
        model,
        args=args,
        run=args[:1] == ["fit"],
        save_config_callback=None,
        trainer_defaults=defaults,
    )


def test_lightning_cli_strategy_class_path_and_options(tmp_path: Path) -> None:
    cli = lightning_cli(
        [
            "--trainer.strategy=lightning_kfac.KFACDDPStrategy",
            "--trainer.strategy.damping=0.03",
            "--trainer.strategy.kl_clip=null",
            "--trainer.strategy.skip_modules=[net.5]",
            "--trainer.strategy.compute_method=inverse",
            "--trainer.strategy.start_method=fork",
        ],
        tmp_path,
    )
    strategy = cli.trainer.strategy
    assert isinstance(strategy, KFACDDPStrategy)
    assert strategy.kfac_options == KFACOptions(
        damping=0.03, kl_clip=None, skip_modules=("net.5",), compute_method="inverse"
    )
    assert strategy._start_method == "fork"  # a DDPStrategy keyword, through **kwargs


def test_lightning_cli_yaml_config_fits_with_kfac_and_mixup(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        textwrap.dedent(
            """
            trainer:
              max_steps: 3
              strategy:
                class_path: lightning_kfac.KFACDDPStrategy
                init_args:
                  damping: 0.02
                  inverse_update_interval: 2
                  factor_dtype: float64
                  timeout: "0:05:00"
              callbacks:
                - class_path: lightning_kfac.MixupCallback
                  init_args:
                    alpha: 0.4
            """
        )
    )
    try:
        cli = lightning_cli(["fit", "--config", str(config)], tmp_path)
    finally:
        destroy_process_group()
    strategy = cli.trainer.strategy
    assert strategy.kfac_options == KFACOptions(
        damping=0.02, inverse_update_interval=2, factor_dtype=torch.float64
    )
    assert strategy._timeout == timedelta(minutes=5)
    assert isinstance(cli.trainer.callbacks[0], MixupCallback)
    assert cli.trainer.global_step == strategy.preconditioner.steps == 3


def test_lightning_cli_rejects_a_bad_option_value(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="damping must be > 0"):
        lightning_cli(
            ["--trainer.strategy=lightning_kfac.KFACDDPStrategy", "--trainer.strategy.damping=0"],
            tmp_path,
        )


def test_unified_lightning_cli(tmp_path: Path) -> None:
    pytest.importorskip("lightning.pytorch")
    from lightning_kfac.lightning import KFACDDPStrategy as Unified
    from lightning_kfac.lightning import MixupCallback as UnifiedMixup

    cli = lightning_cli(
        [
            "--trainer.strategy=lightning_kfac.lightning.KFACDDPStrategy",
            "--trainer.strategy.damping=0.05",
            "--trainer.callbacks+=lightning_kfac.lightning.MixupCallback",
            "--trainer.callbacks.alpha=0.2",
        ],
        tmp_path,
        unified=True,
    )
    assert isinstance(cli.trainer.strategy, Unified)
    assert cli.trainer.strategy.kfac_options.damping == 0.05
    assert isinstance(cli.trainer.callbacks[0], UnifiedMixup)
