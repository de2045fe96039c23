"""``--kfac.*`` command-line options come from ``KFACOptions`` and are validated by it."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch

from lightning_kfac import KFACOptions
from lightning_kfac.cli import add_kfac_arguments, kfac_options_from_args


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
