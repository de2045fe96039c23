"""Command-line options for K-FAC, generated from ``KFACOptions`` (no list of names repeated).

    parser = argparse.ArgumentParser()
    add_kfac_arguments(parser)                 # --kfac.damping, --kfac.inverse_update_interval, ...
    args = parser.parse_args()
    options = kfac_options_from_args(args)     # a validated KFACOptions
    trainer = Trainer(strategy=KFACDDPStrategy(options))

For plain ``argparse`` scripts. With Lightning's ``LightningCLI`` nothing is needed:
``--trainer.strategy=lightning_kfac.KFACDDPStrategy --trainer.strategy.damping=1e-2`` (or the
same in a YAML config) works, since the strategy's signature lists every K-FAC option
(``examples/train.py`` is such a script).

Every field of ``KFACOptions`` becomes ``--kfac.<name>``; values are parsed from text (numbers,
``none``, choice names, dtype names, module patterns for ``skip_modules``) and validated by
``KFACOptions`` itself, so a bad value is rejected with the same message as in Python.
Schedules (callables) are Python-only.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
from typing import Any

from lightning_kfac.kfac.options import KFACOptions

PREFIX = "kfac."


def _parse_value(text: str) -> Any:
    """``none`` → None; then int, float, or the text itself (choices and dtype names)."""
    if text.lower() == "none":
        return None
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            continue
    return text


def add_kfac_arguments(
    parser: argparse.ArgumentParser, defaults: KFACOptions | None = None
) -> None:
    """Add ``--kfac.<field>`` for every ``KFACOptions`` field (defaults: ``defaults`` or the
    library's)."""
    base = defaults or KFACOptions()
    group = parser.add_argument_group("K-FAC options (lightning_kfac.KFACOptions)")
    for field in dataclasses.fields(KFACOptions):
        value = getattr(base, field.name)
        shown = value.value if isinstance(value, enum.Enum) else value
        if field.name == "skip_modules":
            group.add_argument(
                f"--{PREFIX}{field.name}",
                dest=f"{PREFIX}{field.name}",
                nargs="*",
                default=list(value),
                help="module name / class name patterns left to the optimizer",
            )
            continue
        if callable(value) and not isinstance(value, type):
            continue
        group.add_argument(
            f"--{PREFIX}{field.name}",
            dest=f"{PREFIX}{field.name}",
            type=_parse_value,
            default=value,
            help=f"default: {shown}",
        )


def kfac_options_from_args(args: argparse.Namespace) -> KFACOptions:
    """The validated ``KFACOptions`` of parsed ``--kfac.*`` arguments."""
    values = {
        name.removeprefix(PREFIX): value
        for name, value in vars(args).items()
        if name.startswith(PREFIX)
    }
    return KFACOptions(**values)
